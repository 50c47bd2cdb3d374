"""Find attention in a captured FX graph and replace each occurrence by ONE canonical node.

Input: a `torch.fx.GraphModule` from `torch.export.export(..., strict=False).module()` (training
IR, aten ops, every node with `meta['val']`). Two families are recognised:

* `aten.scaled_dot_product_attention` (SDPA) nodes: `is_causal`, `attn_mask` (bool -> 'keep',
  float -> 'add'), `scale` (None -> D**-0.5), `dropout_p`, `enable_gqa` are read from the node.
* hand-written attention, anchored on a softmax over the last dim:

      scores = q @ k^T                  (matmul / bmm / mm / baddbmm / einsum, 2-D..4-D)
      scores = scores * c | / c         (constant scales, also folded into q and/or k)
      scores = c * tanh(scores / c)     (logit soft-capping, Gemma-2; before the mask)
      scores = masked_fill / where / + mask      (at most one mask)
      scores = casts                    (fp32 softmax: .float() ... .to(q.dtype))
      p      = softmax(scores, -1) -> casts -> dropout
      out    = p @ v                    (matmul / bmm / mm / einsum)

Each match is rewritten into `attention(q, k, v, mask, scale=..., causal=..., mask_kind=...,
fill=..., dropout_p=...)` on canonical `[B, H, S, D]` tensors (k/v un-repeated: GQA through
`repeat_kv` or `repeat_interleave` is stripped), with view/permute nodes inserted around it so the
rest of the graph sees the original layout. Masks are kept as they are (a later pass turns the mask
subgraph into a block mask); only `causal=True` from SDPA's `is_causal` sets `causal`.

A softmax over a sequence-sized dim (or fed by a product of two activations) that cannot be
understood is never left silently: `find_attention` lists it in `.unmatched`, and
`canonicalize_attention` raises `UnsupportedModelError` naming the op, module and source line.
"""

from __future__ import annotations

import math
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_symbols, statically_known_true

from ringify.errors import UnsupportedModelError

from .graph import escaping_users, is_assert, live_nodes, live_users, to_digraph, upstream_within

aten = torch.ops.aten
NEG_INF = float("-inf")

__all__ = [
    "attention",
    "AttentionMatch",
    "AttentionMatches",
    "UnmatchedSoftmax",
    "find_attention",
    "canonicalize_attention",
]


# --------------------------------------------------------------------------------------------
# The canonical op
# --------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    mask_kind: str | None = None,
    fill: float = NEG_INF,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Canonical attention. q [B,H,Sq,D]; k, v [B,H_kv,Sk,D] with H % H_kv == 0 (GQA: query head h
    reads kv head h // (H//H_kv)), un-repeated.

    mask broadcastable to [B,H,Sq,Sk]: mask_kind 'keep' (bool, True=attend; other scores become
    `fill`), 'add' (float bias added to the scaled scores), or None.
    causal: key j visible to query i iff j <= i (positions), combined with the mask by AND; masked
    causal scores are -inf. softcap (0 = off): scaled scores become softcap * tanh(s / softcap)
    before the mask. Half-precision inputs are computed in fp32; the result has q's dtype.
    A query row with no visible key (every score -inf) gives 0 with zero gradients, as SDPA does
    (a hand-written softmax would give NaN there).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-2, -1)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        if mask_kind == "keep":
            if mask.dtype != torch.bool:
                raise TypeError(f"attention: a 'keep' mask must be bool, got {mask.dtype}")
            s = s.masked_fill(mask.logical_not(), fill)
        elif mask_kind == "add":
            s = s + mask.to(ct)
        else:
            raise ValueError(f"attention: mask given with mask_kind={mask_kind!r}; use 'keep' or 'add'")
    if causal:
        sq, sk = s.shape[-2], s.shape[-1]
        visible = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(visible.logical_not(), NEG_INF)
    empty = s.amax(dim=-1, keepdim=True) == NEG_INF
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=True)
    return torch.matmul(p, v.to(ct)).to(q.dtype)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class _Operand:
    node: fx.Node
    layout: str  # one letter per dim: B H S(query) K(key) D(head) E(value head) N(=B*H merged)


@dataclass
class _Plan:
    anchor: fx.Node  # the softmax or SDPA node (meta source)
    out: fx.Node  # the node whose value the attention replaces
    out_layout: str
    q: _Operand
    k: _Operand
    v: _Operand
    mask: _Operand | None
    mask_kind: str | None  # 'keep' | 'add' | None
    fill: float  # value of dropped scores ('keep')
    mask_invert: bool  # masked_fill-style mask (True = drop): feed logical_not(mask)
    mask_factor: float  # additive mask applied before a scale: feed mask * factor
    scale_factor: float  # scales folded into q and k
    heads: int
    region: set[fx.Node]  # nodes replaced by the attention node
    peeled: set[fx.Node]  # layout / scale / repeat nodes looked through (die unless used elsewhere)


