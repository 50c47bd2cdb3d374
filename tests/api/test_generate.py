"""rm.generate on real gloo rings: the tokens HF's generate returns, on every rank, for the model families
ringify rewrites (GQA, sliding windows, soft-capping, learned and rotary positions, hand-written models),
left-padded batches, sampling with HF's warpers; a prefill that never computes logits; bad input refused
on every rank without a hang."""

from __future__ import annotations

import copy

import pytest
import torch

from ringify import ringify
from ringify.launch import RankFailure
from ringify.verify import reference_generate
from zoo import VOCAB, ZOO

GREEDY = ["llama_sdpa", "qwen2", "mistral_swa", "gpt2_eager", "gemma2_softcap_swa", "tiny_gpt"]
QUICK = {"llama_sdpa", "tiny_gpt"}


def _prompt(seed: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padding(seed: int, batch: int, length: int) -> torch.Tensor:
    """1 = token, 0 = padding at the start; row 0 padded by 1-3 tokens, the others maybe not."""
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        pads = int(torch.randint(1 if b == 0 else 0, 4, (1,), generator=g))
        mask[b, :pads] = 0
    return mask


def check_greedy(name: str, seed: int, prompt_len: int, new_tokens: int, padded: bool = False, layout: str = "zigzag"):
    zm = ZOO[name]()
    reference = copy.deepcopy(zm.model)
    ids = _prompt(seed, 2, prompt_len)
    mask = _left_padding(seed, 2, prompt_len) if padded else None
    pad = 0 if padded else None
    if padded:
        ids = ids.masked_fill(mask == 0, pad)
    expected, _ = reference_generate(reference, ids, new_tokens, mask, pad)
    rm = ringify(zm.model, layout=layout)
    got = rm.generate(ids, max_new_tokens=new_tokens, attention_mask=mask, pad_token_id=pad)
    assert torch.equal(got, expected), (name, got, expected)
    return got, rm.cache_bytes


def check_pad_id_inside_the_prompt():
    """Gemma-2's config has pad_token_id 0: a 0 inside an unpadded prompt is masked as padding by HF's generate
    when no attention mask is given, and rm.generate does the same (the prompt below: that mask bends the tokens)."""
    zm = ZOO["gemma2_softcap_swa"]()
    reference = copy.deepcopy(zm.model)
    ids = _prompt(328476383, 2, 11)
    assert zm.model.config.pad_token_id == 0 and (ids == 0).any()
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    unmasked = reference.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert not torch.equal(expected, unmasked)
    assert torch.equal(ringify(zm.model).generate(ids, max_new_tokens=6), expected)
    return expected


def test_pad_id_inside_the_prompt_as_hf_generate(ranks):
    results = ranks(2).run(check_pad_id_inside_the_prompt)
    assert torch.equal(results[0], results[1])


def _params(names, worlds):
    return [pytest.param(n, w, id=f"{n}-{w}", marks=[] if n in QUICK else [pytest.mark.slow]) for n in names for w in worlds]


@pytest.mark.parametrize("name,world_size", _params(GREEDY, [2, 3]))
def test_greedy_tokens_equal_hf_generate(ranks, seed, name, world_size):
    prompt_len = 4 * world_size + 3  # odd, longer than the zoo's sliding windows (4)
    results = ranks(world_size).run(check_greedy, name, seed, prompt_len, 6)
    assert all(torch.equal(tokens, results[0][0]) for tokens, _ in results)


@pytest.mark.parametrize("name", ["llama_sdpa", pytest.param("mistral_swa", marks=pytest.mark.slow)])
def test_left_padded_batch(ranks, seed, name):
    ranks(2).run(check_greedy, name, seed, 11, 5, True)


@pytest.mark.parametrize("layout", ["contiguous", "striped"])
def test_other_layouts(ranks, seed, layout):
    """The cache holds the prompt at the layout's positions (striped: not contiguous runs) and decodes the same."""
    ranks(3).run(check_greedy, "llama_sdpa", seed, 14, 5, True, layout)


def check_sampling(name: str, seed: int, prompt_len: int, new_tokens: int):
    """Sampled tokens: rank 0's draw on every rank (each rank's own generator differs); each step's processed
    scores equal HF's warpers on the untouched model's logits for the same prefix."""
    import torch.distributed as dist
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    zm = ZOO[name]()
    reference = copy.deepcopy(zm.model)
    ids = _prompt(seed, 2, prompt_len)
    rm = ringify(zm.model)
    generator = torch.Generator().manual_seed(seed + dist.get_rank())
    tokens, scores = rm.generate(ids, max_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_k=30, top_p=0.9,
                                 generator=generator, eos_token_id=[], output_scores=True)
    assert tokens.shape == (2, prompt_len + new_tokens)
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(30), TopPLogitsWarper(0.9)])
    with torch.no_grad():
        for step, got in enumerate(scores):
            prefix = tokens[:, : prompt_len + step]
            expected = warp(prefix, reference(prefix).logits[:, -1].float())
            kept = torch.isfinite(expected)
            assert torch.equal(kept, torch.isfinite(got)), f"step {step}: a different set of tokens survives the warpers"
            assert torch.allclose(got[kept], expected[kept], rtol=1e-5, atol=1e-5), step
            p_got, p_ref = torch.softmax(got, -1), torch.softmax(expected, -1)
            assert (p_got - p_ref).abs().max() < 1e-5, step
            chosen = tokens[:, prompt_len + step]
            assert bool(kept[torch.arange(2), chosen].all()), "a token outside the warped support was drawn"
    # left None, top-k is the generation_config's or HF's default (50), as model.generate(do_sample=True) takes it
    _, default_scores = rm.generate(ids, max_new_tokens=1, do_sample=True, generator=generator, output_scores=True)
    hf = reference.generate(ids, max_new_tokens=1, do_sample=True, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(torch.isfinite(default_scores[0]), torch.isfinite(hf.scores[0]))
    return tokens


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampling_same_tokens_everywhere_and_hf_distributions(ranks, seed, world_size):
    results = ranks(world_size).run(check_sampling, "llama_sdpa", seed, 3 * world_size + 2, 6)
    assert all(torch.equal(r, results[0]) for r in results)


def check_prefill_keeps_the_cache(name: str, seed: int, prompt_len: int):
    """The prefill graph has no vocabulary-sized product (no logits) and leaves ceil(S/W) tokens per rank."""
    import torch.distributed as dist

    from ringify.generate import Inputs
    from ringify.runtime.layout import shard_lengths

    zm = ZOO[name]()
    ids = _prompt(seed, 2, prompt_len)
    rm = ringify(zm.model)
    rm.generate(ids, max_new_tokens=1)
    graphs = next(iter(rm._generation.values()))
    for node in graphs.prefill.graph.nodes:
        val = node.meta.get("val")
        assert not (isinstance(val, torch.Tensor) and val.dim() >= 2 and val.shape[-1] == VOCAB), \
            f"the prefill computes {node.name} {tuple(val.shape)}: vocabulary-sized"
    world = dist.get_world_size()
    mine = shard_lengths(prompt_len, world, rm.layout)[dist.get_rank()]
    assert mine <= -(-prompt_len // world)
    assert isinstance(graphs.inputs, Inputs)
    return mine, rm.cache_bytes


def test_prefill_computes_no_logits_and_caches_a_shard(ranks, seed):
    results = ranks(3).run(check_prefill_keeps_the_cache, "llama_sdpa", seed, 13)
    assert sum(n for n, _ in results) == 13
    assert all(b > 0 for _, b in results)


def _bad_request(kind: str, seed: int):
    import torch.distributed as dist

    zm = ZOO["gpt2_eager"]()
    rm = ringify(zm.model)
    if kind == "short":
        rm.generate(_prompt(seed, 1, dist.get_world_size() - 1), max_new_tokens=2)
    elif kind == "positions":
        rm.generate(_prompt(seed, 1, 9), max_new_tokens=300)  # GPT-2's table here has 256 positions
    else:
        rm.generate(_prompt(seed + dist.get_rank(), 1, 9), max_new_tokens=2)


@pytest.mark.parametrize("kind,words", [("short", "prompt has 2 tokens but the ring has 3"),
                                        ("positions", "takes at most 256"), ("different", "differ between ranks")])
def test_bad_requests_raise_on_every_rank(ranks, seed, kind, words):
    with pytest.raises(RankFailure) as failure:
        ranks(3).run(_bad_request, kind, seed, timeout=60)
    assert sorted(failure.value.failures) == [0, 1, 2]
    assert all(words in text for text in failure.value.failures.values()), failure.value


def _bidirectional(seed: int):
    ringify(ZOO["bert_mlm_padded"]().model).generate(_prompt(seed, 2, 9), max_new_tokens=2)


@pytest.mark.skipif("bert_mlm_padded" not in ZOO, reason="needs transformers")
def test_bidirectional_attention_is_refused(ranks, seed):
    with pytest.raises(RankFailure) as failure:
        ranks(2).run(_bidirectional, seed, timeout=60)
    assert sorted(failure.value.failures) == [0, 1]
    assert all("bidirectional" in text for text in failure.value.failures.values()), failure.value


class RopeLM(torch.nn.Module):
    """Hand-written: rotary positions from ``arange`` (no position ids), GQA by ``repeat_interleave``, causal SDPA,
    a sliding window in the second layer as a hand-built ``tril``/``triu`` bool mask."""

    def __init__(self, vocab=VOCAB, d=32, heads=4, kv_heads=2, layers=2, window=5):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.window = heads, kv_heads, d // heads, window
        self.embed = torch.nn.Embedding(vocab, d)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(d, (heads + 2 * kv_heads) * self.hd) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def rotate(self, x, pos):
        half = self.hd // 2
        freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
        angle = pos[:, None].float() * freq[None, :]
        cos, sin = angle.cos(), angle.sin()
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def forward(self, ids):
        b, t = ids.shape
        x = self.embed(ids)
        pos = torch.arange(t, device=ids.device)
        for i, (qkv, out) in enumerate(zip(self.qkv, self.out)):
            q, k, v = qkv(x).split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
            q = self.rotate(q.view(b, t, self.heads, self.hd).transpose(1, 2), pos)
            k = self.rotate(k.view(b, t, self.kv_heads, self.hd).transpose(1, 2), pos)
            v = v.view(b, t, self.kv_heads, self.hd).transpose(1, 2)
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            if i == 1:
                keep = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril().triu(-(self.window - 1))
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            else:
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + out(y.transpose(1, 2).reshape(b, t, -1))
        return self.head(self.norm(x))


def check_rope_lm(seed: int, prompt_len: int, new_tokens: int):
    torch.manual_seed(0)
    model = RopeLM().eval()
    for p in model.parameters():  # weights large enough that a dropped window or position changes the tokens
        torch.nn.init.normal_(p, std=0.5)
    ids = _prompt(seed, 2, prompt_len)
    expected, how = reference_generate(model, ids, new_tokens)
    assert how.startswith("greedy loop")
    got = ringify(copy.deepcopy(model)).generate(ids, max_new_tokens=new_tokens)
    assert torch.equal(got, expected), (got, expected)
    return got


@pytest.mark.parametrize("world_size", [2, 3])
def test_hand_written_rotary_model(ranks, seed, world_size):
    results = ranks(world_size).run(check_rope_lm, seed, 3 * world_size + 4, 6)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("case", ["causal", "window_finite_fill", "padding_bias_softcap", "no_key_visible"])
def test_decode_kernel_equals_the_reference_tiles(monkeypatch, seed, case):
    """The decode kernel (a few query rows against a cache at scattered positions, in key blocks) against the
    plain-torch block kernel the ring uses: output and log-sum-exp state, several key blocks."""
    from ringify.runtime import block_attention as ba

    monkeypatch.setattr(ba, "DECODE_BLOCK", 7)
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, d, n = 2, 4, 2, 8, 23
    k_pos = torch.randperm(60, generator=g)[:n].sort().values
    q_pos = torch.tensor([int(k_pos[-1]) + (0 if case == "no_key_visible" else 1)])
    q = torch.randn(b, h, 1, d, generator=g) * 3
    k, v = torch.randn(b, hkv, n, d, generator=g) * 3, torch.randn(b, hkv, n, d, generator=g)
    keep_rows = torch.rand(b, 64, generator=g) > 0.3
    bias = torch.randn(b, 64, generator=g)
    options = {"causal": True}
    if case == "window_finite_fill":
        options.update(mask_fn=lambda qp, kp: (qp[:, None] - kp[None, :]) < 20, fill=torch.finfo(torch.float32).min)
    elif case == "padding_bias_softcap":
        options.update(mask_fn=lambda qp, kp: bias[:, None, None, kp] + torch.where(keep_rows[:, None, None, kp], 0.0, float("-inf")),
                       softcap=2.0)
    elif case == "no_key_visible":
        options.update(mask_fn=lambda qp, kp: (kp[None, :] > 1000).expand(len(qp), -1), causal=False)
    extended = "mask_fn" in options
    out = torch.zeros(b, h, 1, d)
    lse = torch.full((2, b, h, 1) if extended else (b, h, 1), float("-inf"))
    if extended:
        lse[1] = 0
    ba.torch_block_forward(q, k, v, out, lse, q_pos, k_pos, scale=0.3, **options)
    got_out, got_lse = ba.attend_keys(q, k, v, q_pos, k_pos, scale=0.3, **options)
    assert torch.allclose(got_out, out, atol=1e-6, rtol=1e-5)
    if extended:  # the same state up to how (maximum, log-sum) split the same total
        total, got_total = lse[0] + lse[1], got_lse[0] + got_lse[1]
        assert torch.equal(torch.isneginf(total), torch.isneginf(got_total))
        finite = torch.isfinite(total)  # each total sums two parts that may nearly cancel: their size sets the error
        parts = (lse[0].abs() + lse[1].abs())[finite]
        assert ((got_total[finite] - total[finite]).abs() <= 1e-6 * parts).all()
    else:
        assert torch.allclose(got_lse, lse, rtol=1e-6)


def check_eos(seed: int, prompt_len: int, new_tokens: int):
    """Stopping as HF does: a row that draws eos is padded afterwards; the loop ends when every row has."""
    zm = ZOO["llama_sdpa"]()
    reference = copy.deepcopy(zm.model)
    ids = _prompt(seed, 2, prompt_len)
    free = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    rm = ringify(zm.model)
    for eos in {int(free[0, prompt_len + 1]), int(free[1, prompt_len])}:  # row 0 stops at its 2nd token; row 1 at its 1st
        expected = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
        got = rm.generate(ids, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got, expected), (eos, got, expected)
    both = [int(free[0, prompt_len]), int(free[1, prompt_len])]  # every row stops at once: the loop ends early
    got = rm.generate(ids, max_new_tokens=new_tokens, eos_token_id=both, pad_token_id=0)
    assert got.shape[1] == prompt_len + 1 and torch.equal(got, reference.generate(
        ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=both, pad_token_id=0))
    return got


def test_stops_at_eos_like_hf(ranks, seed):
    ranks(2).run(check_eos, seed, 9, 6)
