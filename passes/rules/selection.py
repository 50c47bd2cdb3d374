"""Selection: slicing, narrowing, selecting and indexing, gathers and scatters.

Along dims that hold no tokens these pick features (Falcon's fused q/k/v split, a router's
``scatter_`` over experts) and are token-local. A slice of a table without tokens whose result has
tokens (``buffer[:, :S]``) is a table read at the positions (:mod:`ringify.passes.rules.positions`).
Along the tokens of an activation, a slice with step 1 (``x[:, :-1]``, ``x[:, -k:]``, ``narrow``) keeps the
rows this rank holds in the range (their frame, :mod:`ringify.passes.frames`), and selecting one token
(``x[:, 0]``) hands its owner's row to every rank (:mod:`ringify.runtime.token_slices`). Strided slices and
index lists along the tokens still mix.
"""

from __future__ import annotations

import torch
from torch import fx

from ...runtime import graph_calls
from ..frames import cuttable, select_index, slice_bounds
from ..fx import arg, packet, value
from ..sequence import size_expr
from .base import LOCAL, MIX, SELECT, SLICE, TABLE, Rule, operand, register
from .positions import emit_table

aten = torch.ops.aten

_ALONG_TOKENS = ("A strided slice or an index list along the sequence (x[:, ::2], x[:, idx]) needs tokens that other "
                 "ranks hold; plain slices (x[:, :-1], x[:, -k:]) and single tokens (x[:, 0]) are supported. ")


def _is_full_slice(node: fx.Node, dim: int) -> bool:
    """``slice(x, dim, start, end, step)`` that keeps every token of ``dim``."""
    start, end, step = arg(node, "start"), arg(node, "end"), arg(node, "step", 1)
    size = value(operand(node)).shape[dim]
    full_end = end is None or (isinstance(end, int) and end >= 2**62) or (
        isinstance(end, fx.Node) and value(end) is size)
    return start in (None, 0) and step == 1 and full_end


@register(aten.slice, aten.narrow)
class Slice(Rule):
    """A slice of a table up to the sequence is a table read; a step-1 slice of an activation along its tokens
    keeps this rank's rows in the range (its frame narrowed)."""

    def classify(self, node, tokens) -> str:
        x = operand(node)
        dim = arg(node, "dim", 0) % value(x).dim()
        if dim not in tokens.dims(x):
            if dim in tokens.dims(node):  # rows 0..S of a fixed table
                return TABLE if arg(node, "step", 1) == 1 else MIX
            return LOCAL
        if packet(node) is aten.slice and _is_full_slice(node, dim):
            return LOCAL
        if arg(node, "step", 1) != 1 or len(tokens.dims(x)) != 1 or not cuttable(value(x).shape[dim]):
            return MIX
        return SLICE if tokens.dims(node) else SELECT  # a fixed number of tokens (x[:, -3:]): handed to every rank

    def emit(self, node, sharder):
        family = sharder.family.get(node)
        if family == TABLE:
            return emit_table(node, sharder)
        if family not in (SLICE, SELECT):
            return None
        x = operand(node)
        dim = arg(node, "dim", 0) % value(x).dim()
        start = arg(node, "start", 0)
        lo = slice_bounds(value(x).shape[dim], start, None)[0]
        hi = lo + size_expr(value(node).shape[dim])  # aten's own clamping of the end
        frame = sharder.frame_of(x)
        kept = frame.narrowed(lo, hi)
        sharder.record("slices", node, kept=str(kept))
        rows = sharder.graph.call_function(
            graph_calls.slice_tokens,
            (sharder.as_local(x), dim, sharder.size_node(frame.base), sharder.frame_arg(frame), sharder.size_node(lo),
             sharder.size_node(hi), sharder.group, sharder.layout))
        if family == SELECT:
            return sharder.graph.call_function(graph_calls.gather_frame, (rows, dim, sharder.size_node(frame.base),
                                                                          sharder.frame_arg(kept), sharder.group,
                                                                          sharder.layout))
        sharder.frames[node] = kept
        return rows

    def hint(self, node) -> str:
        return _ALONG_TOKENS


@register(aten.select, aten.index_select)
class Select(Rule):
    """``x.select(dim, i)``, ``x.index_select(dim, idx)``: local along dims without tokens, with fixed indices;
    ``select`` of one token of an activation is that token's row on every rank."""

    def classify(self, node, tokens) -> str:
        x = operand(node)
        if tokens.has(arg(node, "index")):
            return MIX
        if arg(node, "dim") % value(x).dim() in tokens.dims(x):
            single = packet(node) is aten.select and len(tokens.dims(x)) == 1
            return SELECT if single and cuttable(value(x).shape[arg(node, "dim") % value(x).dim()]) else MIX
        return LOCAL

    def emit(self, node, sharder):
        if sharder.family.get(node) != SELECT:
            return None
        x = operand(node)
        dim = arg(node, "dim") % value(x).dim()
        frame = sharder.frame_of(x)
        index = select_index(value(x).shape[dim], arg(node, "index"))
        sharder.record("slices", node, selected=f"position {index} of {frame}")
        return sharder.graph.call_function(
            graph_calls.select_token,
            (sharder.as_local(x), dim, sharder.size_node(frame.base), sharder.frame_arg(frame), sharder.size_node(index),
             sharder.group, sharder.layout))

    def hint(self, node) -> str:
        return _ALONG_TOKENS


@register(aten.index)
class Index(Rule):
    """``x[..., [i, j]]``: picking features with fixed indices is token-local; indexing along the tokens, or with
    indices that depend on them, mixes."""

    def classify(self, node, tokens) -> str:
        x = operand(node)
        held = set(tokens.dims(x))
        for dim, index in enumerate(arg(node, "indices")):
            if index is not None and (dim in held or tokens.has(index)):
                return MIX
        return LOCAL


@register(aten.embedding)
class Embedding(Rule):
    """A lookup of each token's id in a table: local unless the table itself has tokens."""

    def classify(self, node, tokens) -> str:
        return MIX if tokens.has(arg(node, "weight")) else LOCAL


@register(aten.gather, aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_, aten.scatter_reduce,
          aten.scatter_reduce_)
class GatherScatter(Rule):
    """``gather`` / ``scatter`` along ``dim``: element ``i`` of every other dim reads or writes element ``i`` of the
    index, so they are token-local when ``dim`` holds no tokens and self, index and src hold the same tokens in
    the same dims (the Llama-4 router: ``full_like(logits, -inf).scatter_(1, top_idx, top_vals)`` over experts)."""

    def classify(self, node, tokens) -> str:
        x = operand(node)
        dim = arg(node, "dim") % max(value(x).dim(), 1)
        tensors = [t for t in (x, arg(node, "index"), arg(node, "src")) if isinstance(t, fx.Node)]
        layouts = {tuple((d, size_expr(value(t).shape[d])) for d in tokens.dims(t)) for t in tensors}
        if len(layouts) > 1 or dim in tokens.dims(x):
            return MIX
        return LOCAL


@register(aten.index_add, aten.index_copy, aten.index_fill)
class IndexAlongDim(Rule):
    """``x.index_add(dim, idx, src)`` and kin: local along a dim without tokens, with indices that have none."""

    def classify(self, node, tokens) -> str:
        x = operand(node)
        source = arg(node, "source", arg(node, "value"))
        if tokens.has(arg(node, "index")) or arg(node, "dim") % value(x).dim() in tokens.dims(x):
            return MIX
        if isinstance(source, fx.Node) and tokens.dims(source) != tokens.dims(x):
            return MIX
        return LOCAL
