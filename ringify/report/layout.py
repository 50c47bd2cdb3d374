"""Where the picture of the rewritten graph puts its boxes and how its long edges run.

Two layouts, both in inches, top to bottom in data-flow order, rows from ``networkx.topological_generations``:
:func:`layered` (the default) orders each row by barycentre sweeps and routes long edges through lanes beside
the boxes; :func:`multipartite` is networkx's ``multipartite_layout`` with straight edges. Side by side on a
Llama and a Gemma-2 report the layered one reads better (the residual stream is one straight column and skip
edges do not cross boxes), so it is what the report draws; ``scripts/screenshot_report.py --layout`` shows both.
"""

from __future__ import annotations

import math

import networkx as nx

ROW = 0.62       # inches between rows of the picture
CHAR = 0.056     # inches per character of a label at 7.5 pt
_GAP = 0.22      # inches between neighbouring boxes
_LANE = 0.16     # inches taken by an edge passing through a row


def layered(graph: nx.DiGraph, widths: dict) -> tuple[dict, dict]:
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
    routed = nx.DiGraph()
    routed.add_nodes_from(graph)
    lanes: dict = {}
    for u, v in graph.edges:  # the long edges of one source share their lanes: one trunk with branches
        prev, lane = u, []
        for r in range(rank[u] + 1, rank[v]):
            d = ("lane", u, r)
            rank[d] = r
            routed.add_edge(prev, d)
            lane.append(d)
            prev = d
        routed.add_edge(prev, v)
        lanes[(u, v)] = lane
    rows: list[list] = [[] for _ in range(max(rank.values()) + 1)]
    for n in routed:
        rows[rank[n]].append(n)
    width = {n: widths.get(n, _LANE) for n in routed}

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
                    desired[n] = x[next(iter(routed.predecessors(n)))]
                    continue
                near = list(routed.predecessors(n) if down else routed.successors(n))
                total = sum(weight(n, m) for m in near)
                desired[n] = sum(weight(n, m) * x[m] for m in near) / total if near else x[n]
            row.sort(key=lambda n: (desired[n], x[n]))
            _place(row, desired, width, x, anchor=next((n for n in row if n in spine), None))
    # straighten each trunk where its neighbours in every row it crosses leave room for one straight line
    trunks: dict = {}
    for n in routed:
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
    left = min(x[n] - width[n] / 2 for n in routed)
    xy = {n: (x[n] - left, -rank[n] * ROW) for n in routed}
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


def multipartite(graph: nx.DiGraph, widths: dict) -> tuple[dict, dict]:
    """networkx's ``multipartite_layout`` with one row per topological generation, scaled so that no two boxes
    of a row overlap; edges are straight (no lanes)."""
    rows = list(nx.topological_generations(graph))
    generation = {n: g for g, row in enumerate(rows) for n in row}
    layers = nx.Graph()  # the layout reads only the nodes' layer (in the graph's order): the caller's is left as it is
    layers.add_nodes_from((n, {"generation": generation[n]}) for n in graph)
    pos = nx.multipartite_layout(layers, subset_key="generation", align="horizontal", scale=1.0)
    scale = 1.0
    for row in rows:
        row.sort(key=lambda n: pos[n][0])
        for a, b in zip(row, row[1:]):
            apart = pos[b][0] - pos[a][0]
            if apart > 0:
                scale = max(scale, ((widths[a] + widths[b]) / 2 + _GAP) / apart)
    left = min(pos[n][0] * scale - widths[n] / 2 for n in graph)
    xy = {n: (pos[n][0] * scale - left, -generation[n] * ROW) for n in graph}
    return xy, {edge: [] for edge in graph.edges}
