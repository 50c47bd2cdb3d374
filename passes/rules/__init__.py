"""Sequence propagation as a registry of per-op rules (DTensor's ``_ops/`` for the sequence dim).

Every call_function node that touches token dims is looked up (:func:`rule_for`) and its rule says
both what the node is (:meth:`Rule.classify`: a family from :mod:`.base`) and how its rank-local form
is built (:meth:`Rule.emit`, called by :mod:`ringify.passes.shard`). One module per op family:

- :mod:`.pointwise` elementwise ops, factories, dropout, complex construction;
- :mod:`.views` the view algebra (reshapes that keep tokens whole, ``S*B`` against ``B*S``);
- :mod:`.reductions` sums, means and losses over tokens (local partial + sum over ranks), norms;
- :mod:`.matmul` every product as one einsum equation;
- :mod:`.positions` ``arange`` over the sequence and tables sliced to it;
- :mod:`.along_dim` scans, sorts, softmax, cat / split / chunk, pads, convolutions;
- :mod:`.selection` slices, selects, indexing, gathers and scatters;
- :mod:`.sizes` sizes, SymInt arithmetic and asserts.

An op without a rule mixes tokens: it may run on values every rank holds in full, and is refused on
activations. Adding an op is registering it with the rule whose reasoning covers it.
"""

from __future__ import annotations

import operator

from torch import fx

from . import along_dim, matmul, mutation, pointwise, positions, reductions, selection, sizes, views  # noqa: F401 (register)
from .base import (ATTENTION, JOIN, LOCAL, MIX, MIXING, POSITIONS, REDUCE, SELECT, SLICE, TABLE, Rule, register,
                   register_when, rule_for)
from .views import mixes_token_layouts, token_inner


def classify(node: fx.Node, tokens) -> str:
    """The family of a call_function node that touches token dims (``tokens``: a ``sequence.Tokens``).

    The rule's answer, except that token-local ops and reductions whose inputs merged the tokens
    differently (``S*B`` against ``B*S``) mix: on a shard they would pair different tokens.
    """
    family = rule_for(node).classify(node, tokens)
    if family in (LOCAL, REDUCE) and mixes_token_layouts(node, tokens):
        return MIX
    return family


@register(operator.getitem)
class Getitem(Rule):
    """One output of a multi-output op (``split(...)[0]``, ``sort(...).values``): what that op is."""

    moves_tokens = True

    def classify(self, node, tokens) -> str:
        source = node.args[0]
        if isinstance(source, fx.Node) and source.op == "call_function":
            return classify(source, tokens)
        return LOCAL


__all__ = ["ATTENTION", "JOIN", "LOCAL", "MIX", "MIXING", "POSITIONS", "REDUCE", "SELECT", "SLICE", "TABLE", "Rule", "classify",
           "mixes_token_layouts", "register", "register_when", "rule_for", "token_inner"]
