"""Ring attention on real gloo process groups against single-process SDPA on the full sequence."""

import itertools
import math
import os
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


def values_off(rank):
    return {"shapes": [(1, 4, 6, 8), (1, 2, 6, 8), (1, 2, 6 - rank, 12)]}


def sinks_misshapen(rank):
    return {"shapes": [(1, 4, 6, 8), (1, 2, 6, 8), (1, 2, 6, 12)], "sinks": torch.zeros(2)}


def sinks_on_one_rank(rank):
    return {"shapes": [(1, 4, 6, 8)] * 3, "sinks": torch.zeros(4) if rank == 0 else None}


@pytest.mark.parametrize("per_rank,expected", [
    (heads_differ, "ranks disagree on query heads: rank 0: 4, rank 1: 8"),
    (dtypes_differ, "ranks disagree on dtype: rank 0: torch.bfloat16, rank 1: torch.float32"),
    (one_rank_broken, "rank 1: query heads (4) must be a multiple of key/value heads (3)"),
    (lengths_off_layout, "local lengths [6, 7] do not match the 'zigzag' layout"),
    (options_differ, "ranks disagree on causal"),
    (values_off, "rank 1: k and v must agree in batch, heads and local length"),
    (sinks_misshapen, "sinks must be a floating [H] = [4] tensor"),
    (sinks_on_one_rank, "ranks disagree on sinks: rank 0: sinks, rank 1: none"),
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


# ---- a value head dim of its own (multi-head latent attention) and attention sinks (GPT-OSS) ---------


def window_with_blind_rows(q_pos, k_pos):
    """A two-sided window of 6 keys under which the queries at positions 2 mod 7 see no key at all."""
    return ((q_pos[:, None] - k_pos[None, :]).abs() < 6) & (q_pos[:, None] % 7 != 2)


def softmax_reference(q, k, v, sinks, causal, mask, fill):
    """fp64 attention on the full sequence: SDPA where it can say it (no mask, no sinks), else the softmax
    over the scores and the sink column, ``softmax(cat([scores, sink_h]))[..., :-1] @ v``."""
    group = q.shape[1] // k.shape[1]
    if sinks is None and mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    pos = torch.arange(q.shape[2])
    keep = torch.ones(len(pos), len(pos), dtype=torch.bool)
    if causal:
        keep &= pos[None, :] <= pos[:, None]
    if mask is not None:
        keep &= mask(pos, pos)
    s = s.masked_fill(~keep, fill)
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    top = s.amax(-1, keepdim=True).detach()  # any shift gives the same softmax: no gradient through it
    e = torch.exp(s - torch.where(torch.isneginf(top), 0.0, top))
    total = e.sum(-1, keepdim=True)
    return (e / torch.where(total > 0, total, 1.0))[..., : k.shape[2]] @ v


# (causal, block mask, fill, q/k head dim, value head dim, sinks)
MLA_SINK_CASES = [
    (True, None, float("-inf"), 6, 12, False),
    (False, None, float("-inf"), 12, 6, False),
    (True, None, float("-inf"), 6, 12, True),
    (False, window_with_blind_rows, float("-inf"), 8, 8, True),
    (True, window_with_blind_rows, float("-inf"), 6, 12, True),
    (True, None, torch.finfo(torch.float32).min, 8, 8, True),
]


def check_mla_and_sinks(seed, seq_len, layout, kernel):
    """Every case of MLA_SINK_CASES through the ring (fp32) against the fp64 reference on the full sequence:
    out, dq, dk, dv and d sinks (each rank's share, summed over the ranks as sync_grad would)."""
    saved = os.environ.get("RINGIFY_KERNEL")
    os.environ["RINGIFY_KERNEL"] = kernel
    try:
        return [_mla_and_sinks_errors(seed + i, seq_len, layout, *case) for i, case in enumerate(MLA_SINK_CASES)]
    finally:
        os.environ.pop("RINGIFY_KERNEL") if saved is None else os.environ.update(RINGIFY_KERNEL=saved)


def _mla_and_sinks_errors(seed, seq_len, layout, causal, mask, fill, d, dv, with_sinks):
    g = torch.Generator().manual_seed(seed)
    draw = lambda h, width: torch.randn(2, h, seq_len, width, generator=g, dtype=torch.float64)
    q, k, v, grad = draw(4, d), draw(2, d), draw(2, dv), draw(4, dv)
    sinks = torch.randn(4, generator=g, dtype=torch.float64) * 3 if with_sinks else None
    full = [t.clone().requires_grad_() for t in (q, k, v, *([sinks] if with_sinks else []))]
    ref = softmax_reference(*full[:3], full[3] if with_sinks else None, causal, mask, fill)
    ref.backward(grad)

    local = [shard_sequence(t.float(), 2, layout=layout).requires_grad_() for t in (q, k, v)]
    sinks32 = sinks.float().requires_grad_() if with_sinks else None
    out = ring_attention(*local, causal=causal, layout=layout, mask=mask, fill=fill, sinks=sinks32)
    assert out.shape == (2, 4, local[0].shape[2], dv)
    out.backward(shard_sequence(grad.float(), 2, layout=layout))
    gathered = [gather_sequence(t, 2, layout=layout, seq_len=seq_len) for t in (out.detach(), *(x.grad for x in local))]
    if with_sinks:
        dist.all_reduce(sinks32.grad)
        gathered.append(sinks32.grad)
    assert all(torch.isfinite(t).all() for t in gathered)
    errors = [rel_err(a.double(), b) for a, b in zip(gathered, (ref.detach(), *(x.grad for x in full)))]
    assert max(errors) < 1e-5, f"out/dq/dk/dv/dsinks relative errors {errors} (causal={causal}, mask={mask}, " \
        f"fill={fill}, d={d}, dv={dv}, sinks={with_sinks})"
    return errors


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_value_head_dim_and_sinks_match_the_reference(ranks, seed, world_size, layout):
    """The fused kernels (zero-padded to one head dim) and the plain-torch ones, on odd lengths."""
    for kernel in ("auto", "torch"):
        ranks(world_size).run(check_mla_and_sinks, seed, 8 * world_size + 3, layout, kernel)


def test_sinks_bend_the_result(seed):
    """Sinks large enough to matter: the output is not that of attention without them."""
    q, k, v, _ = make_qkv(seed, 9, 4, 2)
    sinks = torch.tensor([3.0, -3.0, 6.0, 0.0])
    plain, sunk = ring_attention(q, k, v, causal=True), ring_attention(q, k, v, causal=True, sinks=sinks)
    assert rel_err(sunk, plain) > 1e-2


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "block-mask"])
def test_opcheck_with_sinks_and_a_value_head_dim(seed, masked):
    """Schema, fake implementation and autograd of the op with sinks and Dv != D agree (single process)."""
    from ringify.runtime import register_block_mask
    from ringify.runtime.ring_attention import ring_attention_op

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, 11, d, generator=g).requires_grad_() for h, d in ((4, 6), (2, 6), (2, 10)))
    sinks = (torch.randn(4, generator=g) * 3).requires_grad_()
    mask = register_block_mask(window_with_blind_rows) if masked else ""
    torch.library.opcheck(ring_attention_op, (q, k, v, "", True, 0.35, "zigzag", 30.0, mask, [], float("-inf"), 0.0,
                                              sinks))


