"""The layout-letter algebra: which dim of a tensor plays which role in attention.

A layout is one letter per dim: B (batch), H (heads), S (query position), K (key position), D (query/key
head dim), E (value head dim, which may differ from D: MLA), N (B*H merged into one dim, as in
``[B*H, S, D]`` bmm forms). Matchers describe q/k/v/mask/output in letters; this module looks through
transposes and constant scales, un-merges B*H, strips ``repeat_kv``, and reads sizes by letter, so the
rewrite only has to permute to the canonical ``BHSD`` / ``BHKD`` / ``BHKE`` / ``BHSK``.

Sizes are compared with ``statically_known_true``: two symbolic sizes are "the same" only when provably so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_symbols, statically_known_true

from ..fx import arg, is_call, ndim, value
from .ops import PERMUTE, RESHAPE, TRANSPOSE, aten, scale_of
from .results import NoMatch, tensor_shape


@dataclass
class Operand:
    node: fx.Node
    layout: str  # one letter per dim (see the module doc)


def same(a, b) -> bool:
    """Provably equal sizes."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def differ(a, b) -> bool:
    """Provably different sizes (sizes with unrelated symbols are not)."""
    if isinstance(a, int) and isinstance(b, int):
        return a != b
    try:
        return bool(statically_known_true(a != b))
    except Exception:
        return False


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = tensor_shape(a), tensor_shape(b)
    return len(sa) == len(sb) and all(same(x, y) for x, y in zip(sa, sb))


def is_symbolic(x) -> bool:
    return isinstance(x, torch.SymInt) and bool(free_symbols(x))


def norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def batch_letters(nd: int, what: str) -> str:
    """The letters before the two matrix dims of a 2-D, 3-D or 4-D attention operand."""
    if nd == 4:
        return "BH"
    if nd == 3:
        return "B"
    if nd == 2:
        return ""
    raise NoMatch(f"{what} on {nd}-D tensors; only 2-D, 3-D ([B*H, S, D]) and 4-D ([B, H, S, D]) are understood")


def is_canonical(layout: str, target: str) -> bool:
    return layout == "".join(c for c in target if c in layout)


def through_permute(node: fx.Node, layout: str) -> tuple[fx.Node, str] | None:
    """If `node` is a transpose/permute, its input and the input's layout."""
    if is_call(node, TRANSPOSE):
        n = len(layout)
        d0, d1 = norm_dim(node.args[1], n), norm_dim(node.args[2], n)
        lay = list(layout)
        lay[d0], lay[d1] = lay[d1], lay[d0]
        return node.args[0], "".join(lay)
    if is_call(node, PERMUTE):
        dims = [norm_dim(d, len(layout)) for d in node.args[1]]
        lay = [""] * len(layout)
        for i, d in enumerate(dims):
            lay[d] = layout[i]
        return node.args[0], "".join(lay)
    return None


def peel(op: Operand, target: str, with_scale: bool, peeled: set) -> tuple[Operand, float]:
    """Look through transposes (when they do not already give the canonical layout, or hide a
    scale) and, for q and k, constant scales; returns the operand and the product of the scales."""
    factor = 1.0
    node, layout = op.node, op.layout
    for _ in range(16):
        if with_scale and (s := scale_of(node)) is not None:
            factor *= s[0]
            peeled.add(node)
            node = s[1]
            continue
        inner = through_permute(node, layout)
        if inner is not None and (
            not is_canonical(layout, target) or (with_scale and scale_of(inner[0]) is not None)
        ):
            peeled.add(node)
            node, layout = inner
            continue
        break
    return Operand(node, layout), factor


def unmerge(node: fx.Node) -> fx.Node | None:
    """If `node` ([N, ...], N = B*H at dim 0) is a reshape of a [B, H, ...] tensor, that tensor."""
    if not is_call(node, RESHAPE | {aten.flatten.using_ints}):
        return None
    if node.target is aten.flatten.using_ints and tuple(node.args[1:3]) not in ((0, 1),):
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or not isinstance(value(src), torch.Tensor):
        return None
    ss, ns = tensor_shape(src), tensor_shape(node)
    if len(ss) != len(ns) + 1 or not same(ss[0] * ss[1], ns[0]):
        return None
    if not all(same(a, b) for a, b in zip(ss[2:], ns[1:])):
        return None
    return src


def split_heads(node: fx.Node) -> int | None:
    """H, if `node` is a reshape of a [N, ...] tensor into [B, H, ...] with N = B*H (BLOOM's
    ``scores.view(B, H, S, S)`` of a [B*H, S, S] baddbmm): the inverse of `unmerge`."""
    if not is_call(node, RESHAPE) or not isinstance(node.args[0], fx.Node):
        return None
    ss, ns = tensor_shape(node.args[0]), tensor_shape(node)
    if len(ns) != len(ss) + 1 or not isinstance(ns[1], int) or not same(ns[0] * ns[1], ss[0]):
        return None
    if not all(same(a, b) for a, b in zip(ss[1:], ns[2:])):
        return None
    return ns[1]


def strip_repeat(op: Operand, peeled: set) -> tuple[Operand, int]:
    """Undo repeat_kv (unsqueeze(2) -> expand -> reshape) or repeat_interleave(n, dim=1): GQA's shared
    key/value heads, un-repeated (the canonical op repeats them itself)."""
    node = op.node
    if op.layout not in ("BHKD", "BHKE"):
        return op, 1
    shape = tensor_shape(node)
    if is_call(node, {aten.repeat_interleave.self_int}):
        reps, dim = arg(node, "repeats"), arg(node, "dim")
        base = node.args[0]
        if isinstance(reps, int) and dim is not None and norm_dim(dim, 4) == 1 \
                and same(shape[1], tensor_shape(base)[1] * reps):
            peeled.add(node)
            return Operand(base, op.layout), reps
        return op, 1
    if not is_call(node, RESHAPE) or not is_call(node.args[0], {aten.expand.default}):
        return op, 1
    expand = node.args[0]
    x5 = expand.args[0]
    chain = [node, expand]
    while is_call(x5, {aten.slice.Tensor, aten.alias.default}) and same_shape(x5, x5.args[0]):
        chain.append(x5)
        x5 = x5.args[0]
    if is_call(x5, {aten.unsqueeze.default}) and norm_dim(x5.args[1], 5) == 2:
        base = x5.args[0]
    elif is_call(x5, RESHAPE) and ndim(x5.args[0]) == 4:
        base = x5.args[0]
    else:
        return op, 1
    chain.append(x5)
    if not isinstance(value(base), torch.Tensor) or ndim(base) != 4 or len(tensor_shape(expand)) != 5:
        return op, 1
    b, e = tensor_shape(base), tensor_shape(expand)
    n = e[2]
    if not isinstance(n, int) or not same(tensor_shape(x5)[2], 1):
        return op, 1
    ok = (
        same(e[0], b[0]) and same(e[1], b[1]) and same(e[3], b[2]) and same(e[4], b[3])
        and same(shape[0], b[0]) and same(shape[1], b[1] * n) and same(shape[2], b[2]) and same(shape[3], b[3])
    )
    if not ok:
        return op, 1
    peeled.update(chain)
    return Operand(base, op.layout), n


def canon_sizes(op: Operand, target: str, heads: int | None = None) -> dict[str, Any]:
    """Sizes of `op` by canonical letter (1 where the letter is missing; N splits as [N/heads, heads])."""
    sizes = dict(zip(op.layout, tensor_shape(op.node)))
    if "N" in sizes:
        n = sizes.pop("N")
        sizes["B"], sizes["H"] = n // heads, heads
    return {c: sizes.get(c, 1) for c in target}
