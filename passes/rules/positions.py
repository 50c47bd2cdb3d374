"""Positions: ``arange`` over the sequence and tables sliced to it.

Both become values at this rank's global positions under the layout: ``arange(S)`` the positions
themselves (``graph_calls.local_arange``), ``table[..., start:start+S]`` (Bert's ``position_ids``
buffer, nanoGPT's causal mask, torchtitan's complex ``freqs_cis[0:S]``) the table's rows at them
(``graph_calls.table_rows``). Which slices are tables is decided where slicing is
(:mod:`ringify.passes.rules.selection`); how a table is emitted is here.
"""

from __future__ import annotations

import torch
from torch import fx

from ...runtime import graph_calls
from ..fx import arg, packet, value
from .base import POSITIONS, Rule, operand, register

aten = torch.ops.aten


@register(aten.arange)
class Arange(Rule):
    def classify(self, node, tokens) -> str:
        return POSITIONS

    def emit(self, node, sharder) -> fx.Node | None:
        if sharder.family.get(node) != POSITIONS:
            return None  # inside a token-local module (a dropless MoE's expert loop): its own local arange
        sharder.record("positions", node)
        full = sharder.as_full
        return sharder.graph.call_function(
            graph_calls.local_arange,
            (full(arg(node, "end")), full(arg(node, "start", 0)), arg(node, "step", 1), sharder.group, sharder.layout,
             arg(node, "dtype", value(node).dtype), arg(node, "device", value(node).device)))


def emit_table(node: fx.Node, sharder) -> fx.Node:
    """``table.slice(dim, start, start+S)`` / ``table.narrow(dim, start, S)`` -> the table's rows at this rank's
    global positions (plus ``start``)."""
    table = operand(node)
    dim = arg(node, "dim", 0) % value(table).dim()
    start = arg(node, "start", 0)
    if packet(node) is aten.narrow:
        length = sharder.as_full(arg(node, "length"))
    else:
        length = value(node).shape[dim]
        length = sharder.full_size(length) if isinstance(length, torch.SymInt) else length
    sharder.record("positions", node, table=table.name)
    return sharder.graph.call_function(
        graph_calls.table_rows,
        (sharder.as_full(table), dim, sharder.as_full(start), length, sharder.group, sharder.layout))