def test_value_head_dim_and_sinks_through_triton_kernels(seed, monkeypatch):
    """The same cases with the Triton block kernels (interpreted on CPU) where they run: the unmasked ones."""
    pytest.importorskip("triton")
    from ringify.launch import LocalRanks

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned ranks when they import triton
    with LocalRanks(2) as pool:
        pool.run(check_mla_and_sinks, seed, 19, "zigzag", "triton")


# ---- gradients into the arguments of an additive block mask (T5's relative position bias, learned ALiBi) ----


def t5_bucket(relative, bidirectional, num_buckets=8, max_distance=16):
    """T5's ``_relative_position_bucket`` of ``k_pos - q_pos`` (HuggingFace's code, small sizes: the
    logarithmic buckets are reached within a test's length)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(relative.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    return buckets + torch.where(relative < exact, relative, large.clamp(max=num_buckets - 1))


def t5_encoder_bias(q_pos, k_pos, weight, keep):
    """T5 encoder: bidirectional bucketed bias ``weight[bucket]`` ([buckets, H] -> [1, H, Lq, Lk]), padded keys
    hidden (-inf)."""
    bias = weight[t5_bucket(k_pos[None, :] - q_pos[:, None], True)].permute(2, 0, 1).unsqueeze(0)
    return bias.masked_fill(~keep[:, None, None, k_pos], float("-inf"))


def t5_decoder_bias(q_pos, k_pos, weight):
    """T5 decoder self-attention: the one-sided buckets (with ``causal``)."""
    return weight[t5_bucket(k_pos[None, :] - q_pos[:, None], False)].permute(2, 0, 1).unsqueeze(0)


def t5_decoder_bias_hf_padding(q_pos, k_pos, weight, keep):
    """The decoder bias plus HuggingFace's additive padding mask (``finfo.min`` at padded keys)."""
    pad = torch.where(keep[:, None, None, k_pos], 0.0, torch.finfo(torch.float32).min).to(weight.dtype)
    return t5_decoder_bias(q_pos, k_pos, weight) + pad


