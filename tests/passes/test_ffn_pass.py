"""Feed-forward pass: each spelling is found, rewritten into chunked_ffn, and stays the same function."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from ringify.memory import PeakMemory
from ringify.passes import ffn
from ringify.passes.ffn import chunk_feed_forward, chunked_ffn, find_feed_forward

D, S, CHUNK = 16, 13, 4  # S is not a multiple of CHUNK: the last chunk is shorter


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def capture(model: nn.Module, kwargs: dict) -> torch.fx.GraphModule:
    """torch.export (non-strict, training IR) with dim 1 of every tensor input (the sequence) dynamic."""
    dynamic = {k: {1: Dim.AUTO} if isinstance(v, torch.Tensor) else None for k, v in kwargs.items()}
    return torch.export.export(model, (), kwargs, strict=False, dynamic_shapes=dynamic).module()


def chunk_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is chunked_ffn]


def check_same_function(model: nn.Module, make_inputs, expected: list[tuple[str, str]], *, lengths=(S, 7)
                        ) -> list[dict]:
    """Export ``model``, chunk its feed-forwards, and compare outputs and grads with an untouched copy.

    ``make_inputs(seq_len)`` -> kwargs; ``expected``: (kind, activation) of each block, in graph order.
    """
    model.eval()  # dropout off; autograd still on
    reference = copy.deepcopy(model)
    gm = capture(model, make_inputs(S))
    matches = chunk_feed_forward(gm, chunk_tokens=CHUNK)
    summaries = [n.meta["ringify_ffn"] for n in chunk_nodes(gm)]
    assert [(s["kind"], s["activation"]) for s in summaries] == expected
    assert len(matches) == len(expected)
    remaining = {n.name for n in gm.graph.nodes}
    assert not remaining.intersection(name for s in summaries for name in s["nodes"])  # all absorbed, gone

    params = dict(gm.named_parameters())
    assert params.keys() == dict(reference.named_parameters()).keys()
    for seq_len in lengths:  # the captured graph is dynamic in the sequence: try a second length too
        kwargs = make_inputs(seq_len)
        ref_kwargs = {k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
        out, ref = _first(gm(**kwargs)), _first(reference(**ref_kwargs))
        assert out.shape == ref.shape
        assert rel(out, ref) < 1e-5
        cotangent = torch.randn_like(ref)
        gm.zero_grad(), reference.zero_grad()
        (out * cotangent).sum().backward()
        (ref * cotangent).sum().backward()
        grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
        # a grad that is zero in exact arithmetic (attention key biases: softmax ignores them) is float
        # noise on both sides: measure it against a floor set by the grads that are not
        floor = 1e-3 * torch.stack([g.norm() for g in grads.values()]).max()
        for name, g in grads.items():
            assert ((params[name].grad - g).norm() / torch.maximum(g.norm(), floor)).item() < 1e-5, name
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor) and v.requires_grad:
                assert rel(v.grad, ref_kwargs[k].grad) < 1e-5, k
    return summaries


def _first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def hidden_inputs(name: str = "x", batch: int = 2):
    return lambda seq_len: {name: torch.randn(batch, seq_len, D, requires_grad=True)}


# ------------------------------------------------------------------------------------ hand-written blocks

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class NewGELU(nn.Module):  # GPT-2's, written out
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class MLPBlock(nn.Module):
    """Pre-norm residual MLP: x is used outside the block too, so it must not be absorbed."""

    def __init__(self, act: nn.Module, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1, self.act, self.drop, self.fc2 = nn.Linear(D, 4 * D, bias=bias), act, nn.Dropout(dropout), \
            nn.Linear(4 * D, D, bias=bias)

    def forward(self, x):
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class GatedBlock(nn.Module):
    """SwiGLU (Llama: act(gate) * up) or GeGLU with biases and the product the other way round."""

    def __init__(self, act, bias: bool, act_first: bool = True):
        super().__init__()
        self.gate, self.up = nn.Linear(D, 3 * D, bias=bias), nn.Linear(D, 3 * D, bias=bias)
        self.down, self.act, self.act_first = nn.Linear(3 * D, D, bias=bias), act, act_first

    def forward(self, x):
        g, u = self.act(self.gate(x)), self.up(x)
        return x + self.down(g * u if self.act_first else u * g)


class FusedGated(nn.Module):
    """One projection gives both halves (chunk or split); either half may be the gate."""

    def __init__(self, act, spelling: str, gate_half: int):
        super().__init__()
        self.proj, self.out, self.act = nn.Linear(D, 6 * D), nn.Linear(3 * D, D), act
        self.spelling, self.gate_half = spelling, gate_half

    def forward(self, x):
        h = self.proj(x)
        halves = h.chunk(2, dim=-1) if self.spelling == "chunk" else h.split(3 * D, dim=-1)
        return self.out(self.act(halves[self.gate_half]) * halves[1 - self.gate_half])


ACTS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU,
        "quick_gelu": QuickGELU, "gelu_new": NewGELU}


@pytest.mark.parametrize("name", list(ACTS))
def test_plain_mlp(seed, name):
    torch.manual_seed(seed)
    [summary] = check_same_function(MLPBlock(ACTS[name]()), hidden_inputs(), [("mlp", name)])
    assert summary["module_path"] == "" and summary["hidden"] == D and summary["intermediate"] == 4 * D
    assert summary["source"].endswith(".py:" + str(MLPBlock.forward.__code__.co_firstlineno + 1))


def test_mlp_without_bias_and_identity_dropout(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(MLPBlock(nn.GELU(), bias=False, dropout=0.1), MLPBlock(nn.ReLU(), dropout=0.0))
    summaries = check_same_function(model, hidden_inputs("input"), [("mlp", "gelu"), ("mlp", "relu")])
    assert [s["module_path"] for s in summaries] == ["0", "1"]


@pytest.mark.parametrize("act, name, bias, act_first", [
    (nn.SiLU(), "silu", False, True), (nn.GELU(approximate="tanh"), "gelu_tanh", True, False),
    (nn.GELU(), "gelu", True, True),
], ids=["swiglu", "geglu-tanh-up-first", "geglu"])
def test_gated(seed, act, name, bias, act_first):
    torch.manual_seed(seed)
    [summary] = check_same_function(GatedBlock(act, bias, act_first), hidden_inputs(), [("gated", name)])
    assert summary["intermediate"] == 3 * D and not summary["fused"]


@pytest.mark.parametrize("spelling", ["chunk", "split"])
@pytest.mark.parametrize("gate_half", [0, 1])
def test_fused_gated(seed, spelling, gate_half):
    torch.manual_seed(seed)
    [summary] = check_same_function(FusedGated(nn.GELU(), spelling, gate_half), hidden_inputs(), [("gated", "gelu")])
    assert summary["fused"] and summary["intermediate"] == 3 * D
    assert len(summary["nodes"]) == 7  # proj, split, two halves, gelu, mul, out


# ------------------------------------------------------------------------------------------ HF models

def token_inputs(vocab: int, **extra):
    return lambda seq_len: {"input_ids": torch.randint(0, vocab, (2, seq_len)), **extra}


def test_hf_llama(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    summaries = check_same_function(transformers.LlamaForCausalLM(config), token_inputs(97, use_cache=False),
                                    [("gated", "silu")] * 2)
    assert [s["module_path"] for s in summaries] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all("modeling_llama.py:" in s["source"] for s in summaries)
    assert summaries[0]["hidden"] == 32 and summaries[0]["intermediate"] == 48


def test_hf_bert(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4)
    summaries = check_same_function(transformers.BertForMaskedLM(config), token_inputs(97), [("mlp", "gelu")] * 2)
    # BertIntermediate and BertOutput are sibling modules: the block lives in the layer
    assert [s["module_path"] for s in summaries] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]


def test_hf_gpt2_conv1d(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    summaries = check_same_function(transformers.GPT2LMHeadModel(config), token_inputs(97, use_cache=False),
                                    [("mlp", "gelu_new")] * 2)
    assert [(s["proj"], s["module_path"], s["intermediate"]) for s in summaries] == \
        [("conv1d", "transformer.h.0.mlp", 128), ("conv1d", "transformer.h.1.mlp", 128)]


def test_hf_phi3_fused(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Phi3Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    [summary] = check_same_function(transformers.Phi3ForCausalLM(config), token_inputs(97, use_cache=False),
                                    [("gated", "silu")], lengths=(S,))
    assert summary["fused"] and summary["module_path"] == "model.layers.0.mlp" and summary["intermediate"] == 48


# --------------------------------------------------------------------------------------------- refusals

def test_not_matched(seed):
    torch.manual_seed(seed)

    class Leaky(MLPBlock):  # the intermediate is also an output: it must stay
        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h), h

    class Unknown(MLPBlock):  # an activation outside the table
        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)) + 1)

    x = {"x": torch.randn(2, S, D)}
    assert find_feed_forward(capture(Leaky(nn.GELU()), x)) == []
    # dropout that draws a mask inside the block: chunked, it would not draw the same mask; p=0 is fine
    assert find_feed_forward(capture(MLPBlock(nn.GELU(), dropout=0.1).train(), x)) == []
    assert len(find_feed_forward(capture(MLPBlock(nn.GELU(), dropout=0.0).train(), x))) == 1
    assert find_feed_forward(capture(Unknown(nn.GELU()), x)) == []
    # no token dim: a static capture has no symbolic sizes
    static = torch.export.export(MLPBlock(nn.GELU()), (), x, strict=False).module()
    assert find_feed_forward(static) == []
    # the token dim must not be the feature dim
    assert find_feed_forward(capture(MLPBlock(nn.GELU()), x), lambda n: -1 if n.op == "call_function" else None) == []


def test_token_dim_with_sequence_symbols(seed):
    """A dynamic batch makes "the symbolic dim" ambiguous; naming the sequence's symbols resolves it."""
    torch.manual_seed(seed)
    model = MLPBlock(nn.SiLU())
    gm = torch.export.export(model, (torch.randn(3, S, D),), strict=False,
                             dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},)).module()
    assert find_feed_forward(gm) == []
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    symbols = placeholder.meta["val"].shape[1].node.expr.free_symbols
    [match] = chunk_feed_forward(gm, lambda n: ffn.symbolic_token_dim(n, symbols), chunk_tokens=CHUNK)
    assert match.token_dim == 1
    x = torch.randn(5, S + 4, D)
    assert rel(gm(x), model(x)) < 1e-5


