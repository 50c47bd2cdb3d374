"""The HTML report: one self-contained page with a picture of the rewritten graph and the cost plots.

:func:`graph_summary` condenses a rewritten ``GraphModule`` into a small JSON-able graph: the nodes that
carry the ring (inputs, outputs, ring attention, chunked feed-forward, collectives, shard cuts, position
rewrites) are kept one by one, and the token-local ops between them are collapsed, one node per module
(or per layer, for deep models) and per stage. :func:`render_html` turns a :class:`~ringify.report.Report`
into a page with inline CSS and images embedded as base64 PNGs drawn by matplotlib's Agg backend: no
JavaScript, no network, nothing to install beyond matplotlib and networkx.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections import Counter

import networkx as nx
import torch
from torch import fx

from .passes.fx import common_prefix, module_path, packet, source_line, value
from .report import _setup_text, _size, _time

# ------------------------------------------------------------------------------------------ graph summary

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

# function / custom-op name -> kind of the kept nodes
_KEPT = {
    "ring_attention_call": "ring_attention", "ring_attention": "ring_attention",
    "chunked_ffn": "ffn",
    "sum_over_ranks": "collective", "mean_over_ranks": "collective", "cross_entropy_over_ranks": "collective",
    "nll_over_ranks": "collective", "pointwise_loss_over_ranks": "collective", "gather_output": "collective",
    "gather_sequence": "collective", "all_reduce_sum": "collective",
    "shard_like": "shard", "shard_sequence": "shard",
    "local_arange": "position", "table_rows": "position",
}
_TITLES = {
    "ring_attention_call": "ring attention", "ring_attention": "ring attention", "chunked_ffn": "chunked FFN",
    "sum_over_ranks": "sum over ranks", "mean_over_ranks": "mean over ranks",
    "cross_entropy_over_ranks": "cross-entropy over ranks", "nll_over_ranks": "NLL over ranks",
    "pointwise_loss_over_ranks": "loss over ranks", "gather_output": "gather output",
    "gather_sequence": "gather sequence", "all_reduce_sum": "all-reduce sum",
    "shard_like": "shard", "shard_sequence": "shard", "local_arange": "local positions", "table_rows": "table rows",
}
_PARAMETER = {"sync_grad"}
_IMPORTANCE = ["ring_attention", "ffn", "collective", "shard", "position", "input", "output", "local", "full"]


def _target_name(node: fx.Node) -> str:
    """``ring_attention_call`` for ringify's graph functions and custom ops (``torch.ops.ringify.X``), else ''."""
    target = node.target
    namespace = getattr(target, "namespace", None)
    if namespace is not None:  # OpOverload / OpOverloadPacket
        if namespace != "ringify":
            return ""
        return str(getattr(target, "_opname", None) or str(target).split(".")[1])
    if str(getattr(target, "__module__", "")).startswith("ringify"):
        return getattr(target, "__name__", "")
    return ""


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
    name = _target_name(node) if node.op == "call_function" else ""
    if name in _PARAMETER:
        return None
    if name in _KEPT:
        return _KEPT[name]
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


def _kept_label(node: fx.Node, kind: str, name: str) -> str:
    if kind == "input":
        return f"input {node.name}"
    if kind == "output":
        return "output"
    title = _TITLES.get(name, name)
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
    if name == "local_arange":
        return f"{title} (arange)"
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
    names: dict[fx.Node, str] = {}
    parameters = synced = 0
    sizes_from: dict[fx.Node, set] = {}  # left-out shape arithmetic -> the drawn tensors its sizes come from
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            parameters += 1
        if node.op == "call_function" and _target_name(node) in _PARAMETER:
            synced += 1
        kind = _node_kind(node)
        if kind is None:
            sizes_from[node] = set().union(*([{i} if i in kinds else sizes_from.get(i, set())
                                               for i in node.all_input_nodes] or [set()]))
            continue
        kinds[node] = kind
        names[node] = _target_name(node) if node.op == "call_function" else ""
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
        summary = _contract(graph, kinds, names, stage, granularity)
        if len(summary["nodes"]) <= max_nodes:
            break
    summary.update(fx_nodes=len(gm.graph.nodes), parameters=parameters, synced_parameters=synced,
                   collapsed_ops=sum(n["ops"] for n in summary["nodes"] if n["kind"] in ("local", "full")))
    return summary


def _contract(graph: nx.DiGraph, kinds: dict, names: dict, stage: dict, granularity: str) -> dict:
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
            ops = Counter([names[head] or head.op])
            module = "" if kind in ("input", "output") else paths[head]
            label = _kept_label(head, kind, names[head])
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


# ------------------------------------------------------------------------------------------------ pictures

