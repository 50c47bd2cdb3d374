"""Small networkx views of FX graphs, shared by the analysis passes.

The passes reason about data flow (who feeds whom, which nodes still matter) on a
`networkx.DiGraph` whose vertices are the `torch.fx.Node`s themselves and whose edges run
producer -> user. Keeping that in one place lets every pass use networkx' reachability
instead of hand-written graph walks.
"""

from __future__ import annotations

import networkx as nx
from torch import fx

from .fx import is_assert


def to_digraph(graph: fx.Graph) -> nx.DiGraph:
    """Data-flow DiGraph of `graph`: one vertex per fx.Node, an edge producer -> user."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


def live_nodes(graph: fx.Graph, g: nx.DiGraph | None = None) -> set[fx.Node]:
    """Nodes whose value can still matter: those with a path to the output or to a node with a
    side effect (a mutation, a placeholder). Run-time metadata asserts do not count: a value
    that only feeds `_assert_tensor_metadata` is dead."""
    g = to_digraph(graph) if g is None else g
    roots = [n for n in graph.nodes if n.op == "output"]
    for n in graph.nodes:
        if n.op in ("call_function", "call_module") and not is_assert(n):
            try:
                if n.is_impure():
                    roots.append(n)
            except Exception:  # pragma: no cover - purity check needs an owning module
                pass
    layers = nx.bfs_layers(g.reverse(copy=False), roots)
    return {n for layer in layers for n in layer}


def live_users(node: fx.Node, live: set[fx.Node]) -> list[fx.Node]:
    """Users of `node` that are live and are not metadata asserts."""
    return [u for u in node.users if u in live and not is_assert(u)]


def escaping_users(region: set[fx.Node], exits: set[fx.Node], live: set[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """For each node of `region` other than `exits`, its live users outside `region`.
    A non-empty answer means the region's intermediate values are needed elsewhere, so the
    region cannot be replaced by one node."""
    out: dict[fx.Node, list[fx.Node]] = {}
    for n in region - exits:
        bad = [u for u in live_users(n, live) if u not in region]
        if bad:
            out[n] = bad
    return out


def upstream_within(g: nx.DiGraph, node: fx.Node, hops: int) -> set[fx.Node]:
    """Producers of `node` at most `hops` edges upstream (node itself excluded)."""
    rev = g.reverse(copy=False)
    dist = nx.single_source_shortest_path_length(rev, node, cutoff=hops)
    return {n for n in dist if n is not node}
