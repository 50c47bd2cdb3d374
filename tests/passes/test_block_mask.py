"""Block masks in the ring (real gloo process groups) against the unsharded model.

Each mask is checked against single-process attention on the full sequence with the equivalent full
mask: SDPA where hidden keys are -inf, an fp64 math reference (softmax of the filled scores) where the
fill is finite, as in HuggingFace models.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringify.runtime import RingInputError, gather_sequence, ring_attention, shard_lengths, shard_sequence
from ringify.runtime.block_attention import torch_block_forward
from ringify.verify import relative_error as rel_err

NEG_INF = float("-inf")
FP32_MIN = torch.finfo(torch.float32).min
WINDOW = 4

# ---- block-mask functions: module level, so every rank imports the same ones -----------------------


def sliding_window(q_pos, k_pos):
    """With causal=True: q - WINDOW < k <= q."""
    return (q_pos[:, None] - k_pos[None, :]) < WINDOW


def key_padding(q_pos, k_pos, keep):
    """keep: bool [B, S], True = real token."""
    return keep[:, None, None, k_pos]


def documents(q_pos, k_pos, doc):
    """doc: int [B, S] document ids of packed sequences; causal inside each document."""
    same = doc[:, q_pos, None] == doc[:, None, k_pos]
    return (same & (k_pos[None, :] <= q_pos[:, None])).unsqueeze(1)


def table(q_pos, k_pos, full):
    """A full [B, 1, S, S] mask given as a model input (HF's 4-D masks), read at the piece's positions."""
    return full[:, :, q_pos[:, None], k_pos[None, :]]


def alibi(q_pos, k_pos, slopes):
    """Per-head additive bias [1, H, Lq, Lk]: exercises the head dim against GQA's folded heads."""
    distance = (q_pos[:, None] - k_pos[None, :]).to(slopes.dtype)
    return -slopes[None, :, None, None] * distance


_SEEN: list[tuple[int, int]] = []


def recording_window(q_pos, k_pos):
    _SEEN.append((q_pos.numel(), k_pos.numel()))
    return sliding_window(q_pos, k_pos)


# ---- cases: (mask function, mask_args, causal, fill, the equivalent full mask) --------------------


def build_sliding_window(g, batch, heads, seq_len):
    pos = torch.arange(seq_len)
    return sliding_window, [], True, NEG_INF, (pos[:, None] - pos[None, :]) < WINDOW


def build_key_padding(g, batch, heads, seq_len):
    keep = torch.rand(batch, seq_len, generator=g) > 0.3
    keep[:, 0] = True
    return key_padding, [keep], False, NEG_INF, keep[:, None, None, :]


def build_documents(g, batch, heads, seq_len):
    doc = torch.cumsum(torch.rand(batch, seq_len, generator=g) < 0.2, dim=1)
    pos = torch.arange(seq_len)
    full = (doc[:, :, None] == doc[:, None, :]) & (pos[None, :] <= pos[:, None])
    return documents, [doc], False, NEG_INF, full.unsqueeze(1)


def hf_keep(g, batch, seq_len):
    """Causal with left padding (the pad rows of batch 1 see no real key) and one more empty row."""
    pos = torch.arange(seq_len)
    real = torch.ones(batch, seq_len, dtype=torch.bool)
    real[-1, :3] = False
    keep = (pos[None, :] <= pos[:, None]) & real[:, None, :]
    keep[0, int(torch.randint(seq_len, (), generator=g))] = False
    return keep.unsqueeze(1)


def build_hf_bias(g, batch, heads, seq_len):
    bias = torch.zeros(batch, 1, seq_len, seq_len).masked_fill_(~hf_keep(g, batch, seq_len), FP32_MIN)
    return table, [bias], False, FP32_MIN, bias


def build_hf_bias_causal(g, batch, heads, seq_len):
    """The same bias with causal=True: causally hidden keys take the (finite) fill and still count."""
    _, args, _, fill, full = build_hf_bias(g, batch, heads, seq_len)
    return table, args, True, fill, full


def random_keep(g, batch, seq_len):
    keep = torch.rand(batch, 1, seq_len, seq_len, generator=g) > 0.4
    keep[0, 0, int(torch.randint(seq_len, (), generator=g))] = False
    keep[-1, 0, -1] = False
    return keep


def build_keep_finite_fill(g, batch, heads, seq_len):
    keep = random_keep(g, batch, seq_len)
    return table, [keep], False, FP32_MIN, keep


def build_keep_neg_inf(g, batch, heads, seq_len):
    keep = random_keep(g, batch, seq_len)
    return table, [keep], True, NEG_INF, keep


def build_alibi(g, batch, heads, seq_len):
    slopes = torch.rand(heads, generator=g) + 0.1
    pos = torch.arange(seq_len)
    return alibi, [slopes], True, NEG_INF, alibi(pos, pos, slopes)


BUILDERS = {name[len("build_"):]: fn for name, fn in globals().items() if name.startswith("build_")}


# ---- the check that runs on every rank ------------------------------------------------------------


def make_qkv(g, batch, seq_len, heads, kv_heads, head_dim=8):
    draw = lambda h: torch.randn(batch, h, seq_len, head_dim, generator=g, dtype=torch.float64).float()
    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


def reference(q, k, v, grad, causal, fill, full):
    """Unsharded attention with the full mask: SDPA for fill=-inf, fp64 math for a finite fill."""
    pos = torch.arange(q.shape[2])
    tril = pos[None, :] <= pos[:, None]
    group = q.shape[1] // k.shape[1]
    if fill == NEG_INF:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if full.dtype == torch.bool:
            attn = full & tril if causal else full
        else:
            attn = full.masked_fill(~tril, NEG_INF) if causal else full
        out = F.scaled_dot_product_attention(*leaves, attn_mask=attn, enable_gqa=group > 1)
        out.backward(grad)
    else:
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        qd, kd, vd = leaves[0], *(t.repeat_interleave(group, dim=1) for t in leaves[1:])
        s = qd @ kd.transpose(-1, -2) * q.shape[-1] ** -0.5
        if full.dtype == torch.bool:
            s = s.masked_fill(~(full & tril if causal else full), fill)
        else:
            s = s + full.double()
            s = s.masked_fill(~tril, fill) if causal else s
        out = torch.softmax(s, dim=-1) @ vd
        out.backward(grad.double())
    return out.detach(), *(t.grad for t in leaves)


def ring(q, k, v, grad, layout, **options):
    seq_len = q.shape[2]
    local = [shard_sequence(t, 2, layout=layout).detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, layout=layout, **options)
    out.backward(shard_sequence(grad, 2, layout=layout))
    full = lambda t: gather_sequence(t, 2, layout=layout, seq_len=seq_len)
    return full(out.detach()), *(full(t.grad) for t in local)


def check_case(seed, case, seq_len, heads, kv_heads, layout):
    g = torch.Generator().manual_seed(seed)
    batch = 2
    q, k, v, grad = make_qkv(g, batch, seq_len, heads, kv_heads)
    fn, args, causal, fill, full = BUILDERS[case](g, batch, heads, seq_len)
    ours = ring(q, k, v, grad, layout, causal=causal, mask=fn, mask_args=args, fill=fill)
    theirs = reference(q, k, v, grad, causal, fill, full)
    errors = [rel_err(a, b) for a, b in zip(ours, theirs)]
    assert max(errors) < 1e-5, f"out/dq/dk/dv relative errors {errors}"
    for t in ours:
        assert torch.isfinite(t).all()
    if full.dtype == torch.bool or fill != NEG_INF:
        pos = torch.arange(seq_len)
        keep = full if full.dtype == torch.bool else full > fill  # HF bias: 0 or finfo.min
        keep = keep & (pos[None, :] <= pos[:, None]) if causal else keep
        empty = ~keep.any(-1).expand(batch, heads, seq_len)  # rows that see no key at all
        if fill == NEG_INF:
            assert torch.all(ours[0][empty] == 0) and torch.all(ours[1][empty] == 0)
        elif empty.any():  # finite fill: a uniform softmax over every key of the sequence
            v_mean = v.repeat_interleave(heads // kv_heads, dim=1).mean(dim=2, keepdim=True).expand_as(q)
            assert torch.allclose(ours[0][empty], v_mean[empty], atol=1e-6)
    return errors


CASES = [
    ("sliding_window", 1, "zigzag", 11, 4, 2),
    ("sliding_window", 4, "zigzag", 35, 4, 2),
    ("sliding_window", 3, "striped", 26, 4, 1),
    ("key_padding", 2, "contiguous", 21, 4, 2),
    ("key_padding", 3, "striped", 25, 2, 2),
    ("documents", 3, "zigzag", 29, 4, 2),
    ("documents", 2, "striped", 20, 4, 4),
    ("hf_bias", 2, "zigzag", 19, 4, 2),
    ("hf_bias", 4, "striped", 30, 4, 1),
    ("hf_bias_causal", 3, "contiguous", 23, 4, 2),
    ("keep_finite_fill", 2, "striped", 17, 4, 2),
    ("keep_neg_inf", 3, "zigzag", 23, 4, 2),
    ("alibi", 4, "contiguous", 33, 4, 2),
    ("alibi", 2, "zigzag", 19, 4, 1),
]


@pytest.mark.parametrize("case,world_size,layout,seq_len,heads,kv_heads", CASES,
                         ids=[f"{c[0]}-w{c[1]}-{c[2]}-s{c[3]}-h{c[4]}kv{c[5]}" for c in CASES])
def test_mask_matches_unsharded(ranks, seed, case, world_size, layout, seq_len, heads, kv_heads):
    ranks(world_size).run(check_case, seed, case, seq_len, heads, kv_heads, layout)


# ---- no [S, S] mask: the function only ever sees pieces of local shards ---------------------------


def piece_sizes(seed, seq_len, layout):
    _SEEN.clear()
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = make_qkv(g, 1, seq_len, 2, 1)
    ring(q, k, v, grad, layout, causal=True, mask=recording_window)
    return list(_SEEN)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_mask_is_evaluated_per_piece_of_local_shards(ranks, seed, layout):
    seq_len, world = 33, 4
    lengths = shard_lengths(seq_len, world, layout)
    for rank, seen in enumerate(ranks(world).run(piece_sizes, seed, seq_len, layout)):
        assert seen, "the mask function was never called"
        assert max(lq for lq, _ in seen) <= lengths[rank]
        assert max(lk for _, lk in seen) <= max(lengths)
        assert max(lq * lk for lq, lk in seen) <= lengths[rank] * max(lengths) < seq_len * seq_len // world


# ---- ranks that disagree on the mask raise the same clear error ---------------------------------


def mask_on_rank_zero_only(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, _ = make_qkv(g, 1, 6, 2, 2)
    try:
        ring_attention(q, k, v, causal=True, mask=sliding_window if dist.get_rank() == 0 else None)
    except RingInputError as err:
        return str(err)
    return "no error"


def test_mask_on_one_rank_only_raises_everywhere(ranks, seed):
    for message in ranks(2).run(mask_on_rank_zero_only, seed, timeout=60):
        assert "ranks disagree on mask: rank 0: a block mask, rank 1: none" in message


# ---- block kernel: pieces with no visible key are skipped (only when the fill is -inf) -------------


def test_fully_masked_piece_is_skipped_only_for_neg_inf_fill(seed, monkeypatch):
    calls = []
    real_matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda *a: calls.append(a) or real_matmul(*a))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 4, 4, generator=g) for _ in range(3))
    nothing = lambda q_pos, k_pos: torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool)
    out, lse = torch.randn(1, 2, 4, 4, generator=g), torch.randn(2, 1, 2, 4, generator=g)
    before = (out.clone(), lse.clone())
    torch_block_forward(q, k, v, out, lse, torch.arange(4), torch.arange(4), scale=0.5, causal=False, mask_fn=nothing)
    assert not calls and torch.equal(out, before[0]) and torch.equal(lse, before[1])

    out, lse = torch.zeros(1, 2, 4, 4), torch.stack([torch.full((1, 2, 4), NEG_INF), torch.zeros(1, 2, 4)])
    torch_block_forward(q, k, v, out, lse, torch.arange(4), torch.arange(4), scale=0.5, causal=False,
                        mask_fn=nothing, fill=FP32_MIN)
    assert torch.allclose(out, v.mean(dim=2, keepdim=True).expand_as(out))  # uniform over the filled keys
    assert torch.all(lse[0] == FP32_MIN) and torch.allclose(lse[1], torch.full_like(lse[1], 4.0).log())


