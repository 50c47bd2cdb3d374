"""Checks that a ring computes the same function as one process (used by the demo and the tests).

In ``check_ring_attention`` every rank draws the same full-length inputs, keeps its shard, runs the ring, and gathers the output
and the gradients back; rank 0 compares them with ``F.scaled_dot_product_attention`` on the whole
sequence in a single process.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .runtime import gather_sequence, ring_attention, shard_lengths, shard_sequence


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64: the measure every equivalence check in ringify uses."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def worst_grad_error(model: torch.nn.Module, reference: torch.nn.Module) -> tuple[float, str]:
    """The largest relative error of ``model``'s parameter gradients against ``reference``'s, and whose.

    A gradient that is zero in exact arithmetic (a key bias under softmax) is float noise on both sides:
    it is compared against the largest reference gradient (times 1e-3) instead of its own size.
    Parameters without a gradient on either side are skipped (the callers check those).
    """
    ref = dict(reference.named_parameters())
    scale = max(p.grad.norm().item() for p in reference.parameters() if p.grad is not None)
    return max((((p.grad - ref[n].grad).norm() / max(ref[n].grad.norm(), 1e-3 * scale)).item(), n)
               for n, p in model.named_parameters() if ref[n].grad is not None and p.grad is not None)


def check_ring_attention(seed: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, causal: bool, layout: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(1, h, seq_len, head_dim, generator=g) for h in (heads, kv_heads, kv_heads, heads))

    local = [shard_sequence(t, 2, layout=layout).requires_grad_() for t in (q, k, v)]
    ring_attention(*local, causal=causal, layout=layout).sum().backward()  # warm-up: first call imports torch._dynamo
    for t in local:
        t.grad = None
    dist.barrier()
    start = time.perf_counter()
    out = ring_attention(*local, causal=causal, layout=layout)
    out.backward(shard_sequence(grad, 2, layout=layout))
    seconds = time.perf_counter() - start
    ring = [gather_sequence(t, 2, layout=layout, seq_len=seq_len) for t in (out.detach(), *(t.grad for t in local))]

    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=heads != kv_heads)
    ref.backward(grad)
    errors = [relative_error(a, b) for a, b in zip(ring, (ref, q.grad, k.grad, v.grad))]
    world = dist.get_world_size()
    return {
        "layout": layout,
        "shard_lengths": shard_lengths(seq_len, world, layout),
        "max_relative_error": max(errors),
        "seconds": seconds,
    }


def check_tiny_gpt(seed: int, seq_len: int, batch: int = 2, layout: str = "zigzag") -> dict:
    """The demo's check: ringified :class:`ringify.models.TinyGPT` against the untouched copy on every rank.

    Logits, loss and every parameter gradient are compared (max relative error); the second call's
    forward + backward is metered with :class:`ringify.memory.PeakMemory` (the first one captures).
    """
    import copy

    from . import ringify
    from .memory import PeakMemory
    from .models import TinyGPT, tiny_gpt_inputs

    torch.manual_seed(seed)
    model = TinyGPT(max_len=seq_len + 64)  # nanoGPT keeps a block_size > T; T == block_size is handled by capture
    reference = copy.deepcopy(model)
    inputs = tiny_gpt_inputs(seed, batch, seq_len, model.vocab)
    expected = reference(**inputs)
    expected.loss.backward()

    rm = ringify(model, layout=layout)
    rm(**inputs).loss.backward()  # capture and warm up
    model.zero_grad(set_to_none=True)
    dist.barrier()
    start = time.perf_counter()
    with PeakMemory() as meter:
        out = rm(**inputs)
        out.loss.backward()
    seconds = time.perf_counter() - start
    grads = {name: relative_error(p.grad, dict(reference.named_parameters())[name].grad)
             for name, p in model.named_parameters()}
    report = rm.report()
    return {
        "rank": dist.get_rank(),
        "logits": relative_error(out.logits.detach(), expected.logits.detach()),
        "loss": relative_error(out.loss.detach(), expected.loss.detach()),
        "grads": max(grads.values()),
        "worst_grad": max(grads, key=grads.get),
        "peak_bytes": meter.peak_bytes,
        "seconds": seconds,
        "report": report if dist.get_rank() == 0 else None,
    }


@torch.no_grad()
def reference_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, mask: torch.Tensor | None = None,
                       pad: int | None = None) -> tuple[torch.Tensor, str]:
    """The untouched model's greedy tokens ``[B, S + N]`` and how they were made (``rm.generate``'s reference).

    HF's ``generate`` where the model has it; else the plain loop that runs the whole sequence again for each
    token, called as ``rm.generate`` calls the model: ``attention_mask`` (extended by ones) only for a padded
    prompt, ``position_ids`` from the mask's cumsum when forward takes them.
    """
    import inspect

    from .generate import logits_of

    if hasattr(model, "generate"):  # what is not given is not passed: None would override the model's
        given = {k: v for k, v in (("attention_mask", mask), ("pad_token_id", pad)) if v is not None}  # config
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **given), "HF generate"
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = set()
    mask = torch.ones_like(ids) if mask is None else mask
    padded = not bool(mask.all())
    out = ids
    for _ in range(new_tokens):
        kwargs: dict = {}
        if padded and "attention_mask" in params:
            kwargs["attention_mask"] = mask
        if "position_ids" in params:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if "use_cache" in params:
            kwargs["use_cache"] = False
        result = model(input_ids=out, **kwargs) if "input_ids" in params else model(out, **kwargs)
        chosen = logits_of(result)[:, -1].float().argmax(-1, keepdim=True)
        out = torch.cat([out, chosen.to(out.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(chosen, dtype=mask.dtype)], dim=1)
    return out, "greedy loop over the whole sequence"
