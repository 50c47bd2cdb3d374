"""Does the ring pay for itself? Speed side by side with what people would run instead, in one run.

(a) ``ring_attention`` at world 1 against ``F.scaled_dot_product_attention`` (torch's fused CPU flash
    kernel) on the same tensors, forward + backward: causal, non-causal, GQA, a sliding-window block
    mask (SDPA gets the same mask in full).
(b) An HF Llama training step (loss forward + backward) at world 1: ringified (feed-forward chunked with
    recomputation, and not) against the untouched model (SDPA).
(c) The same step on 2 gloo ranks (the sequence split, 1 thread each) against one untouched process
    (1 thread) at the same global length: the speedup, ideally 2x.

Targets (issue 12): (a) >= 0.95x SDPA, (b) >= 0.90x the untouched step, (c) >= 1.7x. Medians of
``--reps`` after a warm-up (capture, caches), one torch thread per process; every row of a table is
measured in this same run. ``--smoke`` runs tiny shapes once (the test suite runs it so it cannot rot).

    python benchmarks/step_speed.py [--smoke] [--out benchmarks/results/step_speed_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringify import ringify
from ringify.launch import LocalRanks
from ringify.runtime import ring_attention

from measure import median_seconds, save_result  # benchmarks/measure.py, beside this script

TARGETS = {"kernel": 0.95, "model": 0.90, "two_ranks": 1.7}


# ------------------------------------------------------------------------------------ (a) the kernel


def kernel_rows(shape: dict, reps: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    window = shape["window"]
    for name, heads, kv_heads, dim, causal, masked in [
        ("causal, GQA 8/4, D 32", 8, 4, 32, True, False),
        ("causal, MHA 8, D 64", 8, 8, 64, True, False),
        ("non-causal, GQA 8/4, D 32", 8, 4, 32, False, False),
        (f"sliding window {window}, GQA 8/4, D 32", 8, 4, 32, True, True),
    ]:
        if shape["tiny"]:
            heads, kv_heads, dim = max(2, heads // 4), max(1, kv_heads // 4), 8
        n = shape["seq"]
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, n, dim, generator=g).requires_grad_()
        k, v = (torch.randn(1, kv_heads, n, dim, generator=g).requires_grad_() for _ in range(2))
        grad = torch.randn(1, heads, n, dim, generator=g)
        pos = torch.arange(n)
        full_mask = ((pos[:, None] - pos[None, :]) < window) & (pos[None, :] <= pos[:, None]) if masked else None
        in_window = lambda qp, kp: (qp[:, None] - kp[None, :]) < window  # noqa: E731

        def sdpa():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask, is_causal=causal and not masked,
                                                 enable_gqa=heads != kv_heads)
            out.backward(grad)

        def ring():
            out = ring_attention(q, k, v, causal=causal, mask=in_window if masked else None)
            out.backward(grad)

        base, ours = median_seconds(sdpa, reps), median_seconds(ring, reps)
        rows.append({"what": name, "seq": n, "baseline": "F.scaled_dot_product_attention", "baseline_s": base,
                     "ringify_s": ours, "speed_ratio": base / ours})
    return rows


# ----------------------------------------------------------------------------------- (b), (c) a step


def llama(shape: dict):
    import transformers as tf

    torch.manual_seed(0)  # the same weights on every rank
    cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                         num_hidden_layers=shape["layers"], num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=2 * shape["seq"], attn_implementation="sdpa")
    return tf.LlamaForCausalLM(cfg).train()


def step_seconds(model, params, ids, reps: int) -> float:
    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        for p in params:
            p.grad = None

    if dist.is_initialized():
        dist.barrier()
    return median_seconds(step, reps)


def model_rows(shape: dict, reps: int) -> dict:
    """On one process: the untouched step and the ringified ones at world 1 (no process group)."""
    torch.set_num_threads(1)
    base = llama(shape)
    ids = torch.randint(0, 1000, (1, shape["seq"]), generator=torch.Generator().manual_seed(1))
    untouched = step_seconds(base, list(base.parameters()), ids, reps)
    out = {"untouched_s": untouched}
    for key, chunk in (("ringify_ffn_chunked_s", 256), ("ringify_s", None)):
        model = copy.deepcopy(base)
        out[key] = step_seconds(ringify(model, ffn_chunk_tokens=chunk), list(model.parameters()), ids, reps)
    return out


def ring_step(shape: dict, reps: int) -> float:
    """On one rank of the ring: the ringified step at the full global length."""
    torch.set_num_threads(1)
    model = llama(shape)
    ids = torch.randint(0, 1000, (1, shape["seq"]), generator=torch.Generator().manual_seed(1))
    return step_seconds(ringify(model, outputs="local"), list(model.parameters()), ids, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition: checks that it runs")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/step_speed_cpu.json")
    args = parser.parse_args()
    reps = 1 if args.smoke else args.reps
    kernel_shape = {"seq": 300 if args.smoke else 4096, "window": 64 if args.smoke else 512, "tiny": args.smoke}
    model_shape = ({"seq": 96, "hidden": 32, "inter": 64, "layers": 1} if args.smoke else
                   {"seq": 4096, "hidden": 256, "inter": 688, "layers": 4})

    with LocalRanks(1) as one:
        kernels = one.run(kernel_rows, kernel_shape, reps, timeout=1800)[0]
        steps = one.run(model_rows, model_shape, reps, timeout=1800)[0]
    with LocalRanks(2) as two:
        ring2 = max(two.run(ring_step, model_shape, reps, timeout=1800))
    model = [
        {"what": "HF Llama step, world 1, feed-forward not chunked (default)", "baseline": "untouched (SDPA)",
         "baseline_s": steps["untouched_s"], "ringify_s": steps["ringify_s"]},
        {"what": "HF Llama step, world 1, feed-forward chunked (ffn_chunk_tokens=256)", "baseline": "untouched (SDPA)",
         "baseline_s": steps["untouched_s"], "ringify_s": steps["ringify_ffn_chunked_s"]},
        {"what": "HF Llama step, 2 gloo ranks vs one untouched process", "baseline": "untouched, 1 process",
         "baseline_s": steps["untouched_s"], "ringify_s": ring2},
    ]
    for row in model:
        row["speed_ratio"] = row["baseline_s"] / row["ringify_s"]
    checks = {
        f"kernel >= {TARGETS['kernel']}x SDPA": all(r["speed_ratio"] >= TARGETS["kernel"] for r in kernels),
        f"model step >= {TARGETS['model']}x untouched": model[0]["speed_ratio"] >= TARGETS["model"],
        f"2 ranks >= {TARGETS['two_ranks']}x one process": model[2]["speed_ratio"] >= TARGETS["two_ranks"],
    }
    result = {"date": datetime.date.today().isoformat(), "benchmark": "step_speed", "smoke": args.smoke,
              "device": "cpu, gloo, 1 torch thread per process", "platform": platform.platform(),
              "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "reps": reps,
              "kernel_shape": kernel_shape, "model_shape": model_shape, "kernel": kernels, "model": model,
              "targets": TARGETS, "checks": checks}
    out = save_result(args.out, result)

    print(f"\nmedian of {reps} after a warm-up, fp32, 1 thread per process -> {out}")
    print(f"{'what':<64} {'baseline':>10} {'ringify':>10} {'ratio (speed)':>14}")
    for row in kernels + model:
        print(f"{row['what'] + (' (S=' + str(row['seq']) + ')' if 'seq' in row else ''):<64} "
              f"{row['baseline_s']:>9.3f}s {row['ringify_s']:>9.3f}s {row['speed_ratio']:>13.2f}x")
    for name, ok in checks.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
