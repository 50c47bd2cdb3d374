"""ringify(model) on real gloo rings against the untouched model: logits, loss, every parameter gradient.

Each rank builds the same model (same seed), runs the untouched copy on the full inputs, then the
ringified model, and compares. fp32, 1e-5 relative error, odd sequence lengths, 2 and 3 ranks.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ringify import UnsupportedModelError, ringify
from ringify.verify import relative_error, worst_grad_error

VOCAB = 97


# ----------------------------------------------------------------------------------------- models


class NanoAttention(nn.Module):
    """nanoGPT's attention: a registered tril buffer, hand-written softmax attention."""

    def __init__(self, d, heads, max_len=64):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class NanoGPT(nn.Module):
    def __init__(self, d=32, heads=4, layers=2, max_len=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(ln1=nn.LayerNorm(d), attn=NanoAttention(d, heads, max_len), ln2=nn.LayerNorm(d),
                               mlp=nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))))
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = x + b["attn"](b["ln1"](x))
            x = x + b["mlp"](b["ln2"](x))
        logits = self.head(self.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-100)
        return logits, loss


class EinsumEncoder(nn.Module):
    """Bidirectional encoder: einsum attention with a key-padding mask, SwiGLU, masked mean loss."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.w1, self.w3, self.w2 = nn.Linear(d, 64, bias=False), nn.Linear(d, 64, bias=False), nn.Linear(64, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, keep, target):
        B, S, D = x.shape
        split = lambda t: t.view(B, S, self.heads, D // self.heads)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (D // self.heads) ** -0.5
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, S, D)
        h = self.norm(x + self.o(y))
        h = h + self.w2(F.silu(self.w1(h)) * self.w3(h))
        err = ((h - target) ** 2).mean(-1)
        loss = (err * keep).sum() / keep.sum()
        return h, loss


class TorchMHAEncoder(nn.Module):
    """nn.MultiheadAttention, batch-first or sequence-first, with a key-padding mask and optionally causal."""

    def __init__(self, batch_first: bool, causal: bool, d=32, heads=4):
        super().__init__()
        self.batch_first, self.causal = batch_first, causal
        self.embed = nn.Linear(8, d)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.head = nn.Linear(d, 5)

    def forward(self, x, keep, target):
        h = self.embed(x)
        h = h if self.batch_first else h.transpose(0, 1)
        S = x.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1) if self.causal else None
        y, _ = self.mha(h, h, h, key_padding_mask=~keep, attn_mask=causal, is_causal=self.causal,
                        need_weights=False)
        y = y if self.batch_first else y.transpose(0, 1)
        out = self.head(y + x.sum(-1, keepdim=True))
        return out, ((out - target) ** 2).mean()


def _hf(name):
    import transformers as tf

    if name.startswith("llama"):
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             attn_implementation=name.split("-")[1])
        return tf.LlamaForCausalLM(cfg)
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                            attn_implementation="eager", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        return tf.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0,
                            attention_probs_dropout_prob=0, attn_implementation="eager")
        return tf.BertForMaskedLM(cfg)
    if name == "mistral-window":
        cfg = tf.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               sliding_window=4, attn_implementation="sdpa")
        return tf.MistralForCausalLM(cfg)
    raise KeyError(name)


def build(name: str, seed: int, seq_len: int):
    """(model, args, kwargs) with fresh random inputs; the same on every rank (same seed)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (2, seq_len), generator=g)
    labels = torch.randint(0, VOCAB, (2, seq_len), generator=g)
    labels[0, : seq_len // 3] = -100
    if name == "nanogpt":
        return NanoGPT(), (ids, labels), {}
    if name == "einsum":
        keep = torch.rand(2, seq_len, generator=g) > 0.3
        keep[:, 0] = True
        x, target = torch.randn(2, seq_len, 32, generator=g), torch.randn(2, seq_len, 32, generator=g)
        return EinsumEncoder(), (x, keep, target), {}
    if name.startswith("mha"):  # mha-batch / mha-seq, -causal
        keep = torch.rand(2, seq_len, generator=g) > 0.3
        keep[:, 0] = True
        x, target = torch.randn(2, seq_len, 8, generator=g), torch.randn(2, seq_len, 5, generator=g)
        return TorchMHAEncoder("batch" in name, "causal" in name), (x, keep, target), {}
    model = _hf(name)
    kwargs = dict(input_ids=ids, labels=labels)
    if name == "bert":
        mask = torch.ones(2, seq_len, dtype=torch.long)
        mask[1, seq_len - seq_len // 3:] = 0  # right padding in the second row
        kwargs["attention_mask"] = mask
    else:
        kwargs["use_cache"] = False
        if name == "llama-sdpa":
            kwargs["return_dict"] = True  # goes through **kwargs: export needs the flattened retry
    return model, (), kwargs


def _logits_and_loss(out):
    if isinstance(out, tuple):
        return out[0], out[1]
    return out.logits, out.loss


def check_model(name: str, seed: int, seq_len: int, layout: str = "zigzag") -> dict:
    model, args, kwargs = build(name, seed, seq_len)
    reference = copy.deepcopy(model)
    ref_logits, ref_loss = _logits_and_loss(reference(*args, **kwargs))
    ref_loss.backward()

    rm = ringify(model, layout=layout, ffn_chunk_tokens=4)
    logits, loss = _logits_and_loss(rm(*args, **kwargs))
    loss.backward()
    errors = {"logits": relative_error(logits, ref_logits), "loss": relative_error(loss, ref_loss)}
    ref_params = dict(reference.named_parameters())
    errors["grad"], errors["worst_param"] = worst_grad_error(model, reference)
    assert all(p.grad is not None for n, p in model.named_parameters() if ref_params[n].grad is not None)
    assert max(errors["logits"], errors["loss"], errors["grad"]) < 1e-5, errors
    return errors


# ------------------------------------------------------------------------------------------ tests

QUICK = ["nanogpt", "einsum", "llama-sdpa"]
SLOW = ["llama-eager", "gpt2", "bert", "mistral-window"]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", QUICK)
def test_equivalent(ranks, seed, name, world_size):
    ranks(world_size).run(check_model, name, seed, 8 * world_size + 3)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", SLOW)
def test_equivalent_hf(ranks, seed, name, world_size):
    ranks(world_size).run(check_model, name, seed, 8 * world_size + 3)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["mha-batch", "mha-seq-causal"])
def test_equivalent_torch_multihead_attention(ranks, seed, name, world_size):
    """nn.MultiheadAttention merges the sequence with the batch ((S, B, E) -> (S*B, E)) and back."""
    ranks(world_size).run(check_model, name, seed, world_size * 5 + 2)


@pytest.mark.parametrize("name", ["nanogpt", "llama-sdpa"])
def test_equivalent_four_ranks(ranks, seed, name):
    ranks(4).run(check_model, name, seed, 4 * 5 + 3)


@pytest.mark.parametrize("layout", ["contiguous", "striped"])
def test_other_layouts(ranks, seed, layout):
    ranks(2).run(check_model, "nanogpt", seed, 17, layout)


def test_single_process(seed):
    check_model("llama-sdpa", seed, 11)


# ------------------------------------------------------------------------------- options and groups


def check_options(name: str, seed: int, seq_len: int) -> dict:
    """outputs="local" with rm.local_positions(); a loss the user computes from gathered logits on every
    rank; sync_grads=False (partial grads whose sum is the single-device grad); a 1-D DeviceMesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model, args, kwargs = build(name, seed, seq_len)
    weights = torch.randn(2, seq_len, VOCAB, generator=torch.Generator().manual_seed(seed + 7))
    reference = copy.deepcopy(model)
    ref_logits, ref_loss = _logits_and_loss(reference(*args, **kwargs))
    (ref_logits * weights).sum().backward()  # the user's own loss, on the full logits
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    errors = {}

    # full outputs: every rank computes the same loss from them; the gather's backward must be right
    full = copy.deepcopy(model)
    logits, _ = _logits_and_loss(ringify(full, mesh)(*args, **kwargs))
    (logits * weights).sum().backward()
    errors["gathered-loss grads"] = max(relative_error(p.grad, ref_grads[n]) for n, p in full.named_parameters())

    # local outputs: this rank's tokens at rm.local_positions(); the loss inside the model is still global
    local = copy.deepcopy(model)
    rm = ringify(local, mesh, outputs="local")
    shard, loss = _logits_and_loss(rm(*args, **kwargs))
    positions = rm.local_positions()
    assert shard.shape[1] == len(positions) < seq_len
    errors["local logits"] = relative_error(shard, ref_logits[:, positions])
    errors["local loss"] = relative_error(loss, ref_loss)
    (shard * weights[:, positions]).sum().backward()  # each rank's part of the user's loss: grads sum over ranks
    errors["local-loss grads"] = max(relative_error(p.grad, ref_grads[n]) for n, p in local.named_parameters())

    # sync_grads=False: each rank keeps its partial gradient (for DDP/FSDP to sum); the sum is exact
    partial = copy.deepcopy(model)
    logits, _ = _logits_and_loss(ringify(partial, mesh, sync_grads=False)(*args, **kwargs))
    (logits * weights).sum().backward()
    worst = 0.0
    for n, p in partial.named_parameters():
        summed = p.grad.clone()
        dist.all_reduce(summed)
        worst = max(worst, relative_error(summed, ref_grads[n]))
    errors["summed partial grads"] = worst
    assert max(errors.values()) < 1e-5, errors
    return errors


@pytest.mark.parametrize("world_size", [2, 3])
def test_outputs_sync_grads_and_device_mesh(ranks, seed, world_size):
    ranks(world_size).run(check_options, "nanogpt", seed, 6 * world_size + 1)


# ------------------------------------------------------------------------------------- refusals


class _Mixer(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(16, 16)
        self.conv = nn.Conv1d(16, 16, 4, padding=3, groups=16)

    def forward(self, x):
        h = self.lin(x)
        if self.kind == "cumsum":
            h = h.cumsum(1)
        elif self.kind == "conv":
            h = self.conv(h.transpose(1, 2))[..., : x.size(1)].transpose(1, 2)
        elif self.kind == "roll":
            h = torch.roll(h, 1, dims=1)
        elif self.kind == "sort":
            h = h.sort(dim=1).values
        elif self.kind == "topk":
            h = h.topk(2, dim=1).values.sum(1, keepdim=True) + h
        att = F.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None], is_causal=True)[:, 0]
        return att.sum()


# the op that mixes the tokens, which the refusal must blame (not a view or getitem after it), and its line
_MIXERS = {
    "cumsum": (r"aten\.cumsum", "h = h.cumsum(1)"),
    "conv": (r"aten\.(conv1d|convolution)", "h = self.conv(h.transpose(1, 2))"),
    "roll": (r"aten\.roll", "h = torch.roll(h, 1, dims=1)"),
    "sort": (r"aten\.sort", "h = h.sort(dim=1).values"),
    "topk": (r"aten\.topk", "h = h.topk(2, dim=1)"),
}


@pytest.mark.parametrize("kind", list(_MIXERS))
def test_refuses_token_mixing(seed, kind):
    torch.manual_seed(seed)
    rm = ringify(_Mixer(kind))
    with pytest.raises(UnsupportedModelError) as err:
        rm(torch.randn(2, 9, 16))
    message = str(err.value)
    op, code = _MIXERS[kind]
    assert re.match(rf"`{op}` \(node \w+\) ", message), message  # the mixing op is what the message blames
    blamed = message.split(" mixes the tokens")[0]
    assert "test_ringify.py" in blamed and code in blamed, message  # ...with its own source line
    if kind == "conv":
        assert "in module `conv`" in blamed, message
    assert "Hint" in message or "hint" in message, message


class _CrossedFlatten(nn.Module):
    """Tokens flattened token-major (S*B) and batch-major (B*S) multiplied together: pairs differ per shard."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        B, S, E = h.shape
        token_major, batch_major = h.transpose(0, 1).reshape(S * B, E), h.reshape(B * S, E)
        return (token_major * batch_major).sum()


def test_refuses_differently_flattened_tokens(seed):
    torch.manual_seed(seed)
    rm = ringify(_CrossedFlatten())
    with pytest.raises(UnsupportedModelError, match=r"`aten\.mul` .*token_major \* batch_major"):
        rm(torch.randn(2, 9, 16))


def _inputs_differ(seed):
    import torch.distributed as dist

    model, args, _ = build("nanogpt", seed, 11)
    _, other, _ = build("nanogpt", seed + 1 + dist.get_rank(), 11)  # a different batch on every rank
    with pytest.raises(ValueError, match=r"inputs differ between ranks \(ranks \[1\] differ from rank 0\)"):
        ringify(model)(*other)
    ringify(copy.deepcopy(model))(*args)  # the same batch everywhere: accepted (the check is a collective)
    return True


def test_inputs_that_differ_between_ranks_are_refused_on_every_rank(ranks, seed):
    assert ranks(2).run(_inputs_differ, seed) == [True, True]


def _skip_first_call(seed):
    """Rank 1 never calls the ringified model; rank 0's identical-inputs check must give up in bounded time."""
    import time

    import torch.distributed as dist

    from ringify.runtime import RingTimeoutError, set_default_timeout

    if dist.get_rank() == 1:
        time.sleep(4)
        return None
    model, args, _ = build("nanogpt", seed, 11)
    set_default_timeout(1)
    start = time.perf_counter()
    with pytest.raises(RingTimeoutError, match="same inputs"):
        ringify(model)(*args)
    return time.perf_counter() - start


def test_first_call_waits_boundedly(seed):
    from ringify.launch import LocalRanks

    pool = LocalRanks(2)  # its group is broken afterwards: not the shared one
    try:
        waited, _ = pool.run(_skip_first_call, seed, timeout=60)
    finally:
        pool.close()
    assert 0.8 < waited < 6


def test_world_larger_than_sequence(ranks):
    ranks(3).run(_too_short)


def _too_short():
    rm = ringify(NanoGPT())
    ids = torch.randint(0, VOCAB, (1, 2))
    with pytest.raises(ValueError, match="at least one token"):
        rm(ids, ids)
    return True


def test_report_lists_layers(seed):
    model, args, kwargs = build("llama-sdpa", seed, 9)
    rm = ringify(model)
    rm(*args, **kwargs)
    report = rm.report()
    text = report.to_markdown()
    assert "model.layers.0" in text and "model.layers.1" in text, text
    assert "ring" in text and "gated(silu) -> whole" in text, text  # found; run whole (ffn_chunk_tokens=None)
    chunked = ringify(copy.deepcopy(model), ffn_chunk_tokens=256)
    chunked(*args, **kwargs)
    assert "gated(silu) -> chunked" in chunked.report(cost=False).to_markdown()
    assert '"layers"' in report.to_json()


def check_compiled(name: str, seed: int, seq_len: int) -> float:
    model, args, kwargs = build(name, seed, seq_len)
    reference = copy.deepcopy(model)
    ref_logits, _ = _logits_and_loss(reference(*args, **kwargs))
    rm = ringify(model)
    rm(*args, **kwargs)  # capture and rewrite eagerly, then compile the rewritten graph
    compiled = torch.compile(rm.graph_module, backend="aot_eager")
    logits, loss = _logits_and_loss(compiled(*args, **kwargs))
    loss.backward()
    error = relative_error(logits, ref_logits)
    assert error < 1e-5, error
    assert all(p.grad is not None for p in model.parameters())
    return error


@pytest.mark.slow
def test_rewritten_graph_compiles(ranks, seed):
    ranks(2).run(check_compiled, "nanogpt", seed, 13)


def check_compiled_module(name: str, seed: int, backend: str) -> list[float]:
    """``torch.compile(ringify(model))``, as a user writes it: capture and rewrite run eagerly (they are
    compiler-disabled), the rewritten graph is compiled; a new length re-captures and recompiles."""
    errors = []
    model, _, _ = build(name, seed, 5)
    ringed = copy.deepcopy(model)
    compiled = torch.compile(ringify(ringed), backend=backend)
    for seq_len in (13, 13, 17):
        _, args, kwargs = build(name, seed + seq_len, seq_len)
        ref_logits, ref_loss = _logits_and_loss(model(*args, **kwargs))
        logits, loss = _logits_and_loss(compiled(*args, **kwargs))
        ref_loss.backward()
        loss.backward()  # gradients accumulate over the three calls on both sides
        errors += [relative_error(logits, ref_logits), relative_error(loss, ref_loss)]
    errors += [relative_error(p.grad, q.grad) for p, q in zip(ringed.parameters(), model.parameters())]
    assert max(errors) < 1e-5, errors
    return errors


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_ringified_module_compiles(ranks, seed, backend):
    ranks(2).run(check_compiled_module, "llama-sdpa", seed, backend)


class WideHead(nn.Module):
    """A tiny body under a wide output head: the gathered logits outweigh the parameters."""

    def __init__(self, vocab=6000, d=8):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Embedding(vocab, d), nn.Linear(d, 3 * d), nn.Linear(d, vocab)

    def forward(self, ids):
        q, k, v = self.qkv(self.embed(ids)).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.head(y)


def _gathered_outputs_warn(seed):
    import warnings

    ids = torch.randint(0, 6000, (1, 97), generator=torch.Generator().manual_seed(seed))
    model = WideHead()
    with pytest.warns(UserWarning, match=r"outputs='full' gathers `\w+` \[1, 97, 6000\] .* outputs='local'"):
        full = ringify(model)(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # local outputs: nothing to warn about; the full tensor on request
        rm = ringify(model, outputs="local")
        local = rm(ids)
        assert torch.equal(rm.gather(local), full)
    return True


def test_gathered_outputs_warn_once_with_the_fix(ranks, seed):
    assert ranks(2).run(_gathered_outputs_warn, seed) == [True, True]