@dataclass
class AttentionMatch:
    """One attention found in a graph. Before `canonicalize_attention`, `output` is the node whose
    value the attention produces and query/key/value are the source tensors (see `layouts`); after,
    `output` is the `attention` call node and query/key/value/mask are its canonical inputs."""

    kind: str  # 'sdpa' | 'matmul' | 'bmm' | 'einsum' | 'mha' (any form inside nn.MultiheadAttention)
    form: str  # the op form: 'sdpa' | 'matmul' | 'bmm' | 'baddbmm' | 'einsum'
    output: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    scale: float
    causal: bool = False
    mask: fx.Node | None = None
    mask_kind: str | None = None
    fill: float = NEG_INF
    dropout_p: float = 0.0
    softcap: float = 0.0
    gqa: bool = False
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    module_path: str = ""
    module_type: str = ""
    source: str = ""
    matched: set[str] = field(default_factory=set)
    layouts: dict[str, str] = field(default_factory=dict)
    _plan: _Plan | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description, for reports (also stored as meta['ringify_attention'])."""

        def num(x):
            return x if isinstance(x, (int, float, type(None))) else str(x)

        return {
            "kind": self.kind,
            "form": self.form,
            "module_path": self.module_path,
            "module_type": self.module_type,
            "source": self.source,
            "scale": self.scale,
            "causal": self.causal,
            "mask": self.mask.name if self.mask is not None else None,
            "mask_kind": self.mask_kind,
            "fill": self.fill if self.mask_kind == "keep" else None,
            "dropout_p": self.dropout_p,
            "softcap": self.softcap,
            "gqa": self.gqa,
            "num_heads": num(self.num_heads),
            "num_kv_heads": num(self.num_kv_heads),
            "head_dim": num(self.head_dim),
            "matched": sorted(self.matched),
        }


@dataclass
class UnmatchedSoftmax:
    """A softmax (or attention op) that looks like attention but could not be canonicalised."""

    node: fx.Node
    op: str
    module_path: str
    module_type: str
    source: str
    reason: str
    hint: str

    def message(self) -> str:
        where = self.module_path or "<root>"
        if self.module_type:
            where += f" ({self.module_type})"
        return (
            f"`{self.node.name}` ({self.op}) in module {where} at {self.source or '<unknown source>'}: "
            f"{self.reason}. Hint: {self.hint}"
        )


class AttentionMatches(list):
    """`list[AttentionMatch]`, plus what looked like attention but was not understood."""

    def __init__(self, matches=(), unmatched=()):
        super().__init__(matches)
        self.unmatched: list[UnmatchedSoftmax] = list(unmatched)

    @property
    def unmatched_softmax(self) -> list[fx.Node]:
        return [u.node for u in self.unmatched]


class _NoMatch(Exception):
    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


# --------------------------------------------------------------------------------------------
# Op tables (exact spellings of the training IR)
# --------------------------------------------------------------------------------------------

_SDPA = {aten.scaled_dot_product_attention.default}
_FUSED_SDPA = {
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
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_SCORE_OPS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.baddbmm.default, aten.einsum.default}
_VALUE_OPS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.einsum.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default}
_IDENTITY = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default}
_MUL = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar}
_DIV = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar}
_TANH = {aten.tanh.default, aten.tanh_.default}
_ADD = {aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar}
_SUB = {aten.sub.Tensor, aten.sub.Scalar}
_MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor}
_WHERE = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
_NOT = {aten.logical_not.default, aten.bitwise_not.default}
_DROPOUT = {aten.dropout.default}
_TRANSPOSE = {aten.transpose.int, aten.swapaxes.default, aten.swapdims.default}
_PERMUTE = {aten.permute.default}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}

_HINT_GENERAL = (
    "write attention as torch.nn.functional.scaled_dot_product_attention (attn_implementation='sdpa' "
    "for HuggingFace models), or as softmax((q @ k^T) * scale [+ mask], dim=-1) @ v"
)
_HINT_SEQUENCE = (
    "a softmax over the sequence that is not attention mixes all positions, which ring attention "
    "cannot shard; keep that part (e.g. attention pooling) outside the module given to ringify"
)
_HINT_WEIGHTS = (
    "do not return or reuse the attention probabilities (output_attentions=False for HuggingFace "
    "models, need_weights=False for nn.MultiheadAttention): ring attention never materialises them"
)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _val(node) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node) -> tuple:
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        raise _NoMatch(f"no tensor metadata on `{getattr(node, 'name', node)}`", "capture with torch.export")
    return tuple(v.shape)


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _differ(a, b) -> bool:
    """Provably different (sizes with unrelated symbols are not)."""
    if isinstance(a, int) and isinstance(b, int):
        return a != b
    try:
        return bool(statically_known_true(a != b))
    except Exception:
        return False


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = _shape(a), _shape(b)
    return len(sa) == len(sb) and all(_same(x, y) for x, y in zip(sa, sb))


def _is_symbolic(x) -> bool:
    return isinstance(x, torch.SymInt) and bool(free_symbols(x))


def _is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _scalar(x) -> float | None:
    """The value of a compile-time constant scalar argument, else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function":
        if x.target is aten.scalar_tensor.default:
            return _scalar(x.args[0])
        if x.target is aten.full.default and len(x.args[0]) == 0:
            return _scalar(x.args[1])
        if x.target is aten.full_like.default:
            return _scalar(x.args[1])
        if x.target in (aten.lift_fresh_copy.default, aten.clone.default) or x.target in _CASTS:
            return _scalar(x.args[0])
    return None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _ndim(node) -> int:
    return len(_shape(node))


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _module_of(node: fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    if not isinstance(typ, str):
        typ = f"{typ.__module__}.{typ.__qualname__}"
    return path, typ


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _source_of(node: fx.Node) -> str:
    """file:line of the innermost frame outside torch itself (the user's or the model library's line)."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return ""
    outside = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    file, line, _ = (outside or frames)[-1]
    return f"{file}:{line}"


def _op_name(node: fx.Node) -> str:
    t = node.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def _fmt(node: fx.Node) -> str:
    return f"`{node.name}` ({_op_name(node)})"


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def _is_canonical(layout: str, target: str) -> bool:
    return layout == "".join(c for c in target if c in layout)


def _through_permute(node: fx.Node, layout: str) -> tuple[fx.Node, str] | None:
    """If `node` is a transpose/permute, its input and the input's layout."""
    if _is_call(node, _TRANSPOSE):
        n = len(layout)
        d0, d1 = _norm_dim(node.args[1], n), _norm_dim(node.args[2], n)
        lay = list(layout)
        lay[d0], lay[d1] = lay[d1], lay[d0]
        return node.args[0], "".join(lay)
    if _is_call(node, _PERMUTE):
        dims = [_norm_dim(d, len(layout)) for d in node.args[1]]
        lay = [""] * len(layout)
        for i, d in enumerate(dims):
            lay[d] = layout[i]
        return node.args[0], "".join(lay)
    return None


def _scale_of(node) -> tuple[float, fx.Node] | None:
    """(c, x) if `node` computes x * c or x / c with a constant c."""
    if _is_call(node, _MUL):
        a, b = node.args[:2]
        if (c := _scalar(b)) is not None and isinstance(a, fx.Node):
            return c, a
        if (c := _scalar(a)) is not None and isinstance(b, fx.Node):
            return c, b
    if _is_call(node, _DIV):
        if len(node.args) > 2 or node.kwargs.get("rounding_mode") is not None:
            return None
        a, b = node.args[:2]
        if (c := _scalar(b)) is not None and isinstance(a, fx.Node) and c != 0:
            return 1.0 / c, a
    return None


def _peel(op: _Operand, target: str, with_scale: bool, peeled: set) -> tuple[_Operand, float]:
    """Look through transposes (when they do not already give the canonical layout, or hide a
    scale) and, for q and k, constant scales; returns the operand and the product of the scales."""
    factor = 1.0
    node, layout = op.node, op.layout
    for _ in range(16):
        if with_scale and (s := _scale_of(node)) is not None:
            factor *= s[0]
            peeled.add(node)
            node = s[1]
            continue
        inner = _through_permute(node, layout)
        if inner is not None and (
            not _is_canonical(layout, target) or (with_scale and _scale_of(inner[0]) is not None)
        ):
            peeled.add(node)
            node, layout = inner
            continue
        break
    return _Operand(node, layout), factor


def _unmerge(node: fx.Node) -> fx.Node | None:
    """If `node` ([N, ...], N = B*H at dim 0) is a reshape of a [B, H, ...] tensor, that tensor."""
    if not _is_call(node, _RESHAPE | {aten.flatten.using_ints}):
        return None
    if node.target is aten.flatten.using_ints and tuple(node.args[1:3]) not in ((0, 1),):
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or not isinstance(_val(src), torch.Tensor):
        return None
    ss, ns = _shape(src), _shape(node)
    if len(ss) != len(ns) + 1 or not _same(ss[0] * ss[1], ns[0]):
        return None
    if not all(_same(a, b) for a, b in zip(ss[2:], ns[1:])):
        return None
    return src


def _strip_repeat(op: _Operand, peeled: set) -> tuple[_Operand, int]:
    """Undo repeat_kv (unsqueeze(2) -> expand -> reshape) or repeat_interleave(n, dim=1)."""
    node = op.node
    if op.layout not in ("BHKD", "BHKE"):
        return op, 1
    shape = _shape(node)
    if _is_call(node, {aten.repeat_interleave.self_int}):
        reps, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        base = node.args[0]
        if isinstance(reps, int) and dim is not None and _norm_dim(dim, 4) == 1 and _same(shape[1], _shape(base)[1] * reps):
            peeled.add(node)
            return _Operand(node.args[0], op.layout), reps
        return op, 1
    if not _is_call(node, _RESHAPE) or not _is_call(node.args[0], {aten.expand.default}):
        return op, 1
    expand = node.args[0]
    x5 = expand.args[0]
    chain = [node, expand]
    while _is_call(x5, {aten.slice.Tensor, aten.alias.default}) and _same_shape(x5, x5.args[0]):
        chain.append(x5)
        x5 = x5.args[0]
    if _is_call(x5, {aten.unsqueeze.default}) and _norm_dim(x5.args[1], 5) == 2:
        base = x5.args[0]
    elif _is_call(x5, _RESHAPE) and _ndim(x5.args[0]) == 4:
        base = x5.args[0]
    else:
        return op, 1
    chain.append(x5)
    if not isinstance(_val(base), torch.Tensor) or _ndim(base) != 4 or len(_shape(expand)) != 5:
        return op, 1
    b, e = _shape(base), _shape(expand)
    n = e[2]
    if not isinstance(n, int) or not _same(_shape(x5)[2], 1):
        return op, 1
    ok = (
        _same(e[0], b[0]) and _same(e[1], b[1]) and _same(e[3], b[2]) and _same(e[4], b[3])
        and _same(shape[0], b[0]) and _same(shape[1], b[1] * n) and _same(shape[2], b[2]) and _same(shape[3], b[3])
    )
    if not ok:
        return op, 1
    peeled.update(chain)
    return _Operand(base, op.layout), n


def _canon_sizes(op: _Operand, target: str, heads: int | None = None) -> dict[str, Any]:
    """Sizes of `op` by canonical letter (1 where the letter is missing; N splits as [N/heads, heads])."""
    sizes = dict(zip(op.layout, _shape(op.node)))
    if "N" in sizes:
        n = sizes.pop("N")
        sizes["B"], sizes["H"] = n // heads, heads
    return {c: sizes.get(c, 1) for c in target}


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    gm: fx.GraphModule
    g: Any
    live: set


@dataclass
class _Step:
    kind: str  # 'cast' | 'scale' | 'shift' | 'fill' | 'where' | 'add' | 'softcap'
    node: fx.Node
    value: float = 1.0  # scale factor, or fill value
    mask: fx.Node | None = None
    keep_true: bool = True  # where(cond, scores, fill): True entries of cond keep the score


def _score_inputs(node: fx.Node) -> list[tuple[fx.Node, _Step]]:
    """One step back from `node` along the scores chain: (upstream scores node, step) options."""
    t = node.target
    if t in _CASTS or t in _IDENTITY:
        if t in _CASTS and isinstance(_val(node.args[0]), torch.Tensor):
            if _val(node.args[0]).device != _val(node).device:
                raise _NoMatch(f"scores change device at {_fmt(node)}")
        return [(node.args[0], _Step("cast", node))]
    if (s := _scale_of(node)) is not None:
        return [(s[1], _Step("scale", node, value=s[0]))]
    if t in _MUL or t in _DIV:
        raise _NoMatch(f"scores are scaled by a non-constant at {_fmt(node)}", "scale by a Python number")
    if t in _TANH:  # soft-capping: c * tanh(scores / c), the scales around it are separate steps
        return [(node.args[0], _Step("softcap", node))]
    if t in _MASKED_FILL:
        x, m, value = node.args[:3]
        fill = _scalar(value)
        if fill is None:
            raise _NoMatch(f"masked_fill with a non-constant value at {_fmt(node)}", "fill with a Python float")
        return [(x, _Step("fill", node, value=fill, mask=m))]
    if t in _WHERE:
        cond, a, b = node.args[:3]
        fa, fb = _scalar(a), _scalar(b)
        if fb is not None and isinstance(a, fx.Node):
            return [(a, _Step("where", node, value=fb, mask=cond, keep_true=True))]
        if fa is not None and isinstance(b, fx.Node):
            return [(b, _Step("where", node, value=fa, mask=cond, keep_true=False))]
        raise _NoMatch(f"where() without a constant fill at {_fmt(node)}", "use torch.where(mask, scores, float('-inf'))")
    if t in _ADD or t in _SUB:
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
            raise _NoMatch(f"add/sub with alpha at {_fmt(node)}")
        a, b = node.args[:2]
        if _scalar(b) is not None:  # a constant shift: softmax does not see it
            return [(a, _Step("shift", node))]
        if _scalar(a) is not None and t in _ADD:
            return [(b, _Step("shift", node))]
        if t in _SUB:
            raise _NoMatch(f"a tensor is subtracted from the scores at {_fmt(node)}", "add a bias instead")
        return [(a, _Step("add", node, mask=b)), (b, _Step("add", node, mask=a))]
    raise _NoMatch(f"the scores pass through {_fmt(node)}, which is not a scale, mask or cast")


def _walk_scores(node, depth: int = 0) -> tuple[fx.Node, list[_Step]]:
    """From a softmax input back to the q @ k^T op; returns (score op, steps in forward order)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        raise _NoMatch(f"the softmax input comes from {getattr(node, 'name', node)!r}, not from q @ k^T")
    if node.target in _SCORE_OPS:
        return node, []
    if depth > 24:
        raise _NoMatch("the chain between q @ k^T and softmax is too long")
    options = _score_inputs(node)
    found, errors = [], []
    for up, step in options:
        try:
            score, steps = _walk_scores(up, depth + 1)
            found.append((score, steps + [step]))
        except _NoMatch as e:
            errors.append(e)
    if len(found) == 1:
        return found[0]
    if not found:
        raise errors[0]
    raise _NoMatch(f"both operands of {_fmt(node)} are products of two tensors; cannot tell scores from bias")


def _walk_probs(sm: fx.Node, ctx: _Ctx) -> tuple[list[fx.Node], float, fx.Node]:
    """From the softmax forward to p @ v; returns (cast/dropout nodes, dropout p, value op)."""
    node, steps, p = sm, [], 0.0
    for _ in range(16):
        users = live_users(node, ctx.live)
        if len(users) != 1:
            names = ", ".join(_fmt(u) for u in users) or "nothing"
            raise _NoMatch(
                f"the attention probabilities `{node.name}` are used by {names}; only p @ v is understood",
                _HINT_WEIGHTS if len(users) > 1 else _HINT_GENERAL,
            )
        (u,) = users
        if u.target in _CASTS or u.target in _IDENTITY:
            steps.append(u)
            node = u
            continue
        if u.target in _DROPOUT:
            prob, train = _arg(u, 1, "p", 0.5), _arg(u, 2, "train", True)
            if not isinstance(prob, (int, float)) or not isinstance(train, bool):
                raise _NoMatch(f"dropout with a non-constant p at {_fmt(u)}")
            p = float(prob) if train else 0.0
            steps.append(u)
            node = u
            continue
        if u.target in _VALUE_OPS:
            first = u.args[1][0] if u.target is aten.einsum.default else u.args[0]
            second = u.args[1][1] if u.target is aten.einsum.default else u.args[1]
            if first is node and second is not node:
                return steps, p, u
        raise _NoMatch(f"the attention probabilities flow into {_fmt(u)}, not into p @ v")
    raise _NoMatch("too many ops between softmax and p @ v")


def _parse_einsum(eq: str, ndims: list[int]) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        raise _NoMatch(f"einsum {eq!r} without an explicit output", "write the '->' output")
    lhs, rhs = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        raise _NoMatch(f"einsum {eq!r} does not have two operands")
    spare = [c for c in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in eq]
    n_ell = max([nd - (len(s) - 3) for s, nd in zip(ins, ndims) if "..." in s] or [0])
    ell = "".join(spare[:n_ell])
    out = []
    for s, nd in zip(ins, ndims):
        if "..." in s:
            k = nd - (len(s) - 3)
            s = s.replace("...", ell[n_ell - k :])
        if len(s) != nd or len(set(s)) != len(s):
            raise _NoMatch(f"einsum {eq!r}: subscripts do not match the operands (or repeat a letter)")
        out.append(s)
    rhs = rhs.replace("...", ell)
    return out, rhs


def _roles_einsum(score: fx.Node, out: fx.Node) -> tuple[_Operand, _Operand, _Operand, str, str]:
    (qs, ks), ss = _parse_einsum(score.args[0], [_ndim(a) for a in score.args[1]])
    (ps, vs), os_ = _parse_einsum(out.args[0], [_ndim(a) for a in out.args[1]])
    kl = ss[-1]
    contracted = (set(qs) & set(ks)) - set(ss)
    qls = [c for c in ss if c in qs and c not in ks]
    if kl not in ks or kl in qs or len(contracted) != 1 or len(qls) != 1:
        raise _NoMatch(f"einsum {score.args[0]!r} is not q·k^T contracting the head dim into [..., q, k]")
    (dl,), ql = contracted, qls[0]
    batch = [c for c in ss if c not in (ql, kl)]
    if set(qs) != set(batch) | {ql, dl} or set(ks) != set(batch) | {kl, dl} or len(batch) > 2:
        raise _NoMatch(f"einsum {score.args[0]!r}: q and k must share their batch letters (at most two)")
    if len(ps) != len(ss):
        raise _NoMatch(f"einsum {out.args[0]!r} does not read the probabilities")
    role = dict(zip(batch, "BH"))
    role.update({ql: "S", kl: "K", dl: "D"})
    pmap = {pc: role[sc] for pc, sc in zip(ps, ss)}  # letters of eq 2 -> roles
    extra = [c for c in vs if c not in pmap]
    if len(extra) != 1:
        raise _NoMatch(f"einsum {out.args[0]!r} is not p·v over the key dim")
    pmap[extra[0]] = "E"
    v_roles = "".join(pmap[c] for c in vs)
    o_roles = "".join(pmap.get(c, "?") for c in os_)
    batch_roles = "".join(role[c] for c in batch)
    if set(v_roles) != set(batch_roles) | {"K", "E"} or set(o_roles) != set(batch_roles) | {"S", "E"}:
        raise _NoMatch(f"einsum {out.args[0]!r} is not p·v over the key dim")
    q = _Operand(score.args[1][0], "".join(role[c] for c in qs))
    k = _Operand(score.args[1][1], "".join(role[c] for c in ks))
    v = _Operand(out.args[1][1], v_roles)
    return q, k, v, "".join(role[c] for c in ss), o_roles


def _batch_letters(nd: int, what: str) -> str:
    if nd == 4:
        return "BH"
    if nd == 3:
        return "B"
    if nd == 2:
        return ""
    raise _NoMatch(f"{what} on {nd}-D tensors; only 2-D, 3-D ([B*H, S, D]) and 4-D ([B, H, S, D]) are understood")


def _match_softmax(sm: fx.Node, ctx: _Ctx) -> tuple[dict, _Plan]:
    shape = _shape(sm)
    dim = _norm_dim(sm.args[1], len(shape))
    if dim != len(shape) - 1:
        raise _NoMatch(
            f"softmax over dim {sm.args[1]} of a {len(shape)}-D tensor, not over the last (key) dim",
            _HINT_SEQUENCE,
        )
    score, steps = _walk_scores(sm.args[0])
    post, dropout_p, out = _walk_probs(sm, ctx)

    base_scale, masks = 1.0, []
    if score.target is aten.einsum.default:
        if out.target is not aten.einsum.default:
            raise _NoMatch(f"einsum scores {_fmt(score)} with {_fmt(out)} for p @ v", "use einsum for both or neither")
        q, k, v, score_layout, out_layout = _roles_einsum(score, out)
        form = "einsum"
    else:
        if out.target is aten.einsum.default:
            raise _NoMatch(f"{_fmt(score)} scores with einsum {_fmt(out)} for p @ v", "use einsum for both or neither")
        if score.target is aten.baddbmm.default:
            bias, a, b = score.args[:3]
            beta, alpha = _scalar(score.kwargs.get("beta", 1)), _scalar(score.kwargs.get("alpha", 1))
            if beta is None or alpha is None:
                raise _NoMatch(f"baddbmm with non-constant beta/alpha at {_fmt(score)}")
            base_scale = alpha
            masks.append(_Step("add", score, mask=bias, value=beta))
            form = "baddbmm"
        else:
            a, b = score.args[:2]
            form = {aten.bmm.default: "bmm", aten.mm.default: "matmul", aten.matmul.default: "matmul"}[score.target]
        nd = _ndim(a)
        if _ndim(b) != nd or _ndim(out.args[1]) != nd or _ndim(score) != nd:
            raise _NoMatch(f"{_fmt(score)} broadcasts tensors of different ranks")
        bl = _batch_letters(nd, _fmt(score))
        q, k, v = _Operand(a, bl + "SD"), _Operand(b, bl + "DK"), _Operand(out.args[1], bl + "KE")
        score_layout, out_layout = bl + "SK", bl + "SE"

    # scale and mask, walking forward from q @ k^T to softmax
    scale, mask, mask_kind, fill, invert, factor = base_scale, None, None, NEG_INF, False, 1.0
    capped_scale = None  # the scale inside tanh, once a soft-cap is seen (then `scale` counts the one outside)
    for step in masks + steps:
        if step.kind == "softcap":
            if mask is not None or capped_scale is not None:
                raise _NoMatch(
                    f"the scores pass through {_fmt(step.node)} after a mask or a second tanh",
                    "soft-cap once, before the mask: c * tanh(scores / c) + mask",
                )
            capped_scale, scale = scale, 1.0
            continue
        if step.kind == "scale":
            scale *= step.value
            if mask_kind == "add":
                factor *= step.value
            elif mask_kind == "keep":
                fill *= step.value
        elif step.kind in ("fill", "where", "add"):
            if mask is not None:
                raise _NoMatch(
                    f"a second mask at {_fmt(step.node)} (after `{mask.name}`)",
                    "combine the masks into one boolean or additive mask before applying it",
                )
            mask = step.mask
            if step.kind == "add":
                mask_kind, factor = "add", step.value
            else:
                mask_kind, fill = "keep", step.value
                invert = step.kind == "fill" or not step.keep_true
                if _val(mask) is None or _val(mask).dtype != torch.bool:
                    raise _NoMatch(f"mask `{getattr(mask, 'name', mask)}` of {_fmt(step.node)} is not a bool tensor")
    if mask is not None and not isinstance(mask, fx.Node):
        raise _NoMatch("the mask is not a tensor")

    softcap = 0.0
    if capped_scale is not None:  # post * tanh(pre * s) == |post| * tanh(pre * post * s / |post|)
        if scale == 0:
            raise _NoMatch("the soft-capped scores are multiplied by 0")
        softcap, scale = abs(scale), capped_scale * scale
    region = {score, sm, out, *post, *(s.node for s in steps)}
    return dict(form=form, scale=scale, dropout_p=dropout_p, causal=False, softcap=softcap), _finish(
        ctx, sm, out, q, k, v, score_layout, out_layout, mask, mask_kind, fill, invert, factor, region
    )


def _sdpa_args(node: fx.Node) -> dict:
    names = [a.name for a in node.target._schema.arguments]
    got = dict(zip(names, node.args))
    got.update(node.kwargs)
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    return {**defaults, **got}


def _match_sdpa(node: fx.Node, ctx: _Ctx) -> tuple[dict, _Plan]:
    a = _sdpa_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
        if isinstance(a[name], fx.Node):
            raise _NoMatch(f"SDPA {name} is computed at run time")
    nd = _ndim(q)
    bl = _batch_letters(nd, "scaled_dot_product_attention")
    if _ndim(k) != nd or _ndim(v) != nd:
        raise _NoMatch("SDPA on query/key/value of different ranks")
    head_dim = _shape(q)[-1]
    if a["scale"] is not None:
        scale = float(a["scale"])
    elif isinstance(head_dim, int):
        scale = head_dim**-0.5
    else:
        raise _NoMatch("SDPA without scale on a dynamic head dim", "pass scale= explicitly")
    mask_kind = None
    if mask is not None:
        mask_kind = "keep" if _val(mask).dtype == torch.bool else "add"
    plan = _finish(
        ctx, node, node,
        _Operand(q, bl + "SD"), _Operand(k, bl + "KD"), _Operand(v, bl + "KE"),
        bl + "SK", bl + "SE", mask, mask_kind, NEG_INF, False, 1.0, {node},
    )
    info = dict(form="sdpa", scale=scale, dropout_p=float(a["dropout_p"]), causal=bool(a["is_causal"]))
    return info, plan


def _finish(ctx, anchor, out, q, k, v, score_layout, out_layout, mask, mask_kind, fill, invert, factor, region) -> _Plan:
    """Common tail: peel scales/transposes, undo B*H merges and repeat_kv, check shapes, check that
    nothing outside the region needs its intermediates."""
    peeled: set[fx.Node] = set()
    q, fq = _peel(q, "BHSD", True, peeled)
    k, fk = _peel(k, "BHKD", True, peeled)
    v, _ = _peel(v, "BHKE", False, peeled)
    extra_scale = fq * fk
    mask_layout = None
    if mask is not None:
        mask_layout = score_layout[len(score_layout) - _ndim(mask) :]

    # [B*H, S, D] forms: find the [B, H, S, D] tensors they were reshaped from; failing that, a
    # mask reshaped from [B, H, ...] still tells how N = B*H splits (any split is exact, since
    # attention is independent per (b, h); it only has to agree with the mask's)
    heads = None
    if "H" not in q.layout and all(op.layout.startswith("B") for op in (q, k, v)):
        srcs = [_unmerge(op.node) for op in (q, k, v)]
        mask_merged = mask is not None and mask_layout.startswith("B") and not _same(_shape(mask)[0], 1)
        mask_src = _unmerge(mask) if mask_merged else None
        if all(s is not None for s in srcs) and all(
            _same(_shape(s)[0], _shape(srcs[0])[0]) and _same(_shape(s)[1], _shape(srcs[0])[1]) for s in srcs
        ):
            heads = _shape(srcs[0])[1]
            peeled.update(op.node for op in (q, k, v))
            q, k, v = (_Operand(s, "BH" + op.layout[1:]) for s, op in zip(srcs, (q, k, v)))
        elif mask_src is not None and isinstance(_shape(mask_src)[1], int):
            heads = _shape(mask_src)[1]
            q, k, v = (_Operand(op.node, "N" + op.layout[1:]) for op in (q, k, v))
        if heads is not None:
            out_layout = "N" + out_layout[1:]
            if mask_merged:
                if mask_src is not None and _same(_shape(mask_src)[1], heads):
                    peeled.add(mask)
                    mask, mask_layout = mask_src, "BH" + mask_layout[1:]
                else:
                    mask_layout = "N" + mask_layout[1:]

    k2, nk = _strip_repeat(k, peeled)
    v2, nv = _strip_repeat(v, peeled)
    if nk == nv:
        k, v = k2, v2

    qs, ks, vs = (_canon_sizes(op, t, heads) for op, t in ((q, "BHSD"), (k, "BHKD"), (v, "BHKE")))
    heads, kv_heads = qs["H"], ks["H"]
    if not (_same(qs["B"], ks["B"]) and _same(qs["B"], vs["B"])):
        raise _NoMatch("query and key/value have different batch sizes (broadcast over batch)")
    if not _same(vs["H"], kv_heads) or not _same(qs["D"], ks["D"]) or _differ(ks["K"], vs["K"]):
        raise _NoMatch("key and value do not agree in heads or length")
    if not (_same(heads, kv_heads) or (isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads == 0)):
        raise _NoMatch(f"{heads} query heads cannot share {kv_heads} key/value heads")
    if not isinstance(heads, int):
        raise _NoMatch("the number of heads is dynamic")

    # the region's intermediates must not be needed elsewhere (e.g. returned attention weights)
    esc = escaping_users(region, {out}, ctx.live)
    if esc:
        n, users = next(iter(esc.items()))
        raise _NoMatch(
            f"the intermediate {_fmt(n)} is also used by {', '.join(_fmt(u) for u in users)} outside the attention",
            _HINT_WEIGHTS,
        )
    return _Plan(
        anchor=anchor, out=out, out_layout=out_layout, q=q, k=k, v=v,
        mask=_Operand(mask, mask_layout) if mask is not None else None,
        mask_kind=mask_kind if mask is not None else None, fill=fill if mask_kind == "keep" else NEG_INF,
        mask_invert=invert, mask_factor=factor, scale_factor=extra_scale,
        heads=heads, region=region, peeled=peeled,
    )


def _make_match(info: dict, plan: _Plan) -> AttentionMatch:
    path, typ = _module_of(plan.anchor)
    form = info["form"]
    kind = "mha" if typ.endswith("MultiheadAttention") else {"baddbmm": "bmm"}.get(form, form)
    qs, ks = _canon_sizes(plan.q, "BHSD", plan.heads), _canon_sizes(plan.k, "BHKD", plan.heads)
    layouts = {"query": plan.q.layout, "key": plan.k.layout, "value": plan.v.layout, "output": plan.out_layout}
    if plan.mask is not None:
        layouts["mask"] = plan.mask.layout
    return AttentionMatch(
        kind=kind,
        form=form,
        output=plan.out,
        query=plan.q.node,
        key=plan.k.node,
        value=plan.v.node,
        scale=float(info["scale"] * plan.scale_factor),
        causal=info["causal"],
        mask=plan.mask.node if plan.mask is not None else None,
        mask_kind=plan.mask_kind,
        fill=plan.fill,
        dropout_p=info["dropout_p"],
        softcap=float(info.get("softcap", 0.0)),
        gqa=not _same(qs["H"], ks["H"]),
        num_heads=qs["H"],
        num_kv_heads=ks["H"],
        head_dim=qs["D"],
        module_path=path,
        module_type=typ,
        source=_source_of(plan.anchor),
        matched={n.name for n in plan.region},
        layouts=layouts,
        _plan=plan,
    )


def _looks_like_attention(sm: fx.Node, ctx: _Ctx) -> bool:
    """A softmax mixes the sequence when its dim is sequence-sized (symbolic) or when it is fed by a
    product of two activations (static-shape captures)."""
    try:
        shape = _shape(sm)
        if _is_symbolic(shape[_norm_dim(sm.args[1], len(shape))]):
            return True
    except (_NoMatch, IndexError, TypeError):
        return True
    for n in upstream_within(ctx.g, sm, 8):
        if n.op == "call_function" and n.target in _SCORE_OPS:
            tensors = n.args[1] if n.target is aten.einsum.default else n.args[:2]
            if all(isinstance(t, fx.Node) and t.op != "get_attr" for t in tensors):
                return True
    return False


def _unmatched(node: fx.Node, err: _NoMatch) -> UnmatchedSoftmax:
    path, typ = _module_of(node)
    return UnmatchedSoftmax(
        node=node, op=_op_name(node), module_path=path, module_type=typ, source=_source_of(node),
        reason=err.reason, hint=err.hint or _HINT_GENERAL,
    )


def find_attention(gm: fx.GraphModule) -> AttentionMatches:
    """All attention in `gm` (graph order). Softmaxes that look like attention (over a
    sequence-sized dim, or fed by a product of two activations) but are not understood, and SDPA
    nodes that cannot be read, are listed in `.unmatched` (nodes: `.unmatched_softmax`)."""
    g = to_digraph(gm.graph)
    ctx = _Ctx(gm, g, live_nodes(gm.graph, g))
    matches, unmatched = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in ctx.live:
            continue
        try:
            if node.target in _SDPA:
                info, plan = _match_sdpa(node, ctx)
            elif node.target in _SOFTMAX:
                info, plan = _match_softmax(node, ctx)
            elif node.target in _FUSED_SDPA:
                raise _NoMatch(
                    "a decomposed SDPA kernel call",
                    "capture with torch.export in the training IR, before decompositions, so that "
                    "aten.scaled_dot_product_attention stays one node",
                )
            else:
                continue
            matches.append(_make_match(info, plan))
        except _NoMatch as err:
            if node.target in _SOFTMAX and not _looks_like_attention(node, ctx):
                continue
            unmatched.append(_unmatched(node, err))
    return AttentionMatches(matches, unmatched)


# --------------------------------------------------------------------------------------------
# Rewriting
# --------------------------------------------------------------------------------------------

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


class _Emitter:
    """Creates call_function nodes at the graph's insertion point, carrying the anchor's meta and a
    fake `val` (so later passes see shapes, with the same symbolic sequence sizes)."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode):
        self.graph, self.fake_mode = graph, fake_mode
        self.meta = {k: anchor.meta[k] for k in _COPIED_META if k in anchor.meta}
        self.created: list[fx.Node] = []

    def __call__(self, target, args, kwargs=None) -> fx.Node:
        kwargs = kwargs or {}
        node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta.update(self.meta)
        if self.fake_mode is not None:
            fargs, fkwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
            with self.fake_mode:
                val = target(*fargs, **fkwargs)
            node.meta["val"] = val
            try:
                from torch.fx.passes.shape_prop import _extract_tensor_metadata

                node.meta["tensor_meta"] = _extract_tensor_metadata(val)
            except Exception:  # pragma: no cover - metadata is a convenience
                pass
        self.created.append(node)
        return node

    def to_canonical(self, node: fx.Node, layout: str, target: str, heads: int) -> fx.Node:
        """Permute/unsqueeze (and unflatten a merged B*H dim) so that `node` has layout `target`."""
        if "N" in layout:
            i = layout.index("N")
            node = self(aten.unflatten.int, (node, i, [-1, heads]))
            layout = layout[:i] + "BH" + layout[i + 1 :]
        present = [c for c in target if c in layout]
        if len(present) != len(layout):
            raise AssertionError(f"layout {layout!r} has letters outside {target!r}")
        perm = [layout.index(c) for c in present]
        if perm != sorted(perm):
            node = self(aten.permute.default, (node, perm))
        for i, c in enumerate(target):
            if c not in layout:
                node = self(aten.unsqueeze.default, (node, i))
        return node

    def from_canonical(self, node: fx.Node, source: str, layout: str) -> fx.Node:
        """Inverse of `to_canonical`: bring a `source`-layout node to `layout`."""
        want = layout.replace("N", "BH")
        cur = source
        for c in reversed(source):
            if c not in want:
                node = self(aten.squeeze.dim, (node, cur.index(c)))
                cur = cur.replace(c, "")
        perm = [cur.index(c) for c in want]
        if perm != sorted(perm):
            node = self(aten.permute.default, (node, perm))
        if "N" in layout:
            i = want.index("B")
            node = self(aten.flatten.using_ints, (node, i, i + 1))
        return node


def _rewrite(gm: fx.GraphModule, m: AttentionMatch, fake_mode) -> None:
    plan = m._plan
    graph = gm.graph
    with graph.inserting_before(plan.out):
        emit = _Emitter(graph, plan.anchor, fake_mode)
        q = emit.to_canonical(plan.q.node, plan.q.layout, "BHSD", plan.heads)
        k = emit.to_canonical(plan.k.node, plan.k.layout, "BHKD", plan.heads)
        v = emit.to_canonical(plan.v.node, plan.v.layout, "BHKE", plan.heads)
        mask = None
        if plan.mask is not None:
            mask = plan.mask.node
            if plan.mask_invert:
                if _is_call(mask, _NOT) and _val(mask.args[0]).dtype == torch.bool:
                    plan.peeled.add(mask)
                    mask = mask.args[0]
                else:
                    mask = emit(aten.logical_not.default, (mask,))
            if plan.mask_factor != 1.0:
                mask = emit(aten.mul.Tensor, (mask, plan.mask_factor))
            mask = emit.to_canonical(mask, plan.mask.layout, "BHSK", plan.heads)
        kwargs = dict(scale=m.scale, causal=m.causal, mask_kind=m.mask_kind, fill=m.fill, dropout_p=m.dropout_p)
        if m.softcap:
            kwargs["softcap"] = m.softcap
        att = emit(attention, (q, k, v, mask), kwargs)
        out = emit.from_canonical(att, "BHSE", plan.out_layout)
        want = _val(plan.out).dtype
        if _val(out).dtype != want:
            out = emit(aten.to.dtype, (out, want))
    plan.out.replace_all_uses_with(out)

    # drop the region now (in-place ops in it would survive dead-code elimination)
    for n in plan.region:
        for u in list(n.users):
            if is_assert(u):
                graph.erase_node(u)
    for n in reversed(list(graph.nodes)):
        if n in plan.region and not n.users:
            graph.erase_node(n)

    m.output, m.query, m.key, m.value, m.mask = att, q, k, v, mask
    att.meta["ringify_attention"] = m.summary()


def canonicalize_attention(gm: fx.GraphModule, *, strict: bool = True) -> AttentionMatches:
    """Replace every attention of `gm` by one `attention` call_function node (see module doc).

    Raises `UnsupportedModelError` (before changing anything) when something looks like attention
    but cannot be canonicalised; with `strict=False` those are left as they are and returned in
    `.unmatched`. Returns the matches, whose fields now point at the rewritten nodes."""
    found = find_attention(gm)
    if strict and found.unmatched:
        lines = "\n  - ".join(u.message() for u in found.unmatched)
        raise UnsupportedModelError(
            f"ringify cannot rewrite {len(found.unmatched)} attention-like op(s) into ring attention:\n  - {lines}"
        )
    if not found:
        return found
    vals = [n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    fake_mode = torch._guards.detect_fake_mode(vals)
    before = {n.name for n in gm.graph.nodes}
    for m in found:
        _rewrite(gm, m, fake_mode)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    alive = {n.name for n in gm.graph.nodes}
    for m in found:
        candidates = {n.name for n in m._plan.region | m._plan.peeled}
        m.matched = (candidates & before) - alive
        m.output.meta["ringify_attention"] = m.summary()
    return found
