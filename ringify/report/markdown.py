"""The report as Markdown, for the terminal and for pasting into an issue."""

from __future__ import annotations

from .units import size, time
from .words import mask_text, setup_text


def to_markdown(report) -> str:
    """The report as Markdown: a table per layer, the rewrites, what was refused and the cost model."""
    lines = [f"# ringify report: {report.model}",
             f"world size {report.world_size}, sequence {report.seq_len}, layout {report.layout}", "",
             "| layer | attention | mask | GQA | feed-forward | source |", "|---|---|---|---|---|---|"]
    for path, layer in report.layers.items():
        attn = layer.get("attention", [])
        ffn = layer.get("ffn", [])
        a = ", ".join(f"{x.get('kind', '?')}{_softcap_text(x)} -> ring" for x in attn) or "-"
        m = ", ".join(mask_text(x) for x in attn) or "-"
        g = ", ".join("yes" if x.get("gqa") else "no" for x in attn) or "-"
        f = ", ".join(f"{x.get('kind', '?')}({x.get('activation', '')}) -> "
                      + ("chunked" if x.get("chunk_tokens") else "whole") for x in ffn) or "-"
        src = (attn or ffn or [{}])[0].get("source", "")
        lines.append(f"| {path or '(top)'} | {a} | {m} | {g} | {f} | {src} |")
    lines += ["", f"- positions rewritten to global positions: {len(report.positions)}",
              f"- reductions over tokens -> local partial + sum over ranks: "
              + (", ".join(f"{r['op']} ({r['module'] or 'top'})" for r in report.reductions) or "none"),
              f"- ops run on full inputs on every rank (they mix tokens of inputs only): "
              + (", ".join(f"{r['op']}" for r in report.full_ops) or "none"),
              f"- inputs cut into shards at: " + (", ".join(s["node"] for s in report.shards) or "none"),
              f"- slices and selected tokens along the sequence: "
              + (", ".join(f"{s['op']} ({s.get('kept') or s.get('selected')})" for s in report.slices) or "none"),
              f"- outputs: " + (", ".join(f"{o['node']} ({'gathered' if 'gathered_dim' in o else 'local'})"
                                            for o in report.outputs) or "none"),
              f"- parameters whose gradients are summed over ranks: {report.synced_parameters}"]
    lines += _regions_markdown(report.regions)
    if report.token_local_modules:
        lines.append(f"- run whole on this rank's tokens (dropless mixture-of-experts: each token's output is "
                     f"its own): {', '.join(report.token_local_modules)}")
    if report.refused:
        lines += ["", "## refused"] + [f"- {r.get('what', '?')}: {r.get('why', '')}" for r in report.refused]
    if report.cost:
        lines += ["", "## cost"] + _cost_markdown(report.cost)
    return "\n".join(lines) + "\n"


def _cost_markdown(cost: dict) -> list[str]:
    """A few lines of the cost model: memory per device, the ring step, the largest context per world size."""
    estimate = cost.get("estimate") or {}
    hardware = estimate.get("hardware") or {}
    lines = []
    if hardware:
        lines.append(f"- hardware: {hardware.get('name', '?')}"
                     + (f" ({hardware['description']})" if hardware.get("description") else "")
                     + (f", {size(hardware['memory'])} memory" if hardware.get("memory") else ""))
    setup = setup_text(cost.get("profile") or {})
    if setup:
        lines.append(f"- {setup}")
    device = estimate.get("per_device") or {}
    if device:
        parts = ", ".join(f"{k.replace('_', ' ')} {size(v)}" for k, v in device.items()
                          if k not in ("total", "fits") and v)
        fits = "" if "fits" not in device else (", fits" if device["fits"] else ", DOES NOT FIT")
        lines.append(f"- memory per device at {estimate.get('seq_len', '?')} tokens on {estimate.get('world_size', '?')} "
                     f"devices: {size(device.get('total', '?'))}{fits}" + (f" ({parts})" if parts else ""))
    step = estimate.get("ring_step") or {}
    if step:
        hidden = step.get("transfer_hidden")
        lines.append(f"- ring step: block {step.get('block_tokens', '?')} tokens, sends {size(step.get('bytes_sent', '?'))}, "
                     f"compute {time(step.get('compute_seconds', '?'))} vs transfer {time(step.get('transfer_seconds', '?'))}"
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
    parts = ", ".join(f"{k.replace('_', ' ')} {size(v)}" for k, v in device.items()
                      if k not in ("total", "fits") and v)
    fits = "" if "fits" not in device else (", fits" if device["fits"] else ", DOES NOT FIT")
    hidden = "" if step.get("transfer_hidden") is None else (", hidden" if step["transfer_hidden"] else ", NOT hidden")
    new = generation.get("new_tokens", "?")
    lines = [f"- generation (rm.generate, {new} new tokens after a prompt of {estimate.get('prompt', '?')} tokens on "
             f"{estimate.get('world_size', '?')} devices): memory per device {size(device.get('total', '?'))}{fits} "
             f"({parts}); the prefill computes no logits",
             f"- prefill {time(prefill.get('seconds', '?'))} (ring step: block {step.get('block_tokens', '?')} tokens, "
             f"compute {time(step.get('compute_seconds', '?'))} vs transfer {time(step.get('transfer_seconds', '?'))}"
             f"{hidden}); decode {time(decode.get('seconds_per_token', '?'))} per token ({decode.get('bound', '?')}"
             f"-bound: {size(decode.get('weight_bytes', '?'))} of weights and "
             f"{size(decode.get('cache_bytes_read', '?'))} of cache read, all-gathers "
             f"{time(decode.get('all_gather_seconds', '?'))})"]
    if generation.get("max_prompt"):
        lines.append(f"- longest prompt for {new} new tokens (parameters whole on every device, key/value cache "
                     "sharded): " + _limits_text(generation["max_prompt"]))
    return lines


_OUTPUTS = {"full": "outputs gathered to full length on every rank, O(S x vocab) per rank for logits",
            "local": "each rank keeps its own tokens, at rm.local_positions()"}


def _limits_text(limits: dict) -> str:
    return ", ".join(f"{w} device{'s' if str(w) != '1' else ''}: {int(t):,} tokens" if isinstance(t, (int, float))
                     else f"{w}: {t}" for w, t in sorted(limits.items(), key=lambda kv: int(kv[0])))


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
