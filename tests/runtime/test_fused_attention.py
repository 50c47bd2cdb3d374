"""The fused per-block kernels (torch's CPU flash attention per piece) against fp64 and the plain-torch tiles.

Blocks of keys that together hold every query's position (what a ring gives each rank), cut at odd
places; causal or not, GQA/MQA, block masks (sliding window, key padding, packed documents, an ALiBi-like
float bias), HuggingFace's finite fills (bool and additive) with rows that see no key at all, and -inf
rows. Outputs, log-sum-exp merges and dq/dk/dv within 1e-5 (fp32). Then the plan: how tiles are
classified and dispatched (an HF Llama's causal block mask runs as causal=True does), and the plan cache.
"""

from __future__ import annotations

import math

import pytest
import torch

from ringify.runtime import fused_attention
from ringify.runtime.block_attention import torch_block_backward, torch_block_forward
from ringify.runtime.fused_attention import CAUSAL, FULL, PARTIAL, fused_block_backward, fused_block_forward, plan
from ringify.verify import relative_error

FP32_MIN = torch.finfo(torch.float32).min


def reference(q, k, v, q_pos, k_pos, scale, causal, mask_fn, fill):
    """fp64 attention as the unsharded model computes it: bias added, hidden scores set to ``fill``, rows with
    no score above -inf give 0."""
    q, k, v = (t.double().detach().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(group, dim=1) for t in (k, v))
    s = q @ kk.transpose(-1, -2) * scale
    keep = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    if causal:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    keep = keep.expand(s.shape)
    if mask_fn is not None:
        m = mask_fn(q_pos, k_pos)
        if m.dtype == torch.bool:
            keep = keep & m
        else:
            s = s + m.double()
    s = s.masked_fill(~keep, fill)
    dead = torch.isneginf(s.amax(-1, keepdim=True))  # softmax by its row maximum: exact even over huge fills
    p = torch.where(dead, 0.0, torch.softmax(torch.where(dead, 0.0, s), -1))
    return q, k, v, p @ vv


def run_blocks(fwd, bwd, q, k, v, do, q_pos, k_pos, scale, causal, mask_fn, fill, cuts):
    """Forward over the key blocks ``cuts``, then backward over them: (out, dq, dk, dv)."""
    extended = mask_fn is not None or fill != -math.inf
    out = torch.zeros((*q.shape[:-1], v.shape[-1]))
    lse = torch.zeros((2, *q.shape[:-1])) if extended else torch.full(q.shape[:-1], -math.inf)
    if extended:
        lse[0] = -math.inf
    options = dict(mask_fn=mask_fn, fill=fill) if extended else {}
    blocks = [slice(a, b) for a, b in zip([0, *cuts], [*cuts, k.shape[2]])]
    for b in blocks:
        fwd(q, k[:, :, b], v[:, :, b], out, lse, q_pos, k_pos[b], scale=scale, causal=causal, **options)
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(v.shape)
    delta = (do * out).sum(-1)
    extra = {"out": out} if bwd is fused_block_backward else {}
    for b in blocks:
        bwd(q, k[:, :, b], v[:, :, b], do, lse, delta, dq, dk[:, :, b], dv[:, :, b], q_pos, k_pos[b], scale=scale,
            causal=causal, **options, **extra)
    return out, dq, dk, dv


L = 2 * fused_attention.TILE + 37  # several tiles, one ragged
POSITIONS = {  # (query positions, key positions): the keys hold every query position, shuffled into blocks
    "same": (torch.arange(L), torch.arange(L)),
    "zigzag": (torch.cat([torch.arange(0, 150), torch.arange(2 * L - 150, 2 * L)]),
               torch.cat([torch.arange(150, 2 * L - 150), torch.arange(0, 150), torch.arange(2 * L - 150, 2 * L)])),
    "striped": (torch.arange(1, 3 * L, 3), torch.arange(0, 3 * L)),
}


