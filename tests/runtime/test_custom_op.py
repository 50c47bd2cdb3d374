"""ring_attention is a torch.library custom op: checked, exportable, compilable, on real ranks."""

import pytest
import torch

from ringify.runtime import register_block_mask, ring_attention, shard_sequence
from ringify.runtime.ring_attention import ring_attention_op
from ringify.verify import relative_error


def random_qkv(seed, seq_len=13, heads=4, kv_heads=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, seq_len, 8, generator=g) for h in (heads, kv_heads, kv_heads)]


def key_padding(q_pos, k_pos, keep):
    return keep[:, None, None, k_pos]


def additive(q_pos, k_pos, bias):
    return bias[:, :, q_pos[:, None], k_pos[None, :]]


def mask_case(kind, seed, seq_len=13):
    """(mask key, mask_args, fill) for the op: none, a bool padding mask, an HF-style additive bias."""
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.rand(2, seq_len, generator=g) > 0.3
    keep[:, 0] = True
    if kind == "none":
        return "", [], float("-inf")
    if kind == "padding":
        return register_block_mask(key_padding), [keep], float("-inf")
    bias = torch.zeros(2, 1, seq_len, seq_len).masked_fill_(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    return register_block_mask(additive), [bias], torch.finfo(torch.float32).min


@pytest.mark.parametrize("softcap", [0.0, 1.5])
@pytest.mark.parametrize("mask", ["none", "padding", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(seed, causal, mask, softcap):
    """Schema, fake implementation, autograd registration and dispatch all agree (single process)."""
    q, k, v = (t.requires_grad_() for t in random_qkv(seed))
    torch.library.opcheck(ring_attention_op,
                          (q, k, v, "", causal, 0.35, "zigzag", 30.0, *mask_case(mask, seed), softcap))


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return ring_attention(q, k, v, causal=True) * 2


class MaskedAttention(torch.nn.Module):
    def forward(self, q, k, v, keep):
        return ring_attention(q, k, v, causal=True, mask=key_padding, mask_args=[keep]) * 2


def test_export_keeps_one_ring_attention_node(seed):
    q, k, v = random_qkv(seed)
    program = torch.export.export(Attention(), (q, k, v), strict=False)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.ringify.ring_attention.default in targets
    assert relative_error(program.module()(q, k, v), Attention()(q, k, v)) == 0


def test_export_with_a_block_mask(seed):
    q, k, v = random_qkv(seed)
    _, (keep,), _ = mask_case("padding", seed)
    program = torch.export.export(MaskedAttention(), (q, k, v, keep), strict=False)
    nodes = [n for n in program.graph.nodes if n.target is torch.ops.ringify.ring_attention.default]
    assert len(nodes) == 1 and nodes[0].args[8] == register_block_mask(key_padding)
    assert relative_error(program.module()(q, k, v, keep), MaskedAttention()(q, k, v, keep)) == 0


def test_compile_fullgraph_with_a_block_mask(seed):
    """Single process: a mask first registered while dynamo traces, and the op with its mask arguments."""
    q, k, v = (t.requires_grad_() for t in random_qkv(seed))
    _, (bias,), fill = mask_case("additive", seed)

    def fresh(q_pos, k_pos, bias):  # a new function object: not registered before tracing
        return additive(q_pos, k_pos, bias)

    f = lambda q, k, v, bias: ring_attention(q, k, v, causal=True, mask=fresh, mask_args=[bias], fill=fill).tanh()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(q, k, v, bias)
    out = compiled(q, k, v, bias)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    eager_grads = torch.autograd.grad(eager.sum(), (q, k, v))
    assert max(relative_error(a, b) for a, b in zip((out, *grads), (eager, *eager_grads))) < 1e-6


def compiled_on_ranks(seed, layout):
    """torch.compile(fullgraph=True) of a function calling ring_attention, on a real ring."""
    q, k, v = random_qkv(seed, seq_len=19)
    local = [shard_sequence(t, 2, layout=layout).requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return (ring_attention(q, k, v, causal=True, layout=layout) * 3).tanh()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_out = f(*local)
    eager_grads = torch.autograd.grad(eager_out.sum(), local)
    out = compiled(*local)
    grads = torch.autograd.grad(out.sum(), local)
    return max(relative_error(a, b) for a, b in zip((out, *grads), (eager_out, *eager_grads)))


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_compile_fullgraph_on_ranks(ranks, seed, world_size):
    for error in ranks(world_size).run(compiled_on_ranks, seed, "zigzag"):
        assert error < 1e-6


@pytest.mark.slow
def test_compile_with_inductor(seed):
    q, k, v = random_qkv(seed)
    f = lambda q, k, v: ring_attention(q, k, v, causal=True).relu()
    assert relative_error(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v)) < 1e-6
