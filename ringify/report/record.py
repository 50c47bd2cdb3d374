"""What ringify found, rewrote and refused, per layer, with module paths and source lines."""

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
    graph: dict = field(default_factory=dict)  # condensed rewritten graph: ringify.html.graph_summary
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
        lines = [f"# ringify report: {self.model}",
                 f"world size {self.world_size}, sequence {self.seq_len}, layout {self.layout}", "",
                 "| layer | attention | mask | GQA | feed-forward | source |", "|---|---|---|---|---|---|"]
        for path, layer in self.layers.items():
            attn = layer.get("attention", [])
            ffn = layer.get("ffn", [])
            a = ", ".join(f"{x.get('kind', '?')}{_softcap_text(x)} -> ring" for x in attn) or "-"
            m = ", ".join(mask_text(x) for x in attn) or "-"
            g = ", ".join("yes" if x.get("gqa") else "no" for x in attn) or "-"
            f = ", ".join(f"{x.get('kind', '?')}({x.get('activation', '')}) -> "
                          + ("chunked" if x.get("chunk_tokens") else "whole") for x in ffn) or "-"
            src = (attn or ffn or [{}])[0].get("source", "")
            lines.append(f"| {path or '(top)'} | {a} | {m} | {g} | {f} | {src} |")
        lines += ["", f"- positions rewritten to global positions: {len(self.positions)}",
                  f"- reductions over tokens -> local partial + sum over ranks: "
                  + (", ".join(f"{r['op']} ({r['module'] or 'top'})" for r in self.reductions) or "none"),
                  f"- ops run on full inputs on every rank (they mix tokens of inputs only): "
                  + (", ".join(f"{r['op']}" for r in self.full_ops) or "none"),
                  f"- inputs cut into shards at: " + (", ".join(s["node"] for s in self.shards) or "none"),
                  f"- slices and selected tokens along the sequence: "
                  + (", ".join(f"{s['op']} ({s.get('kept') or s.get('selected')})" for s in self.slices) or "none"),
                  f"- outputs: " + (", ".join(f"{o['node']} ({'gathered' if 'gathered_dim' in o else 'local'})"
                                                for o in self.outputs) or "none"),
                  f"- parameters whose gradients are summed over ranks: {self.synced_parameters}"]
        lines += _regions_markdown(self.regions)
        if self.token_local_modules:
            lines.append(f"- run whole on this rank's tokens (dropless mixture-of-experts: each token's output is "
                         f"its own): {', '.join(self.token_local_modules)}")
        if self.refused:
            lines += ["", "## refused"] + [f"- {r.get('what', '?')}: {r.get('why', '')}" for r in self.refused]
        if self.cost:
            lines += ["", "## cost"] + _cost_markdown(self.cost)
        return "\n".join(lines) + "\n"

    def to_html(self, path: str | None = None) -> str:
        """One self-contained HTML page (tables, plots and the rewritten graph as inline images); written to
        ``path`` if given."""
        from .html import render_html

        page = render_html(self)
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page


def _size(n) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def _time(s) -> str:
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        return str(s)
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _cost_markdown(cost: dict) -> list[str]:
    """A few lines of the cost model: memory per device, the ring step, the largest context per world size."""
    estimate = cost.get("estimate") or {}
    hardware = estimate.get("hardware") or {}
    lines = []
    if hardware:
        lines.append(f"- hardware: {hardware.get('name', '?')}"
                     + (f" ({hardware['description']})" if hardware.get("description") else "")
                     + (f", {_size(hardware['memory'])} memory" if hardware.get("memory") else ""))
    setup = _setup_text(cost.get("profile") or {})
    if setup:
        lines.append(f"- {setup}")
    device = estimate.get("per_device") or {}
    if device:
        parts = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in device.items()
                          if k not in ("total", "fits") and v)
        fits = "" if "fits" not in device else (", fits" if device["fits"] else ", DOES NOT FIT")
        lines.append(f"- memory per device at {estimate.get('seq_len', '?')} tokens on {estimate.get('world_size', '?')} "
                     f"devices: {_size(device.get('total', '?'))}{fits}" + (f" ({parts})" if parts else ""))
    step = estimate.get("ring_step") or {}
    if step:
        hidden = step.get("transfer_hidden")
        lines.append(f"- ring step: block {step.get('block_tokens', '?')} tokens, sends {_size(step.get('bytes_sent', '?'))}, "
                     f"compute {_time(step.get('compute_seconds', '?'))} vs transfer {_time(step.get('transfer_seconds', '?'))}"
                     f"; transfer hides behind compute from {step.get('min_block_tokens', '?')} tokens per block"
                     + ("" if hidden is None else (" (hidden)" if hidden else " (NOT hidden: block too small)")))
    by_outputs = cost.get("max_context_by_outputs") or {}
    in_force = cost.get("outputs")
    if by_outputs and in_force in by_outputs:
        for outputs in sorted(by_outputs, key=lambda o: o != in_force):  # the one in force first
            lines.append(f'- largest context with outputs="{outputs}" ({_OUTPUTS[outputs]}'
                         + ("; in force" if outputs == in_force else f'; ringify(model, mesh, outputs="{outputs}")')
                         + "): " + _limits_text(by_outputs[outputs]))
    elif cost.get("max_context"):
        lines.append("- largest context: " + _limits_text(cost["max_context"]))
    return lines + _generation_markdown(cost.get("generation") or {})


