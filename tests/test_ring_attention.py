"""Ring attention on real gloo process groups against single-process SDPA on the full sequence."""

import itertools
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringify.verify import relative_error as rel_err
from ringify.runtime import (
    LAYOUTS, RingInputError, RingTimeoutError, gather_sequence, ring_attention, shard_sequence,
)


def make_qkv(seed, seq_len, heads, kv_heads, dtype=torch.float32, batch=2, head_dim=16):
    """Fresh random inputs, identical on every rank (same seed), drawn in fp64 then cast."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda h: torch.randn(batch, h, seq_len, head_dim, generator=g, dtype=torch.float64)
    q, k, v, grad = draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)
    return [t.to(dtype) for t in (q, k, v, grad)]


def sdpa(q, k, v, grad, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def ring(q, k, v, grad, causal, layout):
    """Shard, run the ring, gather output and gradients back to the full sequence."""
    seq_len = q.shape[2]
    local = [shard_sequence(t, 2, layout=layout).detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, causal=causal, layout=layout)
    out.backward(shard_sequence(grad, 2, layout=layout))
    full = lambda t: gather_sequence(t, 2, layout=layout, seq_len=seq_len)
    return full(out.detach()), *(full(t.grad) for t in local)


def check_fp32_equivalence(seed, seq_len, heads, kv_heads, causal, layout):
    q, k, v, grad = make_qkv(seed, seq_len, heads, kv_heads)
    errors = [rel_err(a, b) for a, b in zip(ring(q, k, v, grad, causal, layout), sdpa(q, k, v, grad, causal))]
    assert max(errors) < 1e-5, f"out/dq/dk/dv relative errors {errors}"
    return errors


HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("length", ["even", "odd"])
def test_matches_sdpa_fp32(ranks, seed, world_size, layout, causal, length):
    seq_len = 8 * world_size if length == "even" else 8 * world_size + 5  # odd, uneven shards
    heads, kv_heads = HEADS[seed % len(HEADS)]
    ranks(world_size).run(check_fp32_equivalence, seed, seq_len, heads, kv_heads, causal, layout)


@pytest.mark.parametrize("heads,kv_heads", HEADS, ids=["mha", "gqa", "mqa"])
def test_gqa_and_mqa_on_three_ranks(ranks, seed, heads, kv_heads):
    ranks(3).run(check_fp32_equivalence, seed, 29, heads, kv_heads, True, "zigzag")


def test_sequence_as_short_as_the_world(ranks, seed):
    ranks(4).run(check_fp32_equivalence, seed, 4, 4, 2, True, "zigzag")
    ranks(4).run(check_fp32_equivalence, seed, 5, 4, 2, True, "contiguous")


def check_soft_capped(seed, seq_len, causal, layout, cap):
    """Gemma-2's logit soft-cap through the ring, against the canonical attention on the full sequence."""
    from ringify.passes.attention import attention

    q, k, v, grad = make_qkv(seed, seq_len, 4, 2)
    full = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = attention(*full, scale=0.6, causal=causal, softcap=cap)  # scale 0.6: scores reach the cap
    ref.backward(grad)
    local = [shard_sequence(t, 2, layout=layout).detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, causal=causal, layout=layout, scale=0.6, softcap=cap)
    out.backward(shard_sequence(grad, 2, layout=layout))
    gathered = [gather_sequence(t, 2, layout=layout, seq_len=seq_len) for t in (out.detach(), *(x.grad for x in local))]
    errors = [rel_err(a, b) for a, b in zip(gathered, (ref.detach(), *(x.grad for x in full)))]
    assert max(errors) < 1e-5, f"out/dq/dk/dv relative errors {errors}"
    return errors


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_soft_capped_scores(ranks, seed, world_size, causal):
    ranks(world_size).run(check_soft_capped, seed, 8 * world_size + 3, causal, "zigzag", 1.5)


