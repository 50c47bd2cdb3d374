"""The report's parts on their own: graph calls declared where they are defined drive the picture, both
layouts keep boxes apart, and the page escapes what it shows."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import fx

from ringify.report import Report, graph_summary
from ringify.report import layout
from ringify.report.plots import CHAR
from ringify.report.summary import KINDS
from ringify.runtime import graph_calls
from ringify.runtime.graph_calls import declared, graph_call


def test_every_declared_kind_has_a_legend_entry():
    assert set(graph_calls.CALL_KINDS) - {"parameter"} <= set(KINDS)
    with pytest.raises(ValueError, match="kind 'ring'"):
        graph_call("ring", "a typo")


def test_a_declared_call_is_drawn_with_its_kind_and_title():
    """A new graph call shows in the picture by its declaration alone: no name table to update."""
    @graph_call("collective", "max over ranks")
    def max_over_ranks_for_test(x, group):
        return x

    def undeclared_for_test(x):
        return x

    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(graph_calls.shard_like, (x, 1, "", "zigzag"))
    y = g.call_function(undeclared_for_test, (y,))
    g.output(g.call_function(max_over_ranks_for_test, (y, "")))
    nodes = graph_summary(fx.GraphModule(torch.nn.Module(), g))["nodes"]
    assert [(n["kind"], n["label"]) for n in nodes] == [
        ("input", "input x"), ("shard", "shard (dim 1)"), ("local", "undeclared_for_test"),
        ("collective", "max over ranks"), ("output", "output")]
    assert declared(torch.ops.ringify.ring_attention.default).kind == "ring_attention"  # an exported graph's op
    assert declared(torch.ops.aten.mm.default) is None


@pytest.mark.parametrize("arrange", ["layered", "multipartite"])
def test_layouts_keep_the_boxes_of_a_row_apart(arrange):
    torch.manual_seed(0)
    graph = nx.gn_graph(40, seed=3).reverse()  # a random DAG: a tree with its edges towards the leaves
    graph.add_edges_from((u, v) for u, v in nx.gnp_random_graph(40, 0.05, seed=1, directed=True).edges if u < v)
    widths = {n: CHAR * int(torch.randint(4, 40, ())) + 0.3 for n in graph}
    xy, lanes = getattr(layout, arrange)(graph, widths)
    assert set(graph) <= set(xy) and set(lanes) == set(graph.edges)
    rows: dict = {}
    for n in graph:
        rows.setdefault(xy[n][1], []).append(n)
    for row in rows.values():
        row.sort(key=lambda n: xy[n][0])
        for a, b in zip(row, row[1:]):
            assert xy[b][0] - xy[a][0] >= (widths[a] + widths[b]) / 2 - 1e-9, (arrange, a, b)
    for u, v in graph.edges:  # top to bottom in data-flow order
        assert xy[u][1] > xy[v][1]


def test_the_page_escapes_what_it_shows():
    report = Report("<script>alert(1)</script>", 2, 16, "zigzag",
                    refused=[{"what": "aten.cumsum", "why": "x < y & z", "module": "a<b", "source": "m.py:3 (a<b)"}])
    page = report.to_html()
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "x &lt; y &amp; z" in page and '<code class="path">a&lt;b</code>' in page and "<code>a&lt;b</code>" in page
