"""passes/attention/: one tiny module per spelling of attention. Each is captured with torch.export,
canonicalised into exactly one ``ringify::attention`` node with the expected scale / causal / mask kind
(and soft-cap, GQA, value head dim, sinks), and the rewritten graph computes the same function on fresh
inputs of another length."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

from ringify import UnsupportedModelError
from ringify.passes.attention import attention, canonicalize_attention, find_attention

B, H, S, D = 2, 4, 9, 8
KV_HEADS, MLA_DQK, MLA_DV = 2, 12, 6
SCALE = D**-0.5
AUTO = Dim.AUTO
aten = torch.ops.aten


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Fn(nn.Module):
    """A module whose forward is `fn(q, k, v, mask)`: one spelling, nothing else."""

    def __init__(self, fn: Callable, sinks: bool = False):
        super().__init__()
        self.fn = fn
        if sinks:  # large enough to take most of the probability mass in some heads
            self.sinks = nn.Parameter(torch.tensor([3.0, -1.0, 0.5, 6.0]))

    def forward(self, q, k, v, mask):
        return self.fn(self, q, k, v, mask)


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """HuggingFace's repeat_kv: [B, H_kv, S, D] -> [B, H_kv * n, S, D] by expand + reshape."""
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def scores(q, k):
    return q @ k.transpose(-2, -1)


@dataclass
class Spelling:
    fn: Callable
    mask: str | None = None  # 'keep' (bool [B,1,S,S]), 'pad' (long [B,1,1,S], 0 = padding), 'add' (float [B,1,S,S])
    kv_heads: int = H
    dqk: int = D
    dv: int = D
    sinks: bool = False
    expect: dict = field(default_factory=dict)  # AttentionMatch fields beyond the defaults below


