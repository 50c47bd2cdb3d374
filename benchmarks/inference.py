"""Generation on the ring against the untouched model with its own cache: prefill time and per-rank peak
memory, decode time per token, and the tokens.

(a) Prefill, W = 1..4 gloo ranks at a fixed number of prompt tokens per rank (``--local``), so the prompt
    grows with W. Ringified: ``rm.generate(ids, max_new_tokens=N, on_token=...)``; its prefill time is the
    time to the first token (``on_token``'s first call: the ring prefill, which stores each layer's keys and
    values in the sharded cache and computes no logits, then the decode step that computes the first logits).
    Its peak per rank: :class:`ringify.memory.PeakMemory` around ``rm.generate(ids, max_new_tokens=1)``
    after calls of the same shape (capture and graph building stay outside the meter), so the cache holds the
    prompt and one slot, like the untouched prefill's. The untouched model runs in one process at each total
    length ``S = W * local``, with HF's ``DynamicCache``, in two ways: ``model(ids, use_cache=True)`` (what
    the issue names: logits of every position, a [B, S, vocab] fp32 tensor, O(S x vocab)) and with
    ``logits_to_keep=1`` (what HF's ``generate`` does in its prefill: the last position's logits only).
    Time to first token = prefill + argmax in both. Beside the measured peak: the cost model's prediction
    (``ringify.cost.generation_estimate`` on ``cpu-gloo``, total less parameters, as PeakMemory counts).
(b) Decode, at the same total length: ``(last token - first token) / (N - 1)`` seconds per token for both; the
    untouched model decodes one token at a time with its ``cache`` (greedy: HF's generate with
    ``do_sample=False`` and no end-of-sequence token, which a random model may draw), the ring attends each
    token to the sharded cache with one all-gather per layer.
(c) The tokens: the ring's ``[B, S + N]`` greedy tokens equal the untouched model's (ok / mismatch).

Medians of ``--reps`` after a warm-up, one torch thread per process, every row measured in the same run.
The machine's cores are recorded: with more ranks than cores (W > cores) the ranks share cores, so the times
of those rows are not a ring's (memory is unaffected). ``--smoke`` runs tiny shapes once (tests/cli/test_benchmarks.py).

    python benchmarks/inference.py [--smoke] [--out benchmarks/results/inference_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from ringify import ringify
from ringify.launch import LocalRanks
from ringify.memory import PeakMemory

from measure import median_seconds, save_result  # benchmarks/measure.py, beside this script

MIB = 2**20


def build(cfg: dict) -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same weights on every rank and in the untouched process
    return LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).eval()


def prompt(cfg: dict, seq_len: int) -> torch.Tensor:
    return torch.randint(cfg["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(1))


def medians(runs: list[tuple]) -> tuple[float, float]:
    """(time to first token, seconds per decoded token): medians over repetitions."""
    return statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)


# ------------------------------------------------------------------------------------------- untouched


@torch.no_grad()
def hf_greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """HF's own cached greedy decoding, timed: (tokens, time to first token, seconds per later token)."""
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    stamps, chosen = [time.perf_counter()], [token]
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, cache=out.cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        chosen.append(token)
        stamps.append(time.perf_counter())
    return torch.cat([ids, *chosen], dim=1), stamps[0] - start, (stamps[-1] - stamps[0]) / max(1, new_tokens - 1)


def untouched(cfg: dict, lengths: list[int], new_tokens: int, reps: int) -> list[dict]:
    """In one process: the untouched model's prefill (all logits / the last one), its peak, its decode, at each length."""
    model = build(cfg)
    rows = []
    for seq_len in lengths:
        ids = prompt(cfg, seq_len)
        row = {"seq_len": seq_len}
        for name, keep in (("all_logits", 0), ("last_logits", 1)):
            @torch.no_grad()
            def prefill():
                return model(input_ids=ids, use_cache=True, logits_to_keep=keep).logits[:, -1].argmax(-1)

            seconds = median_seconds(prefill, reps)
            with PeakMemory() as meter:
                prefill()
            row[f"prefill_{name}_s"], row[f"peak_{name}_bytes"] = seconds, meter.peak_bytes
        hf_greedy(model, ids, new_tokens)  # warm-up
        runs = [hf_greedy(model, ids, new_tokens) for _ in range(reps)]
        row["ttft_s"], row["decode_s"] = medians(runs)
        row["tokens"] = runs[0][0]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- ringified