def learned_alibi(q_pos, k_pos, slopes):
    """ALiBi with learned per-head slopes: ``slope_h * (k_pos - q_pos)`` (with ``causal``)."""
    return slopes.view(1, -1, 1, 1) * (k_pos[None, :] - q_pos[:, None]).to(slopes.dtype)


def learned_alibi_padded(q_pos, k_pos, slopes, keep):
    """Bidirectional ALiBi, ``-slope_h * |k_pos - q_pos|``, padded keys hidden by a bool-free -inf."""
    bias = -slopes.view(1, -1, 1, 1) * (k_pos[None, :] - q_pos[:, None]).abs().to(slopes.dtype)
    return bias.masked_fill(~keep[:, None, None, k_pos], float("-inf"))


# (causal, mask, fill, softcap, sinks, kind of learned argument: "table" [8, H] or "slopes" [H], padding)
MASK_GRAD_CASES = [
    (False, t5_encoder_bias, float("-inf"), 0.0, False, "table", True),
    (True, t5_decoder_bias, float("-inf"), 0.0, False, "table", False),
    (True, t5_decoder_bias_hf_padding, torch.finfo(torch.float32).min, 0.0, False, "table", True),
    (True, t5_decoder_bias, float("-inf"), 1.5, True, "table", False),
    (True, learned_alibi, float("-inf"), 0.0, False, "slopes", False),
    (False, learned_alibi_padded, float("-inf"), 0.0, True, "slopes", True),
]