def _figure(width: float, height: float, dpi: int):
    """A matplotlib figure on the Agg canvas and its axes; no pyplot, so the user's backend is untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _png(fig) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _short_paths(paths: list[str]) -> dict[str, str]:
    """Module paths without the leading components all of them share (``model.model.layers.0`` -> ``layers.0``)."""
    split = [p.split(".") for p in paths if p]
    prefix = 0
    if split:
        for parts in zip(*split):
            if len(set(parts)) != 1:
                break
            prefix += 1
    out = {}
    for p in paths:
        parts = p.split(".") if p else []
        out[p] = ".".join(parts[prefix:] or parts[-1:])
    return out


_ROW = 0.62      # inches between rows of the picture
_GAP = 0.22      # inches between neighbouring boxes
_LANE = 0.16     # inches taken by an edge passing through a row
_CHAR = 0.056    # inches per character of a label at 7.5 pt


def _layered_layout(graph: nx.DiGraph, widths: dict) -> tuple[dict, dict]:
    """Positions (inches) for a top-to-bottom layered drawing, and the bend points of every edge.

    Rows are topological generations (``networkx.topological_generations``); a node that only feeds later
    rows (masks, labels, position tables) moves down to just above its first consumer. An edge longer than
    one row passes through one lane per row it crosses, so it runs beside the boxes instead of through them
    (the long edges of one node share a trunk).
    Within rows, a few barycentre sweeps order nodes and lanes; the longest path of the graph (the residual
    stream through every layer) is weighted so that it stays one straight column.
    """
    rank = {n: g for g, row in enumerate(nx.topological_generations(graph)) for n in row}
    for n in reversed(list(nx.topological_sort(graph))):
        later = [rank[s] for s in graph.successors(n)]
        if later and graph.nodes[n].get("kind") != "input":
            rank[n] = max(rank[n], min(later) - 1)
    spine = set(nx.dag_longest_path(graph))
    layered = nx.DiGraph()
    layered.add_nodes_from(graph)
    lanes: dict = {}
    for u, v in graph.edges:  # the long edges of one source share their lanes: one trunk with branches
        prev, lane = u, []
        for r in range(rank[u] + 1, rank[v]):
            d = ("lane", u, r)
            rank[d] = r
            layered.add_edge(prev, d)
            lane.append(d)
            prev = d
        layered.add_edge(prev, v)
        lanes[(u, v)] = lane
    rows: list[list] = [[] for _ in range(max(rank.values()) + 1)]
    for n in layered:
        rows[rank[n]].append(n)
    width = {n: widths.get(n, _LANE) for n in layered}

    def weight(a, b) -> float:  # the spine stays straight; boxes off the spine follow their neighbours
        return 1000.0 if a in spine and b in spine else 1.0
    x: dict = {}
    for row in rows:  # first guess: insertion (fx) order
        _place(row, {n: float(i) for i, n in enumerate(row)}, width, x)
    for sweep in range(5):
        down = sweep % 2 == 0
        for row in (rows[1:] if down else rows[-2::-1]):
            desired = {}
            for n in row:
                if isinstance(n, tuple) and n[0] == "lane":  # a lane goes straight down from what is above it
                    desired[n] = x[next(iter(layered.predecessors(n)))]
                    continue
                near = list(layered.predecessors(n) if down else layered.successors(n))
                total = sum(weight(n, m) for m in near)
                desired[n] = sum(weight(n, m) * x[m] for m in near) / total if near else x[n]
            row.sort(key=lambda n: (desired[n], x[n]))
            _place(row, desired, width, x, anchor=next((n for n in row if n in spine), None))
    # straighten each trunk where its neighbours in every row it crosses leave room for one straight line
    trunks: dict = {}
    for n in layered:
        if isinstance(n, tuple) and n[0] == "lane":
            trunks.setdefault(n[1], []).append(n)
    for source, trunk in trunks.items():
        lo, hi = -math.inf, math.inf
        for d in trunk:
            row = rows[rank[d]]
            i = row.index(d)
            if i > 0:
                lo = max(lo, x[row[i - 1]] + (width[row[i - 1]] + width[d]) / 2 + _GAP)
            if i + 1 < len(row):
                hi = min(hi, x[row[i + 1]] - (width[row[i + 1]] + width[d]) / 2 - _GAP)
        if lo <= hi:
            for d in trunk:
                x[d] = min(max(x[source], lo), hi)
    left = min(x[n] - width[n] / 2 for n in layered)
    xy = {n: (x[n] - left, -rank[n] * _ROW) for n in layered}
    return xy, lanes


def _place(row: list, desired: dict, width: dict, x: dict, anchor=None) -> None:
    """x of each node of an ordered row: as near its desired x as the boxes' widths allow (``anchor``, a node
    of the longest path, exactly at its desired x)."""
    pos = []
    for i, n in enumerate(row):
        p = desired[n]
        if i:
            p = max(p, pos[-1] + (width[row[i - 1]] + width[n]) / 2 + _GAP)
        pos.append(p)
    if anchor is not None:
        shift = desired[anchor] - pos[row.index(anchor)]
    else:
        shift = sum(desired[n] - p for n, p in zip(row, pos)) / len(row)
    for n, p in zip(row, pos):
        x[n] = p + shift


def draw_graph(summary: dict) -> str | None:
    """The condensed rewritten graph (:func:`graph_summary`) as a PNG data URI, or None if it is empty.

    Top to bottom in data-flow order, one colour per kind of node, with a legend."""
    nodes = summary.get("nodes") or []
    if not nodes:
        return None
    from matplotlib.patches import PathPatch, Patch
    from matplotlib.path import Path

    graph = nx.DiGraph()
    for n in nodes:
        graph.add_node(n["id"], **n)
    graph.add_edges_from((u, v) for u, v in summary.get("edges", []) if u in graph and v in graph and u != v)
    if not nx.is_directed_acyclic_graph(graph):  # not from graph_summary; draw it anyway
        graph = nx.condensation(graph)
        for c in graph:
            first = next(iter(graph.nodes[c]["members"]))
            graph.nodes[c].update(next(n for n in nodes if n["id"] == first))
    short = _short_paths([graph.nodes[n].get("module", "") for n in graph])
    texts = {}
    for n in graph:
        data = graph.nodes[n]
        lines = [data.get("label", str(n))]
        module = short.get(data.get("module", ""), "")
        if module:
            lines.append(module)
        if data.get("shape") and data.get("kind") in ("input", "ring_attention", "ffn"):
            lines[-1] += "  " + data["shape"]
        texts[n] = "\n".join(_clip(line, 44) for line in lines).replace("$", r"\$")  # no mathtext
    widths = {n: _CHAR * max(len(line.replace("\\$", "$")) for line in texts[n].split("\n")) + 0.3 for n in graph}
    xy, lanes = _layered_layout(graph, widths)
    span_x = max(x for x, _ in xy.values()) + max(widths.values()) / 2
    rows = round(-min(y for _, y in xy.values()) / _ROW) + 1
    legend_w = 2.7  # a column on the right for the legend
    fig_w, fig_h = max(6.0, span_x + 0.4) + legend_w, max(2.5, rows * _ROW + 0.6)
    fig, ax = _figure(fig_w, fig_h, 110)
    fig.subplots_adjust(0, 0, 1, 1)
    ax.set_xlim(-0.2, fig_w - 0.2)
    ax.set_ylim(-(rows - 1) * _ROW - 0.35, 0.35)
    ax.axis("off")
    boxes = {}
    for n in graph:
        kind = graph.nodes[n].get("kind", "local")
        bold = kind not in ("local", "full")
        boxes[n] = ax.text(*xy[n], texts[n], ha="center", va="center", fontsize=7.5, zorder=3,
                           fontweight="bold" if bold else "normal", linespacing=1.15,
                           bbox=dict(boxstyle="round,pad=0.35", fc=KINDS.get(kind, KINDS["local"])[1],
                                     ec="#555555" if bold else "#aaaaaa", lw=1.0 if bold else 0.6))
    fig.canvas.draw()  # the boxes' outlines exist from here on: arrows end at them
    style = dict(color="#5a5a5a", lw=0.8)
    for (u, v), lane in lanes.items():
        start = xy[u]
        if lane:  # through its lanes, under the boxes, with rounded bends
            points = [xy[u]] + [xy[d] for d in lane]
            codes = [Path.MOVETO] + [Path.LINETO] * (len(points) - 1)
            ax.add_patch(PathPatch(Path(points, codes), fill=False, zorder=1, capstyle="round", **style))
            start = points[-1]
        ax.annotate("", xy=xy[v], xytext=start, zorder=4,
                    arrowprops=dict(arrowstyle="-|>", mutation_scale=9, shrinkA=0, shrinkB=1,
                                    patchA=None if lane else boxes[u].get_bbox_patch(),
                                    patchB=boxes[v].get_bbox_patch(), **style))
    present = [k for k in KINDS if any(graph.nodes[n].get("kind") == k for n in graph)]
    fig.legend(handles=[Patch(fc=KINDS[k][1], ec="#555555", label=KINDS[k][0]) for k in present],
               loc="upper right", fontsize=8, frameon=True, framealpha=0.9, edgecolor="#cccccc")
    return _png(fig)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _gib(n: float) -> float:
    return n / 2**30


def memory_plot(cost: dict) -> str | None:
    """Per-device memory against context length, one line per world size (log-log), the device's memory as a
    horizontal line and each world size's largest context marked on it."""
    curves = cost.get("memory_curve") or {}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    estimate = cost.get("estimate") or {}
    hardware = estimate.get("hardware") or {}
    fig, ax = _figure(6.4, 4.2, 110)
    colors = matplotlib.colormaps["viridis"]
    ordered = sorted(curves, key=lambda k: int(k))
    for i, world in enumerate(ordered):
        points = sorted((float(s), float(b)) for s, b in curves[world] if s > 0 and b > 0)
        if not points:
            continue
        color = colors(i / max(1, len(ordered) - 1) * 0.85)
        ax.plot([p[0] for p in points], [_gib(p[1]) for p in points], "-", color=color, lw=1.8,
                label=f"{world} device{'s' if str(world) != '1' else ''}")
        limit = {str(k): v for k, v in (cost.get("max_context") or {}).items()}.get(str(world))
        if limit and hardware.get("memory"):
            ax.plot([float(limit)], [_gib(hardware["memory"])], "o", color=color, ms=5, zorder=4)
    if hardware.get("memory"):
        ax.axhline(_gib(hardware["memory"]), color="#c0392b", ls="--", lw=1.2,
                   label=f"device memory ({_bytes(hardware['memory'])})")
    if estimate.get("seq_len"):
        ax.axvline(float(estimate["seq_len"]), color="#888888", ls=":", lw=1.0, label=f"this run ({_tokens(estimate['seq_len'])} tokens)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(fig, ax, "context length (tokens)", "memory per device (GiB)", "Memory per device vs context length")


def step_plot(cost: dict) -> str | None:
    """Compute and transfer time of one ring step against the block size (log-log), with the crossing (the
    smallest block whose compute hides the transfer) marked."""
    curve = sorted((float(b), float(c), float(t)) for b, c, t in (cost.get("step_curve") or []) if b > 0)
    if not curve:
        return None
    step = (cost.get("estimate") or {}).get("ring_step") or {}
    fig, ax = _figure(6.4, 4.2, 110)
    blocks = [p[0] for p in curve]
    ax.plot(blocks, [p[1] for p in curve], "-", color="#2c7fb8", lw=1.8, label="compute per step")
    ax.plot(blocks, [p[2] for p in curve], "-", color="#e6550d", lw=1.8, label="transfer per step")
    crossing = step.get("min_block_tokens")
    if crossing:
        ax.axvline(float(crossing), color="#444444", ls="--", lw=1.0,
                   label=f"min block = {_tokens(crossing)} tokens")
    if step.get("block_tokens"):
        b = float(step["block_tokens"])
        ax.axvline(b, color="#31a354", ls=":", lw=1.4, label=f"this run's block = {_tokens(b)} tokens")
    ax.set_xscale("log")
    positive = [v for p in curve for v in p[1:] if v > 0]
    if positive:
        ax.set_yscale("log")
    return _finish(fig, ax, "block size (tokens per device)", "seconds per ring step", "Compute vs transfer per ring step")


def _finish(fig, ax, xlabel: str, ylabel: str, title: str) -> str:
    """Labels, grid and legend of a plot, as a PNG data URI."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _png(fig)


# -------------------------------------------------------------------------------------------------- units

def _bytes(n) -> str:
    return html.escape(_size(n))


def _seconds(s) -> str:
    return html.escape(_time(s).replace(" us", " \u00b5s"))


def _tokens(n) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    n = float(n)
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _rate(n, unit: str) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return html.escape(str(n))
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


# ---------------------------------------------------------------------------------------------------- page

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1320px;margin:0 auto;padding:20px 28px 40px}
header{background:#24292f;color:#fff;padding:18px 28px}
header h1{margin:0 0 8px;font-size:22px;font-weight:600}
.facts{display:flex;flex-wrap:wrap;gap:8px}
.fact{background:#32383f;border-radius:6px;padding:4px 10px;font-size:13px}
.fact b{color:#9be9a8;font-weight:600}
nav{margin-top:10px;font-size:13px}
nav a{color:#c9d1d9;margin-right:14px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:14px 18px;margin:16px 0}
h2{font-size:18px;margin:0 0 10px;border-bottom:1px solid #d8dee4;padding-bottom:6px}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;width:100%;font-size:13px;margin:4px 0 8px}
th,td{border:1px solid #d0d7de;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f0f3f6;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.total td{font-weight:600;background:#f6f8fa}
tr.first td{border-top:2px solid #afb8c1}
td.layer{background:#f6f8fa}
table.kv td:first-child{color:#424a53}
code{font:12px/1.35 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f2f4f7;border-radius:4px;padding:1px 4px;overflow-wrap:anywhere}
code.path{white-space:nowrap}
.src{font:12px/1.35 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#57606a;overflow-wrap:anywhere}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600;white-space:nowrap}
.ok{background:#dafbe1;color:#116329}.bad{background:#ffebe9;color:#a40e26}.warn{background:#fff8c5;color:#7d4e00}
.muted{color:#6e7781}
.plots{display:flex;flex-wrap:wrap;gap:16px}
.plots figure{margin:0;flex:1 1 560px}
figure img{max-width:100%;height:auto;border:1px solid #eaeef2;border-radius:6px}
figcaption{font-size:12px;color:#57606a;margin-top:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:16px}
ul.rewrites{margin:4px 0 8px;padding-left:20px}
details summary{cursor:pointer;color:#0969da;margin:6px 0}
.graph img{display:block;margin:0 auto}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    """A table of already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" if not c.startswith("<td") else c for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(rows: list[list[str]], classes: list[str] | None = None) -> str:
    """A two-column key / value table (cells already escaped)."""
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>")
    body = "".join(body)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _num(text: str) -> str:
    return f'<td class="num">{text}</td>'


_SOURCE = re.compile(r"^(.*?):(\d+)(?: \((.*)\))?$", re.S)


def _source(src: str) -> str:
    """``file.py:12 (code)`` as a short path (after site-packages, or relative to the working directory)
    with the full one as a tooltip, and the code."""
    if not src:
        return '<span class="muted">-</span>'
    match = _SOURCE.match(src)
    if not match:
        return f'<span class="src">{_e(src)}</span>'
    path, line, code = match.groups()
    short = path
    if "site-packages/" in path:
        short = path.split("site-packages/", 1)[1]
    else:
        try:
            rel = os.path.relpath(path)
            short = rel if not rel.startswith("..") else "/".join(path.split("/")[-3:])
        except ValueError:
            pass
    short = _e(short).replace("/", "/<wbr>")
    out = f'<span class="src" title="{_e(path)}:{_e(line)}">{short}:{_e(line)}</span>'
    if code:
        out += f"<br><code>{_e(code)}</code>"
    return out


def _module(path: str) -> str:
    return f'<code class="path">{_e(path)}</code>' if path else '<span class="muted">(top level)</span>'


def _mask(attn: dict) -> str:
    from .report import mask_text

    return mask_text(attn)


def _gqa(attn: dict) -> str:
    heads, kv = attn.get("num_heads"), attn.get("num_kv_heads")
    counts = f" ({heads} q / {kv} kv heads)" if heads and kv else (f" ({heads} heads)" if heads else "")
    if attn.get("gqa"):
        return f'<span class="badge ok">yes</span>{_e(counts)}'
    return f"no{_e(counts)}"


def _ffn(f: dict) -> str:
    text = f"{f.get('kind', '?')}"
    if f.get("activation"):
        text += f" ({f['activation']})"
    if f.get("hidden") and f.get("intermediate"):
        text += f", {f['hidden']} \u2192 {f['intermediate']} features"
    return _e(text)


def _layers_section(report) -> str:
    """One row per attention / feed-forward block found, grouped by layer."""
    if not report.layers:
        return '<p class="muted">No attention or feed-forward block was found.</p>'
    dash = '<span class="muted">-</span>'
    rows = []
    for path, layer in report.layers.items():
        blocks = []
        for a in layer.get("attention", []):
            found = _e(a.get("kind", "?") + (f" ({a['form']})" if a.get("form") and a.get("form") != a.get("kind") else ""))
            if a.get("head_dim"):
                found += f' <span class="muted">head dim {_e(a["head_dim"])}</span>'
            if a.get("softcap"):
                found += f' <span class="muted">soft-cap {a["softcap"]:g}</span>'
            blocks.append(["attention", found, _e(_mask(a)), _gqa(a), '<span class="badge ok">ring attention</span>',
                           _module(a.get("module_path", "")), _source(a.get("source", ""))])
        for f in layer.get("ffn", []):
            chunk = f' <span class="muted">{_e(f["chunk_tokens"])} tokens/chunk</span>' if f.get("chunk_tokens") else ""
            done = "chunked FFN" if f.get("chunk_tokens") else "whole (not chunked)"
            blocks.append(["feed-forward", _ffn(f), dash, dash, f'<span class="badge ok">{done}</span>' + chunk,
                           _module(f.get("module_path", "")), _source(f.get("source", ""))])
        for i, block in enumerate(blocks):
            cells = "".join(f"<td>{c}</td>" for c in block)
            head = f'<td rowspan="{len(blocks)}" class="layer">{_module(path)}</td>' if i == 0 else ""
            rows.append(f'<tr class="{"first" if i == 0 else ""}">{head}{cells}</tr>')
    headers = ["layer", "block", "found", "mask", "GQA", "rewritten to", "module path", "source line"]
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _rewrites_section(report) -> str:
    outputs = ", ".join(f"{o.get('node')} ({'gathered' if 'gathered_dim' in o else 'local'})" for o in report.outputs)
    items = [
        ("positions rewritten to this rank's global positions", len(report.positions)),
        ("reductions over tokens -> local partial + sum over ranks", len(report.reductions)),
        ("ops run on full inputs on every rank (they mix tokens of inputs only)", len(report.full_ops)),
        ("inputs cut into shards", len(report.shards)),
        ("outputs", outputs or "none"),
        ("parameters whose gradients are summed over ranks", report.synced_parameters),
    ]
    if getattr(report, "token_local_modules", None):
        items.append(("run whole on this rank's tokens (dropless mixture-of-experts)",
                      ", ".join(report.token_local_modules)))
    parts = ['<ul class="rewrites">' + "".join(f"<li>{_e(k)}: <b>{_e(v)}</b></li>" for k, v in items) + "</ul>"]
    rows: list[list[str]] = []
    rows += [["position", f"<code>{_e(e.get('op', e.get('node')))}</code>"
              + (f" <span class='muted'>table {_e(e['table'])}</span>" if e.get("table") else ""),
              _module(e.get("module", "")), _source(e.get("source", ""))] for e in report.positions]
    rows += [["reduction", f"<code>{_e(e.get('op', e.get('node')))}</code>", _module(e.get("module", "")),
              _source(e.get("source", ""))] for e in report.reductions]
    rows += [["shard cut", f"<code>{_e(e.get('node'))}</code> dim {_e(e.get('dim', '?'))}", _module(e.get("module", "")),
              _source(e.get("source", ""))] for e in report.shards]
    full = Counter((e.get("op", "?"), e.get("module", ""), e.get("source", "")) for e in report.full_ops)
    rows += [["full on every rank", f"<code>{_e(op)}</code>" + (f" &times;{n}" if n > 1 else ""), _module(module),
              _source(source)] for (op, module, source), n in full.items()]
    rows += [["output", f"<code>{_e(o.get('node'))}</code> "
              + ("gathered along dim " + _e(o["gathered_dim"]) if "gathered_dim" in o else "kept local"),
              _module(o.get("module", "")), _source(o.get("source", ""))] for o in report.outputs]
    if rows:
        parts.append(_table(["rewrite", "op", "module path", "source line"], rows))
    return "".join(parts)


def _refused_section(report) -> str:
    if not report.refused:
        return '<p><span class="badge ok">nothing refused</span></p>'
    rows = [[_e(r.get("what", r.get("op", "?"))), _e(r.get("why", "")), _module(r.get("module", "")),
             _source(r.get("source", ""))] for r in report.refused]
    return _table(["what", "why", "module path", "source line"], rows)


_MEMORY_PARTS = ("parameters", "gradients", "optimizer_states", "gathered_parameters", "activations", "gathered_outputs",
                 "kv_buffers", "attention_workspace")


def _context_table(by_outputs: dict, in_force: str) -> str:
    """Largest context per world size with outputs gathered ("full") and kept local, the one in force marked."""
    names = sorted(by_outputs, key=lambda o: o != in_force)
    worlds = sorted({w for limits in by_outputs.values() for w in limits}, key=int)
    headers = ["devices"] + [_e(f'outputs="{o}"' + (" (in force)" if o == in_force else "")) for o in names]

    def cell(tokens) -> str:
        if not isinstance(tokens, (int, float)):
            return _num(_e(tokens))
        return _num(f"{int(tokens):,} <span class='muted'>({_e(_tokens(tokens))})</span>")

    rows = [[_num(_e(w))] + [cell(by_outputs[o].get(w, "-")) for o in names] for w in worlds]
    note = ('<p class="muted">outputs="full" gathers outputs such as logits to full length on every rank (O(S x vocab) '
            'per rank); outputs="local" keeps each rank\'s tokens (<code>ringify(model, mesh, outputs="local")</code>, '
            "positions <code>rm.local_positions()</code>).</p>")
    return _table(headers, rows) + note


def _generation_tables(generation: dict, label: str) -> list[str]:
    """An inference report's ``rm.generate`` costs: memory and time per device, the longest prompt per world size."""
    estimate = generation.get("estimate") or {}
    if not estimate:
        return []
    device, prefill = estimate.get("per_device") or {}, estimate.get("prefill") or {}
    decode = estimate.get("decode") or {}
    rows = [[_e(k.replace("_", " ")), _num(_bytes(v))] for k, v in device.items() if k not in ("total", "fits")]
    rows += [["total", _num(_bytes(device.get("total", "?")))],
             ["prefill (no logits)", _num(_seconds(prefill.get("seconds", "?")))],
             [f"decode per token ({_e(decode.get('bound', '?'))}-bound)",
              _num(_seconds(decode.get("seconds_per_token", "?")))]]
    title = (f"rm.generate: {_e(generation.get('new_tokens', '?'))} new tokens after a prompt of "
             f"{_e(estimate.get('prompt', '?'))} tokens on {_e(estimate.get('world_size', '?'))} devices")
    out = [f"<div><h3>{title}</h3>" + _kv(rows, [""] * (len(rows) - 3) + ["total", "", ""]) + "</div>"]
    limits = generation.get("max_prompt") or {}
    if limits:
        cells = [[_num(_e(w)), _num(f"{int(t):,} <span class='muted'>({_e(_tokens(t))})</span>")]
                 for w, t in sorted(limits.items(), key=lambda kv: int(kv[0]))]
        out.append(f"<div><h3>Longest prompt{label}</h3>" + _table(["devices", "prompt tokens"], cells) + "</div>")
    return out


def _cost_section(cost: dict) -> str:
    if not cost:
        return ('<p class="muted">No cost estimate in this report (it is added by <code>rm.report()</code> '
                "after the first call).</p>")
    estimate = cost.get("estimate") or {}
    hardware = estimate.get("hardware") or {}
    parts = []
    facts = []
    if hardware:
        facts.append(f"hardware <b>{_e(hardware.get('name', '?'))}</b>"
                     + (f" <span class='muted'>({_e(hardware['description'])})</span>" if hardware.get("description") else ""))
        if hardware.get("flops"):
            facts.append(f"{_rate(hardware['flops'], 'FLOP/s')}")
        if hardware.get("bandwidth"):
            facts.append(f"{_bytes(hardware['bandwidth'])}/s link")
        if hardware.get("memory"):
            facts.append(f"{_bytes(hardware['memory'])} memory")
    if estimate.get("seq_len"):
        facts.append(f"sequence {_e(estimate['seq_len'])} tokens")
    if estimate.get("world_size"):
        facts.append(f"{_e(estimate['world_size'])} devices")
    if facts:
        parts.append("<p>" + " &middot; ".join(facts) + "</p>")
    setup = _setup_text(cost.get("profile") or {})
    if setup:
        parts.append(f"<p>{_e(setup)}</p>")
    tables = []
    device = estimate.get("per_device") or {}
    if device:
        rows, classes = [], []
        for key in _MEMORY_PARTS:
            if key in device:
                rows.append([_e(key.replace("_", " ")), _num(_bytes(device[key]))])
                classes.append("")
        for key, v in device.items():  # anything else the cost model adds
            if key not in (*_MEMORY_PARTS, "total", "fits") and isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append([_e(key.replace("_", " ")), _num(_bytes(v))])
                classes.append("")
        if "total" in device:
            rows.append(["total", _num(_bytes(device["total"]))])
            classes.append("total")
        if "fits" in device:
            fits = device["fits"]
            badge = '<span class="badge ok">fits</span>' if fits else '<span class="badge bad">does not fit</span>'
            rows.append(["fits in device memory", badge])
            classes.append("")
        tables.append("<div><h3>Memory per device</h3>" + _kv(rows, classes) + "</div>")
    step = estimate.get("ring_step") or {}
    if step:
        rows = []
        if "block_tokens" in step:
            rows.append(["block (tokens per device)", _num(_e(f"{step['block_tokens']:,}" if isinstance(step['block_tokens'], int) else step['block_tokens']))])
        if "bytes_sent" in step:
            rows.append(["bytes sent per step (K and V)", _num(_bytes(step["bytes_sent"]))])
        if "compute_seconds" in step:
            rows.append(["compute per step", _num(_seconds(step["compute_seconds"]))])
        if "transfer_seconds" in step:
            rows.append(["transfer per step", _num(_seconds(step["transfer_seconds"]))])
        if "min_block_tokens" in step:
            rows.append(["min block to hide the transfer", _num(_e(_tokens(step["min_block_tokens"])) + " tokens")])
        if "transfer_hidden" in step:
            rows.append(["transfer hidden behind compute",
                         '<span class="badge ok">yes</span>' if step["transfer_hidden"]
                         else '<span class="badge warn">no: block too small</span>'])
        if "steps_per_layer" in estimate:
            rows.append(["ring steps per attention layer", _num(_e(estimate["steps_per_layer"]))])
        tables.append("<div><h3>Ring step</h3>" + _kv(rows) + "</div>")
    limits = cost.get("max_context") or {}
    by_outputs, in_force = cost.get("max_context_by_outputs") or {}, cost.get("outputs")
    label = f" on {_e(hardware['name'])}" if hardware.get("name") else ""
    if by_outputs and in_force in by_outputs:
        tables.append(f"<div><h3>Largest context{label}</h3>" + _context_table(by_outputs, in_force) + "</div>")
    elif limits:
        rows = []
        for world in sorted(limits, key=lambda k: int(k)):
            tokens = limits[world]
            rows.append([_num(_e(world)), _num(_e(f"{int(tokens):,}" if isinstance(tokens, (int, float)) else tokens)),
                         _num(_e(_tokens(tokens)))])
        tables.append(f"<div><h3>Largest context{label}</h3>" + _table(["devices", "tokens", "about"], rows) + "</div>")
    tables += _generation_tables(cost.get("generation") or {}, label)
    if tables:
        parts.append('<div class="grid">' + "".join(tables) + "</div>")
    plots = []
    for title, make, caption in (
        ("memory", memory_plot, "Per-device memory (log-log), one line per world size; the dashed line is the "
                                "device's memory, dots mark each world size's largest context."),
        ("step", step_plot, "Time of one ring step: attention compute on the current block vs sending the next "
                            "K/V block. Right of the crossing (the minimum block) the transfer hides behind compute."),
    ):
        try:
            uri = make(cost)
        except Exception as err:  # a malformed curve must not lose the rest of the report
            plots.append(f'<figure><p class="muted">could not draw the {title} plot: {_e(err)}</p></figure>')
            continue
        if uri:
            plots.append(f'<figure><img alt="{title} plot" src="{uri}"><figcaption>{caption}</figcaption></figure>')
    if plots:
        parts.append('<div class="plots">' + "".join(plots) + "</div>")
    if cost.get("profile"):
        parts.append("<details><summary>model profile used by the cost model</summary><pre><code>"
                     + _e(json.dumps(cost["profile"], indent=2, default=str)) + "</code></pre></details>")
    return "".join(parts)


def _graph_section(graph: dict) -> str:
    if not graph or not graph.get("nodes"):
        return '<p class="muted">No picture of the rewritten graph in this report.</p>'
    try:
        uri = draw_graph(graph)
    except Exception as err:  # pragma: no cover - keep the rest of the report
        uri, failure = None, str(err)
    else:
        failure = ""
    kinds = Counter(n.get("kind") for n in graph["nodes"])
    caption = (f"{len(graph['nodes'])} nodes drawn for {graph.get('fx_nodes', '?')} nodes of the rewritten graph: "
               f"{kinds.get('ring_attention', 0)} ring attention, {kinds.get('ffn', 0)} chunked feed-forward, "
               f"{kinds.get('collective', 0)} collectives, {kinds.get('shard', 0)} shard cuts, "
               f"{kinds.get('position', 0)} position rewrites; {graph.get('collapsed_ops', 0)} ops collapsed by "
               f"{graph.get('granularity', 'module')} and stage. Parameters ({graph.get('parameters', 0)}, "
               f"{graph.get('synced_parameters', 0)} with gradients summed over ranks) and shape arithmetic are not drawn.")
    parts = []
    if uri:
        parts.append(f'<figure class="graph"><img alt="rewritten graph" src="{uri}"><figcaption>{_e(caption)}</figcaption></figure>')
    else:
        parts.append(f'<p class="muted">could not draw the graph: {_e(failure)}</p><p>{_e(caption)}</p>')
    rows = [[_e(n.get("label", n.get("id"))), _e(KINDS.get(n.get("kind"), (n.get("kind"),))[0]), _module(n.get("module", "")),
             _e(n.get("shape", "")), _num(_e(n.get("ops", 1))),
             _e(", ".join(f"{op} x{c}" if c > 1 else op for op, c in (n.get("op_counts") or {}).items())),
             _source(n.get("source", ""))] for n in graph["nodes"]]
    parts.append("<details><summary>nodes of the picture</summary>"
                 + _table(["node", "kind", "module path", "shape", "ops", "most frequent ops", "source line"], rows)
                 + "</details>")
    return "".join(parts)


def render_html(report) -> str:
    """The report as one self-contained HTML page (inline CSS, base64 PNG images, no scripts, no network)."""
    layers = len(report.layers)
    n_attn = sum(len(layer.get("attention", [])) for layer in report.layers.values())
    n_ffn = sum(len(layer.get("ffn", [])) for layer in report.layers.values())
    facts = [("world size", report.world_size), ("sequence", f"{report.seq_len:,} tokens" if isinstance(report.seq_len, int) else report.seq_len),
             ("layout", report.layout), ("layers", layers), ("ring attention", n_attn), ("chunked FFN", n_ffn),
             ("refused", len(report.refused))]
    fact_html = "".join(f'<span class="fact">{_e(k)} <b>{_e(v)}</b></span>' for k, v in facts)
    cost = getattr(report, "cost", None) or {}
    graph = getattr(report, "graph", None) or {}
    sections = [
        ("layers", "Layers: found and rewritten", _layers_section(report)),
        ("rewrites", "Rewrites", _rewrites_section(report)),
        ("refused", "Refused", _refused_section(report)),
        ("cost", "Cost model", _cost_section(cost)),
        ("graph", "Rewritten graph", _graph_section(graph)),
    ]
    nav = "".join(f'<a href="#{key}">{_e(title.split(":")[0])}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{_e(title)}</h2>{content}</section>' for key, title, content in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>ringify report: {_e(report.model)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>ringify report: {_e(report.model)}</h1><div class=\"facts\">{fact_html}</div>"
            f"<nav>{nav}</nav></header><main>{body}"
            f'<p class="muted">Generated by ringify. Exact ring attention (Liu, Zaharia, Abbeel 2023): each device '
            f"holds 1/{_e(report.world_size)} of the sequence.</p></main></body></html>\n")
