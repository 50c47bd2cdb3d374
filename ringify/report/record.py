"""The report's record: what ringify found, rewrote and refused, per layer, with module paths and source lines."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field


@dataclass
class Report:
    model: str
    world_size: int
    seq_len: int
    layout: str
    layers: dict[str, dict] = field(default_factory=dict)   # layer path -> {"attention": [...], "ffn": [...]}
    reductions: list[dict] = field(default_factory=list)
    positions: list[dict] = field(default_factory=list)
    full_ops: list[dict] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    slices: list[dict] = field(default_factory=list)  # slices and selected tokens of activations along the sequence
    outputs: list[dict] = field(default_factory=list)
    synced_parameters: int = 0
    token_local_modules: list[str] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    regions: list[dict] = field(default_factory=list)  # checkpointed / FSDP2 regions: ringify.passes.regions.outline_nested
    graph: dict = field(default_factory=dict)  # condensed rewritten graph: ringify.report.summary.graph_summary
    cost: dict = field(default_factory=dict)   # memory and ring-step model: ringify.cost.cost_summary

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        """The report :meth:`to_json` wrote (fields this version does not know are dropped)."""
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_markdown(self) -> str:
        from .markdown import to_markdown

        return to_markdown(self)

    def to_html(self, path: str | None = None, *, layout: str = "layered") -> str:
        """One self-contained HTML page (tables, plots and the rewritten graph as inline images); written to
        ``path`` if given. ``layout``: how the graph is drawn (:mod:`ringify.report.layout`)."""
        from .html import render_html

        page = render_html(self, layout)
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page


def add_mask_structures(report: "Report") -> None:
    """Name each attention's mask by what it was seen to be when it ran ("causal + key padding"), where it has."""
    from ..runtime.mask_structure import described

    for layer in report.layers.values():
        for attn in layer.get("attention", []):
            seen = described(attn.get("mask_key") or "") if attn.get("mask_key") else None
            if seen:
                attn["mask_structure"] = seen


def _layer_of(path: str) -> str:
    """``model.layers.3.self_attn`` -> ``model.layers.3`` (the block that holds attention and FFN)."""
    match = re.match(r"(.*?\.\d+)(\.|$)", path or "")
    return match.group(1) if match else (path.rsplit(".", 1)[0] if "." in (path or "") else path or "")


def _summary(match) -> dict:
    summary = getattr(match, "summary", None)
    summary = summary() if callable(summary) else dict(summary or {})
    return {k: v for k, v in summary.items() if isinstance(v, (str, int, float, bool, type(None)))}


def build_report(model, attention, ffn, plan, *, world_size: int, seq_len: int, layout: str) -> Report:
    report = Report(type(model).__name__, world_size, seq_len, layout)
    by_node = {a["node"]: a for a in plan.attention}
    for match in attention:
        entry = _summary(match)
        output = getattr(match, "output", None)
        if output is not None and output.name in by_node:
            entry.update({k: v for k, v in by_node[output.name].items() if k in ("mask", "mask_ops", "causal", "mask_key")})
        path = entry.get("module_path", "")
        report.layers.setdefault(_layer_of(path), {}).setdefault("attention", []).append(entry)
    for match in ffn:
        entry = _summary(match)
        path = entry.get("module_path", "")
        report.layers.setdefault(_layer_of(path), {}).setdefault("ffn", []).append(entry)
    for f in dataclasses.fields(plan):  # the rewrite's own record: reductions, positions, shards, outputs...
        setattr(report, f.name, getattr(plan, f.name))
    return report
