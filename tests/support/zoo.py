"""The model zoo: tiny versions of the models ringify must handle, and of those it must refuse.

Every builder returns a ``ZooModel(name, model, make_inputs)``; ``make_inputs(seed, seq_len)`` draws
FRESH random inputs ``(args, kwargs)`` (token ids, labels with some -100, padding masks with padded keys
in some rows), never constant data: a sharding bug that drops, swaps or duplicates tokens must change
the result. The kwargs carry what ``torch.export`` needs (``use_cache=False``, ``return_dict=True``).

Models are float32, random weights from small configs (no download), dropout 0, ``eval()`` by default;
every builder takes ``train=True`` for the same model in ``train()`` mode (dropout still 0, so the
function is the same, but the graph is captured in training mode).

``ZOO``: models that ringify must rewrite exactly. ``REFUSE``: models with a sequence-mixing op that is
not attention (cumsum, causal conv, topk, sort, roll over the tokens of activations), each with a
minimal attention block too; ringify must raise ``UnsupportedModelError`` for them.
``BUILD_FAILURES``: relatives a user would try that do not build/run here (name -> reason). Without
transformers, ``ZOO`` holds the hand-written models only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ringify.models import TinyGPT, tiny_gpt_inputs

try:
    import transformers
except ImportError:  # the hand-written models still work
    transformers = None

VOCAB = 96
BATCH = 2
HIDDEN = 32
HEADS = 4
LAYERS = 2


class LMOutput(NamedTuple):
    """``.logits`` / ``.loss`` for the hand-written models (a NamedTuple: export flattens it)."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor]


@dataclass
class ZooModel:
    name: str
    model: nn.Module
    make_inputs: Callable[[int, int], tuple[tuple, dict]]  # (seed, seq_len) -> (args, kwargs)


# ------------------------------------------------------------------------------- random inputs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(g, seq_len, vocab=VOCAB, batch=BATCH):
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


def _right_padding(g, seq_len, batch=BATCH):
    """1 = real token, 0 = pad, padded at the end; row 0 always has >= 1 pad, others maybe."""
    keep = torch.ones(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        lo = max(1, seq_len // 2)
        n_real = int(torch.randint(lo, max(lo + 1, seq_len if b == 0 else seq_len + 1), (1,), generator=g))
        keep[b, n_real:] = 0
    return keep


def _scattered_padding(g, seq_len, batch=BATCH):
    """1 = keep, 0 = pad, pads anywhere but position 0 (bidirectional models); every row has >= 1 pad."""
    keep = (torch.rand(batch, seq_len, generator=g) > 0.3).long()
    keep[:, 0] = 1
    for b in range(batch):
        if keep[b].all():
            keep[b, int(torch.randint(1, seq_len, (1,), generator=g))] = 0
    return keep


def _causal_labels(g, seq_len, keep=None, vocab=VOCAB, batch=BATCH):
    """Random next-token labels (HF shifts them inside): ~15% -100 (>= 1 per row), -100 on pads; label 1 real."""
    labels = torch.randint(0, vocab, (batch, seq_len), generator=g)
    drop = torch.rand(batch, seq_len, generator=g) < 0.15
    if seq_len > 2:  # >= 1 per row among the labels that count
        drop[torch.arange(batch), torch.randint(2, seq_len, (batch,), generator=g)] = True
    if keep is not None:
        drop |= keep == 0
    drop[:, 1] = False  # label 1 is predicted from token 0: always real
    labels[drop] = -100
    return labels


# ------------------------------------------------------------------------------- HuggingFace


def _hf(model_cls, config_cls, train, **cfg):
    """Build a transformers model class from its config class, seeded, float32, in the requested mode."""
    if transformers is None:
        raise ImportError("transformers is not installed")
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**cfg)
    model = getattr(transformers, model_cls)(config).float()
    return model.train(train)


def _decoder_cfg(**over):
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=256,
               attention_dropout=0.0, attn_implementation="sdpa")
    cfg.update(over)
    return cfg


def _causal_lm_inputs(seed, seq_len, padded=False):
    g = _gen(seed)
    ids = _ids(g, seq_len)
    kw = dict(input_ids=ids, use_cache=False, return_dict=True)
    keep = None
    if padded:
        keep = _right_padding(g, seq_len)
        kw["attention_mask"] = keep
    kw["labels"] = _causal_labels(g, seq_len, keep)
    return (), kw


