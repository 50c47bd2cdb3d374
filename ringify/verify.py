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
