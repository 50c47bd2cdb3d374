"""passes/attention/: every spelling of attention becomes one canonical `attention` node, and the
rewritten graph computes the same function (fresh random inputs, other sequence lengths)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

from ringify import UnsupportedModelError
from ringify.passes.attention import attention, canonicalize_attention, find_attention

D_MODEL, HEADS, HEAD_DIM = 32, 4, 8
SCALE = HEAD_DIM**-0.5
AUTO = Dim.AUTO


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def export(model, args=(), kwargs=None, dynamic_shapes=None) -> torch.fx.GraphModule:
    return torch.export.export(model, args, kwargs or {}, strict=False, dynamic_shapes=dynamic_shapes).module()


def calls(gm, *targets) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


aten = torch.ops.aten
ANCHORS = (aten.softmax.int, aten._softmax.default, aten.scaled_dot_product_attention.default)


# --------------------------------------------------------------------------------------------
# Hand-written models: one spelling each
# --------------------------------------------------------------------------------------------


class NanoGPTAttention(nn.Module):
    """Karpathy's nanoGPT CausalSelfAttention (manual path) with a registered tril buffer."""

    def __init__(self, block: int = 32, p: float = 0.0):
        super().__init__()
        self.c_attn = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.c_proj = nn.Linear(D_MODEL, D_MODEL)
        self.attn_dropout = nn.Dropout(p)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(D_MODEL, dim=2)
        k = k.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        q = q.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        v = v.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Spelled(nn.Module):
    """Two layers of attention written in the spelling `mode`."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.layers = nn.ModuleList(nn.ModuleDict(dict(q=nn.Linear(D_MODEL, D_MODEL), k=nn.Linear(D_MODEL, D_MODEL),
                                                       v=nn.Linear(D_MODEL, D_MODEL), o=nn.Linear(D_MODEL, D_MODEL)))
                                    for _ in range(2))

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = x + self.attend(layer, x, mask)
        return x

    def attend(self, layer, x, mask):
        B, S, _ = x.shape
        H, D, m = HEADS, HEAD_DIM, self.mode
        q, k, v = (layer[n](x).view(B, S, H, D) for n in "qkv")
        if m == "einsum_bqhd":  # einsum straight on [B, S, H, D], output in that layout
            s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
            y = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
            return layer["o"](y.reshape(B, S, H * D))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if m == "einsum":  # encoder with a key padding mask [B, S] (True = real token)
            s = torch.einsum("bhqd,bhkd->bhqk", q, k) * D**-0.5
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
            y = torch.einsum("bhqk,bhkd->bhqd", s.softmax(dim=-1), v)
        elif m == "bmm":  # [B*H, S, D] views
            q, k, v = (t.reshape(B * H, S, D) for t in (q, k, v))
            p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * D**-0.5, dim=-1)
            y = torch.bmm(p, v).view(B, H, S, D)
        elif m == "q_scaled":
            q = q * D**-0.5
            y = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        elif m == "qk_scaled":
            q, k = q * D**-0.25, k * D**-0.25
            y = torch.matmul(torch.matmul(q, k.transpose(-1, -2)).softmax(-1), v)
        elif m == "fp32_softmax":
            s = q @ k.transpose(-1, -2) / math.sqrt(D)
            y = F.softmax(s.float(), dim=-1).to(q.dtype) @ v
        else:
            s = q @ k.transpose(-1, -2) / math.sqrt(D)
            if m == "where":  # bool [B, 1, S, S], True = attend
                s = torch.where(mask, s, float("-inf"))
            elif m == "additive":  # float [B, 1, S, S]
                s = s + mask
            elif m == "fill_1e9":  # long [B, 1, 1, S], 0 = padding
                s = s.masked_fill(mask == 0, -1e9)
            elif m == "fill_finfo":  # bool [1, 1, S, S], True = attend
                s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
            y = s.softmax(-1) @ v
        return layer["o"](y.transpose(1, 2).reshape(B, S, H * D))


def seq_mask(kind: str, batch: int, s: int, g: torch.Generator):
    """A random mask for `Spelled` with at least one visible key in every row (key 0)."""
    keep = torch.rand(batch, 1, s, s, generator=g) > 0.4
    keep[..., 0] = True
    if kind == "einsum":
        pad = torch.rand(batch, s, generator=g) > 0.3
        pad[:, 0] = True
        return pad
    if kind == "where":
        return keep
    if kind == "additive":
        return torch.randn(batch, 1, s, s, generator=g)
    if kind == "fill_1e9":
        pad = (torch.rand(batch, 1, 1, s, generator=g) > 0.3).long()
        pad[..., 0] = 1
        return pad
    if kind == "fill_finfo":
        return keep[:1]
    return None


# (mode, expected kind, mask_kind, fill)
SPELLINGS = [
    ("einsum", "einsum", "keep", float("-inf")),
    ("einsum_bqhd", "einsum", None, None),
    ("bmm", "bmm", None, None),
    ("q_scaled", "matmul", None, None),
    ("qk_scaled", "matmul", None, None),
    ("fp32_softmax", "matmul", None, None),
    ("where", "matmul", "keep", float("-inf")),
    ("additive", "matmul", "add", None),
    ("fill_1e9", "matmul", "keep", -1e9),
    ("fill_finfo", "matmul", "keep", torch.finfo(torch.float32).min),
]


def check_rewritten(gm, matches):
    assert not calls(gm, *ANCHORS), "a softmax / SDPA survived"
    names = {n.name for n in gm.graph.nodes}
    att = calls(gm, attention)
    assert att == [m.output for m in matches]
    for m in matches:
        assert not (m.matched & names), "nodes of the old region are still in the graph"
        assert m.output.meta["ringify_attention"]["kind"] == m.kind
        assert "nn_module_stack" in m.output.meta and "stack_trace" in m.output.meta
        q, k, v = (n.meta["val"] for n in (m.query, m.key, m.value))
        assert q.dim() == k.dim() == v.dim() == 4
        assert q.shape[1] == m.num_heads and k.shape[1] == v.shape[1] == m.num_kv_heads


@pytest.mark.parametrize("mode,kind,mask_kind,fill", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_spelling(mode, kind, mask_kind, fill, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Spelled(mode).eval()
    x, mask = torch.randn(2, 9, D_MODEL, generator=g), seq_mask(mode, 2, 9, g)
    mask_dims = None if mask is None else {d: AUTO for d in range(mask.dim()) if mask.shape[d] == 9}
    gm = export(model, (x, mask), dynamic_shapes=({1: AUTO}, mask_dims))

    matches = canonicalize_attention(gm)
    assert len(matches) == 2 and not matches.unmatched
    for m in matches:
        assert (m.kind, m.mask_kind, m.causal, m.gqa, m.dropout_p) == (kind, mask_kind, False, False, 0.0)
        assert m.scale == pytest.approx(SCALE, rel=1e-6)
        assert m.num_heads == HEADS and m.head_dim == HEAD_DIM
        if fill is not None:
            assert m.fill == fill
        assert re.search(r"test_attention_pass\.py:\d+ \(.+\)$", m.source), m.source  # file:line (code)
    if mask_kind == "keep" and mode != "einsum":
        # a masked_fill mask (True = drop) is fed inverted, a where/keep mask as it is
        assert [m.mask.target for m in matches].count(aten.logical_not.default) == (2 if mode == "fill_1e9" else 0)
    check_rewritten(gm, matches)

    s = int(torch.randint(7, 14, (1,), generator=g))
    x, mask = torch.randn(2, s, D_MODEL, generator=g), seq_mask(mode, 2, s, g)
    assert rel(gm(x, mask), model(x, mask)) < 1e-5


def test_fp32_softmax_bf16_no_worse():
    """Half-precision models: the canonical op is no less accurate than the original."""
    torch.manual_seed(0)
    model = Spelled("fp32_softmax").eval()
    x = torch.randn(2, 11, D_MODEL)
    ref = model.double()(x.double())
    model = model.to(torch.bfloat16)
    gm = export(model, (x.bfloat16(),), dynamic_shapes=({1: AUTO},))
    canonicalize_attention(gm)
    assert rel(gm(x.bfloat16()), ref) <= 2 * rel(model(x.bfloat16()), ref) + 1e-6


def test_nanogpt_tril_buffer_and_grads(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = NanoGPTAttention().eval()
    gm = export(model, (torch.randn(2, 9, D_MODEL, generator=g),), dynamic_shapes=({1: AUTO},))
    (m,) = canonicalize_attention(gm)
    assert (m.kind, m.mask_kind, m.fill, m.causal, m.gqa) == ("matmul", "keep", float("-inf"), False, False)
    assert m.scale == pytest.approx(SCALE)
    assert m.mask.target is aten.logical_not.default  # keep = not (bias == 0); the tril slice stays
    assert calls(gm, aten.eq.Scalar)
    check_rewritten(gm, [m])

    x = torch.randn(2, 12, D_MODEL, generator=g)
    out, ref = gm(x), model(x)
    assert rel(out, ref) < 1e-5
    w = torch.randn(ref.shape, generator=g)
    names = [n for n, _ in model.named_parameters()]
    got = torch.autograd.grad((out * w).sum(), [gm.get_parameter(n) for n in names])
    want = torch.autograd.grad((ref * w).sum(), [p for _, p in model.named_parameters()])
    for n, a, b in zip(names, got, want):
        assert rel(a, b) < 1e-5, n


def test_dropout_p_recorded():
    model = NanoGPTAttention(p=0.25).train()
    gm = export(model, (torch.randn(2, 9, D_MODEL),), dynamic_shapes=({1: AUTO},))
    (m,) = find_attention(gm)
    assert m.dropout_p == 0.25
    gm = export(model.eval(), (torch.randn(2, 9, D_MODEL),), dynamic_shapes=({1: AUTO},))
    (m,) = canonicalize_attention(gm)
    assert m.dropout_p == 0.0  # aten.dropout(x, 0.25, train=False) is the identity


# --------------------------------------------------------------------------------------------
# SDPA and nn.MultiheadAttention
# --------------------------------------------------------------------------------------------


class SdpaGqa(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        if self.how == "enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        k, v = k.repeat_interleave(2, dim=1), torch.repeat_interleave(v, 2, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)


@pytest.mark.parametrize("how", ["repeat_interleave", "enable_gqa"])
def test_sdpa_causal_gqa(how, seed):
    g = torch.Generator().manual_seed(seed)
    model = SdpaGqa(how)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    gm = export(model, (q, k, k.clone()), dynamic_shapes=({2: AUTO}, {2: AUTO}, {2: AUTO}))
    (m,) = canonicalize_attention(gm)
    assert (m.kind, m.causal, m.gqa, m.mask, m.num_kv_heads) == ("sdpa", True, True, None, 2)
    assert m.scale == pytest.approx(0.3 if how == "repeat_interleave" else SCALE)
    assert m.key.op == "placeholder" and m.value.op == "placeholder"  # un-repeated
    check_rewritten(gm, [m])
    args = (torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g))
    assert rel(gm(*args), model(*args)) < 1e-5


class MhaBlock(nn.Module):
    def __init__(self, need_weights: bool):
        super().__init__()
        self.need_weights = need_weights
        self.mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)

    def forward(self, x, key_padding_mask):
        return self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=self.need_weights)[0]


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa_path", "bmm_path"])
def test_multihead_attention_key_padding(need_weights, seed):
    """need_weights=False runs SDPA; need_weights=True (the default) runs baddbmm/softmax/bmm and
    averages the weights, which are dead here (only [0] is used)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MhaBlock(need_weights).eval()
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 6:] = True
    gm = export(model, (torch.randn(2, 9, D_MODEL, generator=g), kpm), dynamic_shapes=({1: AUTO}, {1: AUTO}))
    (m,) = canonicalize_attention(gm)
    assert (m.kind, m.form, m.mask_kind, m.causal, m.gqa) == ("mha", "baddbmm" if need_weights else "sdpa", "add", False, False)
    assert m.scale == pytest.approx(SCALE) and m.num_heads == HEADS and m.module_path == "mha"
    check_rewritten(gm, [m])
    assert not calls(gm, aten.bmm.default, aten.baddbmm.default, aten.mean.dim)

    x = torch.randn(2, 11, D_MODEL, generator=g)
    kpm = torch.rand(2, 11, generator=g) > 0.6
    kpm[:, 0] = False
    assert rel(gm(x, kpm), model(x, kpm)) < 1e-5


