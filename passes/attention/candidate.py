"""From what a matcher found (`Candidate`) to what the rewrite needs (`Plan`) and what the pass reports
(`AttentionMatch`).

Every matcher (SDPA, hand-written softmax) ends the same way: peel scales and transposes off q/k/v, undo
B*H merges and ``repeat_kv``, check that the sizes make one attention, and check that nothing outside
the matched region needs its intermediates. `resolve` is that common tail, so a matcher only describes
the spelling it recognised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from ..fx import is_call, module_path, module_type, source_line
from ..graph import escaping_users
from .canonical import NEG_INF
from .layouts import Operand, canon_sizes, differ, peel, same, strip_repeat, unmerge
from .ops import EXPAND, RESHAPE
from .results import HINT_WEIGHTS, AttentionMatch, NoMatch, fmt, tensor_shape


@dataclass
class MatchContext:
    gm: fx.GraphModule
    g: Any  # networkx DiGraph of gm.graph
    live: set


@dataclass
class Candidate:
    """One attention as a matcher read it, in the layout of the source tensors."""

    form: str  # 'sdpa' | 'matmul' | 'bmm' | 'baddbmm' | 'einsum'
    anchor: fx.Node  # the softmax or SDPA node (meta source)
    out: fx.Node  # the node whose value the attention replaces
    q: Operand
    k: Operand
    v: Operand
    score_layout: str
    out_layout: str
    region: set[fx.Node]  # nodes replaced by the attention node
    scale: float
    causal: bool = False
    dropout_p: float = 0.0
    softcap: float = 0.0
    mask: fx.Node | None = None
    mask_kind: str | None = None  # 'keep' | 'add' | None
    fill: float = NEG_INF  # value of dropped scores ('keep')
    mask_invert: bool = False  # masked_fill-style mask (True = drop): feed logical_not(mask)
    mask_factor: float = 1.0  # additive mask applied before a scale: feed mask * factor
    mask_layout: str | None = None  # the mask's letters, when they are not the score layout's right end
    mask_recipe: list | None = None  # several masks: the `scores.MaskTerm` steps of one additive mask
    heads: int | None = None  # H, when the scores split a merged B*H dim ('N' letters before the split)
    sinks: Operand | None = None  # the sink logits, broadcast over the score layout (size 1 but for H)


@dataclass
class Plan:
    """A resolved candidate: canonical-letter operands the rewrite permutes into BHSD/BHKD/BHKE/BHSK."""

    cand: Candidate
    q: Operand
    k: Operand
    v: Operand
    out_layout: str
    mask: Operand | None
    sinks: fx.Node | None  # [H], or a tensor the rewrite reshapes to [H]
    scale_factor: float  # scales folded into q and k
    heads: int
    peeled: set[fx.Node] = field(default_factory=set)  # looked through (die unless used elsewhere)
    mask_terms: list | None = None  # several masks: (MaskTerm, Operand | None) in forward order

    @property
    def anchor(self) -> fx.Node:
        return self.cand.anchor

    @property
    def out(self) -> fx.Node:
        return self.cand.out

    @property
    def region(self) -> set[fx.Node]:
        return self.cand.region


def _sinks_source(sinks: Operand, heads, peeled: set) -> fx.Node:
    """The [H] sink logits behind a column broadcast over the scores (``sinks.reshape(1, -1, 1, 1).expand(...)``):
    canonical sinks are one logit per query head, so the column may vary over nothing else."""
    node = sinks.node
    while is_call(node, EXPAND):
        peeled.add(node)
        node = node.args[0]
    sizes = dict(zip(sinks.layout, tensor_shape(node)))
    if "H" not in sizes or not same(sizes["H"], heads) or not all(same(n, 1) for c, n in sizes.items() if c != "H"):
        raise NoMatch(f"the sink logits {fmt(sinks.node)} vary over more than the heads",
                      "append one sink logit per head: module.sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)")
    if is_call(node, RESHAPE) and len(tensor_shape(node.args[0])) == 1:  # the [H] parameter itself
        peeled.add(node)
        return node.args[0]
    return node


def _merged(mask: Operand) -> bool:
    """The mask's first dim is a merged B*H one ('N', or the 'B' of a [B*H, S, K] form): no H letter."""
    return (mask.layout[0] in "BN" and "H" not in mask.layout and len(mask.layout) >= 3
            and not same(tensor_shape(mask.node)[0], 1))


def _mask_operand(mask: Operand, heads, peeled: set) -> Operand:
    """A mask (or mask term) with its merged B*H dim told apart: the [B, H, ...] tensor it was reshaped
    from, else 'N' (split by `heads`), else 'B' (no split known: then q, k, v treat N as B too)."""
    if not _merged(mask):
        return Operand(mask.node, "B" + mask.layout[1:]) if mask.layout[0] == "N" else mask
    if heads is None:
        return Operand(mask.node, "B" + mask.layout[1:])
    src = unmerge(mask.node)
    if src is not None and same(tensor_shape(src)[1], heads):
        peeled.add(mask.node)
        return Operand(src, "BH" + mask.layout[1:])
    return Operand(mask.node, "N" + mask.layout[1:])