def bias_reference(q, k, v, mask, args, causal, fill, softcap, sinks):
    """fp64 ``softmax(cap(q k^T * scale) + mask(pos, pos, *args), hidden keys = fill) @ v`` on the full sequence
    (with the sink column when ``sinks``)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(q.shape[2])
    s = s + mask(pos, pos, *args)
    if causal:
        s = s.masked_fill(pos[None, :] > pos[:, None], fill)
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    top = s.amax(-1, keepdim=True).detach()
    e = torch.exp(s - torch.where(torch.isneginf(top), 0.0, top))
    total = e.sum(-1, keepdim=True)
    return (e / torch.where(total > 0, total, 1.0))[..., : k.shape[2]] @ v


def check_mask_gradients(seed, seq_len, layout, kernel):
    """Every case of MASK_GRAD_CASES through the ring (fp32) against the fp64 reference: out, dq, dk, dv and the
    gradient of the learned mask argument (each rank's share, summed over the ranks as sync_grad would)."""
    saved = os.environ.get("RINGIFY_KERNEL")
    os.environ["RINGIFY_KERNEL"] = kernel
    try:
        return [_mask_gradient_errors(seed + i, seq_len, layout, *case) for i, case in enumerate(MASK_GRAD_CASES)]
    finally:
        os.environ.pop("RINGIFY_KERNEL") if saved is None else os.environ.update(RINGIFY_KERNEL=saved)


def _mask_gradient_errors(seed, seq_len, layout, causal, mask, fill, softcap, with_sinks, learned, padded):
    g = torch.Generator().manual_seed(seed)
    draw = lambda h: torch.randn(2, h, seq_len, 8, generator=g, dtype=torch.float64)
    q, k, v, grad = draw(4), draw(2), draw(2), draw(4)
    # large enough to bend the result: a bias table of randn * 3, slopes of randn * 0.5 over distances ~ S
    param = torch.randn(8, 4, generator=g, dtype=torch.float64) * 3 if learned == "table" else \
        torch.randn(4, generator=g, dtype=torch.float64) * 0.5
    keep = torch.rand(2, seq_len, generator=g) > 0.3
    keep[:, 0] = True
    sinks = torch.randn(4, generator=g, dtype=torch.float64) * 3 if with_sinks else None
    full = [t.clone().requires_grad_() for t in (q, k, v, param)]
    ref_sinks = sinks.clone().requires_grad_() if with_sinks else None
    ref = bias_reference(*full[:3], mask, [full[3], *([keep] if padded else [])], causal, fill, softcap, ref_sinks)
    ref.backward(grad)

    local = [shard_sequence(t.float(), 2, layout=layout).requires_grad_() for t in (q, k, v)]
    param32 = param.float().requires_grad_()
    sinks32 = sinks.float().requires_grad_() if with_sinks else None
    out = ring_attention(*local, causal=causal, layout=layout, mask=mask,
                         mask_args=[param32, *([keep] if padded else [])], fill=fill, softcap=softcap, sinks=sinks32)
    out.backward(shard_sequence(grad.float(), 2, layout=layout))
    gathered = [gather_sequence(t, 2, layout=layout, seq_len=seq_len) for t in (out.detach(), *(x.grad for x in local))]
    dist.all_reduce(param32.grad)
    gathered.append(param32.grad)
    expected = [ref.detach(), *(x.grad for x in full)]
    if with_sinks:
        dist.all_reduce(sinks32.grad)
        gathered.append(sinks32.grad)
        expected.append(ref_sinks.grad)
    assert all(torch.isfinite(t).all() for t in gathered)
    errors = [rel_err(a.double(), b) for a, b in zip(gathered, expected)]
    assert max(errors) < 1e-5, f"out/dq/dk/dv/d{learned}[/dsinks] relative errors {errors} (causal={causal}, " \
        f"mask={mask.__name__}, fill={fill}, softcap={softcap})"
    return errors


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_into_additive_mask_arguments(ranks, seed, world_size, layout):
    """T5's relative position bias (with padding, causal, HF's finfo.min padding, a soft-cap, sinks) and learned
    ALiBi slopes: exact gradients into the table and the slopes, with the fused forward and the plain one."""
    for kernel in ("auto", "torch"):
        ranks(world_size).run(check_mask_gradients, seed, 8 * world_size + 3, layout, kernel)


def test_learned_bias_bends_the_result_and_needs_no_grad(seed):
    """The bias is large enough to matter; without requires_grad nothing is differentiated (and no gradient)."""
    q, k, v, _ = make_qkv(seed, 11, 4, 2)
    weight = torch.randn(8, 4, generator=torch.Generator().manual_seed(seed)) * 3
    plain = ring_attention(q, k, v, causal=True)
    biased = ring_attention(q, k, v, causal=True, mask=t5_decoder_bias, mask_args=[weight])
    assert rel_err(biased, plain) > 1e-2
    q.requires_grad_()
    ring_attention(q, k, v, causal=True, mask=t5_decoder_bias, mask_args=[weight]).sum().backward()
    assert weight.grad is None and q.grad is not None


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_with_a_differentiable_mask_argument(seed, causal):
    """Schema, fake implementation and autograd of the op agree when a mask argument requires grad (next to one
    that cannot: the bool padding flags)."""
    from ringify.runtime import register_block_mask
    from ringify.runtime.ring_attention import ring_attention_op

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, 11, 8, generator=g).requires_grad_() for h in (4, 2, 2))
    weight = (torch.randn(8, 4, generator=g) * 3).requires_grad_()
    keep = torch.rand(2, 11, generator=g) > 0.3
    keep[:, 0] = True
    key = register_block_mask(t5_encoder_bias)
    torch.library.opcheck(ring_attention_op, (q, k, v, "", causal, 0.35, "zigzag", 30.0, key, [weight, keep],
                                              float("-inf"), 0.0))


def test_compile_fullgraph_with_a_learned_bias(seed):
    """torch.compile(fullgraph=True) of a call whose mask argument requires grad: the same gradients as eager."""
    q, k, v, _ = make_qkv(seed, 13, 4, 2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(8, 4, generator=g) * 3).requires_grad_()
    keep = torch.rand(2, 13, generator=g) > 0.3
    keep[:, 0] = True
    f = lambda q, k, v, w, keep: ring_attention(q, k, v, causal=True, mask=t5_encoder_bias, mask_args=[w, keep]).tanh()
    eager = f(q, k, v, weight, keep)
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v, weight))
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, weight, keep)
    grads = torch.autograd.grad(out.sum(), (q, k, v, weight))
    assert max(rel_err(a, b) for a, b in zip((out, *grads), (eager, *eager_grads))) < 1e-6
