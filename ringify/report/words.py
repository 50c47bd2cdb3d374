"""What a report says in words about an attention's mask and about the training setup, on every page."""

from __future__ import annotations


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


def setup_text(profile: dict) -> str:
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