def ringified(cfg: dict, local: int, new_tokens: int, reps: int) -> dict:
    """On one rank of the ring: rm.generate timed through on_token, its peak for a one-token generate, the cache."""
    world = dist.get_world_size()
    rm = ringify(build(cfg))
    ids = prompt(cfg, local * world)

    def run(n: int):
        stamps = []
        dist.barrier()
        start = time.perf_counter()
        tokens = rm.generate(ids, max_new_tokens=n, eos_token_id=[],
                             on_token=lambda done, total: stamps.append(time.perf_counter()))
        return tokens, stamps[0] - start, (stamps[-1] - stamps[0]) / max(1, n - 1)

    start = time.perf_counter()
    run(new_tokens)  # warm-up: capture, the prefill and decode graphs, caches, connections
    first_call = time.perf_counter() - start
    runs = [run(new_tokens) for _ in range(reps)]
    cache_bytes = rm.cache_bytes
    rm.generate(ids, max_new_tokens=1, eos_token_id=[])  # the same graphs; the meter sees only the run
    dist.barrier()
    with PeakMemory() as meter:
        rm.generate(ids, max_new_tokens=1, eos_token_id=[])
    ttft, decode = medians(runs)
    return {"rank": dist.get_rank(), "first_call_s": first_call, "ttft_s": ttft, "decode_s": decode,
            "peak_bytes": meter.peak_bytes, "cache_bytes": cache_bytes, "cache_bytes_one_token": rm.cache_bytes,
            "tokens": runs[0][0]}


