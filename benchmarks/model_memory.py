"""Peak tensor memory per rank of a ringified Llama-style model (loss forward + backward).

(a) Weak scaling: a fixed number of tokens per rank (``--local``), world 1 -> 4, so the global
    sequence grows 4x. Attention is the ring, feed-forward is chunked, the loss is computed inside the
    model from ``labels`` (a local partial plus a sum over ranks), so the peak per rank should stay flat:
    target within 15% of world 1. Measured with ``outputs="local"`` (logits stay this rank's shard) and,
    for comparison, ``outputs="full"`` (the default: logits gathered to [B, S_global, vocab] on every
    rank, O(global length x vocab) by design).
(b) One rank, a longer sequence (``--long``): the ringified model (the ring's fused block kernels; feed-forward
    whole, the default, and in chunks of ``ffn_chunk_tokens=256`` recomputed in backward) against the
    untouched model with eager attention and with SDPA.

The model is small (hidden 128, intermediate 512, 4 heads, 2 KV heads, 2 layers, vocab 256) so that
activations, not parameters, dominate. :class:`ringify.memory.PeakMemory` counts the bytes of live
tensors created during the call: parameters, inputs and anything that existed before are excluded;
the parameter gradients that backward creates are included (listed as ``grad_mib``; the same in every
row), and the output (loss, logits) is held through backward as a training loop would hold it. For
each measurement the largest contributors alive at the peak are listed by producing op (and phase).
gloo CPU processes, one torch thread each; one warm-up call (capture) before the measured call.

    python benchmarks/model_memory.py [--out benchmarks/results/model_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import pathlib
import platform
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from ringify import ringify
from ringify.launch import LocalRanks
from ringify.memory import PeakMemory

MIB = 2**20
TARGET = 1.15


class PeakBreakdown(PeakMemory):
    """PeakMemory that also records, near the peak, which ops made the tensors then alive.

    ``target``: the peak of an identical earlier run; the live set is snapshot at each new maximum at or
    above 95% of it (cheap: only the last few allocations before the peak)."""

    def __init__(self, target: int = 0) -> None:
        super().__init__()
        self.target, self.phase, self.at_peak = target, "fwd", {}
        self._op, self._made = None, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outer, self._op = self._op, func
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self._op = outer

    def _track(self, storage) -> None:
        peak = self.peak_bytes
        super()._track(storage)
        if id(storage) in self._sizes:  # tracked (empty storages are not); ids are reused once freed
            self._made.setdefault(id(storage), f"{self.phase} {self._op}".replace(".default", ""))
        if self.peak_bytes > peak and self.peak_bytes >= 0.95 * self.target:
            self.at_peak = {key: (self._made[key], size) for key, size in self._sizes.items()}

    def _free(self, key: int) -> None:
        super()._free(key)
        self._made.pop(key, None)

    def top(self, n: int = 6) -> list[dict]:
        groups = collections.defaultdict(lambda: [0, 0])
        for label, size in self.at_peak.values():
            groups[label][0] += 1
            groups[label][1] += size
        rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:n]
        return [{"op": label, "tensors": count, "mib": round(size / MIB, 3)} for label, (count, size) in rows]


def build(cfg: dict, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)  # same weights on every rank
    return LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation=attn, max_position_embeddings=1 << 16))


def measure(model, ids: torch.Tensor) -> dict:
    """Peak of loss forward + backward, after a warm-up call; and the largest contributors at the peak."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []

    def step(meter=None) -> None:
        for p in params:
            p.grad = None
        out = model(input_ids=ids, labels=ids, use_cache=False)  # held through backward, as in training
        if meter is not None:
            meter.phase = "bwd"
        out.loss.backward()

    step()  # warm-up: capture, caches, connections
    with PeakMemory() as meter:
        step()
    with PeakBreakdown(meter.peak_bytes) as detail:  # the same call again, to see what is alive at the peak
        step(detail)
    grads = sum(p.numel() * p.element_size() for p in params)
    return {"peak_bytes": meter.peak_bytes, "peak_mib": meter.peak_bytes / MIB, "grad_mib": grads / MIB,
            "top_at_peak": detail.top()}


def weak_scaling(cfg: dict, batch: int, local: int, outputs: str) -> dict:
    """On one rank of the ring: the ringified model on ``local * world`` tokens."""
    world = dist.get_world_size()
    model = build(cfg, "sdpa")
    ids = torch.randint(cfg["vocab_size"], (batch, local * world), generator=torch.Generator().manual_seed(1))
    return measure(ringify(model, outputs=outputs), ids)


