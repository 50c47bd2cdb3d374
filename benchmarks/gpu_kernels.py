"""Everything a lent H100/H200 should measure, in one call: ringify's per-block kernels against torch's.

1. Attention kernels, forward and forward + backward, bf16, S >= 4096, D 64 and 128, causal and not:
   SDPA with each backend (flash, cuDNN, memory-efficient) against ringify's block kernels on one block
   (Triton, and the fused aten path ``RINGIFY_KERNEL=fused``), TFLOP/s and each one's error against SDPA
   (the fused path's correctness on CUDA is checked here: it cannot be on CPU machines).
2. One rank's ring emulated on one GPU: this rank's queries against the 8 key/value blocks of an 8-rank
   zigzag ring, block by block through the ring's own kernels and merge (no communication), against one
   monolithic causal SDPA over the whole sequence divided by 8 ranks (the ideal share).
3. The longest context one GPU holds for a ~1B-parameter Llama training step (forward + backward, bf16):
   untouched with eager attention, untouched with SDPA, ringify at world 1 (and with checkpoint='layers').

Reference numbers measured on an H100 (for comparison): bf16 matmul ~739 TFLOP/s, SDPA flash ~350
TFLOP/s forward, cuDNN attention ~620. ``--smoke`` runs every section on tiny CPU shapes (the test suite
runs it so the script cannot rot before a GPU is lent).

    python benchmarks/gpu_kernels.py [--smoke] [--out benchmarks/results/gpu_kernels.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F

from ringify.runtime import block_attention, fused_attention
from ringify.runtime.layout import layout_positions


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    fn()
    _sync(device)
    best = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        best.append(time.perf_counter() - start)
    best.sort()
    return best[len(best) // 2]


def attention_flops(b, h, s, d, causal: bool, backward: bool) -> float:
    f = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)  # forward + backward = 1 + 2.5


def _sdpa_backends(device):
    if device.type != "cuda":
        return {"sdpa (default)": None}
    from torch.nn.attention import SDPBackend

    return {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION}


def _block_kernels(device):
    kernels = {"ringify fused (aten)": (fused_attention.fused_block_forward, fused_attention.fused_block_backward)}
    if device.type == "cuda":
        from ringify.runtime.triton_attention import triton_available, triton_block_backward, triton_block_forward

        if triton_available():
            kernels["ringify triton"] = (triton_block_forward, triton_block_backward)
    kernels["ringify torch tiles"] = (block_attention.torch_block_forward, block_attention.torch_block_backward)
    return kernels


def _block_call(fwd, bwd, q, k, v, do, q_pos, k_pos, causal, backward: bool):
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    fwd(q, k, v, out, lse, q_pos, k_pos, scale=q.shape[-1] ** -0.5, causal=causal)
    if not backward:
        return out, None
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=q.device) for t in (q, k, v))
    delta = (do.float() * out).sum(-1)
    extra = {"out": out.to(q.dtype)} if bwd is fused_attention.fused_block_backward else {}
    bwd(q, k, v, do, lse, delta, dq, dk, dv, q_pos, k_pos, scale=q.shape[-1] ** -0.5, causal=causal, **extra)
    return out, (dq, dk, dv)


def kernels_section(device, dtype, shapes, reps: int) -> list[dict]:
    rows = []
    for b, h, s, d, causal in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (torch.randn(b, h, s, d, generator=g).to(device, dtype) for _ in range(4))
        pos = torch.arange(s, device=device)
        qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), do)  # the timing runs below accumulate into .grad
        for name, backend in _sdpa_backends(device).items():
            ctx = (torch.nn.attention.sdpa_kernel(backend) if backend is not None else contextlib.nullcontext())
            for backward in (False, True):
                def run():
                    with ctx:
                        o = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
                        if backward:
                            o.backward(do)
                try:
                    seconds = timed(run, device, reps)
                except RuntimeError as err:  # a backend that does not take this shape or dtype
                    rows.append({"kernel": name, "shape": [b, h, s, d], "causal": causal, "backward": backward,
                                 "error": str(err).splitlines()[0][:200]})
                    continue
                rows.append({"kernel": name, "shape": [b, h, s, d], "causal": causal, "backward": backward,
                             "seconds": seconds,
                             "tflops": attention_flops(b, h, s, d, causal, backward) / seconds / 1e12})
        for name, (fwd, bwd) in _block_kernels(device).items():
            if device.type == "cuda" and name == "ringify fused (aten)" and not fused_attention.available("cuda", True):
                continue
            for backward in (False, True):
                try:
                    seconds = timed(lambda: _block_call(fwd, bwd, q, k, v, do, pos, pos, causal, backward), device, reps)
                    out, grads = _block_call(fwd, bwd, q, k, v, do, pos, pos, causal, True)
                except Exception as err:  # noqa: BLE001 - report it, measure the rest
                    rows.append({"kernel": name, "shape": [b, h, s, d], "causal": causal, "backward": backward,
                                 "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
                    continue
                err = max(_rel(out, ref), *(_rel(a, b_) for a, b_ in zip(grads, ref_grads)))
                rows.append({"kernel": name, "shape": [b, h, s, d], "causal": causal, "backward": backward,
                             "seconds": seconds, "tflops": attention_flops(b, h, s, d, causal, backward) / seconds / 1e12,
                             "max_rel_error_vs_sdpa": err})
    return rows


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ring_section(device, dtype, b, h, s, d, world: int, reps: int) -> dict:
    """Rank ``world // 2``'s queries against every block of a zigzag ring of ``world`` ranks, on one device."""
    g = torch.Generator(device="cpu").manual_seed(1)
    q_full, k_full, v_full = (torch.randn(b, h, s, d, generator=g).to(device, dtype) for _ in range(3))
    rank = world // 2
    positions = [layout_positions(s, world, r, "zigzag").to(device) for r in range(world)]
    q = q_full[:, :, positions[rank]]
    blocks = [(k_full[:, :, p], v_full[:, :, p], p) for p in positions]
    fwd, _ = _block_kernels(device)["ringify triton" if "ringify triton" in _block_kernels(device)
                                    else "ringify fused (aten)"]

    def ring():
        out = torch.zeros(q.shape, dtype=torch.float32, device=device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=device)
        for k, v, p in blocks:
            fwd(q, k, v, out, lse, positions[rank], p, scale=d ** -0.5, causal=True)
        return out

    def monolithic():
        F.scaled_dot_product_attention(q_full, k_full, v_full, is_causal=True)

    ring_s, sdpa_s = timed(ring, device, reps), timed(monolithic, device, reps)
    return {"world": world, "shape": [b, h, s, d], "ring_rank_seconds": ring_s, "sdpa_whole_seconds": sdpa_s,
            "ideal_share_seconds": sdpa_s / world, "efficiency": (sdpa_s / world) / ring_s}