def test_mask_of_the_wrong_shape_is_a_clear_error(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 4, 4, generator=g) for _ in range(3))
    wrong = lambda q_pos, k_pos: torch.ones(3, len(q_pos), len(k_pos), dtype=torch.bool)
    with pytest.raises(ValueError, match=r"must broadcast to \[B, H, Lq, Lk\] = \[1, 2, 4, 4\]"):
        ring_attention(q, k, v, mask=wrong)


# ---- passes/masks.py: a captured mask subgraph, evaluated block by block (one process) -------------


def _t5_encoder(impl):
    from zoo import _hf, _scale_params, _t5_cfg

    model = _hf("T5EncoderModel", "T5Config", False, **{**_t5_cfg(), "attn_implementation": impl})
    _scale_params(model, "relative_attention_bias.weight", 10.0)
    return model


def _node_values(gm, *args) -> dict:
    """Every node's value of one run of `gm` (placeholders in graph order)."""
    env = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            env[n] = out = super().run_node(n)
            return out

    with torch.enable_grad():
        Recorder(gm).run(*args)
    return env


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_t5_relative_bias_block_mask_is_the_full_bias(impl, seed):
    """T5's bias (embedding of the relative position buckets, permuted, plus the padding mask; eager: two
    terms the matcher adds into one mask) rebuilt per block pair equals the full bias there, and its
    vjp w.r.t. the bias table, summed over the blocks, is the full one: the table is a `differentiable` leaf."""
    from torch.export import Dim

    from ringify.passes.attention import canonicalize_attention
    from ringify.passes.masks import block_mask
    from ringify.passes.sequence import sequence_symbols

    g = torch.Generator().manual_seed(seed)
    s = 11
    ids, keep = torch.randint(0, 96, (2, s), generator=g), (torch.rand(2, s, generator=g) > 0.3).long()
    keep[:, 0] = 1
    model = _t5_encoder(impl).eval()
    dyn = {"input_ids": {1: Dim.AUTO}, "attention_mask": {1: Dim.AUTO}}
    gm = torch.export.export(model, (), dict(input_ids=ids, attention_mask=keep), strict=False,
                             dynamic_shapes=dyn).module()
    matches = canonicalize_attention(gm)
    assert len(matches) == 2 and {m.mask_kind for m in matches} == {"add"}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbols = sequence_symbols(placeholders, {"input_ids": 1, "attention_mask": 1})
    env = _node_values(gm, ids, keep)
    blocks = [torch.tensor([0, 10]), torch.arange(1, 6), torch.arange(6, 10)]  # zigzag-like, uneven pieces
    for m in matches:
        plan = block_mask(m.mask, symbols)
        assert "embedding" in plan.ops, plan.ops
        tables = [i for i, leaf in enumerate(plan.leaves) if leaf.op == "get_attr"]
        assert plan.differentiable == tuple(tables) and len(tables) == 1
        (t,) = tables
        full = env[m.mask].expand(2, 4, s, s)
        weight = env[plan.leaves[t]].detach().requires_grad_()
        dmask = torch.randn(full.shape, generator=g)
        args = [weight if i == t else env[leaf] for i, leaf in enumerate(plan.leaves)]
        grad = torch.zeros_like(weight)
        for qp in blocks:
            for kp in blocks:
                got = plan.fn(qp, kp, *args)
                want = full[:, :, qp[:, None], kp[None, :]]
                assert torch.equal(got.expand(want.shape), want)
                piece = dmask[:, :, qp[:, None], kp[None, :]].sum_to_size(got.shape)
                grad += torch.autograd.grad(got, weight, piece)[0]
        table = env[plan.leaves[t]]  # the captured graph's own parameter: its autograd is the reference
        ref = torch.autograd.grad(env[m.mask], table, dmask.sum_to_size(env[m.mask].shape), retain_graph=True)[0]
        assert table.requires_grad and ref.abs().sum() > 0 and rel_err(grad, ref) < 1e-6


