"""The plain-torch block kernels: exact against fp64, and safe on rows with no visible key."""

import pytest
import torch

from ringify.runtime.block_attention import torch_block_backward, torch_block_forward


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