def _sinks_eager(m, q, k, v, mask):
    """GPT-OSS's eager_attention_forward (transformers/models/gpt_oss/modeling_gpt_oss.py)."""
    n = H // KV_HEADS
    s = torch.matmul(q, repeat_kv(k, n).transpose(2, 3)) * SCALE + mask
    sinks = m.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([s, sinks], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
    p = F.dropout(probs[..., :-1], p=0.0, training=m.training).to(v.dtype)
    return torch.matmul(p, repeat_kv(v, n))


def _titan_out(m, q, k, v, _):
    """torchtitan's attention: q, k, v are [B, S, H, D] tensors transposed, so SDPA's result is [B, S, H, D]
    in memory, capture drops the ``.contiguous()`` as a no-op and the ``.view`` relies on those strides."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).contiguous().view(q.shape[0], q.shape[2], -1)


def _keep_some(bias):
    """A bool keep-mask from the bias that keeps key 0 for every query (no row without a visible key)."""
    return (bias > -1.0) | (torch.arange(bias.shape[-1]) == 0)


def _bloom(m, q, k, v, bias):
    """BloomAttention: ALiBi ([B*H, 1, K], per-head slopes times key positions) added by baddbmm on the
    merged [B*H, S, S] scores, viewed as [B, H, S, S] for the mask and the fp32 softmax, and back for the bmm."""
    b, h, s, d = q.shape
    slopes = 2.0 ** -torch.arange(1.0, h + 1.0)
    alibi = (slopes[:, None] * torch.arange(s, dtype=q.dtype)).expand(b, h, s).reshape(b * h, 1, s)
    scores = torch.baddbmm(alibi, q.reshape(b * h, s, d), k.reshape(b * h, s, d).transpose(1, 2), beta=1.0,
                           alpha=SCALE)
    w = scores.view(b, h, s, s) + bias
    p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(p.view(b * h, s, s), v.reshape(b * h, s, d)).view(b, h, s, d)


SPELLINGS = {
    "sdpa": Spelling(lambda m, q, k, v, _: F.scaled_dot_product_attention(q, k, v), expect=dict(kind="sdpa")),
    "sdpa_causal_scale": Spelling(
        lambda m, q, k, v, _: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
        expect=dict(kind="sdpa", scale=0.3, causal=True)),
    "sdpa_bool_mask": Spelling(lambda m, q, k, v, keep: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
                               mask="keep", expect=dict(kind="sdpa", mask_kind="keep")),
    "sdpa_transpose_contiguous_view": Spelling(_titan_out, expect=dict(kind="sdpa", causal=True)),
    "sdpa_enable_gqa": Spelling(lambda m, q, k, v, _: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                kv_heads=KV_HEADS, expect=dict(kind="sdpa", gqa=True)),
    "div_scale": Spelling(lambda m, q, k, v, _: (scores(q, k) / math.sqrt(D)).softmax(-1) @ v),
    "mul_scale": Spelling(lambda m, q, k, v, _: torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.25, -1) @ v,
                          expect=dict(scale=0.25)),
    "scaled_q": Spelling(lambda m, q, k, v, _: scores(q * SCALE, k).softmax(-1) @ v),
    "scaled_q_and_k": Spelling(lambda m, q, k, v, _: scores(q * D**-0.25, k / D**0.25).softmax(-1) @ v),
    "einsum": Spelling(lambda m, q, k, v, _: torch.einsum(
        "bhqk,bhkd->bhqd", (torch.einsum("bhqd,bhkd->bhqk", q, k) * SCALE).softmax(-1), v), expect=dict(kind="einsum")),
    "einsum_bqhd": Spelling(lambda m, q, k, v, _: torch.einsum(
        "bhqk,bkhd->bqhd", (torch.einsum("bqhd,bkhd->bhqk", *(t.transpose(1, 2) for t in (q, k))) * SCALE).softmax(-1),
        v.transpose(1, 2)).transpose(1, 2), expect=dict(kind="einsum")),
    "bmm_3d": Spelling(lambda m, q, k, v, _: torch.bmm(
        torch.softmax(torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)) * SCALE, -1),
        v.flatten(0, 1)).unflatten(0, (q.shape[0], H)), expect=dict(kind="bmm")),
    "baddbmm": Spelling(lambda m, q, k, v, bias: torch.bmm(
        torch.baddbmm(bias.expand(-1, H, -1, -1).flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                      alpha=SCALE).softmax(-1), v.flatten(0, 1)).unflatten(0, (q.shape[0], H)),
                        mask="add", expect=dict(kind="bmm", form="baddbmm", mask_kind="add")),
    "masked_fill": Spelling(
        lambda m, q, k, v, keep: (scores(q, k) * SCALE).masked_fill(~keep, float("-inf")).softmax(-1) @ v,
        mask="keep", expect=dict(mask_kind="keep")),
    "masked_fill_padding": Spelling(
        lambda m, q, k, v, pad: (scores(q, k) * SCALE).masked_fill(pad == 0, -1e9).softmax(-1) @ v,
        mask="pad", expect=dict(mask_kind="keep", fill=-1e9)),
    "masked_fill_before_scale": Spelling(
        lambda m, q, k, v, keep: (scores(q, k).masked_fill(~keep, -1e4) * SCALE).softmax(-1) @ v,
        mask="keep", expect=dict(mask_kind="keep", fill=-1e4 * SCALE)),
    "two_biases": Spelling(lambda m, q, k, v, bias: (scores(q, k) * SCALE + bias + bias.transpose(-1, -2) * 0.5)
                           .softmax(-1) @ v, mask="add", expect=dict(mask_kind="add")),
    "bias_then_fill_inf": Spelling(lambda m, q, k, v, bias: ((scores(q, k) + bias) * SCALE).masked_fill(
        ~_keep_some(bias), float("-inf")).softmax(-1) @ v, mask="add", expect=dict(mask_kind="add")),
    "fill_inf_then_bias": Spelling(lambda m, q, k, v, bias: (torch.where(
        _keep_some(bias), scores(q, k) * SCALE, float("-inf")) + bias).softmax(-1) @ v,
        mask="add", expect=dict(mask_kind="add")),
    "bloom_alibi_baddbmm_split": Spelling(_bloom, mask="add", expect=dict(kind="bmm", form="baddbmm", mask_kind="add")),
    "where": Spelling(lambda m, q, k, v, keep: torch.where(keep, scores(q, k) * SCALE, float("-inf")).softmax(-1) @ v,
                      mask="keep", expect=dict(mask_kind="keep")),
    "additive": Spelling(lambda m, q, k, v, bias: (scores(q, k) * SCALE + bias).softmax(-1) @ v,
                         mask="add", expect=dict(mask_kind="add")),
    "additive_before_scale": Spelling(lambda m, q, k, v, bias: ((scores(q, k) + bias) * SCALE).softmax(-1) @ v,
                                      mask="add", expect=dict(mask_kind="add")),
    "fp32_softmax": Spelling(lambda m, q, k, v, _: F.softmax((scores(q, k) * SCALE).float(), -1, dtype=torch.float32)
                             .to(q.dtype) @ v),
    "soft_cap": Spelling(lambda m, q, k, v, bias: (torch.tanh(scores(q, k) * SCALE / 2.0) * 2.0 + bias).softmax(-1) @ v,
                         mask="add", expect=dict(mask_kind="add", softcap=2.0)),
    "max_subtracted": Spelling(lambda m, q, k, v, _: (lambda s: (s - s.amax(-1, keepdim=True)).softmax(-1))(
        scores(q, k) * SCALE) @ v),
    "repeat_kv": Spelling(lambda m, q, k, v, _: (scores(q, repeat_kv(k, H // KV_HEADS)) * SCALE).softmax(-1)
                          @ repeat_kv(v, H // KV_HEADS), kv_heads=KV_HEADS, expect=dict(gqa=True)),
    "repeat_interleave_sdpa": Spelling(lambda m, q, k, v, _: F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True), kv_heads=KV_HEADS,
        expect=dict(kind="sdpa", gqa=True, causal=True)),
    "mla_eager": Spelling(lambda m, q, k, v, bias: (scores(q, k) * MLA_DQK**-0.5 + bias).softmax(-1) @ v, mask="add",
                          dqk=MLA_DQK, dv=MLA_DV, expect=dict(mask_kind="add", scale=MLA_DQK**-0.5)),
    "mla_sdpa": Spelling(lambda m, q, k, v, _: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                         dqk=MLA_DQK, dv=MLA_DV, expect=dict(kind="sdpa", causal=True, scale=MLA_DQK**-0.5)),
    "sinks": Spelling(_sinks_eager, mask="add", kv_heads=KV_HEADS, sinks=True,
                      expect=dict(mask_kind="add", gqa=True)),
}


def make_inputs(sp: Spelling, s: int, g: torch.Generator, dtype=torch.float32):
    q = torch.randn(B, H, s, sp.dqk, generator=g, dtype=dtype)
    k = torch.randn(B, sp.kv_heads, s, sp.dqk, generator=g, dtype=dtype)
    v = torch.randn(B, sp.kv_heads, s, sp.dv, generator=g, dtype=dtype)
    keep = torch.rand(B, 1, s, s, generator=g) > 0.4
    keep[..., 0] = True  # every query sees a key: the original's softmax would give NaN otherwise
    mask = {None: torch.zeros(()), "keep": keep, "add": torch.randn(B, 1, s, s, generator=g, dtype=dtype),
            "pad": (torch.rand(B, 1, 1, s, generator=g) > 0.3).long().index_fill_(3, torch.tensor([0]), 1)}[sp.mask]
    return q, k, v, mask


def capture(model, args):
    dyn = tuple({d: AUTO for d in range(a.dim()) if a.shape[d] == S} for a in args)
    return torch.export.export(model, args, strict=False, dynamic_shapes=dyn).module()


def canonical_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is attention]


@pytest.mark.parametrize("name", SPELLINGS)
def test_spelling(name, seed):
    sp = SPELLINGS[name]
    g = torch.Generator().manual_seed(seed)
    model = Fn(sp.fn, sinks=sp.sinks).eval()
    gm = capture(model, make_inputs(sp, S, g))
    (m,) = canonicalize_attention(gm)

    want = dict(kind="matmul", scale=SCALE, causal=False, mask_kind=None, gqa=False, softcap=0.0, dropout_p=0.0,
                num_heads=H, num_kv_heads=sp.kv_heads, head_dim=sp.dqk, v_head_dim=sp.dv)
    want.update(sp.expect)
    got = {key: getattr(m, key) for key in want}
    assert got == {**want, "scale": pytest.approx(want["scale"], rel=1e-6)}, name
    (node,) = canonical_nodes(gm)
    assert node is m.output and not [n for n in gm.graph.nodes if n.target in (aten.softmax.int, aten._softmax.default)]
    assert node.kwargs["scale"] == pytest.approx(want["scale"]) and node.kwargs["mask_kind"] == want["mask_kind"]
    assert tuple(node.meta["val"].shape[-1:]) == (sp.dv,) and node.meta["val"].shape[1] == H
    assert node.meta["val"].is_contiguous()  # the canonical op's own layout; restored after it where needed
    assert (m.sinks is not None) == sp.sinks == ("sinks" in node.kwargs)
    if sp.sinks:
        assert m.sinks.op == "get_attr" and tuple(m.sinks.meta["val"].shape) == (H,)  # the parameter itself

    args = make_inputs(sp, 13, g)
    assert rel(gm(*args), model(*args)) < 1e-5, name


@pytest.mark.parametrize("name", ["sinks", "additive", "repeat_kv", "mla_eager", "soft_cap", "two_biases",
                                  "bias_then_fill_inf"])
def test_gradients(name, seed):
    """Into q, k, v, an additive mask and the sinks: the canonical op's backward is the original's."""
    sp = SPELLINGS[name]
    g = torch.Generator().manual_seed(seed)
    model = Fn(sp.fn, sinks=sp.sinks).eval()
    gm = capture(model, make_inputs(sp, S, g))
    canonicalize_attention(gm)
    args = [t.requires_grad_() if t.is_floating_point() and t.dim() else t for t in make_inputs(sp, 11, g)]
    leaves = [t for t in args if t.requires_grad] + list(model.parameters())
    w = torch.randn(B, H, 11, sp.dv, generator=g)
    got = torch.autograd.grad((gm(*args) * w).sum(), [t for t in args if t.requires_grad] + list(gm.parameters()))
    ref = torch.autograd.grad((model(*args) * w).sum(), leaves)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-5, name
    if sp.sinks:
        assert ref[-1].abs().min() > 0  # the sinks bend the result


def test_sinks_bend_the_result():
    """The sinks take part in the softmax: without them the output differs (the test above is not vacuous)."""
    sp = SPELLINGS["sinks"]
    g = torch.Generator().manual_seed(0)
    model = Fn(sp.fn, sinks=True).eval()
    args = make_inputs(sp, S, g)
    with_sinks = model(*args)
    with torch.no_grad():
        model.sinks.fill_(float("-inf"))
    assert rel(model(*args), with_sinks) > 0.1


def test_fp32_softmax_in_bf16_no_worse():
    """Half-precision inputs: the canonical op (fp32 inside) is no less accurate than the original."""
    sp = SPELLINGS["fp32_softmax"]
    g = torch.Generator().manual_seed(0)
    model = Fn(sp.fn).eval()
    gm = capture(model, make_inputs(sp, S, g, torch.bfloat16))
    canonicalize_attention(gm)
    args = make_inputs(sp, 13, g)
    exact = model(*(a.double() if a.is_floating_point() else a for a in args))
    low = [a.bfloat16() if a.is_floating_point() else a for a in args]
    assert rel(gm(*low), exact) <= 2 * rel(model(*low), exact) + 1e-6


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa_path", "baddbmm_path"])
def test_multihead_attention(need_weights, seed):
    torch.manual_seed(seed)

    class Mha(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(H * D, H, batch_first=True)

        def forward(self, x, pad):
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=need_weights)[0]

    g = torch.Generator().manual_seed(seed)
    model = Mha().eval()
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, 6:] = True
    gm = capture(model, (torch.randn(B, S, H * D, generator=g), pad))
    (m,) = canonicalize_attention(gm)
    assert (m.kind, m.form, m.mask_kind, m.num_heads) == ("mha", "baddbmm" if need_weights else "sdpa", "add", H)
    assert m.scale == pytest.approx(SCALE) and len(canonical_nodes(gm)) == 1
    x, pad = torch.randn(B, 12, H * D, generator=g), torch.rand(B, 12, generator=g) > 0.6
    pad[:, 0] = False
    assert rel(gm(x, pad), model(x, pad)) < 1e-5


def _sinks_scaled_after_cat(m, q, k, v, bias):
    s = torch.cat([scores(q, k) + bias, m.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)], -1)
    return (s * SCALE).softmax(-1)[..., :-1] @ v


def _shifted_before_sinks(m, q, k, v, bias):
    s = scores(q, k) * SCALE + bias
    s = s - s.amax(-1, keepdim=True)  # softmax([s - max, sink]) is not softmax([s, sink])
    s = torch.cat([s, m.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)], -1)
    return s.softmax(-1)[..., :-1] @ v


def _sinks_vary_over_queries(m, q, k, v, bias):
    s = scores(q, k) * SCALE + bias
    return torch.cat([s, bias[..., :1].expand(-1, H, -1, -1)], -1).softmax(-1)[..., :-1] @ v


@pytest.mark.parametrize("fn,words", [(_sinks_scaled_after_cat, "after the attention sinks"),
                                      (_shifted_before_sinks, "shifted"),
                                      (_sinks_vary_over_queries, "vary over more than the heads")],
                         ids=["scaled_after_cat", "shifted_before_sinks", "sinks_vary_over_queries"])
def test_sinks_refused(fn, words):
    """Spellings with a sink column that is not the canonical op's: refused with the reason, graph unchanged."""
    sp = Spelling(fn, mask="add", sinks=True)
    gm = capture(Fn(fn, sinks=True).eval(), make_inputs(sp, S, torch.Generator().manual_seed(0)))
    assert not find_attention(gm)
    code = gm.code
    with pytest.raises(UnsupportedModelError, match=words):
        canonicalize_attention(gm)
    assert gm.code == code


def _bias_then_fill_min(m, q, k, v, bias):
    s = (scores(q, k) * SCALE + bias).masked_fill(bias < -1.0, torch.finfo(q.dtype).min)
    return s.softmax(-1) @ v


def test_finite_fill_next_to_a_bias_refused():
    """A bias and a finite fill would be one additive mask, whose rows with no visible key get score
    gradients the model's do not: refused with the reason, graph unchanged."""
    sp = Spelling(_bias_then_fill_min, mask="add")
    gm = capture(Fn(sp.fn).eval(), make_inputs(sp, S, torch.Generator().manual_seed(0)))
    code = gm.code
    with pytest.raises(UnsupportedModelError, match="no visible key"):
        canonicalize_attention(gm)
    assert gm.code == code
