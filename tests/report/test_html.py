"""The HTML report: the condensed picture of a rewritten graph, a self-contained page, JSON round trip,
and a headless-Chromium screenshot that is not blank (skipped without /usr/bin/chromium)."""

from __future__ import annotations

import base64
import json
import re

import networkx as nx
import pytest
import torch

from ringify import ringify
from ringify.report import Report, graph_summary

from chromium import CHROMIUM, screenshot
from report_samples import sample_cost

GiB = 2**30


@pytest.fixture(scope="module")
def llama():
    """A 2-layer HF Llama (GQA, RoPE, SwiGLU, labels) rewritten for 2 ranks (no process group needed)."""
    pytest.importorskip("transformers")
    import zoo
    from ringify.api import rewrite
    from ringify.capture import capture

    built = zoo.llama()
    args, kwargs = built.make_inputs(0, 9)
    captured = capture(built.model, args, kwargs, 1)
    gm, report = rewrite(built.model, captured, world_size=2, ffn_chunk_tokens=256)  # the chunked FFN drawn too
    report.graph = graph_summary(gm)
    return gm, report


def test_graph_summary_of_llama(llama):
    gm, report = llama
    summary = report.graph
    json.dumps(summary)  # JSON-able
    nodes = {n["id"]: n for n in summary["nodes"]}
    assert 10 <= len(nodes) <= 80, len(nodes)
    assert len(nodes) < len(gm.graph.nodes) / 3
    ring = [n for n in nodes.values() if n["kind"] == "ring_attention"]
    assert sorted(n["module"] for n in ring) == ["model.model.layers.0.self_attn", "model.model.layers.1.self_attn"]
    assert all(n["source"] and "modeling_llama.py" in n["source"] for n in ring), ring
    ffn = [n for n in nodes.values() if n["kind"] == "ffn"]
    assert sorted(n["module"] for n in ffn) == ["model.model.layers.0.mlp", "model.model.layers.1.mlp"]
    kinds = {n["kind"] for n in nodes.values()}
    assert {"input", "output", "shard", "position", "collective", "local", "full"} <= kinds, kinds
    graph = nx.DiGraph([tuple(e) for e in summary["edges"]])
    assert set(graph) <= set(nodes)
    assert nx.is_directed_acyclic_graph(graph)
    inputs = [k for k, n in nodes.items() if n["kind"] == "input"]
    for n in ring + ffn:  # data flows from an input through every ring call to the output
        assert any(nx.has_path(graph, i, n["id"]) for i in inputs), n
        assert nx.has_path(graph, n["id"], "output"), n
    # layer 0's attention comes before layer 1's
    assert nx.has_path(graph, ring[0]["id"], ring[1]["id"]) or nx.has_path(graph, ring[1]["id"], ring[0]["id"])
    assert summary["synced_parameters"] == sum(1 for _ in gm.parameters())


def test_graph_summary_of_a_real_run():
    """ringify(model) run on one rank (no group): the report carries the picture of the graph it ran."""
    from ringify.models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT()
    ids = torch.randint(0, 50, (2, 11))
    rm = ringify(model)
    rm(ids)
    report = rm.report()
    summary = report.graph or graph_summary(rm.graph_module)
    ring = [n for n in summary["nodes"] if n["kind"] == "ring_attention"]
    layers = {path for path, layer in report.layers.items() if layer.get("attention")}
    assert len(ring) == len(layers) >= 1, (ring, layers)
    assert len(summary["nodes"]) <= 80