def test_unflatten_of_a_merged_mask_term(seed):
    """A [B*H, S, S] distance bias unflattened to [B, H, S, S] (how the attention pass splits a merged mask
    term it cannot trace back to [B, H, ...]) is rebuilt per block as a reshape to the block's sizes."""
    from torch.export import Dim

    from ringify.passes.masks import block_mask
    from ringify.passes.sequence import sequence_symbols

    class Distance(torch.nn.Module):
        def forward(self, x):
            pos = torch.arange(x.shape[1])
            return (pos[None, :] - pos[:, None]).float().expand(6, -1, -1).unflatten(0, (2, 3)) * x.new_ones(())

    x = torch.randn(2, 9)
    gm = torch.export.export(Distance(), (x,), dynamic_shapes=({1: Dim.AUTO},), strict=False).module()
    (out,) = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    plan = block_mask(out, sequence_symbols([n for n in gm.graph.nodes if n.op == "placeholder"], {"x": 1}))
    assert "unflatten" in plan.ops
    env = _node_values(gm, torch.randn(2, 13))
    qp, kp = torch.tensor([0, 1, 12]), torch.arange(4, 9)
    got = plan.fn(qp, kp, *(env[leaf] for leaf in plan.leaves))
    assert plan.differentiable == () and torch.equal(got, env[out][:, :, qp[:, None], kp[None, :]])
