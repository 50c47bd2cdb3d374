"""The two graphs of generation, derived from the ring graph (outputs local, no gradient sync).

- **prefill**: before each ring attention, the layer's keys and values (this rank's shard, as the model
  computed them) are stored into the sharded cache; the graph returns the stores, so everything only the
  logits need (the last layer's attention, the final norm, the head) is dead code and goes: a prefill
  never computes O(S x vocab).
- **decode**: the same graph under the ``LAST`` layout, where every rank holds the last position: the
  inputs are the whole sequence so far (O(S) token ids, masks and positions, like the ring's full
  values), the positions, tables and masks are those of the last token, and each attention attends to
  the sharded cache, merged over the ranks. One graph serves every step: it is symbolic in the length.

Both share the ring graph's parameters (no copies).
"""

from __future__ import annotations

import copy
import inspect

from torch import fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from ..errors import UnsupportedModelError
from ..runtime import graph_calls, kv_cache
from ..runtime.layout import LAST
from .fx import describe, module_path, source_line
from .rules import reductions

# graph calls that sum over the ranks' tokens (what the reduction rules emit) or gather them: a decoded token is on
# every rank at once
_OVER_RANKS = (*reductions.OVER_RANKS, graph_calls.gather_output)


def attention_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The ring attention calls of ``gm`` in graph order: the cache's layer numbers."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is graph_calls.ring_attention_call]


def _copy(gm: fx.GraphModule) -> tuple[fx.Graph, dict]:
    graph = fx.Graph()
    graph.set_codegen(copy.copy(gm.graph._codegen))
    mapping: dict = {}
    graph.graph_copy(gm.graph, mapping)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    graph.output(fx.node.map_arg(out.args[0], lambda n: mapping[n]))
    return graph, mapping


def prefill_graph(ring: fx.GraphModule, slot: str) -> fx.GraphModule:
    """``ring`` storing every attention layer's keys and values in the cache bound to ``slot``, returning nothing
    else (see the module docstring)."""
    calls = attention_calls(ring)
    if not calls:
        raise UnsupportedModelError("the model has no attention that ringify rewrote: there is no key/value cache to fill")
    graph, mapping = _copy(ring)
    stores = []
    for layer, call in enumerate(calls):
        new = mapping[call]
        with graph.inserting_before(new):
            stores.append(graph.call_function(kv_cache.store_kv, (new.args[1], new.args[2]),
                                              {"slot": slot, "layer": layer}))
    output = next(n for n in graph.nodes if n.op == "output")
    graph.erase_node(output)
    graph.output(tuple(stores))
    info = graph._codegen.pytree_info if isinstance(graph._codegen, _PyTreeCodeGen) else None
    if info is not None:
        graph.set_codegen(_PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None)))
    gm = fx.GraphModule(ring, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def decode_graph(ring: fx.GraphModule, slot: str) -> fx.GraphModule:
    """``ring`` computing the last token on every rank, its attention over the cache bound to ``slot``."""
    graph, mapping = _copy(ring)
    layers = {mapping[c]: i for i, c in enumerate(attention_calls(ring))}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _OVER_RANKS:
            raise UnsupportedModelError(
                f"{describe(node)} ({module_path(node) or 'the model'}, {source_line(node) or 'no source line'}) "
                "combines the tokens of the sequence; generation needs a model whose outputs are per-token logits. "
                "Hint: call the model without labels, or generate from a model that returns logits.")
        if node in layers:
            q, k, v, mask_args = node.args
            kw = dict(node.kwargs)
            with graph.inserting_before(node):
                new = graph.call_function(
                    kv_cache.cache_attention, (q, k, v, mask_args),
                    dict(slot=slot, layer=layers[node], mask_fn=kw["mask_fn"], scale=kw["scale"], causal=kw["causal"],
                         fill=kw["fill"], softcap=kw.get("softcap", 0.0), group=kw["group"], sinks=kw.get("sinks")))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif getattr(node.target, "__module__", "") == graph_calls.__name__ and _takes_layout(node.target):
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            bound.arguments["layout"] = LAST
            node.args, node.kwargs = bound.args, bound.kwargs
    gm = fx.GraphModule(ring, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _takes_layout(fn) -> bool:
    try:
        return "layout" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


__all__ = ["attention_calls", "decode_graph", "prefill_graph"]
