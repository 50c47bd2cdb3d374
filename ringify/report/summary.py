"""The rewritten graph condensed for the report's picture.

:func:`graph_summary` keeps the nodes that carry the ring one by one (inputs, outputs, and every call the
runtime declares with :func:`ringify.runtime.graph_calls.graph_call`: ring attention, chunked feed-forward,
collectives, shard cuts, position rewrites) and collapses the token-local ops between them, one node per
module (or per layer, for deep models) and per stage. The result is JSON-able and goes into the report.
"""

from __future__ import annotations

import re
from collections import Counter

import networkx as nx
import torch
from torch import fx

from ..passes.fx import common_prefix, module_path, packet, source_line, value
from ..runtime.graph_calls import declared

#: What the picture calls each kind of node, in legend order, with its colour.
KINDS: dict[str, tuple[str, str]] = {
    "input": ("input", "#d9d9d9"),
    "shard": ("cut to this rank's shard", "#6baed6"),
    "position": ("global positions", "#74c476"),
    "ring_attention": ("ring attention", "#fb6a4a"),
    "ffn": ("chunked feed-forward", "#fdae6b"),
    "collective": ("collective over ranks", "#9e9ac8"),
    "local": ("token-local ops (this rank's tokens)", "#fff5d6"),
    "full": ("ops on full inputs (every rank)", "#e5eef7"),
    "output": ("output", "#969696"),
}

_IMPORTANCE = ["ring_attention", "ffn", "collective", "shard", "position", "input", "output", "local", "full"]


def _node_kind(node: fx.Node) -> str | None:
    """The kind of an fx node in the picture, or None for nodes the picture leaves out."""
    if node.op == "placeholder":
        val = value(node)
        return None if val is not None and not _has_tensor(val) else "input"
    if node.op == "output":
        return "output"
    if node.op == "get_attr":
        return None  # parameters and buffers: counted, not drawn
    if node.op == "call_module":
        return None if "guard" in str(node.target) else "local"
    call = declared(node.target) if node.op == "call_function" else None
    if call is not None:
        return None if call.kind == "parameter" else call.kind
    text = str(node.target)
    if "assert" in text or "sym_size" in text or "sym_constrain" in text:
        return None
    val = value(node)
    if val is not None and not _has_tensor(val):
        return None  # shape arithmetic on symbolic sizes
    return "local"


def _has_tensor(val) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (list, tuple)):
        return any(_has_tensor(v) for v in val)
    return False


def _shape(node: fx.Node) -> str:
    """``[2, S, 32]``: the value's shape, with symbolic sizes (the sequence) written S."""
    val = value(node)
    if isinstance(val, torch.Tensor):
        return re.sub(r"\bs\d+\b", "S", "[" + ", ".join(str(s) for s in val.shape) + "]")
    return ""


