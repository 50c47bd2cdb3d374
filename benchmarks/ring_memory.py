"""Peak tensor memory per rank of ring attention (forward + backward) as the ring grows.

The local length is fixed, so the global sequence grows with the world size. Ring attention keeps
only O(local length) state per rank (its shard, two key/value buffers, two dK/dV accumulators) and
O(TILE^2) score tiles, so the peak per rank must stay flat as the ring grows: target within 15% of the
peak of the smallest ring (world 2). World 1 is no ring: it computes on its own k/v and allocates no
buffers, so it sits lower by about those four buffers (``ring_buffers_mib``); its ratio is reported too.

Measured with :class:`ringify.memory.PeakMemory` (live tensor bytes created during the call, inputs
excluded) on gloo CPU processes, one torch thread each.

    python benchmarks/ring_memory.py [--out benchmarks/results/ring_memory_cpu.json]
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
TARGET = 1.15


def peak_forward_backward(seed: int, batch: int, heads: int, kv_heads: int, local: int, head_dim: int) -> int:
    """On one rank: peak bytes of ring_attention forward + backward on fresh random shards."""
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    draw = lambda h: torch.randn(batch, h, local, head_dim, generator=g)
    q, k, v = (draw(h).requires_grad_() for h in (heads, kv_heads, kv_heads))
    grad = draw(heads)
    ring_attention(q, k, v, causal=True, layout="zigzag").backward(grad)  # warm-up: caches, connections
    for t in (q, k, v):
        t.grad = None
    with PeakMemory() as meter:
        ring_attention(q, k, v, causal=True, layout="zigzag").backward(grad)
    return meter.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--local", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=torch.seed() % 2**31)
    parser.add_argument("--out", default="benchmarks/results/ring_memory_cpu.json")
    args = parser.parse_args()
    shape = (args.batch, args.heads, args.kv_heads, args.local, args.head_dim)

    rows = []
    for world in args.worlds:
        with LocalRanks(world) as ranks:
            peaks = ranks.run(peak_forward_backward, args.seed, *shape)
        rows.append({"world": world, "global_len": world * args.local, "peak_bytes_per_rank": peaks})
    base = max(rows[0]["peak_bytes_per_rank"])
    ring = next((r for r in rows if r["world"] > 1), rows[0])  # the smallest real ring
    ring_base = max(ring["peak_bytes_per_rank"])
    for row in rows:
        row["peak_mib_max"] = max(row["peak_bytes_per_rank"]) / MIB
        row["ratio_to_first"] = max(row["peak_bytes_per_rank"]) / base
        row["ratio_to_ring"] = max(row["peak_bytes_per_rank"]) / ring_base
    block = 2 * args.batch * args.kv_heads * args.local * args.head_dim  # k and v of one block
    buffers_mib = 2 * block * (4 + 4) / MIB  # two fp32 k/v buffers, two fp32 dK/dV accumulators

    result = {
        "date": datetime.date.today().isoformat(), "benchmark": "ring_memory", "device": "cpu (gloo, 1 thread per rank)", "platform": platform.platform(),
        "torch": torch.__version__, "seed": args.seed, "causal": True, "layout": "zigzag", "dtype": "float32",
        "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "local_len": args.local,
        "head_dim": args.head_dim, "target_ratio": TARGET, "ring_base_world": ring["world"],
        "ring_buffers_mib": buffers_mib, "flat": all(row["ratio_to_ring"] <= TARGET for row in rows if row["world"] > 1),
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"ring attention fwd+bwd, peak tensor memory per rank (B={args.batch} H={args.heads} "
          f"Hkv={args.kv_heads} S_local={args.local} D={args.head_dim} fp32 causal zigzag) -> {out}")
    print(f"{'world':>5} {'global len':>10} {'peak MiB/rank':>13} {'vs world ' + str(rows[0]['world']):>10} "
          f"{'vs world ' + str(ring['world']):>10}")
    for row in rows:
        print(f"{row['world']:>5} {row['global_len']:>10} {row['peak_mib_max']:>13.2f} {row['ratio_to_first']:>10.2f} "
              f"{row['ratio_to_ring']:>10.2f}")
    print(f"flat within {TARGET:.2f}x of world {ring['world']} (the smallest ring): {'yes' if result['flat'] else 'NO'}; "
          f"ring buffers (absent at world 1): {buffers_mib:.2f} MiB")


if __name__ == "__main__":
    main()