def test_graph_summary_knows_the_custom_ops():
    """A graph holding ringify's registered ops (as after torch.export of a rewritten graph), not its functions."""
    from torch import fx

    from ringify.report.plots import draw_graph
    from ringify.runtime import graph_calls

    g = fx.Graph()
    x = g.placeholder("x")
    cut = g.call_function(graph_calls.shard_like, (x, 1, "", "zigzag"))
    q = g.call_function(torch.ops.aten.mul.Tensor, (cut, 2.0))
    attn = g.call_function(torch.ops.ringify.ring_attention.default, (q, q, q))
    g.output(g.call_function(torch.ops.ringify.all_reduce_sum.default, (attn, "")))
    summary = graph_summary(fx.GraphModule(torch.nn.Module(), g))
    kinds = [n["kind"] for n in summary["nodes"]]
    assert kinds == ["input", "shard", "local", "ring_attention", "collective", "output"], kinds
    assert len(summary["edges"]) == 5
    assert draw_graph(summary).startswith("data:image/png;base64,")
    assert draw_graph(summary, "multipartite").startswith("data:image/png;base64,")  # the other layout draws too
    empty = fx.Graph()
    empty.output(None)
    assert draw_graph(graph_summary(fx.GraphModule(torch.nn.Module(), empty))) is not None  # one node: output


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_html_is_self_contained(llama, tmp_path):
    _, report = llama
    report.cost = sample_cost()
    path = tmp_path / "report.html"
    page = report.to_html(str(path))
    assert path.read_text(encoding="utf-8") == page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page), "page loads something from the network"
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    images = _images(page)
    assert len(images) == 3, len(images)  # graph, memory plot, step plot
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") and len(img) > 5000 for img in images)
    for layer in ("model.model.layers.0", "model.model.layers.1"):
        assert f'<code class="path">{layer}</code>' in page
        assert f'<code class="path">{layer}.self_attn</code>' in page and f'<code class="path">{layer}.mlp</code>' in page
    assert "modeling_llama.py:" in page  # source lines
    assert page.count("ring attention</span>") == 2 and page.count("chunked FFN</span>") == 2
    assert "sample-80g" in page and "Largest context" in page and "does not fit" not in page
    assert "aten.cross_entropy_loss" in page and "nothing refused" in page


def test_html_without_or_with_partial_cost():
    empty = Report("Empty", 2, 16, "zigzag")
    page = empty.to_html()
    assert "No cost estimate" in page and "No picture" in page and not _images(page)
    partial = Report("Partial", 2, 16, "zigzag", refused=[{"what": "aten.cumsum", "why": "mixes tokens",
                                                          "module": "mixer", "source": "m.py:3 (x.cumsum(1))"}])
    partial.cost = {"estimate": {"per_device": {"total": 3 * GiB, "fits": False}}}
    page = partial.to_html()
    assert "does not fit" in page and "aten.cumsum" in page and "mixes tokens" in page and not _images(page)
    partial.cost = {"memory_curve": sample_cost()["memory_curve"]}
    assert len(_images(partial.to_html())) == 1
    partial.cost = {"step_curve": sample_cost()["step_curve"], "estimate": {"ring_step": {"min_block_tokens": 500}}}
    assert len(_images(partial.to_html())) == 1
    assert "## cost" in partial.to_markdown()


def test_json_round_trip_and_markdown(llama):
    _, report = llama
    report.cost = sample_cost()
    text = report.to_json()
    back = Report.from_json(text)
    assert back == report
    assert json.loads(back.to_json()) == json.loads(text)
    markdown = report.to_markdown()
    assert "## cost" in markdown and "largest context" in markdown and "sample-80g" in markdown
    assert "model.model.layers.1" in markdown


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_screenshot_is_not_blank(llama, tmp_path):
    import matplotlib.image

    _, report = llama
    report.cost = sample_cost()
    html_path, png_path = tmp_path / "report.html", tmp_path / "report.png"
    report.to_html(str(html_path))
    screenshot(str(html_path), str(png_path))
    assert png_path.exists() and png_path.stat().st_size > 20_000
    pixels = matplotlib.image.imread(str(png_path))[..., :3]
    assert abs(pixels.shape[0] / pixels.shape[1] - 3000 / 1400) < 0.01, pixels.shape  # the window we asked for
    not_white = (pixels < 0.95).any(axis=-1).mean()
    assert not_white > 0.05, not_white  # text, tables, plots and the graph, not an empty page
    assert pixels.std() > 0.05
