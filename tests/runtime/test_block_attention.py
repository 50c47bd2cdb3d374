"""The plain-torch block kernels: exact against fp64, and safe on rows with no visible key."""

import pytest
import torch

from ringify.memory import PeakMemory
from ringify.runtime import block_attention
from ringify.runtime.block_attention import torch_block_backward, torch_block_forward
from ringify.runtime.layout import layout_positions


def reference(q, k, v, q_pos, k_pos, scale, causal):
    """fp64 attention with GQA by repetition and a causal mask by position: the thing to match."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


POSITIONS = {
    "same": (torch.arange(0, 12), torch.arange(0, 12)),
    "zigzag": (torch.tensor([*range(4, 8), *range(24, 28)]), torch.tensor([*range(0, 4), *range(28, 32)])),
    "striped": (torch.arange(1, 40, 3), torch.arange(0, 40, 3)),
}


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_two_blocks_merge_to_full_attention(seed, positions, kv_heads):
    g = torch.Generator().manual_seed(seed)
    q_pos, k_pos = POSITIONS[positions]
    lq, lk, scale = len(q_pos), len(k_pos), 0.3
    q = torch.randn(2, 4, lq, 8, generator=g)
    k, v = (torch.randn(2, kv_heads, lk, 8, generator=g) for _ in range(2))
    out = torch.zeros(2, 4, lq, 8)
    lse = torch.full((2, 4, lq), float("-inf"))
    half = lk // 2  # two blocks, merged into the running state
    for part in (slice(0, half), slice(half, lk)):
        torch_block_forward(q, k[:, :, part], v[:, :, part], out, lse, q_pos, k_pos[part], scale=scale, causal=True)
    ref_out, ref_lse = reference(q, k, v, q_pos, k_pos, scale, causal=True)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert torch.allclose(out.double(), ref_out.nan_to_num(0.0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(lse.double()[seen], ref_lse[seen], rtol=1e-5, atol=1e-6)


def test_rows_with_no_visible_key_are_zero_with_finite_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(4))
    q_pos, k_pos = torch.arange(0, 6), torch.arange(3, 9)  # queries 0..2 see nothing
    out, lse = torch.zeros(1, 2, 6, 4), torch.full((1, 2, 6), float("-inf"))
    torch_block_forward(q, k, v, out, lse, q_pos, k_pos, scale=0.5, causal=True)
    assert torch.all(out[:, :, :3] == 0) and torch.all(torch.isneginf(lse[:, :, :3]))
    assert torch.all(out[:, :, 3:] != 0) and torch.all(torch.isfinite(lse[:, :, 3:]))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    delta = (do * out).sum(-1)
    torch_block_backward(q, k, v, do, lse, delta, dq, dk, dv, q_pos, k_pos, scale=0.5, causal=True)
    for grad in (dq, dk, dv):
        assert torch.all(torch.isfinite(grad))
    assert torch.all(dq[:, :, :3] == 0) and dq[:, :, 3:].abs().sum() > 0


def test_fully_masked_block_is_not_computed(seed, monkeypatch):
    """Every key after every query: no matmul at all, state untouched."""
    calls = []
    monkeypatch.setattr(torch, "matmul", lambda *a: calls.append(a) or torch.ops.aten.matmul(*a))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 4, 4, generator=g) for _ in range(3))
    out, lse = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, generator=g)
    before = (out.clone(), lse.clone())
    torch_block_forward(q, k, v, out, lse, torch.arange(0, 4), torch.arange(4, 8), scale=0.5, causal=True)
    assert not calls and torch.equal(out, before[0]) and torch.equal(lse, before[1])


# ---- tiling: long blocks are cut into pieces of at most TILE x TILE, exactly -----------------------

FP32_MIN = torch.finfo(torch.float32).min


def doc_mask(q_pos, k_pos):
    """Packed documents of 10 positions each (a bool block mask, broadcast over batch and heads)."""
    return (q_pos[:, None] // 10) == (k_pos[None, :] // 10)


def alibi_bias(q_pos, k_pos):
    """A per-head additive bias [1, 4, Lq, Lk] (4 query heads)."""
    return -torch.tensor([0.1, 0.2, 0.3, 0.4])[None, :, None, None] * (q_pos[:, None] - k_pos[None, :]).abs()


# (mask_fn, fill, causal, softcap): the plain causal state, the extended state with bool / float masks,
# and Gemma-2's logit soft-capping on both (a cap of 1.5 bends most of these scores)
TILED = {
    "causal": (None, float("-inf"), True, 0.0),
    "docs_finite_fill": (doc_mask, FP32_MIN, True, 0.0),
    "docs_neg_inf": (doc_mask, float("-inf"), False, 0.0),
    "bias_finite_fill": (alibi_bias, FP32_MIN, True, 0.0),
    "causal_softcap": (None, float("-inf"), True, 1.5),
    "bias_finite_fill_softcap": (alibi_bias, FP32_MIN, True, 1.5),
}


def full_softmax(q, k, v, do, q_pos, k_pos, scale, mask_fn, fill, causal, softcap=0.0):
    """fp64 softmax over the whole block (one piece), with autograd: (out, lse, dq, dk, dv)."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    group = q.shape[1] // k.shape[1]
    kd, vd = (t.repeat_interleave(group, dim=1) for t in leaves[1:])
    s = leaves[0] @ kd.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    keep = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    if mask_fn is not None:
        m = mask_fn(q_pos, k_pos)
        keep = keep & m if m.dtype == torch.bool else keep
        s = s + m.double() if m.is_floating_point() else s
    if causal:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    s = s.masked_fill(~keep, fill)
    empty = torch.isneginf(s).all(-1, keepdim=True)  # -inf fill, no visible key: the row gives 0
    out = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0) @ vd
    out.backward(do.double())
    return out.detach(), torch.logsumexp(s, -1).detach(), *(t.grad for t in leaves)


