"""Rewriting each match into one canonical `attention` node.

The canonical op wants ``[B, H, S, D]`` tensors; the graph around a match keeps its own layout. The
`_Emitter` inserts the permutes / unsqueezes / B*H unflattens that bring q, k, v and the mask to the
canonical layout, and the inverse ones after the call, each node carrying the anchor's module stack and
source line and a fake value (later passes read shapes, with the same symbolic sequence sizes).
"""

from __future__ import annotations

import torch
from torch import fx
from torch._prims_common import compute_elementwise_output_logical_to_physical_perm

from ringify.errors import UnsupportedModelError

from ..fx import is_assert, is_call, map_aggregate, value
from .canonical import attention
from .find import find_attention
from .layouts import same
from .ops import NOT, aten
from .results import AttentionMatch, AttentionMatches

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    return len(a.stride()) == len(b.stride()) and all(same(x, y) for x, y in zip(a.stride(), b.stride()))


class _Emitter:
    """Creates call_function nodes at the graph's insertion point, carrying the anchor's meta and a
    fake `val`."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, fake_mode):
        self.graph, self.fake_mode = graph, fake_mode
        self.meta = {k: anchor.meta[k] for k in _COPIED_META if k in anchor.meta}

    def __call__(self, target, args, kwargs=None) -> fx.Node:
        kwargs = kwargs or {}
        node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta.update(self.meta)
        if self.fake_mode is not None:
            fargs, fkwargs = map_aggregate((args, kwargs), value)
            with self.fake_mode:
                val = target(*fargs, **fkwargs)
            node.meta["val"] = val
            try:
                from torch.fx.passes.shape_prop import _extract_tensor_metadata

                node.meta["tensor_meta"] = _extract_tensor_metadata(val)
            except Exception:  # pragma: no cover - metadata is a convenience
                pass
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

    def like_strides(self, node: fx.Node, original: fx.Node) -> fx.Node:
        """`node` laid out in memory like `original`. Code after an attention may rely on its output's
        strides: SDPA's output is [B, S, H, D] in memory, so torchtitan's ``out.transpose(1, 2).view(B, S, -1)``
        is a view (capture drops the ``.contiguous()`` before it as a no-op); the canonical op's output is
        not, and that view would fail. Permute to the original's memory order, copy, permute back."""
        want, have = value(original), value(node)
        if not isinstance(want, torch.Tensor) or self.fake_mode is None or _same_strides(have, want):
            return node
        order, _ = compute_elementwise_output_logical_to_physical_perm(want)
        inverse = [order.index(d) for d in range(want.dim())]
        dense = self(aten.permute.default, (node, order)) if order != sorted(order) else node
        dense = self(aten.clone.default, (dense,), {"memory_format": torch.contiguous_format})
        out = self(aten.permute.default, (dense, inverse)) if order != sorted(order) else dense
        return out if _same_strides(value(out), want) else node  # not dense: nothing to reproduce


def _combined_mask(emit: _Emitter, plan) -> fx.Node:
    """One additive [B, H, S, K] mask from several (`scores.fold`), built in the order the model applied them."""
    total = None
    for term, op in plan.mask_terms:
        if term.kind == "scale":
            total = emit(aten.mul.Tensor, (total, term.value))
            continue
        x = emit.to_canonical(op.node, op.layout, "BHSK", plan.heads)
        if term.kind == "add":
            x = emit(aten.mul.Tensor, (x, term.value)) if term.value != 1.0 else x
            total = x if total is None else emit(aten.add.Tensor, (total, x))
        elif total is None:  # a fill before any bias: 0 where kept
            total = emit(aten.where.Scalar, (x, term.value, 0.0) if term.drop else (x, 0.0, term.value))
        elif term.drop:
            total = emit(aten.where.ScalarSelf, (x, term.value, total))
        else:
            total = emit(aten.where.ScalarOther, (x, total, term.value))
    return total


def _rewrite(gm: fx.GraphModule, m: AttentionMatch, fake_mode) -> None:
    plan, cand = m._plan, m._plan.cand
    graph = gm.graph
    with graph.inserting_before(plan.out):
        emit = _Emitter(graph, plan.anchor, fake_mode)
        q = emit.to_canonical(plan.q.node, plan.q.layout, "BHSD", plan.heads)
        k = emit.to_canonical(plan.k.node, plan.k.layout, "BHKD", plan.heads)
        v = emit.to_canonical(plan.v.node, plan.v.layout, "BHKE", plan.heads)
        mask = None
        if plan.mask_terms is not None:
            mask = _combined_mask(emit, plan)
        elif plan.mask is not None:
            mask = plan.mask.node
            if cand.mask_invert:
                if is_call(mask, NOT) and value(mask.args[0]).dtype == torch.bool:
                    plan.peeled.add(mask)
                    mask = mask.args[0]
                else:
                    mask = emit(aten.logical_not.default, (mask,))
            if cand.mask_factor != 1.0:
                mask = emit(aten.mul.Tensor, (mask, cand.mask_factor))
            mask = emit.to_canonical(mask, plan.mask.layout, "BHSK", plan.heads)
        sinks = plan.sinks
        if sinks is not None and value(sinks).dim() != 1:
            sinks = emit(aten.reshape.default, (sinks, [plan.heads]))
        kwargs = dict(scale=m.scale, causal=m.causal, mask_kind=m.mask_kind, fill=m.fill, dropout_p=m.dropout_p)
        if m.softcap:
            kwargs["softcap"] = m.softcap
        if sinks is not None:
            kwargs["sinks"] = sinks
        att = emit(attention, (q, k, v, mask), kwargs)
        out = emit.from_canonical(att, "BHSE", plan.out_layout)
        want = value(plan.out).dtype
        if value(out).dtype != want:
            out = emit(aten.to.dtype, (out, want))
        out = emit.like_strides(out, plan.out)
    plan.out.replace_all_uses_with(out)

    # drop the region now (in-place ops in it would survive dead-code elimination)
    for n in plan.region:
        for u in list(n.users):
            if is_assert(u):
                graph.erase_node(u)
    for n in reversed(list(graph.nodes)):
        if n in plan.region and not n.users:
            graph.erase_node(n)

    m.output, m.query, m.key, m.value, m.mask, m.sinks = att, q, k, v, mask, sinks
    att.meta["ringify_attention"] = m.summary()


def canonicalize_attention(gm: fx.GraphModule, *, strict: bool = True) -> AttentionMatches:
    """Replace every attention of `gm` by one `attention` call_function node (see the package doc).

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