def _group_path(path: str, granularity: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.3.self_attn`` (module) or ``model.layers.3`` (layer)."""
    if granularity == "chain" or not path:
        return ""
    parts = path.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit()]
    if numbered:
        keep = numbered[0] + (2 if granularity == "module" else 1)
    else:
        keep = 3 if granularity == "module" else 2
    return ".".join(parts[:keep])


def _inferred(read, node: fx.Node) -> str:
    """``read(node)`` (module path, source line) of a kept node; ringify's own calls have none, so else the
    first consumer's, else producer's that has one."""
    return next((found for other in [node, *node.users, *node.all_input_nodes] if (found := read(other))), "")


def _kept_label(node: fx.Node, kind: str) -> str:
    if kind == "input":
        return f"input {node.name}"
    if kind == "output":
        return "output"
    title = declared(node.target).title
    if kind == "ring_attention":
        bits = []
        if node.kwargs.get("causal"):
            bits.append("causal")
        if node.kwargs.get("mask_fn") is not None or (len(node.args) > 3 and node.args[3]):
            bits.append("masked")
        return title + (f" ({', '.join(bits)})" if bits else "")
    if kind == "ffn":
        return f"{title} ({node.kwargs.get('kind', '?')}, {node.kwargs.get('activation', '?')})"
    if kind == "shard" and len(node.args) > 1 and isinstance(node.args[1], int):
        return f"{title} (dim {node.args[1]})"
    return title


def graph_summary(gm: fx.GraphModule, max_nodes: int = 80) -> dict:
    """A condensed, JSON-able picture of a rewritten graph.

    Every input, output, ring attention, chunked feed-forward, collective, shard cut and position rewrite
    is a node of its own; the ops between them are collapsed by module (``...layers.0.self_attn``) and by
    stage (how many kept nodes lie upstream), so a collapsed node never spans a ring call. Parameters and
    shape arithmetic are left out. Coarser grouping (per layer, then per stage only) is used when the
    picture would have more than ``max_nodes`` nodes.

    Returns ``{"nodes": [{"id", "kind", "label", "module", "source", "ops", "op_counts", "members",
    "shape"}...], "edges": [[src, dst]...], "granularity", "fx_nodes", "parameters", "synced_parameters",
    "collapsed_ops"}``; edges are the data flow between the nodes (networkx contraction of the fx graph).
    """
    graph = nx.DiGraph()
    kinds: dict[fx.Node, str] = {}
    parameters = synced = 0
    sizes_from: dict[fx.Node, set] = {}  # left-out shape arithmetic -> the drawn tensors its sizes come from
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            parameters += 1
        if node.op == "call_function" and getattr(declared(node.target), "kind", None) == "parameter":
            synced += 1
        kind = _node_kind(node)
        if kind is None:
            sizes_from[node] = set().union(*([{i} if i in kinds else sizes_from.get(i, set())
                                               for i in node.all_input_nodes] or [set()]))
            continue
        kinds[node] = kind
        graph.add_node(node)
        inputs = [i for i in node.all_input_nodes if i in kinds]
        if not inputs and kind != "output":  # e.g. arange(seq_len): drawn below the tensor its size is from
            inputs = sorted(set().union(*[sizes_from.get(i, set()) for i in node.all_input_nodes] or [set()]),
                            key=lambda n: n.name)
        graph.add_edges_from((i, node) for i in inputs)

    # stage: how many kept (ring) nodes lie on the longest path from the inputs; where: local or full tokens
    stage: dict[fx.Node, int] = {}
    local: dict[fx.Node, bool] = {}
    for node in nx.topological_sort(graph):
        preds = list(graph.predecessors(node))
        kind = kinds[node]
        stage[node] = max((stage[p] for p in preds), default=0) + (kind not in ("local", "input", "output"))
        if kind in ("shard", "position", "ring_attention", "ffn"):
            local[node] = True
        elif kind == "collective":
            local[node] = False  # reduced or gathered: the same on every rank
        else:
            local[node] = any(local[p] for p in preds)
        if kind == "local" and not local[node]:
            kinds[node] = "full"

    summary: dict = {}
    for granularity in ("module", "layer", "chain"):
        summary = _contract(graph, kinds, stage, granularity)
        if len(summary["nodes"]) <= max_nodes:
            break
    summary.update(fx_nodes=len(gm.graph.nodes), parameters=parameters, synced_parameters=synced,
                   collapsed_ops=sum(n["ops"] for n in summary["nodes"] if n["kind"] in ("local", "full")))
    return summary


def _contract(graph: nx.DiGraph, kinds: dict, stage: dict, granularity: str) -> dict:
    paths = {n: (_inferred(module_path, n) if kinds[n] not in ("local", "full") else module_path(n)) for n in graph}
    key: dict[fx.Node, str] = {}
    for node in graph:
        if kinds[node] in ("local", "full"):
            key[node] = f"{kinds[node]}:{_group_path(paths[node], granularity)}:{stage[node]}"
        else:
            key[node] = node.name
    quotient = nx.relabel_nodes(graph, key, copy=True)  # many-to-one: merges each group into one node
    quotient.remove_edges_from(list(nx.selfloop_edges(quotient)))
    order = {n: i for i, n in enumerate(graph)}
    members: dict[str, list] = {}
    for node in graph:  # graph order is the fx order (topological)
        members.setdefault(key[node], []).append(node)
    if not nx.is_directed_acyclic_graph(quotient):  # groups of one stage that feed each other: merge them
        condensed = nx.condensation(quotient)
        rename = {}
        for c in condensed:
            group = sorted(condensed.nodes[c]["members"], key=lambda k: order[members[k][0]])
            rename.update((k, group[0]) for k in group)
        quotient = nx.relabel_nodes(quotient, rename, copy=True)
        quotient.remove_edges_from(list(nx.selfloop_edges(quotient)))
        for old, new in rename.items():
            if old != new:
                members[new] += members.pop(old)
    # then join the stages of one module wherever that keeps the picture acyclic (no ring call in between)
    by_module: dict[str, list] = {}
    for k in sorted(quotient, key=lambda k: order[members[k][0]]):
        if ":" in k:
            by_module.setdefault(k.rsplit(":", 1)[0], []).append(k)
    for keys in by_module.values():
        base = keys[0]
        for other in keys[1:]:
            trial = nx.contracted_nodes(quotient, base, other, self_loops=False, copy=True)
            if nx.is_directed_acyclic_graph(trial):
                quotient = trial
                members[base] += members.pop(other)
            else:
                base = other
    nodes = []
    for k in sorted(quotient, key=lambda k: min(order[m] for m in members[k])):
        group = sorted(members[k], key=order.get)
        kind = min((kinds[m] for m in group), key=_IMPORTANCE.index)
        head = next(m for m in group if kinds[m] == kind)
        if kind in ("local", "full"):
            ops = Counter(_op_short(m) for m in group)
            module = _common_path([paths[m] for m in group]) or _group_path(paths[head], granularity)
            label = " + ".join(_op_short(m) for m in group) if len(group) <= 2 else f"{len(group)} ops"
            source = next((s for s in map(source_line, group) if s), "")
            shape = _shape(group[-1]) if kind == "full" else ""
        else:
            ops = Counter([_op_short(head) if head.op == "call_function" else head.op])
            module = "" if kind in ("input", "output") else paths[head]
            label = _kept_label(head, kind)
            source = _inferred(source_line, head) if kind not in ("input", "output") else ""
            shape = _shape(head)
        nodes.append({"id": k, "kind": kind, "label": label, "module": module, "source": source,
                      "ops": len(group), "op_counts": dict(ops.most_common(6)),
                      "members": [m.name for m in group[:12]], "shape": shape})
    kind_of = {n["id"]: n["kind"] for n in nodes}
    for n in nodes:  # ops on full inputs that only feed attention compute its mask
        consumers = {kind_of.get(s) for s in quotient.successors(n["id"])}
        if n["kind"] == "full" and consumers == {"ring_attention"}:
            n["label"] = f"attention mask: {n['label']}"
    edges = sorted(([u, v] for u, v in quotient.edges), key=lambda e: (e[0], e[1]))
    return {"nodes": nodes, "edges": edges, "granularity": granularity}


def _op_short(node: fx.Node) -> str:
    op = packet(node)
    return getattr(op, "__name__", str(op))


def _common_path(paths: list[str]) -> str:
    return ".".join(common_prefix([p.split(".") for p in paths if p]))