def _generation_markdown(generation: dict) -> list[str]:
    """What ``rm.generate`` costs (an inference report): memory per device, prefill and decode time, and the
    longest prompt per world size."""
    estimate = generation.get("estimate") or {}
    if not estimate:
        return []
    device, prefill = estimate.get("per_device") or {}, estimate.get("prefill") or {}
    decode = estimate.get("decode") or {}
    step = prefill.get("ring_step") or {}
    parts = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in device.items()
                      if k not in ("total", "fits") and v)
    fits = "" if "fits" not in device else (", fits" if device["fits"] else ", DOES NOT FIT")
    hidden = "" if step.get("transfer_hidden") is None else (", hidden" if step["transfer_hidden"] else ", NOT hidden")
    new = generation.get("new_tokens", "?")
    lines = [f"- generation (rm.generate, {new} new tokens after a prompt of {estimate.get('prompt', '?')} tokens on "
             f"{estimate.get('world_size', '?')} devices): memory per device {_size(device.get('total', '?'))}{fits} "
             f"({parts}); the prefill computes no logits",
             f"- prefill {_time(prefill.get('seconds', '?'))} (ring step: block {step.get('block_tokens', '?')} tokens, "
             f"compute {_time(step.get('compute_seconds', '?'))} vs transfer {_time(step.get('transfer_seconds', '?'))}"
             f"{hidden}); decode {_time(decode.get('seconds_per_token', '?'))} per token ({decode.get('bound', '?')}"
             f"-bound: {_size(decode.get('weight_bytes', '?'))} of weights and "
             f"{_size(decode.get('cache_bytes_read', '?'))} of cache read, all-gathers "
             f"{_time(decode.get('all_gather_seconds', '?'))})"]
    if generation.get("max_prompt"):
        lines.append(f"- longest prompt for {new} new tokens (parameters whole on every device, key/value cache "
                     "sharded): " + _limits_text(generation["max_prompt"]))
    return lines


_OUTPUTS = {"full": "outputs gathered to full length on every rank, O(S x vocab) per rank for logits",
            "local": "each rank keeps its own tokens, at rm.local_positions()"}


def _limits_text(limits: dict) -> str:
    return ", ".join(f"{w} device{'s' if str(w) != '1' else ''}: {int(t):,} tokens" if isinstance(t, (int, float))
                     else f"{w}: {t}" for w, t in sorted(limits.items(), key=lambda kv: int(kv[0])))


def _setup_text(profile: dict) -> str:
    """The training setup the memory is for, in words: dtype, optimizer, mixed precision, FSDP sharding."""
    if not profile:
        return ""
    dtype = profile.get("compute_dtype") or "?"
    if not profile.get("training", True):
        return f"inference (forward only), parameters in {dtype}" + (
            ", planned without weights (parameters on the meta device)" if profile.get("meta_device") else "")
    optimizer = profile.get("optimizer", "none")
    mixed, dp = bool(profile.get("mixed_precision")), int(profile.get("dp", 1) or 1)
    stored = "float32" if mixed else dtype
    states = {"adam": "Adam, 2 states per parameter", "sgd": "SGD with momentum, 1 state per parameter"}
    parts = [f"training step (forward + backward), compute in {dtype}",
             f"optimizer: {states[optimizer] + ' in ' + stored if optimizer in states else 'none counted'}"]
    if profile.get("meta_device"):
        parts.append("planned without weights (parameters on the meta device)")
    if mixed:
        parts.append("mixed precision (FSDP2 MixedPrecisionPolicy: float32 master parameters and gradients, "
                     f"{dtype} copies gathered per layer)")
    if dp > 1:
        parts.append(f"FSDP2 over dp={dp}: parameters, gradients and optimizer states 1/{dp} per device")
    regions = int(profile.get("recomputed_regions", 0) or 0)
    if regions:
        why = "checkpoint='layers'" if profile.get("checkpoint") == "layers" else "the model's own checkpointing"
        parts.append(f"activation checkpointing: {regions} regions recomputed in backward ({why})")
    return ", ".join(parts)


def _regions_markdown(regions: list[dict]) -> list[str]:
    """What runs recomputed in backward (activation checkpointing kept or asked for) and inside FSDP2's hooks."""
    lines = []
    fsdp = [r for r in regions if r.get("kind") == "fsdp"]
    recomputed = [r for r in regions if r.get("kind") == "checkpoint"]
    if recomputed:
        origin = {r.get("origin", "model") for r in recomputed}
        why = "checkpoint='layers'" if origin == {"layers"} else "the model's own activation checkpointing"
        lines.append(f"- recomputed in backward ({why}, torch.utils.checkpoint): {len(recomputed)} regions: "
                     + _some(r.get("module") or r.get("name", "?") for r in recomputed))
    if fsdp:
        lines.append(f"- run as FSDP2 modules' forwards (their unshard/reshard and reduce-scatter hooks): "
                     + _some(r.get("module", "?") for r in fsdp))
    return lines


def _some(names, keep: int = 3) -> str:
    """``a, b, c, ... z`` for a long list of names."""
    names = list(names)
    return ", ".join(names) if len(names) <= keep + 1 else ", ".join(names[:keep]) + f", ... {names[-1]}"


def _softcap_text(attn: dict) -> str:
    return f" (soft-cap {attn['softcap']:g})" if attn.get("softcap") else ""


def mask_text(attn: dict) -> str:
    """An attention's mask in words: what it was seen to be when it ran, else how it is built."""
    if attn.get("mask_structure"):  # what the block mask was seen to be when it ran (runtime.mask_structure)
        return attn["mask_structure"]
    parts = []
    if attn.get("causal"):
        parts.append("causal")
    if attn.get("mask"):
        ops = attn.get("mask_ops") or []
        parts.append(f"{attn['mask']} mask" + (f" ({'/'.join(dict.fromkeys(ops))})" if ops else ""))
    return " + ".join(parts) or "none"


def add_mask_structures(report: "Report") -> None:
    """Name each attention's mask by what it was seen to be when it ran ("causal + key padding"), where it has."""
    from .runtime.mask_structure import described

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
