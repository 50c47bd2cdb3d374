"""The report as one self-contained HTML page: ``templates/report.html.j2`` with ``report.css`` inline.

Jinja2 (it comes with torch) renders the page with autoescaping; this module only gathers what the template
shows: the report's fields, the cost model's numbers in words and the pictures as base64 PNGs (no scripts,
no network, nothing to install beyond matplotlib and networkx).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import jinja2

from . import plots, units
from .summary import KINDS
from .words import mask_text, setup_text

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("ringify.report", "templates"),
                          autoescape=jinja2.select_autoescape(["html", "j2"]),
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_ENV.filters.update(size=units.size, tokens=units.tokens, rate=units.rate,
                    seconds=lambda s: units.time(s).replace(" us", " \u00b5s"),
                    thousands=lambda n: f"{int(n):,}" if isinstance(n, (int, float)) and not isinstance(n, bool) else n)

#: The memory parts in the order the page lists them; others the cost model adds follow.
_MEMORY_PARTS = ("parameters", "gradients", "optimizer_states", "gathered_parameters", "activations", "gathered_outputs",
                 "kv_buffers", "attention_workspace")

_SOURCE = re.compile(r"^(.*?):(\d+)(?: \((.*)\))?$", re.S)


def render_html(report, layout: str = "layered") -> str:
    """The report as one self-contained HTML page (inline CSS, base64 PNG images, no scripts, no network);
    ``layout``: how the graph is drawn, ``layered`` or ``multipartite`` (:mod:`ringify.report.layout`)."""
    cost = getattr(report, "cost", None) or {}
    graph = getattr(report, "graph", None) or {}
    layers = report.layers.values()
    facts = [("world size", report.world_size),
             ("sequence", f"{report.seq_len:,} tokens" if isinstance(report.seq_len, int) else report.seq_len),
             ("layout", report.layout), ("layers", len(report.layers)),
             ("ring attention", sum(len(layer.get("attention", [])) for layer in layers)),
             ("chunked FFN", sum(len(layer.get("ffn", [])) for layer in layers)), ("refused", len(report.refused))]
    return _ENV.get_template("report.html.j2").render(
        report=report, facts=facts, layers=_layers(report), rewrites=_rewrites(report), cost=_cost(cost),
        graph=_graph(graph, layout), kinds=KINDS, source=_source)


def _source(src: str) -> dict | None:
    """``file.py:12 (code)`` split for the page: a short path (after site-packages, or relative to the working
    directory), the full one for the tooltip, the line and the code."""
    if not src:
        return None
    match = _SOURCE.match(src)
    if not match:
        return {"text": src}
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
    return {"path": path, "short": short.split("/"), "line": line, "code": code}


def _layers(report) -> list[tuple[str, list[dict]]]:
    """One row per attention / feed-forward block found, grouped by layer."""
    out = []
    for path, layer in report.layers.items():
        blocks = []
        for a in layer.get("attention", []):
            notes = [f"head dim {a['head_dim']}"] if a.get("head_dim") else []
            notes += [f"soft-cap {a['softcap']:g}"] if a.get("softcap") else []
            form = f" ({a['form']})" if a.get("form") and a.get("form") != a.get("kind") else ""
            heads, kv = a.get("num_heads"), a.get("num_kv_heads")
            blocks.append({"block": "attention", "found": a.get("kind", "?") + form, "notes": notes,
                           "mask": mask_text(a), "gqa": bool(a.get("gqa")),
                           "heads": f" ({heads} q / {kv} kv heads)" if heads and kv else (f" ({heads} heads)" if heads else ""),
                           "done": "ring attention", "chunk": None, "module": a.get("module_path", ""),
                           "source": a.get("source", "")})
        for f in layer.get("ffn", []):
            found = f"{f.get('kind', '?')}" + (f" ({f['activation']})" if f.get("activation") else "")
            if f.get("hidden") and f.get("intermediate"):
                found += f", {f['hidden']} \u2192 {f['intermediate']} features"
            blocks.append({"block": "feed-forward", "found": found, "notes": [], "mask": None, "gqa": None,
                           "done": "chunked FFN" if f.get("chunk_tokens") else "whole (not chunked)",
                           "chunk": f.get("chunk_tokens"), "module": f.get("module_path", ""),
                           "source": f.get("source", "")})
        out.append((path, blocks))
    return out


def _rewrites(report) -> dict:
    """The counts of each rewrite, and one row per rewritten op (ops on full inputs counted per place)."""
    outputs = ", ".join(f"{o.get('node')} ({'gathered' if 'gathered_dim' in o else 'local'})" for o in report.outputs)
    counts = [
        ("positions rewritten to this rank's global positions", len(report.positions)),
        ("reductions over tokens -> local partial + sum over ranks", len(report.reductions)),
        ("ops run on full inputs on every rank (they mix tokens of inputs only)", len(report.full_ops)),
        ("inputs cut into shards", len(report.shards)),
        ("outputs", outputs or "none"),
        ("parameters whose gradients are summed over ranks", report.synced_parameters),
    ]
    if getattr(report, "token_local_modules", None):
        counts.append(("run whole on this rank's tokens (dropless mixture-of-experts)",
                       ", ".join(report.token_local_modules)))

    def row(rewrite, op, e, note="", times=1, aside=""):
        return {"rewrite": rewrite, "op": op, "note": note, "aside": aside, "times": times,
                "module": e.get("module", ""), "source": e.get("source", "")}
    rows = [row("position", e.get("op", e.get("node")), e, aside=f"table {e['table']}" if e.get("table") else "")
            for e in report.positions]
    rows += [row("reduction", e.get("op", e.get("node")), e) for e in report.reductions]
    rows += [row("shard cut", e.get("node"), e, f"dim {e.get('dim', '?')}") for e in report.shards]
    full = Counter((e.get("op", "?"), e.get("module", ""), e.get("source", "")) for e in report.full_ops)
    rows += [row("full on every rank", op, {"module": module, "source": source}, times=n)
             for (op, module, source), n in full.items()]
    rows += [row("output", o.get("node"), o, "gathered along dim " + str(o["gathered_dim"]) if "gathered_dim" in o
                 else "kept local") for o in report.outputs]
    return {"counts": counts, "rows": rows}


def _cost(cost: dict) -> dict:
    """The cost model's numbers as the page shows them: facts, tables, the two plots and the profile."""
    if not cost:
        return {}
    estimate = cost.get("estimate") or {}
    hardware = estimate.get("hardware") or {}
    device = estimate.get("per_device") or {}
    memory = [(key, device[key]) for key in _MEMORY_PARTS if key in device]
    memory += [(key, v) for key, v in device.items()  # anything else the cost model adds
               if key not in (*_MEMORY_PARTS, "total", "fits") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    by_outputs, in_force = cost.get("max_context_by_outputs") or {}, cost.get("outputs")
    context = None
    if by_outputs and in_force in by_outputs:
        names = sorted(by_outputs, key=lambda o: o != in_force)
        worlds = sorted({w for limits in by_outputs.values() for w in limits}, key=int)
        context = {"names": names, "in_force": in_force,
                   "rows": [(w, [by_outputs[o].get(w, "-") for o in names]) for w in worlds]}
    limits = sorted((cost.get("max_context") or {}).items(), key=lambda kv: int(kv[0]))
    generation = cost.get("generation") or {}
    return {"estimate": estimate, "hardware": hardware, "setup": setup_text(cost.get("profile") or {}),
            "device": device, "memory": memory, "step": estimate.get("ring_step") or {}, "context": context,
            "limits": limits, "generation": generation if generation.get("estimate") else None,
            "max_prompt": sorted((generation.get("max_prompt") or {}).items(), key=lambda kv: int(kv[0])),
            "plots": [p for p in (_plot("memory", plots.memory_plot, cost), _plot("step", plots.step_plot, cost))
                      if p["uri"] or "error" in p],  # a plot without data is left out
            "profile": json.dumps(cost["profile"], indent=2, default=str) if cost.get("profile") else ""}


_CAPTIONS = {
    "memory": "Per-device memory (log-log), one line per world size; the dashed line is the device's memory, dots "
              "mark each world size's largest context.",
    "step": "Time of one ring step: attention compute on the current block vs sending the next K/V block. Right of "
            "the crossing (the minimum block) the transfer hides behind compute.",
}


def _plot(title: str, make, cost: dict) -> dict:
    """A plot's image, or why it could not be drawn: a malformed curve must not lose the rest of the report."""
    try:
        return {"title": title, "uri": make(cost), "caption": _CAPTIONS[title]}
    except Exception as err:
        return {"title": title, "uri": None, "error": str(err)}


def _graph(graph: dict, layout: str) -> dict:
    """The picture of the rewritten graph, its caption in numbers, and the table of its nodes."""
    if not graph or not graph.get("nodes"):
        return {}
    try:
        uri, failure = plots.draw_graph(graph, layout), ""
    except Exception as err:  # pragma: no cover - keep the rest of the report
        uri, failure = None, str(err)
    kinds = Counter(n.get("kind") for n in graph["nodes"])
    caption = (f"{len(graph['nodes'])} nodes drawn for {graph.get('fx_nodes', '?')} nodes of the rewritten graph: "
               f"{kinds.get('ring_attention', 0)} ring attention, {kinds.get('ffn', 0)} chunked feed-forward, "
               f"{kinds.get('collective', 0)} collectives, {kinds.get('shard', 0)} shard cuts, "
               f"{kinds.get('position', 0)} position rewrites; {graph.get('collapsed_ops', 0)} ops collapsed by "
               f"{graph.get('granularity', 'module')} and stage. Parameters ({graph.get('parameters', 0)}, "
               f"{graph.get('synced_parameters', 0)} with gradients summed over ranks) and shape arithmetic are not drawn.")
    return {"uri": uri, "failure": failure, "caption": caption, "nodes": graph["nodes"]}