def max_rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("tile", [16, None])  # a small tile (many pieces, ragged ends) and the real one
@pytest.mark.parametrize("case", TILED)
@pytest.mark.parametrize("positions", ["same", "zigzag", "striped"])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_tiles_match_full_softmax(seed, monkeypatch, tile, case, positions, kv_heads):
    check_tiles(seed, monkeypatch, tile, case, positions, kv_heads)


@pytest.mark.parametrize("case", TILED)
@pytest.mark.parametrize("d,dv", [(6, 12), (12, 6)])
def test_value_head_dim_of_its_own(seed, monkeypatch, case, d, dv):
    """Multi-head latent attention: values (and the output) [.., Dv] with Dv != D, tiled, every kind of mask."""
    check_tiles(seed, monkeypatch, 16, case, "zigzag", 2, d, dv)


def check_tiles(seed, monkeypatch, tile, case, positions, kv_heads, d=8, dv=8):
    """Forward and backward of one block pair in tiles against the fp64 softmax of the whole block."""
    if tile is not None:
        monkeypatch.setattr(block_attention, "TILE", tile)
    size = block_attention.TILE
    lq = 2 * size + 37 if tile else size + 45  # longer than a tile, not a multiple of it
    if positions == "same":
        q_pos = k_pos = torch.arange(lq)
    else:  # the query shard of rank 0 against the key block of rank 1, on a ring of two
        q_pos, k_pos = (layout_positions(2 * lq + 1, 2, rank, positions) for rank in (0, 1))
    mask_fn, fill, causal, softcap = TILED[case]
    g = torch.Generator().manual_seed(seed)
    q, do = torch.randn(2, 4, len(q_pos), d, generator=g), torch.randn(2, 4, len(q_pos), dv, generator=g)
    k, v = torch.randn(2, kv_heads, len(k_pos), d, generator=g), torch.randn(2, kv_heads, len(k_pos), dv, generator=g)

    pieces = []
    plan = block_attention._plan
    monkeypatch.setattr(block_attention, "_plan", lambda *a, **kw: (pieces.append(p[:4]) or p for p in plan(*a, **kw)))
    extended = mask_fn is not None or fill != float("-inf")
    out = torch.zeros_like(do)
    lse = torch.zeros(2, 2, 4, len(q_pos)) if extended else torch.full((2, 4, len(q_pos)), float("-inf"))
    if extended:
        lse[0] = float("-inf")
    kw = dict(scale=0.3, causal=causal, mask_fn=mask_fn, fill=fill, softcap=softcap)
    torch_block_forward(q, k, v, out, lse, q_pos, k_pos, **kw)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    torch_block_backward(q, k, v, do, lse, (do * out).sum(-1), dq, dk, dv, q_pos, k_pos, **kw)

    assert len(pieces) > 2 and all(ql <= size and kl <= size for _, ql, _, kl in pieces)
    ref_out, ref_lse, *ref_grads = full_softmax(q, k, v, do, q_pos, k_pos, 0.3, mask_fn, fill, causal, softcap)
    ours_lse = lse[0] + lse[1] if extended else lse
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(ours_lse), seen)
    assert max_rel(ours_lse[seen], ref_lse[seen]) < 1e-5
    for ours, ref in zip((out, dq, dk, dv), (ref_out, *ref_grads)):
        assert max_rel(ours, ref) < 1e-5


def test_causal_tiles_skip_hidden_and_unmask_visible(monkeypatch):
    """Above the diagonal nothing runs, below it no mask is built; only diagonal tiles are masked."""
    monkeypatch.setattr(block_attention, "TILE", 8)
    pos = torch.arange(40)
    pieces = list(block_attention._plan(pos, pos, causal=True))
    assert [(qs, ks) for qs, _, ks, _, _ in pieces] == [(q, k) for q in range(0, 40, 8) for k in range(0, q + 1, 8)]
    assert all((m is None) == (qs != ks) for qs, _, ks, _, m in pieces)


