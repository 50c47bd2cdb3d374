"""Elementwise ops, factories and dropout: each output element depends on the same element of the inputs.

Token-local when broadcasting pairs a token with itself (or with a value without tokens); inputs
whose tokens land on different output dims pair every token with every other (a mask built as
``pos[:, None] <= pos[None, :]``) and mix. Inputs whose token dims were merged differently (``S*B`` against
``B*S``) are caught by the driver (:func:`ringify.passes.rules.classify`), not here.
"""

from __future__ import annotations

import torch

from ..fx import value
from .base import LOCAL, MIX, Rule, register, register_when

aten = torch.ops.aten

FACTORIES = (
    aten.ones, aten.zeros, aten.full, aten.empty, aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty,
    aten.ones_like, aten.zeros_like, aten.full_like, aten.empty_like, aten.scalar_tensor, aten.empty_strided,
)
DROPOUT = (aten.dropout, aten.native_dropout, aten.feature_dropout, aten.alpha_dropout)
ACTIVATIONS = (aten.gelu, aten.silu, aten.relu, aten.tanh, aten.sigmoid, aten.rsqrt)
# complex numbers built elementwise (torchtitan's rotary: ``torch.polar(ones, freqs)``)
COMPLEX = (aten.polar, aten.complex)


def _tagged_pointwise(node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


@register_when(_tagged_pointwise)
@register(FACTORIES, DROPOUT, ACTIVATIONS, COMPLEX, aten.broadcast_tensors)
class Pointwise(Rule):
    def classify(self, node, tokens) -> str:
        return MIX if _tokens_meet_tokens(node, tokens) else LOCAL


def _tokens_meet_tokens(node, tokens) -> bool:
    """Inputs whose tokens broadcast onto different output dims (``pos[:, None] <= pos[None, :]``): every token
    meets every other, an outer product over the sequence, not an elementwise op on it."""
    out = value(node)
    out = out[0] if isinstance(out, (list, tuple)) and out else out  # broadcast_tensors: all the same shape
    if not isinstance(out, torch.Tensor):
        return False
    placed = set()
    for a in node.all_input_nodes:
        if isinstance(value(a), torch.Tensor) and tokens.has(a):
            shift = out.dim() - value(a).dim()
            placed.add(tuple(d + shift for d in tokens.dims(a)))
    return len(placed) > 1