def _packed_inputs(seed, seq_len):
    """Several documents per row: ``position_ids`` restart at each boundary (no attention_mask)."""
    g = _gen(seed)
    pos = torch.empty(BATCH, seq_len, dtype=torch.long)
    for b in range(BATCH):
        n_docs = min(int(torch.randint(2, 4, (1,), generator=g)), max(1, seq_len // 2))
        cuts = sorted(torch.randperm(seq_len - 1, generator=g)[: n_docs - 1].add(1).tolist())
        start = 0
        for end in cuts + [seq_len]:
            pos[b, start:end] = torch.arange(end - start)
            start = end
    labels = _causal_labels(g, seq_len)
    labels[pos == 0] = -100  # the first token of a document is not predicted from the previous document
    for b in range(BATCH):  # keep >= 1 real label per row: the first token that continues a document
        cont = (pos[b, 1:] != 0).nonzero()
        if len(cont):
            labels[b, int(cont[0]) + 1] = int(torch.randint(0, VOCAB, (1,), generator=g))
    return (), dict(input_ids=_ids(g, seq_len), position_ids=pos, labels=labels, use_cache=False, return_dict=True)


def llama(impl: str = "sdpa", train: bool = False, padded: bool = False) -> ZooModel:
    """LlamaForCausalLM: GQA (2 kv heads of 4), RoPE, RMSNorm, SwiGLU, labels -> loss."""
    model = _hf("LlamaForCausalLM", "LlamaConfig", train, **_decoder_cfg(attn_implementation=impl))
    name = f"llama_{impl}" + ("_padded" if padded else "")
    return ZooModel(name, model, partial(_causal_lm_inputs, padded=padded))


def llama_packed(train: bool = False) -> ZooModel:
    """Llama with packed documents: position_ids restart at boundaries, HF builds a per-document mask."""
    model = _hf("LlamaForCausalLM", "LlamaConfig", train, **_decoder_cfg())
    return ZooModel("llama_packed", model, _packed_inputs)


def mistral(train: bool = False) -> ZooModel:
    """MistralForCausalLM with a sliding window (4) shorter than the sequence."""
    model = _hf("MistralForCausalLM", "MistralConfig", train, **_decoder_cfg(sliding_window=4))
    return ZooModel("mistral_swa", model, _causal_lm_inputs)


def qwen2(train: bool = False) -> ZooModel:
    """Qwen2ForCausalLM: GQA, q/k/v biases."""
    model = _hf("Qwen2ForCausalLM", "Qwen2Config", train, **_decoder_cfg())
    return ZooModel("qwen2", model, _causal_lm_inputs)


def qwen3(train: bool = False) -> ZooModel:
    """Qwen3ForCausalLM: GQA, per-head q/k RMSNorm before RoPE, explicit head_dim."""
    model = _hf("Qwen3ForCausalLM", "Qwen3Config", train, **_decoder_cfg(head_dim=HIDDEN // HEADS))
    return ZooModel("qwen3", model, _causal_lm_inputs)


def gpt_neox(train: bool = False) -> ZooModel:
    """GPTNeoXForCausalLM: partial rotary (half of each head), parallel residual, fused qkv."""
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, rotary_pct=0.5, max_position_embeddings=256, attention_dropout=0.0,
               hidden_dropout=0.0, attn_implementation="sdpa")
    model = _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", train, **cfg)
    return ZooModel("gpt_neox_partial_rotary", model, _causal_lm_inputs)


def phi(train: bool = False) -> ZooModel:
    """PhiForCausalLM: partial_rotary_factor 0.5, parallel attention/MLP, GELU MLP."""
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=HEADS, partial_rotary_factor=0.5,
               max_position_embeddings=256, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
               attn_implementation="sdpa")
    model = _hf("PhiForCausalLM", "PhiConfig", train, **cfg)
    return ZooModel("phi_partial_rotary", model, _causal_lm_inputs)


def stablelm(train: bool = False) -> ZooModel:
    """StableLmForCausalLM: partial_rotary_factor 0.25, LayerNorm, GQA."""
    model = _hf("StableLmForCausalLM", "StableLmConfig", train,
                **_decoder_cfg(partial_rotary_factor=0.25, hidden_dropout=0.0))
    return ZooModel("stablelm_partial_rotary", model, _causal_lm_inputs)


def gemma(train: bool = False) -> ZooModel:
    """GemmaForCausalLM: embeddings scaled by sqrt(hidden), GeGLU (gelu tanh) MLP, (1 + w) RMSNorm."""
    model = _hf("GemmaForCausalLM", "GemmaConfig", train, **_decoder_cfg(head_dim=HIDDEN // HEADS))
    return ZooModel("gemma", model, _causal_lm_inputs)


def gemma2(train: bool = False, attn_logit_softcapping: float | None = 1.0) -> ZooModel:
    """Gemma2ForCausalLM (eager): tanh soft-capped attention scores and logits, alternating sliding window 4.

    Weights are drawn larger (std 0.2) and the cap is 1, so the cap bends the scores: with the default
    init the scores are ~1e-3 and a cap of 50 would change nothing a test could see.
    """
    model = _hf("Gemma2ForCausalLM", "Gemma2Config", train,
                **_decoder_cfg(head_dim=HIDDEN // HEADS, sliding_window=4, attn_implementation="eager",
                               attn_logit_softcapping=attn_logit_softcapping, initializer_range=0.2,
                               query_pre_attn_scalar=HIDDEN // HEADS))
    return ZooModel("gemma2_softcap_swa", model, _causal_lm_inputs)


def gemma3(train: bool = False) -> ZooModel:
    """Gemma3ForCausalLM (text): q/k RMSNorm, a local RoPE base for sliding layers, sliding + full layers."""
    model = _hf("Gemma3ForCausalLM", "Gemma3TextConfig", train,
                **_decoder_cfg(head_dim=HIDDEN // HEADS, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"]))
    return ZooModel("gemma3", model, _causal_lm_inputs)


def phi3(train: bool = False) -> ZooModel:
    """Phi3ForCausalLM: fused qkv and gate/up projections, GQA."""
    model = _hf("Phi3ForCausalLM", "Phi3Config", train,
                **_decoder_cfg(pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0))
    return ZooModel("phi3_fused_qkv", model, _causal_lm_inputs)


def falcon(train: bool = False) -> ZooModel:
    """FalconForCausalLM, new decoder architecture: fused qkv split by list indexing, 2 kv heads, parallel block."""
    model = _hf("FalconForCausalLM", "FalconConfig", train, vocab_size=VOCAB, hidden_size=HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, new_decoder_architecture=True, num_kv_heads=2,
                hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=256)
    return ZooModel("falcon_gqa", model, _causal_lm_inputs)


def opt(train: bool = False) -> ZooModel:
    """OPTForCausalLM: learned positions offset by 2 and computed from the attention mask's cumsum; padded rows."""
    model = _hf("OPTForCausalLM", "OPTConfig", train, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                ffn_dim=2 * HIDDEN, num_attention_heads=HEADS, max_position_embeddings=256, word_embed_proj_dim=HIDDEN,
                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    return ZooModel("opt_padded", model, partial(_causal_lm_inputs, padded=True))


def gpt_bigcode(train: bool = False) -> ZooModel:
    """GPTBigCodeForCausalLM: multi-query attention (one kv head), learned positions."""
    model = _hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", train, vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                n_head=HEADS, n_positions=256, multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return ZooModel("gpt_bigcode_mqa", model, _causal_lm_inputs)


def roberta(train: bool = False) -> ZooModel:
    """RobertaForMaskedLM: positions from the non-pad tokens' cumsum (padding_idx + 1 onwards), padding mask."""
    model = _hf("RobertaForMaskedLM", "RobertaConfig", train, vocab_size=VOCAB, hidden_size=HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                max_position_embeddings=260, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ZooModel("roberta_mlm_padded", model, _bert_inputs)


def mixtral(train: bool = False) -> ZooModel:
    """MixtralForCausalLM: mixture of 4 experts, top-2, dropless (the experts sort tokens by expert inside)."""
    model = _hf("MixtralForCausalLM", "MixtralConfig", train,
                **_decoder_cfg(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0))
    return ZooModel("mixtral_moe", model, _causal_lm_inputs)


def qwen2_moe(train: bool = False) -> ZooModel:
    """Qwen2MoeForCausalLM: routed experts (top-2 of 4) plus a gated shared expert."""
    model = _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", train,
                **_decoder_cfg(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN,
                               shared_expert_intermediate_size=HIDDEN))
    return ZooModel("qwen2_moe", model, _causal_lm_inputs)


def gpt2(train: bool = False) -> ZooModel:
    """GPT2LMHeadModel (eager): learned positions, Conv1D projections, tied head."""
    if transformers is None:
        raise ImportError("transformers is not installed")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).train(train)
    return ZooModel("gpt2_eager", model, _causal_lm_inputs)


def _bert_inputs(seed, seq_len):
    g = _gen(seed)
    keep = _scattered_padding(g, seq_len)
    labels = torch.full((BATCH, seq_len), -100, dtype=torch.long)
    chosen = (torch.rand(BATCH, seq_len, generator=g) < 0.4) & (keep == 1)
    chosen[:, 0] = True
    labels[chosen] = torch.randint(0, VOCAB, (int(chosen.sum()),), generator=g)
    return (), dict(input_ids=_ids(g, seq_len), attention_mask=keep, labels=labels, return_dict=True)


def bert(train: bool = False) -> ZooModel:
    """BertForMaskedLM (eager): bidirectional, padding attention_mask (1 keep, 0 pad), MLM labels."""
    if transformers is None:
        raise ImportError("transformers is not installed")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=2 * HIDDEN, max_position_embeddings=256,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    model = transformers.BertForMaskedLM(cfg).train(train)
    return ZooModel("bert_mlm_padded", model, _bert_inputs)


# ------------------------------------------------------------------------------- hand-written


def tiny_gpt(train: bool = False) -> ZooModel:
    """``ringify.models.TinyGPT``: the demo model (nanoGPT, tril buffer, learned positions, tied head)."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, d_model=HIDDEN, n_head=HEADS, n_layer=LAYERS, max_len=256).train(train)

    def make_inputs(seed, seq_len):
        return (), tiny_gpt_inputs(seed, BATCH, seq_len, VOCAB)

    return ZooModel("tiny_gpt", model, make_inputs)


class RMSNorm(nn.Module):
    """Hand-written RMSNorm, as LLaMA-style code spells it."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class EinsumBlock(nn.Module):
    """Bidirectional attention in einsum spelling with a [B, S] key-padding mask, then SwiGLU."""

    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads, self.scale = heads, 1.0 / math.sqrt(d // heads)
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.w1, self.w3 = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x, pad):
        B, S, D = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).view(B, S, self.heads, D // self.heads) for lin in (self.q, self.k, self.v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        y = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, S, D)
        x = x + self.o(y)
        h = self.norm2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class EinsumEncoder(nn.Module):
    """A hand-written regression encoder: float features in, per-token predictions out.

    ``forward(x [B,S,F], key_padding_mask [B,S] bool (True = pad), target [B,S,O])``; the loss is the
    per-token MSE averaged over real tokens only (a masked mean: a reduction over the sequence).
    """

    def __init__(self, feat=16, d=HIDDEN, heads=HEADS, layers=LAYERS, out=8):
        super().__init__()
        self.inp = nn.Linear(feat, d)
        self.blocks = nn.ModuleList(EinsumBlock(d, heads, 2 * d) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, out)

    def forward(self, x, key_padding_mask, target=None):
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, key_padding_mask)
        pred = self.head(self.norm(h))
        loss = None
        if target is not None:
            real = (~key_padding_mask).to(pred.dtype)
            per_token = (pred - target).pow(2).mean(-1)
            loss = (per_token * real).sum() / real.sum()
        return LMOutput(pred, loss)


def einsum_encoder(train: bool = False) -> ZooModel:
    torch.manual_seed(0)
    model = EinsumEncoder().train(train)

    def make_inputs(seed, seq_len):
        g = _gen(seed)
        x = torch.randn(BATCH, seq_len, 16, generator=g)
        pad = _scattered_padding(g, seq_len) == 0
        target = torch.randn(BATCH, seq_len, 8, generator=g)
        return (x, pad, target), {}

    return ZooModel("einsum_encoder", model, make_inputs)


# ------------------------------------------------------------------------------- must be refused


class _CausalSDPABlock(nn.Module):
    """The minimal attention block every REFUSE model also has (so the refusal is about the mixer)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(B, S, D))


class CumsumMixer(nn.Module):
    """Running sum over tokens of the hidden states (linear-attention / prefix-sum style)."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return x + self.proj(torch.cumsum(x, dim=1)) * 0.1


class CausalConvMixer(nn.Module):
    """Mamba-style causal depthwise Conv1d over the sequence: kernel 4, padding 3, keep the first S."""

    def __init__(self, d):
        super().__init__()
        self.conv = nn.Conv1d(d, d, kernel_size=4, groups=d, padding=3)

    def forward(self, x):
        S = x.size(1)
        return x + self.conv(x.transpose(1, 2))[..., :S].transpose(1, 2)


class TopkMixer(nn.Module):
    """A router: topk over the sequence of per-token scores, the chosen tokens summarised into every token.

    Needs seq_len >= k (4); export records that as the range [4, inf) of the sequence symbol.
    """

    def __init__(self, d, k=4):
        super().__init__()
        self.k = k
        self.score = nn.Linear(d, 1)

    def forward(self, x):
        scores = self.score(x).squeeze(-1)                          # [B, S]
        vals, idx = torch.topk(scores, self.k, dim=1)               # over the sequence
        chosen = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.size(-1)))
        summary = (chosen * vals.softmax(-1)[..., None]).sum(1, keepdim=True)
        return x + summary


class SortMixer(nn.Module):
    """torch.sort of hidden states along the sequence."""

    def forward(self, x):
        return x + 0.1 * torch.sort(x, dim=1).values


class RollMixer(nn.Module):
    """torch.roll along the sequence: token t sees token t-1 (wrapping around)."""

    def forward(self, x):
        return x + 0.5 * torch.roll(x, shifts=1, dims=1)


class MixerLM(nn.Module):
    """Embedding + learned positions -> causal SDPA block -> mixer -> head, CE loss with ignore_index."""

    def __init__(self, mixer: nn.Module, d=HIDDEN, heads=HEADS, max_len=256):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(max_len, d)
        self.attn = _CausalSDPABlock(d, heads)
        self.mixer = mixer
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.attn(self.wte(idx) + self.wpe(pos))
        logits = self.head(self.norm(self.mixer(x)))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return LMOutput(logits, loss)


def _mixer_lm(name: str, make_mixer: Callable[[], nn.Module], train: bool = False) -> ZooModel:
    torch.manual_seed(0)
    model = MixerLM(make_mixer()).train(train)

    def make_inputs(seed, seq_len):
        return (), tiny_gpt_inputs(seed, BATCH, seq_len, VOCAB)

    return ZooModel(name, model, make_inputs)


# ------------------------------------------------------------------------------- registries

_ZOO_CANDIDATES: dict[str, Callable[..., ZooModel]] = {
    "tiny_gpt": tiny_gpt,
    "einsum_encoder": einsum_encoder,
    "llama_sdpa": partial(llama, "sdpa"),
    "llama_eager": partial(llama, "eager"),
    "llama_sdpa_padded": partial(llama, "sdpa", padded=True),
    "llama_packed": llama_packed,
    "gpt2_eager": gpt2,
    "bert_mlm_padded": bert,
    "mistral_swa": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gpt_neox_partial_rotary": gpt_neox,
    "phi_partial_rotary": phi,
    "stablelm_partial_rotary": stablelm,
    "gemma": gemma,
    "gemma2_softcap_swa": gemma2,
    "gemma3": gemma3,
    "phi3_fused_qkv": phi3,
    "falcon_gqa": falcon,
    "opt_padded": opt,
    "gpt_bigcode_mqa": gpt_bigcode,
    "roberta_mlm_padded": roberta,
    "mixtral_moe": mixtral,
    "qwen2_moe": qwen2_moe,
}

REFUSE: dict[str, Callable[..., ZooModel]] = {
    "cumsum": partial(_mixer_lm, "cumsum", lambda: CumsumMixer(HIDDEN)),
    "causal_conv1d": partial(_mixer_lm, "causal_conv1d", lambda: CausalConvMixer(HIDDEN)),
    "topk": partial(_mixer_lm, "topk", lambda: TopkMixer(HIDDEN)),
    "sort": partial(_mixer_lm, "sort", SortMixer),
    "roll": partial(_mixer_lm, "roll", RollMixer),
}


# Relatives tried that do not build or run here, name -> why (transformers 5.23, torch 2.13 CPU): none so far.
BUILD_FAILURES: dict[str, str] = {}

_HF = {"llama_sdpa", "llama_eager", "llama_sdpa_padded", "llama_packed", "gpt2_eager", "bert_mlm_padded",
       "mistral_swa", "qwen2", "qwen3", "gpt_neox_partial_rotary", "phi_partial_rotary", "stablelm_partial_rotary",
       "gemma", "gemma2_softcap_swa", "gemma3", "phi3_fused_qkv", "falcon_gqa", "opt_padded", "gpt_bigcode_mqa",
       "roberta_mlm_padded", "mixtral_moe", "qwen2_moe"}
ZOO: dict[str, Callable[..., ZooModel]] = {
    name: b for name, b in _ZOO_CANDIDATES.items() if transformers is not None or name not in _HF
}


# =============================================================================== round 2
#
# Families whose attention is not plain scaled-dot-product attention over one sequence, built and
# checked like the zoo above but kept out of ``ZOO`` until the passes support them: ``ROUND2`` (name ->
# builder). Each builder bends the feature under test so that dropping it fails a 1e-5 check, and
# ``ROUND2_FEATURE_OFF`` (name -> function that switches the feature off in place) lets a test prove it.
# ``check_same_function`` is the check every ring test runs (tests/api/test_relatives.py, test_zoo_round2.py).


def check_same_function(zm: ZooModel, seed: int, seq_len: int, ffn_chunk_tokens: int = 3) -> dict:
    """Ringify ``zm.model`` on the current process group and compare it with a copy run whole.

    Logits, loss and every parameter gradient must agree within 1e-5 relative error; a parameter that
    has a gradient in the reference must have one in the ring. Returns the errors.
    """
    import copy

    from ringify import ringify
    from ringify.verify import relative_error, worst_grad_error

    args, kwargs = zm.make_inputs(seed, seq_len)
    reference = copy.deepcopy(zm.model)
    ref = reference(*args, **kwargs)
    ref.loss.backward()

    out = ringify(zm.model, ffn_chunk_tokens=ffn_chunk_tokens)(*args, **kwargs)
    out.loss.backward()
    errors = {"logits": relative_error(out.logits, ref.logits), "loss": relative_error(out.loss, ref.loss)}
    ref_params = dict(reference.named_parameters())
    for n, p in zm.model.named_parameters():
        assert ref_params[n].grad is None or p.grad is not None, f"{zm.name}: no gradient for {n}"
    errors["grad"], worst_param = worst_grad_error(zm.model, reference)
    assert max(errors.values()) < 1e-5, (zm.name, worst_param, errors)
    return errors


@torch.no_grad()
def _scale_params(model: nn.Module, suffix: str, factor: float) -> None:
    """Multiply every parameter whose name ends with ``suffix`` by ``factor`` (to bend a feature)."""
    hit = [p.mul_(factor) for n, p in model.named_parameters() if n.endswith(suffix)]
    assert hit, f"no parameter ends with {suffix!r}"


# ------------------------------------------------------------------------------- round 2: HuggingFace


def _deepseek_v3_cfg(moe: bool):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
                q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                moe_intermediate_size=HIDDEN // 2, first_k_dense_replace=1 if moe else LAYERS,
                attention_dropout=0.0, attn_implementation="sdpa", initializer_range=0.1)


def deepseek_v3(train: bool = False, moe: bool = True) -> ZooModel:
    """DeepseekV3ForCausalLM: multi-head latent attention (q/kv low-rank + RMSNorm, a shared rotary key part,
    interleaved RoPE), qk head dim 8 + 4 = 12 but v head dim 6; layer 1 a dropless MoE (sigmoid router,
    top-2 of 4 routed experts + a shared expert), or all dense. The rotary part of q and k is scaled up
    (x4 on kv_a_proj's rotary rows and q_b_proj's rotary columns) so positions bend the scores."""
    model = _hf("DeepseekV3ForCausalLM", "DeepseekV3Config", train, **_deepseek_v3_cfg(moe))
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.kv_a_proj_with_mqa.weight[attn.kv_lora_rank:] *= 4.0
            q_b = attn.q_b_proj.weight.view(HEADS, attn.qk_head_dim, -1)
            q_b[:, attn.qk_nope_head_dim:] *= 4.0
    return ZooModel("deepseek_v3_mla_moe" if moe else "deepseek_v3_mla_dense", model, _causal_lm_inputs)


def _deepseek_rope_off(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_a_proj_with_mqa.weight[layer.self_attn.kv_lora_rank:] = 0


def gpt_oss(train: bool = False) -> ZooModel:
    """GptOssForCausalLM (eager): a learned per-head attention sink (an extra logit in the softmax that
    takes probability mass and no value), sliding window 3 on layer 0 and full attention on layer 1,
    MoE top-2 of 4 experts with a clamped SwiGLU on every layer, YaRN RoPE (factor 8 over 32 positions).
    Sinks drawn N(1, 1) (not N(0, 0.02)) so they absorb a visible share of every row."""
    model = _hf("GptOssForCausalLM", "GptOssConfig", train,
                **_decoder_cfg(head_dim=HIDDEN // HEADS, sliding_window=3, num_local_experts=4,
                               num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                               attn_implementation="eager", router_aux_loss_coef=0.0,
                               rope_parameters=dict(rope_type="yarn", factor=8.0, beta_fast=32.0, beta_slow=1.0,
                                                    truncate=False, original_max_position_embeddings=32,
                                                    rope_theta=150000.0)))
    with torch.no_grad():
        g = _gen(1)
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(HEADS, generator=g) + 1.0)
    return ZooModel("gpt_oss_sinks_swa_moe", model, _causal_lm_inputs)


def llama4_text(train: bool = False) -> ZooModel:
    """Llama4ForCausalLM (text only): layer 0 RoPE (complex, view_as_complex) + L2 qk-norm with chunked
    causal attention (chunks of 3 tokens), layer 1 NoPE with full causal attention and the position-wise
    attention temperature (floor_scale 2, attn_scale 0.5: the query scale grows with the position);
    layer 1 a MoE (sigmoid router top-1 of 4 + a shared expert, every expert run on every token)."""
    model = _hf("Llama4ForCausalLM", "Llama4TextConfig", train,
                **_decoder_cfg(head_dim=HIDDEN // HEADS, intermediate_size_mlp=2 * HIDDEN,
                               intermediate_size=HIDDEN, num_local_experts=4, num_experts_per_tok=1,
                               moe_layers=[1], no_rope_layers=[1, 0], attention_chunk_size=3,
                               attn_temperature_tuning=True, floor_scale=2, attn_scale=0.5,
                               router_aux_loss_coef=0.0, initializer_range=0.1))
    return ZooModel("llama4_chunked_nope_moe", model, _causal_lm_inputs)


class T5EncoderTagger(nn.Module):
    """T5EncoderModel + a linear token-classification head; the loss is cross-entropy with -100 labels."""

    def __init__(self, encoder: nn.Module, n_classes: int = 8):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.d_model, n_classes)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return LMOutput(logits, loss)


def _t5_cfg():
    return dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN, num_layers=LAYERS,
                num_heads=HEADS, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                dropout_rate=0.0, feed_forward_proj="gated-gelu", attn_implementation="sdpa")


def _t5_encoder_inputs(seed, seq_len, n_classes=8):
    g = _gen(seed)
    keep = _scattered_padding(g, seq_len)
    labels = torch.randint(0, n_classes, (BATCH, seq_len), generator=g)
    labels[(torch.rand(BATCH, seq_len, generator=g) < 0.15) | (keep == 0)] = -100
    labels[:, 0] = torch.randint(0, n_classes, (BATCH,), generator=g)
    if seq_len > 2:
        labels[:, -1] = -100
    return (), dict(input_ids=_ids(g, seq_len), attention_mask=keep, labels=labels)


def t5_encoder(train: bool = False) -> ZooModel:
    """T5EncoderModel + tagging head: bidirectional attention with T5's bucketed relative position bias
    (8 buckets, max distance 16, shared by the layers, added to the scores; no 1/sqrt(d) scaling) and a
    scattered padding mask. The bias table is scaled x10 so relative positions bend the scores."""
    model = _hf("T5EncoderModel", "T5Config", train, **_t5_cfg())
    _scale_params(model, "relative_attention_bias.weight", 10.0)
    torch.manual_seed(1)
    tagger = T5EncoderTagger(model).train(train)
    return ZooModel("t5_encoder_relbias_padded", tagger, _t5_encoder_inputs)


def _t5_seq2seq_inputs(seed, seq_len):
    """Source ids + padding mask, and target labels (-100 somewhere, never the first): the decoder's
    inputs are the labels shifted right inside the model. Source and target are both ``seq_len`` long."""
    g = _gen(seed)
    keep = _scattered_padding(g, seq_len)
    labels = torch.randint(2, VOCAB, (BATCH, seq_len), generator=g)
    drop = torch.rand(BATCH, seq_len, generator=g) < 0.15
    if seq_len > 2:
        drop[torch.arange(BATCH), torch.randint(1, seq_len, (BATCH,), generator=g)] = True
    drop[:, 0] = False
    labels[drop] = -100
    return (), dict(input_ids=_ids(g, seq_len), attention_mask=keep, labels=labels, use_cache=False,
                    return_dict=True)


def t5_seq2seq(train: bool = False) -> ZooModel:
    """T5ForConditionalGeneration with labels: encoder (bidirectional, padded, relative bias), decoder
    (causal self-attention with its own unidirectional relative bias, cross-attention to the encoder
    with the source padding mask), decoder inputs = labels shifted right (-100 -> pad), tied head scaled
    by d_model**-0.5. Both bias tables scaled x10."""
    model = _hf("T5ForConditionalGeneration", "T5Config", train, **_t5_cfg(), decoder_start_token_id=0)
    _scale_params(model, "relative_attention_bias.weight", 10.0)
    return ZooModel("t5_seq2seq_relbias", model, _t5_seq2seq_inputs)


def bloom(train: bool = False) -> ZooModel:
    """BloomForCausalLM: ALiBi (per-head slopes times the key position from the attention mask's cumsum)
    added through ``baddbmm``, fused qkv, embedding LayerNorm, right-padded rows. The slopes for 4 heads
    are 1/4 ... 1/256 times distances up to the sequence length: they bend the scores as they are."""
    model = _hf("BloomForCausalLM", "BloomConfig", train, vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                n_head=HEADS, hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.1)
    return ZooModel("bloom_alibi_padded", model, partial(_causal_lm_inputs, padded=True))


# ------------------------------------------------------------------------------- round 2: hand-written


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """torchtitan's complex rotary table: ``[end, dim // 2]`` complex64, ``polar(1, t * freq)``."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(xq, xk, freqs_cis):
    """torchtitan's complex RoPE: pairs of features as complex numbers times the table ([S, D/2] -> [1, S, 1, D/2])."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class TitanAttention(nn.Module):
    def __init__(self, d, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.wq = nn.Linear(d, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, x, freqs_cis):
        B, S, _ = x.shape
        xq = self.wq(x).view(B, S, self.heads, self.head_dim)
        xk = self.wk(x).view(B, S, self.kv_heads, self.head_dim)
        xv = self.wv(x).view(B, S, self.kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        rep = self.heads // self.kv_heads  # torchtitan's repeat_kv
        xk = xk[:, :, :, None, :].expand(B, S, self.kv_heads, rep, self.head_dim).reshape(B, S, self.heads, -1)
        xv = xv[:, :, :, None, :].expand(B, S, self.kv_heads, rep, self.head_dim).reshape(B, S, self.heads, -1)
        xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
        out = F.scaled_dot_product_attention(xq, xk, xv, is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(B, S, -1))


class TitanBlock(nn.Module):
    def __init__(self, d, heads, kv_heads, ffn):
        super().__init__()
        self.attention = TitanAttention(d, heads, kv_heads)
        self.attention_norm, self.ffn_norm = RMSNorm(d), RMSNorm(d)
        self.w1, self.w3 = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.w2 = nn.Linear(ffn, d, bias=False)

    def forward(self, x, freqs_cis):
        x = x + self.attention(self.attention_norm(x), freqs_cis)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class TitanLlama(nn.Module):
    """A torchtitan-style Llama: ``freqs_cis`` (complex) a non-persistent buffer of ``max_len`` rows,
    sliced ``[0:S]`` in forward; complex RoPE; GQA by expand/reshape; causal SDPA; CE loss on labels
    that are already shifted (torchtitan's dataloader shifts them)."""

    def __init__(self, d=HIDDEN, heads=HEADS, kv_heads=2, layers=LAYERS, max_len=256, rope_theta=100.0):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, d)
        self.register_buffer("freqs_cis", precompute_freqs_cis(d // heads, max_len, rope_theta), persistent=False)
        self.layers = nn.ModuleList(TitanBlock(d, heads, kv_heads, 2 * d) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.output = nn.Linear(d, VOCAB, bias=False)

    def forward(self, tokens, labels=None):
        S = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[0:S]
        for layer in self.layers:
            h = layer(h, freqs_cis)
        logits = self.output(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return LMOutput(logits, loss)


def _token_label_inputs(seed, seq_len, ids_name="tokens", labels_name="labels"):
    """Random ids and random (already aligned) labels, ~15% -100 and >= 1 per row, token 0's label real."""
    g = _gen(seed)
    ids = _ids(g, seq_len)
    return (), {ids_name: ids, labels_name: _causal_labels(g, seq_len)}


def titan_llama(train: bool = False) -> ZooModel:
    """Hand-written torchtitan Llama with complex RoPE (theta 100 so the rotation turns fast over a few tokens)."""
    torch.manual_seed(0)
    model = TitanLlama().train(train)
    return ZooModel("titan_llama_complex_rope", model, _token_label_inputs)


def _titan_rope_off(model):
    model.freqs_cis.copy_(torch.ones_like(model.freqs_cis))


class ViTBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTEncoder(nn.Module):
    """A timm-style ViT over pre-patchified features: ``[B, S, F]`` -> linear patch embedding -> a learned
    CLS token prepended (``torch.cat`` over the sequence: S + 1 tokens) -> learned position embedding
    -> non-causal SDPA blocks -> ``head(x[:, 0])``: class logits [B, C] and cross-entropy on ``labels [B]``."""

    def __init__(self, feat=12, d=HIDDEN, heads=HEADS, layers=LAYERS, n_classes=10, max_len=257):
        super().__init__()
        self.patch_embed = nn.Linear(feat, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, d) * 0.5)
        self.blocks = nn.ModuleList(ViTBlock(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, patches, labels=None):
        B, S, _ = patches.shape
        x = self.patch_embed(patches)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : S + 1]
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.norm(x)[:, 0])
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return LMOutput(logits, loss)


def vit_cls(train: bool = False) -> ZooModel:
    """Hand-written ViT: CLS token concatenated in front, learned positions (std 0.5, so they bend), pooled head."""
    torch.manual_seed(0)
    model = ViTEncoder().train(train)

    def make_inputs(seed, seq_len):
        g = _gen(seed)
        return (torch.randn(BATCH, seq_len, 12, generator=g), torch.randint(0, 10, (BATCH,), generator=g)), {}

    return ZooModel("vit_cls_token", model, make_inputs)


class ShiftedLossLM(nn.Module):
    """A causal LM that shifts in the loss: ``F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:]
    .reshape(-1))`` with full-length logits. With ``keep_last=k`` it computes the head on
    ``hidden[:, -k:]`` only (HF's ``logits_to_keep``) and the loss on those k positions' next tokens."""

    def __init__(self, d=HIDDEN, heads=HEADS, layers=LAYERS, max_len=256, keep_last: int = 0):
        super().__init__()
        self.keep_last = keep_last
        self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(_CausalSDPABlock(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids, labels=None):
        S = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(S, device=input_ids.device))
        for blk in self.blocks:
            x = blk(x)
        hidden = self.norm(x)
        if self.keep_last:
            hidden = hidden[:, -self.keep_last:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            k = logits.shape[1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, S - k + 1:].reshape(-1),
                                   ignore_index=-100)
        return LMOutput(logits, loss)


def _shifted_inputs(seed, seq_len, keep_last=0):
    """Labels = the ids themselves (the model shifts), ~15% -100, >= 1 real among the ones the loss reads."""
    g = _gen(seed)
    ids = _ids(g, seq_len)
    labels = ids.clone()
    drop = torch.rand(BATCH, seq_len, generator=g) < 0.15
    first = seq_len - keep_last + 1 if keep_last else 1  # the first label the loss reads
    drop[:, first] = False
    if seq_len - first > 1:
        drop[torch.arange(BATCH), torch.randint(first + 1, seq_len, (BATCH,), generator=g)] = True
    labels[drop] = -100
    return (), dict(input_ids=ids, labels=labels)


def shifted_loss_lm(train: bool = False) -> ZooModel:
    torch.manual_seed(0)
    return ZooModel("shifted_loss_lm", ShiftedLossLM().train(train), _shifted_inputs)


def shifted_loss_lm_keep_last(train: bool = False, keep_last: int = 3) -> ZooModel:
    """ShiftedLossLM with ``hidden[:, -3:]`` before the head: logits [B, 3, V], loss on the last 2 positions."""
    torch.manual_seed(0)
    return ZooModel("shifted_loss_lm_keep_last", ShiftedLossLM(keep_last=keep_last).train(train),
                    partial(_shifted_inputs, keep_last=keep_last))


# ------------------------------------------------------------------------------- round 2 registries

_ROUND2_CANDIDATES: dict[str, Callable[..., ZooModel]] = {
    "titan_llama_complex_rope": titan_llama,
    "vit_cls_token": vit_cls,
    "shifted_loss_lm": shifted_loss_lm,
    "shifted_loss_lm_keep_last": shifted_loss_lm_keep_last,
    "deepseek_v3_mla_moe": deepseek_v3,
    "deepseek_v3_mla_dense": partial(deepseek_v3, moe=False),
    "gpt_oss_sinks_swa_moe": gpt_oss,
    "llama4_chunked_nope_moe": llama4_text,
    "t5_encoder_relbias_padded": t5_encoder,
    "t5_seq2seq_relbias": t5_seq2seq,
    "bloom_alibi_padded": bloom,
}
_ROUND2_HF = {"deepseek_v3_mla_moe", "deepseek_v3_mla_dense", "gpt_oss_sinks_swa_moe", "llama4_chunked_nope_moe",
              "t5_encoder_relbias_padded", "t5_seq2seq_relbias", "bloom_alibi_padded"}
ROUND2: dict[str, Callable[..., ZooModel]] = {
    name: b for name, b in _ROUND2_CANDIDATES.items() if transformers is not None or name not in _ROUND2_HF
}


def _params_set(suffix: str, value: float):
    def off(model):
        with torch.no_grad():
            hit = [p.fill_(value) for n, p in model.named_parameters() if n.endswith(suffix)]
        assert hit, suffix
    return off


def _llama4_chunks_off(model):
    model.config.layer_types = ["full_attention"] * len(model.config.layer_types)


def _llama4_temperature_off(model):
    for layer in model.model.layers:
        layer.self_attn.attn_temperature_tuning = False


def _bloom_alibi_off(model):
    """Zero ALiBi: patches bloom's module-level ``build_alibi_tensor`` (returns the patcher to undo it)."""
    from unittest import mock

    from transformers.models.bloom import modeling_bloom

    real = modeling_bloom.build_alibi_tensor
    patcher = mock.patch.object(modeling_bloom, "build_alibi_tensor",
                                lambda mask, heads, dtype: real(mask, heads, dtype).zero_())
    patcher.start()
    return patcher


def _vit_positions_off(model):
    with torch.no_grad():
        model.pos_embed.zero_()


# name -> functions that each switch one bent feature off in the built model, in place: the loss must move
# (tests/api/test_zoo_round2.py). A function may return an object with ``stop()`` that undoes a patch.
ROUND2_FEATURE_OFF: dict[str, list[Callable[[nn.Module], object]]] = {
    "titan_llama_complex_rope": [_titan_rope_off],
    "vit_cls_token": [_vit_positions_off],
    "deepseek_v3_mla_moe": [_deepseek_rope_off, _params_set("mlp.experts.down_proj", 0.0)],
    "deepseek_v3_mla_dense": [_deepseek_rope_off],
    "gpt_oss_sinks_swa_moe": [_params_set("self_attn.sinks", -1e4),
                              lambda m: setattr(m.config, "layer_types", ["full_attention"] * 2)],
    "llama4_chunked_nope_moe": [_llama4_chunks_off, _llama4_temperature_off],
    "t5_encoder_relbias_padded": [_params_set("relative_attention_bias.weight", 0.0)],
    "t5_seq2seq_relbias": [_params_set("relative_attention_bias.weight", 0.0)],
    "bloom_alibi_padded": [_bloom_alibi_off],
}
