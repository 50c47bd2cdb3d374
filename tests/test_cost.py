"""The cost model (ringify.cost): formulas on hand-computed cases, and predicted memory against the memory
measured on CPU gloo ranks for a small Llama and a nanoGPT-style model."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from ringify import ringify
from ringify.capture import capture
from ringify.cost import HARDWARE, Hardware, ModelProfile, cost_summary, estimate, max_context, profile_model
from ringify.memory import PeakMemory
from ringify.passes.attention import canonicalize_attention

MIB = 2**20
TOLERANCE = 0.25


def synthetic(**over) -> ModelProfile:
    """A model profile with round numbers: 8 heads, 2 kv heads, head dim 64, bf16, batch 1, training."""
    fields = dict(model="synthetic", layers=4, heads=8, kv_heads=2, head_dim=64, hidden=512, parameters=1_000_000,
                  parameter_bytes=2_000_000, gradient_bytes=2_000_000, dtype_bytes=2, batch=1, training=True,
                  causal=False, masked=False, step_peak_lines=[[2_000_000, 10_000]],
                  attention_backward_lines=[[1_000_000, 8_000], [1_500_000, 6_000]],
                  attention_forward_lines=[[0, 2_000], [0, 5_000]], output_bytes_per_token=100,
                  kernel_workspace={"forward": {"one_piece": [1, 2], "pieces": [1, 2]},
                                    "backward": {"one_piece": [2, 2], "pieces": [2, 2]}})
    fields.update(over)
    return ModelProfile(**fields)


FLAT = Hardware("flat", "round numbers", flops=1e12, bandwidth=1e9, memory=2**30)


# ------------------------------------------------------------------------------------------ formulas


def test_hardware_table_has_the_named_profiles():
    for name in ("h100-nvlink", "h100-ib", "h200-nvlink", "a100-nvlink", "a100-ib", "cpu-gloo"):
        hw = HARDWARE[name]
        assert hw.name == name and hw.flops > 0 and hw.bandwidth > 0 and hw.memory > 0
    assert HARDWARE["h100-nvlink"].bandwidth == 450e9 and HARDWARE["h100-ib"].bandwidth == 50e9
    assert HARDWARE["a100-nvlink"].bandwidth == 300e9 and HARDWARE["a100-ib"].bandwidth == 25e9


def test_estimate_has_the_documented_shape_and_is_json():
    out = estimate(synthetic(), 8192, 4, FLAT)
    assert set(out) == {"seq_len", "world_size", "hardware", "per_device", "ring_step", "steps_per_layer"}
    assert set(out["per_device"]) == {"parameters", "gradients", "activations", "kv_buffers", "attention_workspace",
                                      "total", "fits"}
    assert set(out["ring_step"]) == {"block_tokens", "bytes_sent", "compute_seconds", "transfer_seconds",
                                     "min_block_tokens", "transfer_hidden"}
    assert out["steps_per_layer"] == 4 and out["hardware"]["name"] == "flat"
    device = out["per_device"]
    assert device["total"] == sum(device[k] for k in ("parameters", "gradients", "activations", "kv_buffers",
                                                      "attention_workspace"))
    json.dumps(out)


def test_bytes_and_seconds_of_one_ring_step():
    # S = 8192 on W = 4: block c = 2048 tokens; K and V of 2 kv heads x 64 dims in bf16
    kv = 2 * 1 * 2 * 2048 * 64 * 2                 # 1 MiB forward
    dkv = 2 * 1 * 2 * 2048 * 64 * (2 + 4)          # backward: K, V again and the fp32 dK, dV
    flops = 4 * 1 * 8 * 2048**2 * 64               # forward QK^T and PV, 8 query heads, full attention
    step = estimate(synthetic(training=False), 8192, 4, FLAT)["ring_step"]
    assert step["block_tokens"] == 2048 and step["bytes_sent"] == kv == 2**20
    assert step["compute_seconds"] == pytest.approx(flops / 1e12)
    assert step["transfer_seconds"] == pytest.approx(kv / 1e9)
    step = estimate(synthetic(), 8192, 4, FLAT)["ring_step"]
    assert step["bytes_sent"] == kv + dkv
    assert step["compute_seconds"] == pytest.approx(3.5 * flops / 1e12)
    assert step["transfer_seconds"] == pytest.approx((kv + dkv) / 1e9)
    causal = estimate(synthetic(causal=True), 8192, 4, FLAT)["ring_step"]  # zigzag: half of each block pair
    assert causal["compute_seconds"] == pytest.approx(3.5 * flops / 2 / 1e12) and causal["bytes_sent"] == kv + dkv
    assert estimate(synthetic(), 8192, 4, FLAT, block_tokens=512)["ring_step"]["bytes_sent"] == (kv + dkv) // 4
    alone = estimate(synthetic(), 8192, 1, FLAT)  # no ring: nothing to send
    assert alone["ring_step"]["bytes_sent"] == 0 and alone["per_device"]["kv_buffers"] == 0


def test_min_block_is_the_ring_attention_papers_condition():
    # full multi-head attention in bf16, forward: c >= flops / bandwidth (Liu et al. 2023, A100 figures)
    mha = synthetic(heads=8, kv_heads=8, training=False)
    a100_nvlink = Hardware("a100", "", flops=312e12, bandwidth=300e9, memory=80e9)
    a100_ib = Hardware("a100-ib100", "", flops=312e12, bandwidth=12.5e9, memory=80e9)
    assert estimate(mha, 4096, 2, a100_nvlink)["ring_step"]["min_block_tokens"] == 1040
    assert estimate(mha, 4096, 2, a100_ib)["ring_step"]["min_block_tokens"] == 24960
    # GQA sends H_kv / H of the bytes; causal halves the compute; fp32 doubles the bytes
    gqa = synthetic(heads=8, kv_heads=2, training=False)
    assert estimate(gqa, 4096, 2, a100_nvlink)["ring_step"]["min_block_tokens"] == 260
    assert estimate(synthetic(heads=8, kv_heads=8, training=False, causal=True), 4096, 2,
                    a100_nvlink)["ring_step"]["min_block_tokens"] == 2080
    # training: the backward (K, V + fp32 dK, dV against 2.5x the FLOPs) binds: (2 + 4) / 5 > 2 / 2
    train = synthetic(heads=8, kv_heads=8, training=True)
    assert estimate(train, 4096, 2, a100_nvlink)["ring_step"]["min_block_tokens"] == math.ceil(312e12 / 300e9 * 6 / 5)


@pytest.mark.parametrize("profile", [synthetic(), synthetic(training=False, causal=True), synthetic(kv_heads=8)])
@pytest.mark.parametrize("hw", ["h100-nvlink", "h100-ib", "a100-ib", "cpu-gloo"])
def test_transfer_hides_exactly_from_the_min_block(profile, hw):
    hardware = HARDWARE[hw]
    need = estimate(profile, 4096, 2, hardware)["ring_step"]["min_block_tokens"]
    at = estimate(profile, 4096, 2, hardware, block_tokens=need)["ring_step"]
    below = estimate(profile, 4096, 2, hardware, block_tokens=need - 1)["ring_step"]
    assert at["transfer_hidden"] and at["compute_seconds"] >= at["transfer_seconds"]
    assert not below["transfer_hidden"]


def test_kv_buffers_follow_the_runtime():
    # W = 2, S = 4096: shards of 2048; K+V block = 2 * B * H_kv * 2048 * D elements
    block = 2 * 1 * 2 * 2048 * 64
    device = estimate(synthetic(), 4096, 2, FLAT)["per_device"]
    assert device["kv_buffers"] == 2 * block * 2 + 3 * block * 4  # two bf16 kv buffers; dK/dV fp32 x2 + in flight
    assert estimate(synthetic(training=False), 4096, 2, FLAT)["per_device"]["kv_buffers"] == 2 * block * 2
    assert estimate(synthetic(), 4096, 1, FLAT)["per_device"]["kv_buffers"] == 0
    # the torch kernels' score tiles: fp32 [B, H, T, T], T = min(TILE, the layout's runs)
    torch_hw = dataclasses.replace(FLAT, kernel="torch")
    ws_torch = estimate(synthetic(), 4096, 2, torch_hw)["per_device"]["attention_workspace"]
    ws_triton = estimate(synthetic(), 4096, 2, FLAT)["per_device"]["attention_workspace"]
    assert ws_torch - ws_triton == 2 * 8 * 256 * 256 * 4 + 2 * 8 * 256 * 64 * 4
    # a shard shorter than a tile is one piece of L x L (S = 256 on W = 2: L = 128)
    ws_torch = estimate(synthetic(), 256, 2, torch_hw)["per_device"]["attention_workspace"]
    ws_triton = estimate(synthetic(), 256, 2, FLAT)["per_device"]["attention_workspace"]
    assert ws_torch - ws_triton == 2 * 8 * 128 * 128 * 4 + 2 * 8 * 128 * 64 * 4
    # evaluating a block mask that reads rows of a table can cost more than the tiles
    masked = synthetic(mask_piece_bytes=64 * 2**20)
    assert estimate(masked, 4096, 2, torch_hw)["per_device"]["attention_workspace"] > 64 * 2**20


def test_memory_per_device_shrinks_with_the_ring():
    totals = [estimate(synthetic(), 1 << 16, w, FLAT)["per_device"]["total"] for w in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True)


def test_max_context_is_monotone_in_world_size_and_memory():
    for profile in (synthetic(), synthetic(outputs="local"), synthetic(training=False)):
        small = [max_context(profile, w, FLAT) for w in (1, 2, 4, 8, 16)]
        assert small == sorted(small) and small[0] > 0
        big = dataclasses.replace(FLAT, memory=4 * FLAT.memory)
        assert all(max_context(profile, w, big) >= s for w, s in zip((1, 2, 4, 8, 16), small))
        for w, s in zip((1, 2, 4, 8, 16), small):
            assert estimate(profile, s, w, FLAT)["per_device"]["fits"]
            assert not estimate(profile, s + 1, w, FLAT)["per_device"]["fits"]
    # gathered outputs (outputs="full") cost O(S) on every rank: less context than keeping shards
    assert max_context(synthetic(outputs="local"), 8, FLAT) > max_context(synthetic(), 8, FLAT)
    tiny = dataclasses.replace(FLAT, memory=1_000_000)  # less than the parameters
    assert max_context(synthetic(), 4, tiny) == 0


def test_cost_summary_curves():
    summary = cost_summary(synthetic(), 8192, 4, FLAT)
    json.dumps(summary)
    assert summary["estimate"] == estimate(synthetic(), 8192, 4, FLAT)
    assert summary["profile"]["model"] == "synthetic"
    for w, limit in summary["max_context"].items():
        curve = summary["memory_curve"][w]
        lengths = [s for s, _ in curve]
        assert lengths == sorted(lengths) and curve[-1][0] >= 1.9 * limit
        assert [t for _, t in curve] == sorted(t for _, t in curve)
    blocks = [c for c, _, _ in summary["step_curve"]]
    assert blocks == sorted(blocks) and blocks[-1] >= summary["estimate"]["ring_step"]["min_block_tokens"]


# ----------------------------------------------------------------------- predicted against measured

LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
GPT = dict(vocab=101, d_model=64, n_head=4, n_layer=2, max_len=2048)


def _build(kind: str):
    torch.manual_seed(0)  # same weights on every rank
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**LLAMA, attn_implementation="sdpa", max_position_embeddings=4096))
    from ringify.models import TinyGPT

    return TinyGPT(**GPT)


def _call(kind: str, model, ids):
    if kind == "llama":
        return model(input_ids=ids, labels=ids, use_cache=False)
    return model(ids, ids)


def _ids(kind: str, seq_len: int) -> torch.Tensor:
    vocab = LLAMA["vocab_size"] if kind == "llama" else GPT["vocab"]
    return torch.randint(vocab, (1, seq_len), generator=torch.Generator().manual_seed(1))


def _measure(kind: str, seq_len: int, outputs: str) -> int:
    """On one rank: peak tensor bytes of loss forward + backward of the ringified model (as
    benchmarks/model_memory.py: parameters and inputs excluded, gradients included, output held)."""
    model = _build(kind)
    ids = _ids(kind, seq_len)
    rm = ringify(model, outputs=outputs)
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        out = _call(kind, rm, ids)
        out.loss.backward()

    step()  # capture, caches, connections
    with PeakMemory() as meter:
        step()
    return meter.peak_bytes


def _predict(kind: str, outputs: str) -> ModelProfile:
    model = _build(kind)
    ids = _ids(kind, 64)
    args, kwargs = ((), dict(input_ids=ids, labels=ids, use_cache=False)) if kind == "llama" else ((ids, ids), {})
    captured = capture(model, args, kwargs)
    attention = [m.summary() for m in canonicalize_attention(captured.graph_module)]
    return profile_model(model, captured.graph_module, captured.symbols, attention, batch=1, outputs=outputs)


def test_profile_of_a_raw_graph_equals_that_of_the_rewritten_one():
    """profile_model takes the captured graph before or after the attention and feed-forward passes (it
    applies them to a copy), and leaves the graph it is given as it was."""
    model = _build("gpt")
    ids = _ids("gpt", 32)
    captured = capture(model, (ids, ids), {})
    gm = captured.graph_module
    before = gm.code
    raw = profile_model(model, gm, captured.symbols, [], batch=1)
    assert gm.code == before
    from ringify.passes.ffn import chunk_feed_forward, symbolic_token_dim

    attention = [m.summary() for m in canonicalize_attention(gm)]
    chunk_feed_forward(gm, lambda n: symbolic_token_dim(n, captured.symbols), chunk_tokens=256)
    done = profile_model(model, gm, captured.symbols, attention, batch=1)
    for name in ("step_peak_lines", "attention_backward_lines", "attention_forward_lines", "activation_bytes_per_token",
                 "output_bytes_per_token", "mask_piece_bytes", "layers", "heads",
                 "head_dim", "ffn_chunk_tokens", "causal", "masked"):
        assert getattr(raw, name) == getattr(done, name), name
    assert raw.layers == 2 and raw.heads == 4 and raw.head_dim == 16 and raw.causal and raw.ffn_chunk_tokens == 256
    assert raw.buffer_bytes == 2 * 2048 * 2048 * 4  # nanoGPT's causal tables: device memory, not parameters
    assert raw.mask_piece_bytes >= 256 * 2048 * 4  # the ring reads rows of that table per piece

    fallback = profile_model(model, gm, set(), attention, batch=1)  # no sequence symbol: no fake run
    assert fallback.method == "analytic" and fallback.notes
    assert estimate(fallback, 4096, 4, HARDWARE["h100-nvlink"])["per_device"]["activations"] > 0


@pytest.mark.parametrize("kind, outputs", [("llama", "full"), ("gpt", "local")])
def test_predicted_memory_matches_gloo_measurement(ranks, kind, outputs):
    """Predicted per-device total minus parameters and buffers (what PeakMemory cannot see: they exist
    before the step) within 25% of the measured peak of the step, on 1 and 2 ranks."""
    profile = _predict(kind, outputs)
    assert profile.method == "fake-trace", profile.notes
    assert profile.layers == 2 and profile.causal and profile.training
    rows = []
    for world, seq_len in ((1, 512), (2, 512), (2, 1024)):
        measured = max(ranks(world).run(_measure, kind, seq_len, outputs, timeout=300))
        device = estimate(profile, seq_len, world, HARDWARE["cpu-gloo"])["per_device"]
        predicted = device["total"] - device["parameters"]
        rows.append((world, seq_len, predicted / MIB, measured / MIB))
    for world, seq_len, predicted, measured in rows:
        assert abs(predicted - measured) <= TOLERANCE * measured, (
            f"{kind}, {seq_len} tokens on {world} ranks: predicted {predicted:.2f} MiB, measured {measured:.2f} MiB; "
            f"all: {rows}")
