"""The exact op spellings of the training IR that attention is written in, and reading the compile-time
constants (scales, fills) off them.

The matchers compare targets against these tables (``fx.is_call``), never against op names: one table
per role, so a spelling is added in one place.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..fx import arg, is_call

aten = torch.ops.aten

SDPA = {aten.scaled_dot_product_attention.default}
FUSED_SDPA = {
    getattr(aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
    )
    if hasattr(aten, name)
}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SCORE_OPS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.baddbmm.default, aten.einsum.default}
VALUE_OPS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.einsum.default}
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default}
IDENTITY = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default}
MUL = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar}
DIV = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar}
TANH = {aten.tanh.default, aten.tanh_.default}
ADD = {aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar}
SUB = {aten.sub.Tensor, aten.sub.Scalar}
MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor}
WHERE = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
NOT = {aten.logical_not.default, aten.bitwise_not.default}
DROPOUT = {aten.dropout.default}
TRANSPOSE = {aten.transpose.int, aten.swapaxes.default, aten.swapdims.default}
PERMUTE = {aten.permute.default}
RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
EXPAND = {aten.expand.default}
CAT = {aten.cat.default, aten.concat.default, aten.concatenate.default}
SLICE = {aten.slice.Tensor}
ROW_MAX = {aten.amax.default, aten.max.dim}


def scalar(x) -> float | None:
    """The value of a compile-time constant scalar argument, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function":
        if x.target is aten.scalar_tensor.default:
            return scalar(x.args[0])
        if x.target is aten.full.default and len(x.args[0]) == 0:
            return scalar(x.args[1])
        if x.target is aten.full_like.default:
            return scalar(x.args[1])
        if x.target in (aten.lift_fresh_copy.default, aten.clone.default) or x.target in CASTS:
            return scalar(x.args[0])
    return None


def scale_of(node) -> tuple[float, fx.Node] | None:
    """(c, x) if `node` computes x * c or x / c with a constant c."""
    if is_call(node, MUL):
        a, b = node.args[:2]
        if (c := scalar(b)) is not None and isinstance(a, fx.Node):
            return c, a
        if (c := scalar(a)) is not None and isinstance(b, fx.Node):
            return c, b
    if is_call(node, DIV):
        if len(node.args) > 2 or node.kwargs.get("rounding_mode") is not None:
            return None
        a, b = node.args[:2]
        if (c := scalar(b)) is not None and isinstance(a, fx.Node) and c != 0:
            return 1.0 / c, a
    return None


def row_max_of(node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(x, nodes) if `node` is the max of `x` over its last dim with keepdim: ``x.amax(-1, keepdim=True)``
    or ``x.max(-1, keepdim=True).values`` (the getitem of ``aten.max.dim``), seen through a detach."""
    nodes = []
    if is_call(node, {aten.detach.default}):
        nodes.append(node)
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        if node.args[1] != 0 or not is_call(node.args[0], {aten.max.dim}):
            return None
        nodes.append(node)
        node = node.args[0]
    if not is_call(node, ROW_MAX):
        return None
    x = node.args[0]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    dims = arg(node, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if [d % val.dim() for d in dims] != [val.dim() - 1] or not arg(node, "keepdim", False):
        return None
    return x, [*nodes, node]
