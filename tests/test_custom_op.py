"""ring_attention is a torch.library custom op: checked, exportable, compilable, on real ranks."""

import pytest
import torch

from ringify.runtime import ring_attention, shard_sequence
from ringify.runtime.ring_attention import ring_attention_op
from ringify.verify import relative_error


def random_qkv(seed, seq_len=13, heads=4, kv_heads=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, seq_len, 8, generator=g) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(seed, causal):
    """Schema, fake implementation, autograd registration and dispatch all agree (single process)."""
    q, k, v = (t.requires_grad_() for t in random_qkv(seed))
    torch.library.opcheck(ring_attention_op, (q, k, v, "", causal, 0.35, "zigzag", 30.0))


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return ring_attention(q, k, v, causal=True) * 2


def test_export_keeps_one_ring_attention_node(seed):
    q, k, v = random_qkv(seed)
    program = torch.export.export(Attention(), (q, k, v), strict=False)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.ringify.ring_attention.default in targets
    assert relative_error(program.module()(q, k, v), Attention()(q, k, v)) == 0


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
