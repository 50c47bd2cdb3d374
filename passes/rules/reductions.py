"""Reductions: sums, means and losses over tokens become a local partial plus a sum over the ranks.

Only reductions that leave no token dim are rewritten (the partial of every rank has the same shape);
a sum that keeps another token dim, and reductions that do not split into a sum of per-rank parts
(amax, var, norms over tokens), mix. Over features they are token-local, as are norms (layer, RMS)
over the trailing dims when those hold no tokens.
"""

from __future__ import annotations

import torch

from ...errors import UnsupportedModelError
from ...runtime import graph_calls
from ..fx import arg, describe, packet, value
from .base import LOCAL, MIX, REDUCE, Rule, dim_set, operand, register

aten = torch.ops.aten

LOSSES = (aten.cross_entropy_loss, aten.nll_loss, aten.nll_loss_nd, aten.mse_loss, aten.l1_loss,
          aten.smooth_l1_loss, aten.binary_cross_entropy_with_logits)
_PER_TOKEN = (aten.cross_entropy_loss, aten.nll_loss, aten.mse_loss)  # reduction="none": one loss per token

#: the graph calls this module emits: each combines the tokens of every rank (a decoded token is on all at once)
OVER_RANKS = (graph_calls.sum_over_ranks, graph_calls.mean_over_ranks, graph_calls.cross_entropy_over_ranks,
              graph_calls.nll_over_ranks, graph_calls.pointwise_loss_over_ranks)


def _over_tokens(node, tokens) -> bool:
    x = operand(node)
    return bool(set(tokens.dims(x)) & dim_set(arg(node, "dim"), value(x).dim()))


@register(aten.sum, aten.mean)
class Sum(Rule):
    def classify(self, node, tokens) -> str:
        if not _over_tokens(node, tokens):
            return LOCAL
        return MIX if tokens.has(node) else REDUCE  # a sum that keeps a token dim is no sum over ranks

    def emit(self, node, sharder):
        if sharder.family.get(node) != REDUCE:
            return None
        sharder.record("reductions", node)
        fn = graph_calls.sum_over_ranks if packet(node) is aten.sum else graph_calls.mean_over_ranks
        return sharder.graph.call_function(fn, (sharder.as_local(operand(node)), arg(node, "dim"),
                                                arg(node, "keepdim", False), arg(node, "dtype"), sharder.group))


@register(aten.amax, aten.amin, aten.var, aten.var_mean, aten.std, aten.std_mean, aten.norm, aten.linalg_vector_norm,
          aten.logsumexp, aten.prod, aten.all, aten.any)
class NotASum(Rule):
    """Reductions whose per-rank parts do not add up (a max, a variance): local over features, mixing over tokens."""

    def classify(self, node, tokens) -> str:
        return MIX if _over_tokens(node, tokens) else LOCAL


@register(aten.layer_norm, aten.native_layer_norm, aten.rms_norm, aten._fused_rms_norm)
class Norm(Rule):
    """Normalised over the trailing ``normalized_shape`` dims: token-local unless those hold tokens."""

    def classify(self, node, tokens) -> str:
        x = operand(node)
        nd = value(x).dim()
        normalized = set(range(nd - len(arg(node, "normalized_shape")), nd))
        return MIX if set(tokens.dims(x)) & normalized else LOCAL


@register(LOSSES)
class Loss(Rule):
    def classify(self, node, tokens) -> str:
        if arg(node, "reduction", 1) != 0:
            return REDUCE
        return LOCAL if packet(node) in _PER_TOKEN else MIX

    def emit(self, node, sharder):
        if sharder.family.get(node) != REDUCE:
            return None
        op, get = packet(node), sharder.as_local
        x, target, group = get(operand(node)), get(arg(node, "target")), {"group": sharder.group}
        if op is aten.cross_entropy_loss:
            call = (graph_calls.cross_entropy_over_ranks,
                    (x, target, get(arg(node, "weight")), arg(node, "reduction", 1), arg(node, "ignore_index", -100),
                     arg(node, "label_smoothing", 0.0)))
        elif op in (aten.nll_loss, aten.nll_loss_nd):
            call = (graph_calls.nll_over_ranks, (x, target, get(arg(node, "weight")), arg(node, "reduction", 1),
                                                 arg(node, "ignore_index", -100)))
        elif op in (aten.mse_loss, aten.l1_loss, aten.smooth_l1_loss):
            call = (graph_calls.pointwise_loss_over_ranks,
                    (op.__name__, x, target, arg(node, "reduction", 1), *([arg(node, "beta", 1.0)]
                                                                         if op is aten.smooth_l1_loss else [])))
        else:
            raise UnsupportedModelError(
                f"{describe(node)} reduces over the tokens in a way ringify does not rewrite yet. Hint: spell the "
                "loss as its elementwise form followed by .mean() or .sum()")
        sharder.record("reductions", node)
        return sharder.graph.call_function(*call, group)