# ---------------------------------------------------------------------------------------------- runtime

def test_chunked_ffn_inference_skips_checkpoint(seed, monkeypatch):
    torch.manual_seed(seed)
    x, w1, b1, w2, b2 = (torch.randn(3, S, D), torch.randn(4 * D, D), torch.randn(4 * D), torch.randn(D, 4 * D),
                         torch.randn(D))

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("checkpoint called without autograd")

    monkeypatch.setattr(ffn, "checkpoint", no_checkpoint)
    ref = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    for chunk in (1, CHUNK, S, 100):
        out = chunked_ffn(x, w1, b1, w2, b2, kind="mlp", activation="gelu", token_dim=1, chunk_tokens=chunk)
        assert rel(out, ref) < 1e-5
    # tokens first
    out = chunked_ffn(x.transpose(0, 1), w1, b1, w2, b2, kind="mlp", activation="gelu", token_dim=0, chunk_tokens=5)
    assert rel(out, ref.transpose(0, 1)) < 1e-5


def test_compile_aot_eager(seed):
    torch.manual_seed(seed)
    model = GatedBlock(nn.SiLU(), bias=True)
    reference = copy.deepcopy(model)
    gm = capture(model, {"x": torch.randn(2, S, D)})
    chunk_feed_forward(gm, chunk_tokens=CHUNK)
    compiled = torch.compile(gm, backend="aot_eager", dynamic=False)
    x = torch.randn(2, S, D, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = compiled(x=x), reference(x_ref)
    assert rel(out, ref) < 1e-5
    cotangent = torch.randn_like(ref)
    (out * cotangent).sum().backward()
    (ref * cotangent).sum().backward()
    assert rel(x.grad, x_ref.grad) < 1e-5
    params = dict(gm.named_parameters())
    for name, p in reference.named_parameters():
        assert rel(params[name].grad, p.grad) < 1e-5, name


def test_peak_memory_forward_backward(seed):
    """MLP 4x, S=2048, hidden 256, chunks of 128: the intermediates of one chunk only."""
    torch.manual_seed(seed)
    hidden, seq_len = 256, 2048
    model = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
    gm = capture(model, {"input": torch.randn(1, 16, hidden)})
    assert len(chunk_feed_forward(gm, chunk_tokens=128)) == 1

    def peak(module) -> int:
        x = torch.randn(1, seq_len, hidden, requires_grad=True)
        cotangent = torch.randn(1, seq_len, hidden)
        with PeakMemory() as meter:
            (module(input=x) * cotangent).sum().backward()
        return meter.peak_bytes

    original, chunked = peak(model), peak(gm)
    ratio = chunked / original
    print(f"peak activation memory: original {original / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB, "
          f"ratio {ratio:.3f}")
    assert ratio < 0.5