def context_section(device, dtype, cfg: dict, lengths: list[int], checkpointed: bool = True) -> dict:
    """The longest of ``lengths`` each variant trains on without running out of memory."""
    import transformers as tf

    from ringify import ringify

    def fits(variant: str, seq: int) -> bool:
        torch.manual_seed(0)
        attn = "eager" if variant == "untouched eager" else "sdpa"
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg, attn_implementation=attn)).to(device, dtype).train()
        net = model
        if variant.startswith("ringify"):
            net = ringify(model, outputs="local", checkpoint="layers" if "layers" in variant else None)
        ids = torch.randint(0, cfg["vocab_size"], (1, seq), device=device)
        try:
            net(input_ids=ids, labels=ids).loss.backward()
            _sync(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del model, net
            if device.type == "cuda":
                torch.cuda.empty_cache()

    variants = ["untouched eager", "untouched sdpa", "ringify world 1"]
    if checkpointed:
        variants.append("ringify world 1, checkpoint='layers'")
    out = {}
    for variant in variants:
        best = 0
        for seq in lengths:
            if not fits(variant, seq):
                break
            best = seq
        out[variant] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes: checks that every section runs")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/gpu_kernels.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        dtype, reps = torch.float32, 1
        shapes = [(1, 2, 96, 16, True), (1, 2, 96, 16, False)]
        ring_shape, lengths = (1, 2, 128, 16), [32, 64]
        cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096)
    else:
        if device.type != "cuda":
            raise SystemExit("no CUDA device: run with --smoke on CPU machines")
        os.environ.setdefault("RINGIFY_KERNEL", "auto")
        dtype, reps = torch.bfloat16, args.reps
        shapes = [(1, 16, s, d, c) for s in (4096, 16384) for d in (64, 128) for c in (True, False)]
        ring_shape, lengths = (1, 16, 65536, 128), [2**i for i in range(12, 21)]
        cfg = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1 << 21)
    result = {"date": datetime.date.today().isoformat(), "benchmark": "gpu_kernels", "smoke": args.smoke,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "platform": platform.platform(), "torch": torch.__version__, "dtype": str(dtype),
              "command": " ".join(["python", *sys.argv])}
    result["kernels"] = kernels_section(device, dtype, shapes, reps)
    result["ring"] = ring_section(device, dtype, *ring_shape, 8, reps)
    result["context"] = context_section(device, dtype, cfg, lengths)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['device']}, {dtype} -> {out}")
    print(f"{'kernel':<24} {'shape':<22} {'causal':>6} {'fwd+bwd':>7} {'ms':>9} {'TFLOP/s':>8} {'err vs sdpa':>11}")
    for r in result["kernels"]:
        if "error" in r:
            print(f"{r['kernel']:<24} {str(r['shape']):<22} {str(r['causal']):>6} {str(r['backward']):>7}  {r['error']}")
            continue
        err = f"{r['max_rel_error_vs_sdpa']:.1e}" if "max_rel_error_vs_sdpa" in r else "-"
        print(f"{r['kernel']:<24} {str(r['shape']):<22} {str(r['causal']):>6} {str(r['backward']):>7} "
              f"{1e3 * r['seconds']:>9.2f} {r['tflops']:>8.1f} {err:>11}")
    ring = result["ring"]
    print(f"one rank of an {ring['world']}-rank ring on one device: {1e3 * ring['ring_rank_seconds']:.2f} ms vs the "
          f"ideal share of one SDPA {1e3 * ring['ideal_share_seconds']:.2f} ms: efficiency {ring['efficiency']:.2f}")
    print("longest training context on one device: " + ", ".join(f"{k} {v}" for k, v in result["context"].items()))


if __name__ == "__main__":
    main()
