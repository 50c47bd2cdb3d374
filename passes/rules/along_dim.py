"""Ops along one dim (scans, sorts, arg-reductions, softmax) and ops that join or cut along one (cat,
split, chunk, unbind, repeat_interleave, pad).

Along a dim without tokens they are token-local: a router's top-k over experts, a cumsum over
features, a split of fused q/k/v. Along the tokens they are scans, sorts, shifts and selections over
the sequence, which need every token: mixing. Convolutions and rolls always mix here; the rules
below only give their refusals a reason.
"""

from __future__ import annotations

import torch

from ..fx import arg, packet, value
from ..frames import cuttable
from .base import JOIN, LOCAL, MIX, Rule, operand, register

aten = torch.ops.aten

SCANS = (aten.cumsum, aten.cumprod, aten.logcumsumexp, aten.cummax, aten.cummin)
SORTS = (aten.sort, aten.argsort, aten.msort, aten.topk, aten.kthvalue, aten.argmax, aten.argmin, aten.mode,
         aten.median, aten.nanmedian, aten.max, aten.min)
SOFTMAX = (aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
CUTS = (aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split, aten.repeat_interleave)
CONVOLUTIONS = (aten.convolution, aten._convolution, aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d,
                aten.conv_transpose2d, aten.conv_tbc)


def _along(node, tokens, dim) -> str:
    """Local unless ``dim`` (None: every dim, flattened) holds tokens of the op's tensor."""
    x = operand(node)
    if dim is None or not isinstance(value(x), torch.Tensor) or value(x).dim() == 0:
        return MIX
    return MIX if dim % value(x).dim() in tokens.dims(x) else LOCAL


@register(SCANS)
class Scan(Rule):
    def classify(self, node, tokens) -> str:
        return _along(node, tokens, arg(node, "dim"))

    def hint(self, node) -> str:
        return ("A scan over the sequence (cumsum: linear attention, state-space scans) needs the running total of "
                "the ranks before this one, which ringify does not pass between ranks. ")


@register(SORTS)
class Sort(Rule):
    def classify(self, node, tokens) -> str:
        dim = 0 if packet(node) is aten.msort else arg(node, "dim")
        return _along(node, tokens, dim)

    def hint(self, node) -> str:
        return "Sorting or selecting (sort, top-k, max) over the sequence needs every token on one rank. "


@register(SOFTMAX)
class Softmax(Rule):
    def classify(self, node, tokens) -> str:
        return _along(node, tokens, arg(node, "dim"))


@register(CUTS)
class Cut(Rule):
    """split / chunk / unbind / repeat_interleave along ``dim`` (repeat_interleave without one flattens: mixing)."""

    def classify(self, node, tokens) -> str:
        return _along(node, tokens, arg(node, "dim", None if packet(node) is aten.repeat_interleave else 0))


@register(aten.cat)
class Cat(Rule):
    """Along other dims: local. Along the tokens (a CLS token or registers in front, ``cat([cls, x], 1)``): a new
    sequence, laid out over the ranks anew; its activations are gathered whole first (``regather``, O(S) rows
    per rank once) and the joined sequence is cut again where it is used."""

    def classify(self, node, tokens) -> str:
        tensors = arg(node, "tensors")
        dim = arg(node, "dim", 0) % value(tensors[0]).dim()
        if not any(dim in tokens.dims(t) for t in tensors):
            return LOCAL
        single = all(tokens.dims(t) in ([], [dim]) for t in tensors) and tokens.dims(node) == [dim]
        return JOIN if single and cuttable(value(node).shape[dim]) else MIX

    def emit_full(self, node, sharder):
        if sharder.family.get(node) != JOIN or not sharder.active[node]:
            return None
        tensors = arg(node, "tensors")
        dim = arg(node, "dim", 0) % value(tensors[0]).dim()
        sharder.record("full_ops", node, joined="activations gathered whole, the joined sequence cut again")
        return sharder.graph.call_function(aten.cat.default, ([sharder.whole(t, dim) for t in tensors], dim))


@register(aten.stack)
class Stack(Rule):
    """A new dim: every input's tokens stay where they are."""

    def classify(self, node, tokens) -> str:
        return LOCAL


@register(aten.pad, aten.constant_pad_nd)
class Pad(Rule):
    def classify(self, node, tokens) -> str:
        x = operand(node)
        nd = value(x).dim()
        padded = {nd - 1 - i // 2 for i, p in enumerate(arg(node, "pad")) if p != 0}
        return MIX if set(tokens.dims(x)) & padded else LOCAL


@register(CONVOLUTIONS)
class Convolution(Rule):
    def hint(self, node) -> str:
        return ("A convolution along the sequence (a causal depthwise conv1d as in Mamba's causal_conv1d, a "
                "convolutional position embedding) needs the kernel_size-1 neighbouring tokens of the adjacent rank "
                "(a halo), which ringify does not exchange. ")


@register(aten.roll)
class Roll(Rule):
    def hint(self, node) -> str:
        return "A shift along the sequence (torch.roll, token shift) moves tokens across rank boundaries. "
