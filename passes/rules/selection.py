"""Selection: slicing, narrowing, selecting and indexing, gathers and scatters.

Along dims that hold no tokens these pick features (Falcon's fused q/k/v split, a router's
``scatter_`` over experts) and are token-local. A slice of a table without tokens whose result has
tokens (``buffer[:, :S]``) is a table read at the positions (:mod:`ringify.passes.rules.positions`).
Along the tokens of an activation (``x[:, :-1]``, ``x[:, 0]``) they need other ranks' tokens: refused
for now, and this is where such a rule belongs when it lands.
"""

from __future__ import annotations

import torch
from torch import fx

from ..fx import arg, packet, value
from ..sequence import size_expr
from .base import LOCAL, MIX, TABLE, Rule, operand, register
from .positions import emit_table

aten = torch.ops.aten

_ALONG_TOKENS = ("Slicing or selecting along the sequence (x[:, :-1], x[:, 0], x[:, ::2]) needs tokens that other "
                 "ranks hold. For shifted labels, shift the labels (an input) rather than the logits. ")


def _is_full_slice(node: fx.Node, dim: int) -> bool:
    """``slice(x, dim, start, end, step)`` that keeps every token of ``dim``."""
    start, end, step = arg(node, "start"), arg(node, "end"), arg(node, "step", 1)
    size = value(operand(node)).shape[dim]
    full_end = end is None or (isinstance(end, int) and end >= 2**62) or (
        isinstance(end, fx.Node) and value(end) is size)
    return start in (None, 0) and step == 1 and full_end


@register(aten.slice, aten.narrow)
class Slice(Rule):
    def classify(self, node, tokens) -> str:
        x = operand(node)
        dim = arg(node, "dim", 0) % value(x).dim()
        if dim not in tokens.dims(x):
            if dim in tokens.dims(node):  # rows 0..S of a fixed table
                return TABLE if arg(node, "step", 1) == 1 else MIX
            return LOCAL
        return LOCAL if packet(node) is aten.slice and _is_full_slice(node, dim) else MIX

    def emit(self, node, sharder):
        return emit_table(node, sharder) if sharder.family.get(node) == TABLE else None

    def hint(self, node) -> str:
        return _ALONG_TOKENS


@register(aten.select, aten.index_select)
class Select(Rule):
    """``x.select(dim, i)``, ``x.index_select(dim, idx)``: local along dims without tokens, with fixed indices."""

    def classify(self, node, tokens) -> str:
        x = operand(node)
        if tokens.has(arg(node, "index")) or arg(node, "dim") % value(x).dim() in tokens.dims(x):
            return MIX
        return LOCAL

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
