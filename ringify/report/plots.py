"""The report's pictures as PNG data URIs: the rewritten graph, memory against context, the ring step.

Drawn by matplotlib on its Agg canvas (no pyplot, so the user's backend is untouched, and no display).
"""

from __future__ import annotations

import base64
import io

import networkx as nx

from ..passes.fx import common_prefix
from . import layout
from .layout import CHAR, ROW
from .summary import KINDS
from .units import size, tokens


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
    prefix = len(common_prefix([p.split(".") for p in paths if p]))
    out = {}
    for p in paths:
        parts = p.split(".") if p else []
        out[p] = ".".join(parts[prefix:] or parts[-1:])
    return out


def draw_graph(summary: dict, arrange: str = "layered") -> str | None:
    """The condensed rewritten graph (:func:`~ringify.report.summary.graph_summary`) as a PNG data URI, or
    None if it is empty.

    Top to bottom in data-flow order, one colour per kind of node, with a legend; ``arrange``: a layout of
    :mod:`ringify.report.layout` (``layered`` or ``multipartite``)."""
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
    widths = {n: CHAR * max(len(line.replace("\\$", "$")) for line in texts[n].split("\n")) + 0.3 for n in graph}
    xy, lanes = getattr(layout, arrange)(graph, widths)
    span_x = max(x for x, _ in xy.values()) + max(widths.values()) / 2
    rows = round(-min(y for _, y in xy.values()) / ROW) + 1
    legend_w = 2.7  # a column on the right for the legend
    fig_w, fig_h = max(6.0, span_x + 0.4) + legend_w, max(2.5, rows * ROW + 0.6)
    fig, ax = _figure(fig_w, fig_h, 110)
    fig.subplots_adjust(0, 0, 1, 1)
    ax.set_xlim(-0.2, fig_w - 0.2)
    ax.set_ylim(-(rows - 1) * ROW - 0.35, 0.35)
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
                   label=f"device memory ({size(hardware['memory'])})")
    if estimate.get("seq_len"):
        ax.axvline(float(estimate["seq_len"]), color="#888888", ls=":", lw=1.0, label=f"this run ({tokens(estimate['seq_len'])} tokens)")
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
                   label=f"min block = {tokens(crossing)} tokens")
    if step.get("block_tokens"):
        b = float(step["block_tokens"])
        ax.axvline(b, color="#31a354", ls=":", lw=1.4, label=f"this run's block = {tokens(b)} tokens")
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