def one_rank(cfg: dict, batch: int, seq_len: int) -> dict:
    """At world 1: the untouched model (eager, SDPA) and the ringified one on ``seq_len`` tokens."""
    ids = torch.randint(cfg["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(1))
    return {
        "untouched eager": measure(build(cfg, "eager"), ids),
        "untouched sdpa": measure(build(cfg, "sdpa"), ids),
        "ringify (default: ffn whole)": measure(ringify(build(cfg, "sdpa")), ids),
        "ringify, ffn_chunk_tokens=256": measure(ringify(build(cfg, "sdpa"), ffn_chunk_tokens=256), ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--local", type=int, default=256, help="(a) tokens per rank")
    parser.add_argument("--long", type=int, default=2048, help="(b) tokens on one rank")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/model_memory_cpu.json")
    args = parser.parse_args()
    cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)

    scaling = {"local": [], "full": []}
    for world in args.worlds:
        with LocalRanks(world) as ranks:
            for outputs in scaling:
                per_rank = ranks.run(weak_scaling, cfg, args.batch, args.local, outputs, timeout=600)
                worst = max(per_rank, key=lambda r: r["peak_bytes"])
                scaling[outputs].append({"world": world, "global_len": world * args.local,
                                         "peak_mib_per_rank": [r["peak_mib"] for r in per_rank],
                                         "peak_mib_max": worst["peak_mib"], "grad_mib": worst["grad_mib"],
                                         "top_at_peak": worst["top_at_peak"]})
    for rows in scaling.values():
        for row in rows:
            row["ratio_to_first"] = row["peak_mib_max"] / rows[0]["peak_mib_max"]
    with LocalRanks(1) as ranks:
        single = ranks.run(one_rank, cfg, args.batch, args.long, timeout=600)[0]
    base = single["untouched sdpa"]["peak_mib"]
    for row in single.values():
        row["ratio_to_sdpa"] = row["peak_mib"] / base
        row["ratio_to_eager"] = row["peak_mib"] / single["untouched eager"]["peak_mib"]

    result = {
        "date": datetime.date.today().isoformat(), "benchmark": "model_memory", "device": "cpu, gloo",
        "platform": platform.platform(), "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]), "dtype": "float32", "model": "LlamaForCausalLM",
        "config": cfg, "batch": args.batch, "layout": "zigzag", "loss": "inside the model (labels=input_ids)",
        "target_ratio": TARGET, "weak_scaling": {
            "local_len": args.local, "attn_implementation": "sdpa",
            "flat_outputs_local": all(r["ratio_to_first"] <= TARGET for r in scaling["local"]),
            "flat_outputs_full": all(r["ratio_to_first"] <= TARGET for r in scaling["full"]),
            "outputs_local": scaling["local"], "outputs_full": scaling["full"]},
        "one_rank": {"seq_len": args.long, "rows": single},
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nlargest contributors at the peak (world {args.worlds[-1]}, outputs=local | one rank, {args.long} tokens):")
    for name, row in [(f"world {args.worlds[-1]} local", scaling["local"][-1]),
                      (f"world {args.worlds[-1]} full", scaling["full"][-1]), *single.items()]:
        print(f"  {name}: " + ", ".join(f"{t['op']} {t['mib']:.2f} MiB (x{t['tensors']})" for t in row["top_at_peak"][:4]))
    print(f"\nLlama B={args.batch} hidden 128 inter 512 heads 4/2 layers 2 vocab 256 fp32 -> {out}")
    print(f"(a) loss fwd+bwd, peak tensor MiB per rank (max over ranks), {args.local} tokens per rank "
          f"(parameter grads {scaling['local'][0]['grad_mib']:.2f} MiB included)")
    print(f"{'world':>5} {'global len':>10} {'outputs=local':>13} {'ratio':>6} {'outputs=full':>13} {'ratio':>6}")
    for loc, full in zip(scaling["local"], scaling["full"]):
        print(f"{loc['world']:>5} {loc['global_len']:>10} {loc['peak_mib_max']:>13.2f} {loc['ratio_to_first']:>6.2f} "
              f"{full['peak_mib_max']:>13.2f} {full['ratio_to_first']:>6.2f}")
    print(f"flat within {TARGET:.2f}x: outputs=local {'yes' if result['weak_scaling']['flat_outputs_local'] else 'NO'}, "
          f"outputs=full {'yes' if result['weak_scaling']['flat_outputs_full'] else 'NO'}")
    print(f"(b) one rank, {args.long} tokens: peak tensor MiB of loss fwd+bwd")
    print(f"{'model':<26} {'peak MiB':>9} {'vs sdpa':>8} {'vs eager':>9}")
    for name, row in single.items():
        print(f"{name:<26} {row['peak_mib']:>9.2f} {row['ratio_to_sdpa']:>8.2f} {row['ratio_to_eager']:>9.2f}")


if __name__ == "__main__":
    main()