# --------------------------------------------------------------------------------------------
# HuggingFace models
# --------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def hf_llama(impl):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_llama_gqa(impl, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = hf_llama(impl)
    ids = torch.randint(0, 96, (2, 9), generator=g)
    gm = export(model, kwargs=dict(input_ids=ids, use_cache=False), dynamic_shapes=dict(input_ids={1: AUTO}, use_cache=None))
    matches = canonicalize_attention(gm)
    assert [m.module_path for m in matches] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for m in matches:
        assert (m.kind, m.gqa, m.causal, m.num_heads, m.num_kv_heads) == ("sdpa" if impl == "sdpa" else "matmul", True, False, 4, 2)
        # the model builds its causal mask itself: kept as a mask node (bool for SDPA, additive for eager)
        assert m.mask_kind == ("keep" if impl == "sdpa" else "add")
        assert m.scale == pytest.approx(SCALE)
        assert "modeling_llama.py" in m.source
    assert matches[0].mask is matches[1].mask  # the mask shared by all layers is kept, once
    check_rewritten(gm, matches)
    assert not calls(gm, aten.expand.default) or all(len(n.meta["val"].shape) < 5 for n in calls(gm, aten.expand.default))

    ids = torch.randint(0, 96, (2, 12), generator=g)
    out = gm(input_ids=ids, use_cache=False).logits
    ref = model(input_ids=ids, use_cache=False).logits
    assert rel(out, ref) < 1e-5
    if impl == "eager":  # gradients too
        params = dict(model.named_parameters())
        names = [n for n, _ in gm.named_parameters() if n in params]
        got = torch.autograd.grad(out.logsumexp(-1).sum(), [gm.get_parameter(n) for n in names])
        want = torch.autograd.grad(ref.logsumexp(-1).sum(), [params[n] for n in names])
        assert len(names) >= 10
        for n, a, b in zip(names, got, want):
            assert rel(a, b) < 1e-5, n