def resolve(ctx: MatchContext, cand: Candidate) -> Plan:
    """The common tail of every matcher (see the module doc)."""
    peeled: set[fx.Node] = set()
    q, fq = peel(cand.q, "BHSD", True, peeled)
    k, fk = peel(cand.k, "BHKD", True, peeled)
    v, _ = peel(cand.v, "BHKE", False, peeled)
    out_layout, score_layout = cand.out_layout, cand.score_layout
    mask = None
    if cand.mask is not None:
        mask = Operand(cand.mask, cand.mask_layout or score_layout[len(score_layout) - len(tensor_shape(cand.mask)):])

    # [B*H, S, D] forms: find the [B, H, S, D] tensors they were reshaped from; failing that, a split of
    # the scores or a mask reshaped from [B, H, ...] still tells how N = B*H splits (any split is exact,
    # since attention is independent per (b, h); it only has to agree with the masks')
    heads = None
    if "H" not in q.layout and all(op.layout[0] in "BN" for op in (q, k, v)):
        srcs = [unmerge(op.node) for op in (q, k, v)]
        mask_src = unmerge(mask.node) if mask is not None and _merged(mask) else None
        if all(s is not None for s in srcs) and all(
            same(tensor_shape(s)[0], tensor_shape(srcs[0])[0]) and same(tensor_shape(s)[1], tensor_shape(srcs[0])[1])
            for s in srcs
        ) and (cand.heads is None or same(tensor_shape(srcs[0])[1], cand.heads)):
            heads = tensor_shape(srcs[0])[1]
            peeled.update(op.node for op in (q, k, v))
            q, k, v = (Operand(s, "BH" + op.layout[1:]) for s, op in zip(srcs, (q, k, v)))
        else:
            heads = cand.heads
            if heads is None and mask_src is not None and isinstance(tensor_shape(mask_src)[1], int):
                heads = tensor_shape(mask_src)[1]
            if heads is not None:
                q, k, v = (Operand(op.node, "N" + op.layout[1:]) for op in (q, k, v))
        if heads is not None:
            out_layout = "N" + out_layout[1:]
    terms = None
    if cand.mask_recipe is not None:
        terms = [(t, _mask_operand(Operand(t.node, t.layout), heads, peeled) if t.node is not None else None)
                 for t in cand.mask_recipe]
        mask = terms[0][1]
    elif mask is not None:
        mask = _mask_operand(mask, heads, peeled)

    k2, nk = strip_repeat(k, peeled)
    v2, nv = strip_repeat(v, peeled)
    if nk == nv:
        k, v = k2, v2

    qs, ks, vs = (canon_sizes(op, t, heads) for op, t in ((q, "BHSD"), (k, "BHKD"), (v, "BHKE")))
    heads, kv_heads = qs["H"], ks["H"]
    if not (same(qs["B"], ks["B"]) and same(qs["B"], vs["B"])):
        raise NoMatch("query and key/value have different batch sizes (broadcast over batch)")
    if not same(vs["H"], kv_heads) or not same(qs["D"], ks["D"]) or differ(ks["K"], vs["K"]):
        raise NoMatch("key and value do not agree in heads or length")
    if not (same(heads, kv_heads) or (isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads == 0)):
        raise NoMatch(f"{heads} query heads cannot share {kv_heads} key/value heads")
    if not isinstance(heads, int):
        raise NoMatch("the number of heads is dynamic")
    sinks = _sinks_source(cand.sinks, heads, peeled) if cand.sinks is not None else None

    # the region's intermediates must not be needed elsewhere (e.g. returned attention weights)
    esc = escaping_users(cand.region, {cand.out}, ctx.live)
    if esc:
        n, users = next(iter(esc.items()))
        raise NoMatch(
            f"the intermediate {fmt(n)} is also used by {', '.join(fmt(u) for u in users)} outside the attention",
            HINT_WEIGHTS,
        )
    return Plan(cand=cand, q=q, k=k, v=v, out_layout=out_layout, mask=mask, sinks=sinks,
                scale_factor=fq * fk, heads=heads, peeled=peeled, mask_terms=terms)


def to_match(plan: Plan) -> AttentionMatch:
    cand, anchor = plan.cand, plan.anchor
    typ = module_type(anchor)
    kind = "mha" if typ.endswith("MultiheadAttention") else {"baddbmm": "bmm"}.get(cand.form, cand.form)
    qs, ks, vs = (canon_sizes(op, t, plan.heads) for op, t in ((plan.q, "BHSD"), (plan.k, "BHKD"), (plan.v, "BHKE")))
    layouts = {"query": plan.q.layout, "key": plan.k.layout, "value": plan.v.layout, "output": plan.out_layout}
    if plan.mask is not None:
        layouts["mask"] = plan.mask.layout
    has_mask = plan.mask is not None
    return AttentionMatch(
        kind=kind,
        form=cand.form,
        output=cand.out,
        query=plan.q.node,
        key=plan.k.node,
        value=plan.v.node,
        scale=float(cand.scale * plan.scale_factor),
        causal=cand.causal,
        mask=plan.mask.node if has_mask else None,
        mask_kind=cand.mask_kind if has_mask else None,
        fill=cand.fill if has_mask and cand.mask_kind == "keep" else NEG_INF,
        dropout_p=cand.dropout_p,
        softcap=float(cand.softcap),
        sinks=plan.sinks,
        gqa=not same(qs["H"], ks["H"]),
        num_heads=qs["H"],
        num_kv_heads=ks["H"],
        head_dim=qs["D"],
        v_head_dim=vs["E"],
        module_path=module_path(anchor),
        module_type=typ,
        source=source_line(anchor),
        matched={n.name for n in cand.region},
        layouts=layouts,
        _plan=plan,
    )


__all__ = ["Candidate", "MatchContext", "Plan", "resolve", "to_match"]
