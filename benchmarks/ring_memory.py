"""Peak tensor memory per rank of ring attention (forward + backward) as the ring grows.

The local length is fixed, so the global sequence grows with the world size. Ring attention keeps
only O(local length) state per rank (its shard, key/value receive buffers, dK/dV accumulators) and
O(TILE^2) score tiles, so the peak per rank must stay flat as the ring grows. The buffers it needs:
on one rank none; on two, one key/value receive buffer (the other rank's block arrives while this rank
computes on its own), its share of dK/dV computed in one fp32 pair while the last one is in flight in a
second, and the accumulator arriving in a third; from three ranks on a second key/value buffer (a
received block is computed on while the next one arrives). Targets (issue 12): world 2 <= 2x world 1,
world 4 within 10% of world 2, at 512 and 2048 local tokens.

Measured with :class:`ringify.memory.PeakMemory` (live tensor bytes created during the call, inputs
excluded) on gloo CPU processes, one torch thread each; ``--locals`` runs several local lengths.

    python benchmarks/ring_memory.py [--locals 512 2048] [--dtype float32] [--out benchmarks/results/ring_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform

import torch
import torch.distributed as dist

from ringify.launch import LocalRanks
from ringify.memory import PeakMemory
from ringify.runtime import ring_attention

MIB = 2**20


def peak_forward_backward(seed: int, batch: int, heads: int, kv_heads: int, local: int, head_dim: int,
                          dtype: str = "float32") -> int:
    """On one rank: peak bytes of ring_attention forward + backward on fresh random shards."""
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    draw = lambda h: torch.randn(batch, h, local, head_dim, generator=g).to(getattr(torch, dtype))  # noqa: E731
    q, k, v = (draw(h).requires_grad_() for h in (heads, kv_heads, kv_heads))
    grad = draw(heads)
    ring_attention(q, k, v, causal=True, layout="zigzag").backward(grad)  # warm-up: caches, connections
    for t in (q, k, v):
        t.grad = None
    with PeakMemory() as meter:
        ring_attention(q, k, v, causal=True, layout="zigzag").backward(grad)
    return meter.peak_bytes


def scaling(args, local: int) -> dict:
    shape = (args.batch, args.heads, args.kv_heads, local, args.head_dim)
    rows = []
    for world in args.worlds:
        with LocalRanks(world) as ranks:
            peaks = ranks.run(peak_forward_backward, args.seed, *shape, args.dtype)
        rows.append({"world": world, "global_len": world * local, "peak_bytes_per_rank": peaks,
                     "peak_mib_max": max(peaks) / MIB})
    by_world = {r["world"]: r["peak_mib_max"] for r in rows}
    for row in rows:
        row["ratio_to_world_1"] = row["peak_mib_max"] / by_world[min(by_world)]
        row["ratio_to_world_2"] = row["peak_mib_max"] / by_world.get(2, row["peak_mib_max"])
    checks = {}
    if 1 in by_world and 2 in by_world:
        checks["world 2 <= 2x world 1"] = by_world[2] <= 2 * by_world[1]
    if 2 in by_world and 4 in by_world:
        checks["world 4 within 10% of world 2"] = by_world[4] <= 1.10 * by_world[2]
    return {"local_len": local, "rows": rows, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--locals", type=int, nargs="+", default=[512, 2048], help="tokens per rank")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=torch.seed() % 2**31)
    parser.add_argument("--out", default="benchmarks/results/ring_memory_cpu.json")
    args = parser.parse_args()
    runs = [scaling(args, local) for local in args.locals]
    result = {
        "date": datetime.date.today().isoformat(), "benchmark": "ring_memory", "device": "cpu (gloo, 1 thread per rank)",
        "platform": platform.platform(), "torch": torch.__version__, "seed": args.seed, "causal": True,
        "layout": "zigzag", "dtype": args.dtype, "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
        "head_dim": args.head_dim, "runs": runs,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"ring attention fwd+bwd, peak tensor memory per rank (B={args.batch} H={args.heads} Hkv={args.kv_heads} "
          f"D={args.head_dim} {args.dtype} causal zigzag) -> {out}")
    print(f"{'local':>6} {'world':>5} {'global len':>10} {'peak MiB/rank':>13} {'vs world 1':>10} {'vs world 2':>10}")
    for run in runs:
        for row in run["rows"]:
            print(f"{run['local_len']:>6} {row['world']:>5} {row['global_len']:>10} {row['peak_mib_max']:>13.2f} "
                  f"{row['ratio_to_world_1']:>10.2f} {row['ratio_to_world_2']:>10.2f}")
        print("       " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in run["checks"].items()))


if __name__ == "__main__":
    main()