def predicted(cfg: dict, lengths_by_world: dict, new_tokens: int) -> dict:
    """The cost model's per-rank peak (less parameters) of a one-token generate and cache of an N-token one."""
    from ringify.capture import capture
    from ringify.cost import HARDWARE, generation_estimate, profile_model
    from ringify.passes.attention import canonicalize_attention

    model = build(cfg)
    ids = prompt(cfg, 64)
    captured = capture(model, (), dict(input_ids=ids, use_cache=False))
    attention = [m.summary() for m in canonicalize_attention(captured.graph_module)]
    profile = profile_model(model, captured.graph_module, captured.symbols, attention, batch=1, training=False)
    out = {}
    for world, seq_len in lengths_by_world.items():
        one = generation_estimate(profile, seq_len, 1, world, HARDWARE["cpu-gloo"])
        full = generation_estimate(profile, seq_len, new_tokens, world, HARDWARE["cpu-gloo"])
        out[world] = {"peak_bytes": one["per_device"]["total"] - one["per_device"]["parameters"],
                      "cache_bytes": full["per_device"]["kv_cache"], "prefill_s": full["prefill"]["seconds"],
                      "decode_s": full["decode"]["seconds_per_token"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition: checks that it runs")
    parser.add_argument("--worlds", type=int, nargs="+", default=None)
    parser.add_argument("--local", type=int, default=None, help="prompt tokens per rank")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/inference_cpu.json")
    args = parser.parse_args()
    worlds = args.worlds or ([1, 2] if args.smoke else [1, 2, 3, 4])
    local = args.local or (24 if args.smoke else 2048)
    new_tokens = args.new_tokens or (4 if args.smoke else 32)
    reps = 1 if args.smoke else args.reps
    cfg = (dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) if args.smoke else
           dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4))
    cfg["max_position_embeddings"] = 2 * (max(worlds) * local + new_tokens)
    lengths = {w: w * local for w in worlds}
    load_before, wall = os.getloadavg(), time.perf_counter()

    with LocalRanks(1) as one:
        base = {row["seq_len"]: row for row in one.run(untouched, cfg, list(lengths.values()), new_tokens, reps,
                                                       timeout=3600)[0]}
    ring = {}
    for world in worlds:
        with LocalRanks(world) as ranks:
            ring[world] = ranks.run(ringified, cfg, local, new_tokens, reps, timeout=3600)
    model = predicted(cfg, lengths, new_tokens)

    cores = os.cpu_count() or 1
    rows = []
    for world, seq_len in lengths.items():
        b, per_rank = base[seq_len], ring[world]
        ttft = max(r["ttft_s"] for r in per_rank)  # the slowest rank decides
        decode = max(r["decode_s"] for r in per_rank)
        peak = max(r["peak_bytes"] for r in per_rank)
        same = all(torch.equal(r["tokens"], b["tokens"]) for r in per_rank)
        rows.append({
            "world": world, "seq_len": seq_len, "local_len": local, "oversubscribed": world > cores,
            "untouched_prefill_all_logits_s": b["prefill_all_logits_s"],
            "untouched_prefill_last_logits_s": b["prefill_last_logits_s"], "untouched_ttft_s": b["ttft_s"],
            "ringify_ttft_s": ttft, "ttft_speed_ratio": b["ttft_s"] / ttft,
            "untouched_peak_all_logits_mib": b["peak_all_logits_bytes"] / MIB,
            "untouched_peak_last_logits_mib": b["peak_last_logits_bytes"] / MIB,
            "ringify_peak_mib_per_rank": [r["peak_bytes"] / MIB for r in per_rank], "ringify_peak_mib_max": peak / MIB,
            "predicted_peak_mib": model[world]["peak_bytes"] / MIB,
            "peak_ratio_to_untouched_last_logits": peak / b["peak_last_logits_bytes"],
            "peak_ratio_to_untouched_all_logits": peak / b["peak_all_logits_bytes"],
            "untouched_decode_ms": b["decode_s"] * 1e3, "ringify_decode_ms": decode * 1e3,
            "decode_speed_ratio": b["decode_s"] / decode,
            "cache_mib_per_rank": [r["cache_bytes"] / MIB for r in per_rank],
            "predicted_cache_mib": model[world]["cache_bytes"] / MIB,
            "predicted_prefill_s": model[world]["prefill_s"], "predicted_decode_ms": model[world]["decode_s"] * 1e3,
            "ringify_first_call_s": max(r["first_call_s"] for r in per_rank),
            "tokens_equal": same,
        })
    first = rows[0]["ringify_peak_mib_max"]
    for row in rows:
        row["ringify_peak_ratio_to_world_1"] = row["ringify_peak_mib_max"] / first
    result = {
        "date": datetime.date.today().isoformat(), "benchmark": "inference", "smoke": args.smoke,
        "device": "cpu, gloo over loopback, 1 torch thread per process", "cores": cores,
        "platform": platform.platform(), "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
        "dtype": "float32", "model": "LlamaForCausalLM (random weights, eval)", "config": cfg, "batch": 1,
        "layout": "zigzag", "new_tokens": new_tokens, "reps": reps,
        "untouched": "HF DynamicCache; prefill model(ids, use_cache=True) with all logits and with logits_to_keep=1; "
                     "decode: one-token steps with its cache (greedy)",
        "ringify": "rm.generate; prefill = time to first token (on_token), decode = (last - first) / (N - 1); peak: "
                   "PeakMemory around rm.generate(max_new_tokens=1) after warm-up calls",
        "loadavg_1_5_15min_before_after": [load_before, os.getloadavg()], "wall_s": time.perf_counter() - wall,
        "tokens_equal": all(r["tokens_equal"] for r in rows), "rows": rows,
    }
    out = save_result(args.out, result)

    print(f"\nLlama {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, heads {cfg['num_attention_heads']}/"
          f"{cfg['num_key_value_heads']}, vocab {cfg['vocab_size']}, fp32, B=1, {local} prompt tokens per rank, "
          f"{new_tokens} new tokens; medians of {reps}, 1 thread per process, {cores} cores -> {out}")
    print("(a) prefill: time to first token (s) and peak tensor MiB (per rank; parameters excluded). untouched = HF with "
          "its DynamicCache in one process at the same total length: 'all' = model(ids, use_cache=True), logits of every "
          "position (O(S x vocab)); 'last' = logits_to_keep=1, as HF generate")
    print(f"{'W':>2} {'prompt':>6} | {'s all':>6} {'s last':>6} {'s ring':>7} {'speed':>6} | {'MiB all':>8} {'MiB last':>8} "
          f"{'MiB ring':>8} {'pred':>7} {'ring/last':>9} {'ring/W1':>7}")
    for r in rows:
        flag = " *" if r["oversubscribed"] else ""
        print(f"{r['world']:>2} {r['seq_len']:>6} | {r['untouched_prefill_all_logits_s']:>6.3f} {r['untouched_ttft_s']:>6.3f} "
              f"{r['ringify_ttft_s']:>7.3f} {r['ttft_speed_ratio']:>5.2f}x | {r['untouched_peak_all_logits_mib']:>8.1f} "
              f"{r['untouched_peak_last_logits_mib']:>8.1f} {r['ringify_peak_mib_max']:>8.1f} {r['predicted_peak_mib']:>7.1f} "
              f"{r['peak_ratio_to_untouched_last_logits']:>9.2f} {r['ringify_peak_ratio_to_world_1']:>7.2f}{flag}")
    print("(b) decode at the same total length: ms per token; (c) greedy tokens equal to the untouched model's")
    print(f"{'W':>2} {'prompt':>6} | {'untouched':>9} {'ring':>7} {'speed':>6} {'pred':>6} | {'cache MiB/rank':>14} {'pred':>6} | tokens")
    for r in rows:
        flag = " *" if r["oversubscribed"] else ""
        print(f"{r['world']:>2} {r['seq_len']:>6} | {r['untouched_decode_ms']:>9.2f} {r['ringify_decode_ms']:>7.2f} "
              f"{r['decode_speed_ratio']:>5.2f}x {r['predicted_decode_ms']:>6.2f} | {max(r['cache_mib_per_rank']):>14.2f} "
              f"{r['predicted_cache_mib']:>6.2f} | {'ok' if r['tokens_equal'] else 'MISMATCH'}{flag}")
    if any(r["oversubscribed"] for r in rows):
        print(f"* more ranks than the {cores} cores: the ranks share cores, so these times are not a ring's")


if __name__ == "__main__":
    main()