def test_hf_gpt2_eager(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 96, (2, 9), generator=g)
    gm = export(model, kwargs=dict(input_ids=ids, use_cache=False), dynamic_shapes=dict(input_ids={1: AUTO}, use_cache=None))
    matches = canonicalize_attention(gm)
    assert [m.module_path for m in matches] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    for m in matches:
        assert (m.kind, m.mask_kind, m.causal, m.gqa) == ("matmul", "add", False, False)
        assert m.scale == pytest.approx(SCALE)
    check_rewritten(gm, matches)
    ids = torch.randint(0, 96, (2, 13), generator=g)
    assert rel(gm(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits) < 1e-5


def test_hf_bert_padding_mask(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, attn_implementation="eager")
    model = transformers.BertForMaskedLM(cfg).eval()

    def inputs(b, s):
        am = (torch.rand(b, s, generator=g) > 0.3).long()
        am[:, 0] = 1
        return dict(input_ids=torch.randint(0, 96, (b, s), generator=g), attention_mask=am)

    gm = export(model, kwargs=inputs(2, 9), dynamic_shapes=dict(input_ids={1: AUTO}, attention_mask={1: AUTO}))
    matches = canonicalize_attention(gm)
    assert [m.module_path for m in matches] == [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    for m in matches:
        assert (m.kind, m.mask_kind, m.causal, m.gqa) == ("matmul", "add", False, False)
    check_rewritten(gm, matches)
    kw = inputs(2, 12)
    assert rel(gm(**kw).logits, model(**kw).logits) < 1e-5


# --------------------------------------------------------------------------------------------
# What is refused, and what is not attention
# --------------------------------------------------------------------------------------------


class SoftCapped(nn.Module):
    """Gemma-2 style logit soft-capping: tanh between q @ k^T and the (additive) mask."""

    def __init__(self, cap: float = 2.0, after_mask: bool = False):
        super().__init__()
        self.cap, self.after_mask = cap, after_mask

    def forward(self, q, k, v, bias):
        s = q @ k.transpose(-1, -2) * SCALE
        if self.after_mask:
            s = s + bias
        s = torch.tanh(s / self.cap) * self.cap
        if not self.after_mask:
            s = s + bias
        return s.softmax(-1) @ v


class ReturnsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)  # (output, averaged attention weights)


class TwoMasks(nn.Module):
    """A bias, then a finite fill that does not absorb the scores: adding it is not masking with it."""

    def forward(self, q, k, v, bias, keep):
        s = (q @ k.transpose(-1, -2) * SCALE + bias).masked_fill(~keep, -1e4)
        return s.softmax(-1) @ v


class Pooling(nn.Module):
    """Attention pooling: softmax over the sequence dim (1), not over keys of a q @ k^T."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(D_MODEL, 1)

    def forward(self, x):
        w = self.score(x).softmax(dim=1)
        return (w * x).sum(1)


def qkv(s=9):
    return tuple(torch.randn(2, HEADS, s, HEAD_DIM) for _ in range(3))


REFUSED = {
    "soft_cap_after_mask": (SoftCapped(after_mask=True), qkv() + (torch.randn(2, 1, 9, 9),),
                            ({2: AUTO},) * 3 + ({2: AUTO, 3: AUTO},), "after a mask"),
    "returns_weights": (ReturnsWeights(), (torch.randn(2, 9, D_MODEL),), ({1: AUTO},), "need_weights=False"),
    "two_masks": (TwoMasks(), qkv() + (torch.randn(2, 1, 9, 9), torch.rand(2, 1, 9, 9) > 0.2),
                  ({2: AUTO},) * 3 + ({2: AUTO, 3: AUTO},) * 2, "second mask"),
    "pooling": (Pooling(), (torch.randn(2, 9, D_MODEL),), ({1: AUTO},), "outside the module given to ringify"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_with_clear_error(name):
    model, args, dyn, words = REFUSED[name]
    gm = export(model.eval(), args, dynamic_shapes=dyn)
    found = find_attention(gm)
    assert not found and len(found.unmatched_softmax) == 1
    code = gm.code
    with pytest.raises(UnsupportedModelError) as info:
        canonicalize_attention(gm)
    msg = str(info.value)
    assert words in msg and "Hint:" in msg
    assert re.search(r"test_attention_pass\.py:\d+ \(.+\): ", msg), msg  # the user's line, not torch's
    assert ("module mha (" if name == "returns_weights" else "module <root> (") in msg
    assert gm.code == code  # nothing was changed


@pytest.mark.parametrize("cap", [2.0, -3.0])  # c * tanh(s / c) is even in c
def test_soft_capped_scores(seed, cap):
    """Gemma-2's soft-cap becomes attention(..., softcap=|c|); the graph computes the same function."""
    torch.manual_seed(seed)
    model = SoftCapped(cap)
    args = qkv() + (torch.randn(2, 1, 9, 9),)
    gm = export(model, args, dynamic_shapes=({2: AUTO},) * 3 + ({2: AUTO, 3: AUTO},))
    (m,) = canonicalize_attention(gm)
    assert m.softcap == abs(cap) and m.scale == pytest.approx(SCALE) and m.mask_kind == "add"
    assert m.summary()["softcap"] == abs(cap) and not calls(gm, aten.tanh.default)
    again = tuple(torch.randn(2, HEADS, 13, HEAD_DIM) for _ in range(3)) + (torch.randn(2, 1, 13, 13),)
    assert rel(gm(*again), model(*again)) < 1e-6


def test_softmax_that_is_not_attention_is_left_alone():
    class Router(nn.Module):  # MoE-style softmax over 4 experts (a static dim)
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(D_MODEL, 4)

        def forward(self, x):
            return self.gate(x).softmax(-1)

    gm = export(Router(), (torch.randn(2, 9, D_MODEL),), dynamic_shapes=({1: AUTO},))
    found = canonicalize_attention(gm)
    assert not found and not found.unmatched and calls(gm, aten.softmax.int)


# --------------------------------------------------------------------------------------------
# The canonical op itself
# --------------------------------------------------------------------------------------------


def test_canonical_attention_matches_sdpa(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 7, 8, generator=g)
    k, v = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    keep = torch.rand(2, 1, 7, 10, generator=g) > 0.3
    keep[..., 0] = True
    bias = torch.randn(2, 4, 7, 10, generator=g)
    sd = lambda **kw: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)  # noqa: E731
    assert rel(attention(q, k, v, scale=0.2), sd(scale=0.2)) < 1e-6
    assert rel(attention(q, k, v, scale=0.2, causal=True), sd(scale=0.2, is_causal=True)) < 1e-6
    assert rel(attention(q, k, v, keep, scale=0.2, mask_kind="keep"), sd(scale=0.2, attn_mask=keep)) < 1e-6
    assert rel(attention(q, k, v, bias, scale=0.2, mask_kind="add"), sd(scale=0.2, attn_mask=bias)) < 1e-6
    both = keep & torch.ones(7, 10, dtype=torch.bool).tril()
    assert rel(attention(q, k, v, keep, scale=0.2, causal=True, mask_kind="keep"), sd(scale=0.2, attn_mask=both)) < 1e-6
    # a finite fill: fully masked rows become uniform instead of NaN
    none = torch.zeros(1, 1, 7, 10, dtype=torch.bool)
    out = attention(q, k, v, none, scale=0.2, mask_kind="keep", fill=-1e9)
    assert rel(out, v.repeat_interleave(2, 1).mean(2, keepdim=True).expand_as(out)) < 1e-6


def test_canonical_attention_rows_without_keys_are_zero_like_sdpa():
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[..., 1, :] = False  # query 1 sees nothing
    out = attention(q, k, v, keep, scale=0.3, mask_kind="keep")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    assert rel(out, ref) < 1e-6 and not out[..., 1, :].any()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    assert all(torch.isfinite(a).all() and rel(a, b) < 1e-5 for a, b in zip(grads, want))