def test_one_long_block_never_builds_the_full_score_matrix():
    """Forward + backward of one 2048-token block: far below a single [B, H, S, S] fp32 score matrix."""
    s, heads = 2048, 2
    q, k, v, do = (torch.randn(1, heads, s, 16) for _ in range(4))
    pos = torch.arange(s)
    with PeakMemory() as meter:
        out, lse = torch.zeros_like(q), torch.full((1, heads, s), float("-inf"))
        torch_block_forward(q, k, v, out, lse, pos, pos, scale=0.25, causal=True)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        torch_block_backward(q, k, v, do, lse, (do * out).sum(-1), dq, dk, dv, pos, pos, scale=0.25, causal=True)
    assert meter.peak_bytes < heads * s * s * 4 / 8


# ---- decoding over a sharded cache: a value head dim of its own and attention sinks --------------------


def recent_keys(q_pos, k_pos):
    """A window of the last 5 positions (a bool block mask: the extended state in decoding)."""
    return (q_pos[:, None] - k_pos[None, :]) < 5


def decode_one(q, k, v, prompt, layout, mask_args, **kwargs):
    """The last of ``k``/``v``'s ``prompt + 1`` positions decoded: a cache holding this rank's prompt keys and
    values, then ``cache_attention`` (scale 0.3, causal, fill -inf, no soft-cap) with ``kwargs``."""
    import torch.distributed as dist

    from ringify.runtime import kv_cache

    rank, world = dist.get_rank(), dist.get_world_size()
    cache = kv_cache.ShardedKVCache("", kv_cache.slots_per_rank(prompt, 2, world))
    cache.begin(prompt, layout, "cpu")
    mine = layout_positions(prompt, world, rank, layout)
    cache.store(0, k[:, :, mine], v[:, :, mine])
    cache.step(prompt, append=True)
    slot = kv_cache.new_slot()
    with kv_cache.bound(slot, cache):
        return kv_cache.cache_attention(q, k[:, :, prompt:], v[:, :, prompt:], mask_args, slot=slot, layer=0,
                                        scale=0.3, causal=True, fill=float("-inf"), softcap=0.0, group="", **kwargs)


def check_decode_with_sinks(seed, prompt, layout):
    """One decoded token (q/k head dim 6, value head dim 12, sinks randn * 3) over the cache sharded on the ranks,
    against the fp64 softmax with the sink column over every key; with and without a block mask."""
    from ringify.runtime import register_block_mask

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 1, 6, generator=g)
    k, v = torch.randn(2, 2, prompt + 1, 6, generator=g), torch.randn(2, 2, prompt + 1, 12, generator=g)
    sinks = torch.randn(4, generator=g) * 3
    errors = []
    for mask in (None, register_block_mask(recent_keys)):
        out = decode_one(q, k, v, prompt, layout, [], mask_fn=mask, sinks=sinks)
        s = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
        if mask is not None:
            s = s.masked_fill(~recent_keys(torch.tensor([prompt]), torch.arange(prompt + 1)), float("-inf"))
        p = torch.softmax(torch.cat([s, sinks.double().view(1, 4, 1, 1).expand(2, 4, 1, 1)], -1), -1)[..., :-1]
        ref = p @ v.double().repeat_interleave(2, dim=1)
        assert out.shape == (2, 4, 1, 12)
        errors.append(((out.double() - ref).norm() / ref.norm()).item())
    assert max(errors) < 1e-5, errors
    return errors


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_decode_with_sinks_and_a_value_head_dim(ranks, seed, world_size):
    layout = ("zigzag", "striped", "contiguous")[world_size % 3]
    ranks(world_size).run(check_decode_with_sinks, seed, 4 * world_size + 3, layout)