def _masks(g, total: int, heads: int):
    keep = torch.rand(2, total, generator=g) > 0.25
    keep[0, : total // 3] = False  # left padding: rows of batch 0 with no visible key at all (causal)
    doc = torch.randint(0, 4, (2, total), generator=g).sort(-1).values
    slopes = torch.rand(heads, generator=g)
    return {
        "window": lambda qp, kp: (qp[:, None] - kp[None, :]) < 100,
        "padding": lambda qp, kp: keep[:, None, None, kp],
        "documents": lambda qp, kp: (doc[:, qp, None] == doc[:, None, kp]).unsqueeze(1),
        "alibi": lambda qp, kp: -slopes[None, :, None, None] * (qp[:, None] - kp[None, :]).abs().float(),
        "hf-additive": lambda qp, kp: torch.where(keep[:, None, None, kp] & keep[:, None, qp, None], 0.0, FP32_MIN),
    }


CASES = [  # (name, causal, mask, fill)
    ("plain", False, None, -math.inf), ("causal", True, None, -math.inf), ("causal, finite fill", True, None, FP32_MIN),
    ("window", True, "window", -math.inf), ("window, finite fill", True, "window", FP32_MIN),
    ("padding", True, "padding", -math.inf), ("padding, finite fill", True, "padding", FP32_MIN),
    ("documents", True, "documents", FP32_MIN), ("alibi", True, "alibi", -math.inf),
    ("hf additive", True, "hf-additive", -math.inf), ("bidirectional padding", False, "padding", FP32_MIN),
]


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_blocks_match_fp64(seed, positions, kv_heads, case):
    _, causal, mask, fill = case
    g = torch.Generator().manual_seed(seed)
    q_pos, k_pos = POSITIONS[positions]
    q = torch.randn(2, 4, len(q_pos), 16, generator=g)
    k, v = (torch.randn(2, kv_heads, len(k_pos), 16, generator=g) for _ in range(2))
    do = torch.randn(q.shape, generator=g)
    mask_fn = _masks(g, int(k_pos.max()) + 1, 4)[mask] if mask else None
    cuts = sorted(torch.randperm(len(k_pos) - 1, generator=g)[:2].add(1).tolist())  # three blocks, odd sizes
    out, dq, dk, dv = run_blocks(fused_block_forward, fused_block_backward, q, k, v, do, q_pos, k_pos, 0.3, causal,
                                 mask_fn, fill, cuts)
    rq, rk, rv, ref = reference(q, k, v, q_pos, k_pos, 0.3, causal, mask_fn, fill)
    ref.backward(do.double())
    errors = [relative_error(a, b) for a, b in zip((out, dq, dk, dv), (ref, rq.grad, rk.grad, rv.grad))]
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("d,dv", [(6, 12), (12, 6)])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[9]], ids=lambda c: c[0])
def test_value_head_dim_of_its_own(seed, case, d, dv):
    """Multi-head latent attention (Dv != D): the fused kernels run on zero-padded heads, exactly."""
    _, causal, mask, fill = case
    g = torch.Generator().manual_seed(seed)
    q_pos, k_pos = POSITIONS["zigzag"]
    q, k = torch.randn(2, 4, len(q_pos), d, generator=g), torch.randn(2, 2, len(k_pos), d, generator=g)
    v, do = torch.randn(2, 2, len(k_pos), dv, generator=g), torch.randn(2, 4, len(q_pos), dv, generator=g)
    mask_fn = _masks(g, int(k_pos.max()) + 1, 4)[mask] if mask else None
    out, dq, dk, dv_ = run_blocks(fused_block_forward, fused_block_backward, q, k, v, do, q_pos, k_pos, 0.3, causal,
                                  mask_fn, fill, [200, 500])
    rq, rk, rv, ref = reference(q, k, v, q_pos, k_pos, 0.3, causal, mask_fn, fill)
    ref.backward(do.double())
    errors = [relative_error(a, b) for a, b in zip((out, dq, dk, dv_), (ref, rq.grad, rk.grad, rv.grad))]
    assert max(errors) < 1e-5, errors


