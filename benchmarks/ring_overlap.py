"""Does the ring hide its transfers behind compute? Ring attention vs the same compute without transfers.

For each world size W and local length S_local, every rank times
  - ``ring``: ``ringify.runtime.ring_attention`` (forward; then forward + backward as a second row);
  - ``compute``: the same per-block kernels (``_kernels('cpu')``) called W times on blocks of the same
    shapes and the same causal visibility, with no communication at all;
  - ``comm``: the ring's key/value transfers alone (W-1 exchanges of one block, no compute), for scale.
All ranks run each measurement at once (so they share the cores the same way), a barrier starts each
repeat, a repeat's time is the slowest rank's, and the reported time is the median after warm-up.

Target: ring / compute <= 1.15 where compute dominates (here: every size, on loopback gloo).
World 4 on a 2-core machine oversubscribes the cores (4 single-threaded ranks): both columns are
then about twice as slow, and the ratio also carries scheduling noise.

    python benchmarks/ring_overlap.py [--local 256 512 1024] [--out benchmarks/results/ring_overlap_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import time

import torch
import torch.distributed as dist

from ringify.launch import LocalRanks
from ringify.runtime import layout_positions, ring_attention
from ringify.runtime.comm import RingComm, default_timeout
from ringify.runtime.ring_attention import _kernels

TARGET = 1.15
LAYOUT = "zigzag"


def make_inputs(seed, batch, heads, kv_heads, local, head_dim, world):
    """This rank's q, k, v, grad, and W stand-in key/value blocks [2, B, H_kv, S, D] for compute-only."""
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    draw = lambda *shape: torch.randn(*shape, generator=g)
    q, grad = draw(batch, heads, local, head_dim), draw(batch, heads, local, head_dim)
    k, v = draw(batch, kv_heads, local, head_dim), draw(batch, kv_heads, local, head_dim)
    blocks = [draw(2, batch, kv_heads, local, head_dim) for _ in range(world)]
    return q, k, v, grad, blocks


def compute_only(q, grad, blocks, positions, causal, backward):
    """What ring_forward/ring_backward compute on this rank, block by block, minus every transfer."""
    forward_block, backward_block = _kernels("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    scale = q.shape[-1] ** -0.5
    q_pos = positions[rank]
    order = [(rank - step) % world for step in range(world)]  # the ring's visiting order
    visible = [src for src in order if not causal or int(positions[src][0]) <= int(q_pos[-1])]
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32)
    for src in visible:
        forward_block(q, blocks[src][0], blocks[src][1], out, lse, q_pos, positions[src], scale=scale, causal=causal)
    if backward:
        delta = (grad * out).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32)
        for src in order:
            block_grads = torch.zeros(blocks[src].shape, dtype=torch.float32)
            if src in visible:
                backward_block(q, blocks[src][0], blocks[src][1], grad, lse, delta, dq, block_grads[0],
                               block_grads[1], q_pos, positions[src], scale=scale, causal=causal)


def ring_call(q, k, v, grad, causal, backward):
    if not backward:
        ring_attention(q, k, v, causal=causal, layout=LAYOUT)
        return
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    ring_attention(q, k, v, causal=causal, layout=LAYOUT).backward(grad)


def comm_only(kv, buffers, backward):
    """The ring's key/value transfers alone, no compute; for backward twice (dK/dV travel as far)."""
    comm = RingComm(dist.group.WORLD, default_timeout())
    for _ in range(2 if backward else 1):
        for step in range(1, comm.world):
            comm.wait(comm.exchange(kv if step == 1 else buffers[step % 2], buffers[(step + 1) % 2], 11), "comm")


