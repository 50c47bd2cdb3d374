"""`find_attention`: every attention of a graph, and every softmax that looks like attention but is not
understood (never left silently: `canonicalize_attention` refuses the model over it)."""

from __future__ import annotations

from torch import fx

from ..fx import module_path, module_type, op_name, source_line
from ..graph import live_nodes, to_digraph
from .candidate import MatchContext, resolve, to_match
from .ops import FUSED_SDPA, SDPA, SOFTMAX
from .results import HINT_GENERAL, AttentionMatches, NoMatch, UnmatchedSoftmax
from .sdpa import match_sdpa
from .softmax import looks_like_attention, match_softmax


def _unmatched(node: fx.Node, err: NoMatch) -> UnmatchedSoftmax:
    return UnmatchedSoftmax(
        node=node, op=op_name(node), module_path=module_path(node), module_type=module_type(node),
        source=source_line(node), reason=err.reason, hint=err.hint or HINT_GENERAL,
    )


def find_attention(gm: fx.GraphModule) -> AttentionMatches:
    """All attention in `gm` (graph order). Softmaxes that look like attention (over a
    sequence-sized dim, or fed by a product of two activations) but are not understood, and SDPA
    nodes that cannot be read, are listed in `.unmatched` (nodes: `.unmatched_softmax`)."""
    g = to_digraph(gm.graph)
    ctx = MatchContext(gm, g, live_nodes(gm.graph, g))
    matches, unmatched = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in ctx.live:
            continue
        try:
            if node.target in SDPA:
                cand = match_sdpa(node, ctx)
            elif node.target in SOFTMAX:
                cand = match_softmax(node, ctx)
            elif node.target in FUSED_SDPA:
                raise NoMatch(
                    "a decomposed SDPA kernel call",
                    "capture with torch.export in the training IR, before decompositions, so that "
                    "aten.scaled_dot_product_attention stays one node",
                )
            else:
                continue
            matches.append(to_match(resolve(ctx, cand)))
        except NoMatch as err:
            if node.target in SOFTMAX and not looks_like_attention(node, ctx):
                continue
            unmatched.append(_unmatched(node, err))
    return AttentionMatches(matches, unmatched)
