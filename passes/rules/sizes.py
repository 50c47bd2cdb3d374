"""Sizes and checks: ``sym_size``, SymInt arithmetic (``operator.*``) and run-time asserts.

They are recomputed from the local values: a size read from a shard is the shard's size, which is
what the rank-local graph's later views and factories need.
"""

from __future__ import annotations

import operator

import torch

from ..fx import ASSERT_OPS
from .base import LOCAL, Rule, register, register_when

aten = torch.ops.aten


@register(ASSERT_OPS, aten.sym_size, getattr(torch.ops.higher_order, "_guards_fn", None))
class Sizes(Rule):
    def classify(self, node, tokens) -> str:
        return LOCAL


@register_when(lambda node: isinstance(node.target, type(operator.add)))
class SymIntArithmetic(Sizes):
    """``operator.mul(s0, 4)``, ``math.floor``...: Python builtins on sizes."""