def test_merge_partials_applies_sinks_once(seed):
    """Sinks in the merge of two parts == the part of all keys with sinks; a row no part saw stays 0."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 10, 4, generator=g)
    v = torch.randn(1, 2, 10, 6, generator=g)
    q_pos, k_pos, sinks = torch.tensor([2, 6, 9]), torch.arange(3, 13), torch.tensor([2.0, -1.0])
    kw = dict(scale=0.5, causal=True)
    parts = [block_attention.attend_keys(q, k[:, :, s], v[:, :, s], q_pos, k_pos[s], **kw)
             for s in (slice(0, 5), slice(5, 10))]
    merged, lse = block_attention.merge_partials([o for o, _ in parts], [l for _, l in parts], False, sinks)
    whole, whole_lse = block_attention.attend_keys(q, k, v, q_pos, k_pos, **kw)
    once, once_lse = block_attention.merge_partials([whole], [whole_lse], False, sinks)
    assert torch.allclose(merged, once, atol=1e-6) and torch.allclose(lse, once_lse)
    assert torch.all(merged[:, :, 0] == 0) and torch.equal(lse[:, :, 0], sinks.view(1, 2))  # position 2 sees no key


# ---- gradients into the arguments of an additive block mask ------------------------------------------------


def head_bias(q_pos, k_pos, table):
    """A learned bias per (head, distance) from a table [H, 2 * 40 + 1], hidden beyond a distance of 9."""
    rel = k_pos[None, :] - q_pos[:, None]
    bias = table[:, rel + 40].unsqueeze(0)  # [1, H, Lq, Lk]
    return bias.masked_fill((rel.abs() > 9).view(1, 1, *rel.shape), float("-inf"))


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("softcap,fill", [(0.0, float("-inf")), (1.5, float("-inf")), (0.0, -1e9)])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_mask_gradients_of_two_blocks(seed, monkeypatch, positions, softcap, fill, kv_heads):
    """``MaskGradients`` through the plain-torch kernels (tiles of 4, so pieces are skipped and masked) over two
    key blocks: d table == fp64 autograd of ``softmax(cap(q k^T * scale) + bias, causal hidden = fill) @ v``."""
    monkeypatch.setattr(block_attention, "TILE", 4)
    g = torch.Generator().manual_seed(seed)
    q_pos, k_pos = POSITIONS[positions]
    lq, lk, scale = len(q_pos), len(k_pos), 0.6
    q, do = torch.randn(2, 4, lq, 8, generator=g), torch.randn(2, 4, lq, 8, generator=g)
    k, v = (torch.randn(2, kv_heads, lk, 8, generator=g) for _ in range(2))
    table = torch.randn(4, 81, generator=g) * 3

    ref_in = [t.double().requires_grad_() for t in (q, k, v, table)]
    group = 4 // kv_heads
    s = ref_in[0] @ ref_in[1].repeat_interleave(group, 1).transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = (s + head_bias(q_pos, k_pos, ref_in[3])).masked_fill(k_pos[None, :] > q_pos[:, None], fill)
    top = s.amax(-1, keepdim=True).detach()  # rows with no visible key (zigzag: 24..27) give 0, not NaN
    e = torch.exp(s - torch.where(torch.isneginf(top), 0.0, top))
    total = e.sum(-1, keepdim=True)
    ref = (e / torch.where(total > 0, total, 1.0)) @ ref_in[2].repeat_interleave(group, 1)
    ref.backward(do.double())

    mask_fn = lambda a, b: head_bias(a, b, table)
    out, lse = torch.zeros(2, 4, lq, 8), torch.zeros(2, 2, 4, lq)
    lse[0] = float("-inf")
    half = lk // 2
    kw = dict(scale=scale, causal=True, fill=fill, softcap=softcap)
    for part in (slice(0, half), slice(half, lk)):
        torch_block_forward(q, k[:, :, part], v[:, :, part], out, lse, q_pos, k_pos[part], mask_fn=mask_fn, **kw)
    grads = block_attention.MaskGradients(head_bias, [table], [True])  # one accumulator over both blocks
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for part in (slice(0, half), slice(half, lk)):
        torch_block_backward(q, k[:, :, part], v[:, :, part], do, lse, (do * out).sum(-1), dq, dk[:, :, part],
                             dv[:, :, part], q_pos, k_pos[part], mask_fn=grads, **kw)
    (dtable,) = grads.results()
    expected = (ref, *(t.grad for t in ref_in))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dtable"), (out, dq, dk, dv, dtable), expected):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-5, (name, err)


def check_decode_with_a_learned_bias(seed, prompt, layout):
    """Decoding takes a mask argument that requires grad (it is just an argument: no gradient, no graph)."""
    from ringify.runtime import register_block_mask

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 1, 8, generator=g)
    k, v = torch.randn(2, 2, prompt + 1, 8, generator=g), torch.randn(2, 2, prompt + 1, 8, generator=g)
    table = (torch.randn(4, 81, generator=g) * 3).requires_grad_()
    out = decode_one(q, k, v, prompt, layout, [table], mask_fn=register_block_mask(head_bias))
    assert not out.requires_grad
    s = q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    s = s + head_bias(torch.tensor([prompt]), torch.arange(prompt + 1), table.detach().double())
    ref = torch.softmax(s, -1) @ v.double().repeat_interleave(2, dim=1)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    assert error < 1e-5, error
    return error


@pytest.mark.parametrize("world_size", [1, 2])
def test_decode_with_a_learned_bias_argument(ranks, seed, world_size):
    ranks(world_size).run(check_decode_with_a_learned_bias, seed, 4 * world_size + 3, "zigzag")