def measure(seed, shape, causal, backward, warmup, repeats=None):
    """On one rank: {ring, compute, comm}: this rank's seconds per repeat, the three interleaved."""
    batch, heads, kv_heads, local, head_dim = shape
    world = dist.get_world_size()
    q, k, v, grad, blocks = make_inputs(seed, *shape, world)
    positions = [layout_positions(local * world, world, r, LAYOUT) for r in range(world)]
    kv, buffers = torch.stack([k, v]), [torch.empty(2, batch, kv_heads, local, head_dim) for _ in range(2)]
    calls = {
        "ring": lambda: ring_call(q, k, v, grad, causal, backward),
        "compute": lambda: compute_only(q, grad, blocks, positions, causal, backward),
        "comm": lambda: comm_only(kv, buffers, backward),
    }

    def one_round():
        took = {}
        for name, call in calls.items():
            dist.barrier()
            start = time.perf_counter()
            call()
            took[name] = time.perf_counter() - start
        return took

    for _ in range(max(1, warmup)):
        took = one_round()
    if repeats is None:  # enough repeats for ~2 s of ring time (estimated by the compute), agreed by all ranks
        slowest = torch.tensor(took["compute"])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        repeats = max(3, min(11, math.ceil(2.0 / slowest.item())))
    rounds = [one_round() for _ in range(repeats)]
    return {name: [r[name] for r in rounds] for name in calls}


def summarize(per_rank: list[dict]) -> dict:
    """Median over repeats of the slowest rank's time, per measurement."""
    out = {}
    for name in per_rank[0]:
        slowest = [max(rank[name][i] for rank in per_rank) for i in range(len(per_rank[0][name]))]
        out[f"{name}_s"] = statistics.median(slowest)
    out["ratio"] = out["ring_s"] / out["compute_s"]
    out["repeats"] = len(per_rank[0]["ring"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--local", type=int, nargs="+", default=[256, 512, 1024], help="tokens per rank")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 to 11, about 2 s of ring time")
    parser.add_argument("--seed", type=int, default=torch.seed() % 2**31)
    parser.add_argument("--out", default="benchmarks/results/ring_overlap_cpu.json")
    args = parser.parse_args()

    rows = []
    load_before = os.getloadavg()  # other work on the machine skews timings: recorded with them
    started = time.perf_counter()
    for world in args.worlds:
        with LocalRanks(world) as ranks:
            for local in args.local:
                shape = (args.batch, args.heads, args.kv_heads, local, args.head_dim)
                for backward in (False, True):
                    per_rank = ranks.run(measure, args.seed, shape, args.causal, backward, args.warmup,
                                         args.repeats, timeout=600)
                    rows.append({"world": world, "local_len": local, "pass": "fwd+bwd" if backward else "fwd",
                                 **summarize(per_rank), "per_rank": per_rank})

    result = {
        "date": datetime.date.today().isoformat(), "benchmark": "ring_overlap", "device": "cpu (gloo over loopback, 1 torch thread per rank)",
        "cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "seed": args.seed,
        "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "causal": args.causal, "layout": LAYOUT, "dtype": "float32", "warmup": args.warmup, "repeats": args.repeats,
        "target_ratio": TARGET, "wall_s": time.perf_counter() - started,
        "loadavg_1_5_15min_before_after": [load_before, os.getloadavg()], "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"ring vs compute-only, median over repeats of the slowest rank, B={args.batch} H={args.heads} "
          f"Hkv={args.kv_heads} D={args.head_dim} fp32 {'causal' if args.causal else 'non-causal'} {LAYOUT}, "
          f"{os.cpu_count()} cores, load avg {load_before[0]:.1f} before -> {out}")
    print(f"{'world':>5} {'S_local':>7} {'pass':>7} {'reps':>4} {'ring ms':>9} {'compute ms':>10} {'comm ms':>8} {'ratio':>6}")
    for r in rows:
        flag = "" if r["ratio"] <= TARGET else "  > target"
        oversub = "  (oversubscribed)" if r["world"] > (os.cpu_count() or 1) else ""
        print(f"{r['world']:>5} {r['local_len']:>7} {r['pass']:>7} {r['repeats']:>4} {1e3 * r['ring_s']:>9.1f} "
              f"{1e3 * r['compute_s']:>10.1f} {1e3 * r['comm_s']:>8.1f} {r['ratio']:>6.2f}{flag}{oversub}")


if __name__ == "__main__":
    main()