def test_fused_and_torch_kernels_agree_on_a_ring_of_blocks(seed):
    """Both kernel families on the same blocks, merged into the same state: the same numbers."""
    g = torch.Generator().manual_seed(seed)
    q_pos, k_pos = POSITIONS["zigzag"]
    q = torch.randn(1, 8, len(q_pos), 32, generator=g)
    k, v = (torch.randn(1, 2, len(k_pos), 32, generator=g) for _ in range(2))
    do = torch.randn(q.shape, generator=g)
    mask_fn = _masks(g, int(k_pos.max()) + 1, 8)["window"]
    fused = run_blocks(fused_block_forward, fused_block_backward, q, k, v, do, q_pos, k_pos, 0.2, True, mask_fn,
                       FP32_MIN, [200, 500])
    plain = run_blocks(torch_block_forward, torch_block_backward, q, k, v, do, q_pos, k_pos, 0.2, True, mask_fn,
                       FP32_MIN, [200, 500])
    assert max(relative_error(a, b) for a, b in zip(fused, plain)) < 1e-5


def test_rows_with_no_visible_key_stay_zero_and_finite(seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(1, 300, dtype=torch.bool)
    keep[0, :100] = False  # queries 0..99 (causal) see only padded keys: -inf fill, so their output is 0
    mask_fn = lambda qp, kp: keep[:, None, None, kp]  # noqa: E731
    q = torch.randn(1, 2, 300, 8, generator=g)
    k, v, = (torch.randn(1, 2, 300, 8, generator=g) for _ in range(2))
    out, dq, dk, dv = run_blocks(fused_block_forward, fused_block_backward, q, k, v, torch.randn(q.shape, generator=g),
                                 torch.arange(300), torch.arange(300), 0.5, True, mask_fn, -math.inf, [140])
    assert torch.all(out[:, :, :100] == 0) and torch.all(out[:, :, 100:] != 0)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv)) and torch.all(dq[:, :, :100] == 0)


# ------------------------------------------------------------------------------------------- the plan


def _kinds(pieces) -> list[str]:
    return sorted(p.kind for p in pieces)


def test_causal_block_mask_runs_as_causal():
    """A block mask that is exactly causal (how HF builds it) gets the plan of causal=True: whole runs."""
    q_pos, k_pos = POSITIONS["zigzag"][0], POSITIONS["zigzag"][0]  # a rank's own block: its two chunks
    as_mask = lambda qp, kp: (kp[None, :] <= qp[:, None]).view(1, 1, len(qp), len(kp))  # noqa: E731
    by_mask, _ = plan(q_pos, k_pos, False, as_mask, -math.inf, (1, 4))
    by_flag, _ = plan(q_pos, k_pos, True, None, -math.inf, (1, 4))
    assert _kinds(by_mask) == _kinds(by_flag) == [CAUSAL, CAUSAL, FULL]
    assert {(p.qs, p.ql, p.ks, p.kl) for p in by_mask} == {(p.qs, p.ql, p.ks, p.kl) for p in by_flag}


def test_hf_llama_attention_is_dispatched_as_causal(seed):
    """The mask HF Llama builds (captured, rewritten into a block-mask function) plans as causal: every
    block pair of every rank is whole runs of FULL and CAUSAL pieces, no mask tile."""
    import transformers as tf

    from ringify import ringify
    from ringify.runtime import graph_calls
    from ringify.runtime.block_mask import block_mask_fn
    from ringify.runtime.layout import layout_positions

    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(seed)
    seq = 3 * fused_attention.TILE + 11
    ids = torch.randint(0, 97, (1, seq))
    rm = ringify(tf.LlamaForCausalLM(cfg))
    captured = {}
    original = graph_calls.ring_attention_call

    def spy(q, k, v, mask_args, **kw):
        captured.update(mask=kw["mask_fn"], args=mask_args, causal=kw["causal"], fill=kw["fill"])
        return original(q, k, v, mask_args, **kw)

    graph_calls.ring_attention_call = spy
    try:
        rm(input_ids=ids)
    finally:
        graph_calls.ring_attention_call = original
    fn = block_mask_fn(captured["mask"])
    mask_fn = lambda qp, kp: fn(qp, kp, *captured["args"])  # noqa: E731
    world = 4
    for rank in range(world):
        q_pos = layout_positions(seq, world, rank, "zigzag")
        for src in range(world):
            pieces, exact = plan(q_pos, layout_positions(seq, world, src, "zigzag"), captured["causal"], mask_fn,
                                 captured["fill"], (1, 4))
            assert not exact and all(p.kind in (FULL, CAUSAL) for p in pieces), [p.kind for p in pieces]
            assert len(pieces) <= 4  # two chunks each side: at most four run pairs