def check_low_precision(seed, dtype, causal, layout):
    """Error against fp64 is at most 2x what SDPA itself makes in the same dtype."""
    q, k, v, grad = make_qkv(seed, 45, 4, 2, dtype=torch.float64)
    exact = sdpa(q, k, v, grad, causal)
    low = [t.to(dtype) for t in (q, k, v, grad)]
    ours = ring(*low, causal, layout)
    theirs = sdpa(*low, causal)
    for name, a, b, ref in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert a.dtype == dtype
        assert rel_err(a, ref) <= 2 * rel_err(b, ref) + 1e-6, (name, rel_err(a, ref), rel_err(b, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_low_precision_within_twice_sdpa_error(ranks, seed, dtype, world_size):
    for causal, layout in itertools.product([False, True], ["zigzag", "striped"]):
        ranks(world_size).run(check_low_precision, seed, dtype, causal, layout)


# ---- bad input: a clear error on every rank, never a hang -----------------------------------------


def call_with(seed, per_rank):
    """Call ring_attention with this rank's arguments from ``per_rank``; return the error text."""
    rank = dist.get_rank()
    kwargs = per_rank(rank)
    g = torch.Generator().manual_seed(seed + rank)
    dtype = kwargs.pop("dtype", torch.float32)
    tensors = [torch.randn(*shape, generator=g).to(dtype) for shape in kwargs.pop("shapes")]
    try:
        ring_attention(*tensors, **kwargs)
    except RingInputError as err:
        return str(err)
    return "no error"


def heads_differ(rank):
    return {"shapes": [(1, 4 if rank == 0 else 8, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)]}


def dtypes_differ(rank):
    return {"shapes": [(1, 4, 6, 8)] * 3, "dtype": torch.float32 if rank else torch.bfloat16}


def one_rank_broken(rank):
    return {"shapes": [(1, 4, 6, 8), (1, 3 if rank == 1 else 2, 6, 8), (1, 3 if rank == 1 else 2, 6, 8)]}


def lengths_off_layout(rank):
    return {"shapes": [(1, 4, 6 + rank, 8)] * 3, "layout": "zigzag"}


def options_differ(rank):
    return {"shapes": [(1, 4, 6, 8)] * 3, "causal": rank == 0}


@pytest.mark.parametrize("per_rank,expected", [
    (heads_differ, "ranks disagree on query heads: rank 0: 4, rank 1: 8"),
    (dtypes_differ, "ranks disagree on dtype: rank 0: torch.bfloat16, rank 1: torch.float32"),
    (one_rank_broken, "rank 1: query heads (4) must be a multiple of key/value heads (3)"),
    (lengths_off_layout, "local lengths [6, 7] do not match the 'zigzag' layout"),
    (options_differ, "ranks disagree on causal"),
])
def test_bad_input_raises_on_every_rank(ranks, seed, per_rank, expected):
    messages = ranks(2).run(call_with, seed, per_rank, timeout=60)
    for message in messages:
        assert expected in message


def skip_the_call(seed):
    """Rank 1 never calls ring attention (as if it had died); rank 0 must give up in bounded time."""
    if dist.get_rank() == 1:
        time.sleep(8)
        return None
    q, k, v, _ = make_qkv(seed, 6, 2, 2)
    start = time.perf_counter()
    with pytest.raises(RingTimeoutError, match="no answer from a peer within 2s"):
        ring_attention(q, k, v, timeout=2)
    return time.perf_counter() - start


def test_missing_peer_times_out(seed):
    from ringify.launch import LocalRanks

    pool = LocalRanks(2)  # its group is broken afterwards: not the shared one
    try:
        waited, _ = pool.run(skip_the_call, seed, timeout=60)
    finally:
        pool.close()
    assert 1.5 < waited < 10


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_ring_through_triton_kernels(seed, monkeypatch, layout):
    """The whole ring with the Triton block kernels (interpreted on CPU): what CUDA runs by default."""
    pytest.importorskip("triton")
    from ringify.launch import LocalRanks

    monkeypatch.setenv("RINGIFY_KERNEL", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned ranks when they import triton
    with LocalRanks(2) as pool:
        pool.run(check_fp32_equivalence, seed, 21, 4, 2, True, layout)