def test_hidden_tiles_are_not_computed(seed, monkeypatch):
    """A sliding window with HF's finite fill: tiles outside the band make no fused call."""
    calls = []
    real = fused_attention._flash
    monkeypatch.setattr(fused_attention, "_flash", lambda *a, **k: calls.append(a[1].shape[2]) or real(*a, **k))
    g = torch.Generator().manual_seed(seed)
    n = 4 * fused_attention.TILE
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(3))
    window = lambda qp, kp: (qp[:, None] - kp[None, :]) < 64  # noqa: E731
    out, lse = torch.zeros(q.shape), torch.zeros(2, 1, 2, n)
    lse[0] = -math.inf
    fused_block_forward(q, k, v, out, lse, torch.arange(n), torch.arange(n), scale=0.3, causal=True,
                        mask_fn=window, fill=FP32_MIN)
    assert sum(calls) <= 2 * n  # each query tile: its diagonal tile and the one before, no more


def test_plan_cache_follows_the_mask_arguments(seed):
    """The plan is reused while the mask's arguments are the same tensors, unmodified; not after."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(1, 600, generator=g) > 0.5
    fn = lambda qp, kp, keep: keep[:, None, None, kp]  # noqa: E731
    q_pos = k_pos = torch.arange(600)
    bound = lambda qp, kp: fn(qp, kp, keep)  # noqa: E731
    first = fused_attention.cached_plan(("m", (keep,)), q_pos, k_pos, True, bound, -math.inf, (1, 2))
    assert fused_attention.cached_plan(("m", (keep,)), q_pos, k_pos, True, bound, -math.inf, (1, 2)) is first
    keep[:, : 300] = True  # in place: a new version
    assert fused_attention.cached_plan(("m", (keep,)), q_pos, k_pos, True, bound, -math.inf, (1, 2)) is not first
    other = keep.clone()
    assert fused_attention.cached_plan(("m", (other,)), q_pos, k_pos, True, lambda qp, kp: fn(qp, kp, other),
                                       -math.inf, (1, 2)) is not first
    assert all(p.kind in (FULL, CAUSAL, PARTIAL) for p in first[0])


# ---------------------------------------------------------------------------------- mask structure


def test_mask_structure_is_named(seed):
    from ringify.runtime.mask_structure import describe

    g = torch.Generator().manual_seed(seed)
    n = 301
    keep = torch.rand(2, n, generator=g) > 0.2
    keep[:, -1] = True
    doc = torch.randint(0, 5, (1, n), generator=g).sort(-1).values
    cases = {
        "causal": (lambda qp, kp: kp[None, :] <= qp[:, None], False),
        "causal + key padding": (lambda qp, kp: keep[:, None, None, kp], True),
        "sliding window 12": (lambda qp, kp: (qp[:, None] - kp[None, :]) < 12, True),
        "causal, packed documents": (lambda qp, kp: (doc[:, qp, None] == doc[:, None, kp]).unsqueeze(1), True),
        "bidirectional + key padding": (lambda qp, kp: keep[:, None, None, kp], False),
        "causal (additive)": (lambda qp, kp: torch.where(kp[None, :] <= qp[:, None], 0.0, FP32_MIN), False),
        "additive bias + causal": (lambda qp, kp: -(qp[:, None] - kp[None, :]).abs().float(), True),
    }
    for name, (fn, causal) in cases.items():
        assert describe(fn, n, causal) == name, (name, describe(fn, n, causal))


def test_report_names_hf_masks(seed):
    """The report says what each HF mask is once it has run, instead of the ops that build it."""
    import zoo

    from ringify import ringify

    seen = []
    for build in (zoo.llama, zoo.mistral):
        z = build()
        args, kwargs = z.make_inputs(seed, 23)
        rm = ringify(z.model)
        rm(*args, **kwargs)
        seen.append(rm.report(cost=False).to_markdown())
    assert "| causal |" in seen[0], seen[0]
    assert "| sliding window 4 |" in seen[1], seen[1]
