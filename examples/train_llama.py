"""Train a small Llama (GQA, RoPE) with FSDP2 over data parallel x ringify over the sequence; check it.

The README's training recipe: a 2-D mesh (dp x cp), ``fully_shard`` on each layer and on the model over
``mesh["dp"]`` (parameters, gradients and optimizer states split over dp), ``ringify(model, mesh["cp"],
outputs="local")`` (the sequence split over cp; the logits stay this rank's shard, the loss is the
whole sequence's), the model's own activation checkpointing kept (``--checkpoint hf``) or every layer
recomputed (``--checkpoint layers``). Each dp replica trains on its own batch, the same on its cp ranks.

A copy of the model runs each step on one device in the same process, from the recipe's parameters,
on all replicas' batches: the losses and every step's gradient (the mean over the replicas) must agree
(fp32: relative difference < 1e-5; a gradient that is zero in exact arithmetic is measured against the
largest one). Starting each step from the same parameters keeps the check exact: AdamW divides by the
gradients' size, so two runs drift apart in their near-zero gradients' rounding over steps.

    torchrun --nproc_per_node 4 examples/train_llama.py --dp 2 --cp 2   # gloo on CPU, nccl on GPUs
    python examples/train_llama.py --dp 2 --cp 2                         # spawns 4 CPU gloo processes
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from ringify import ringify


def build(args: argparse.Namespace, device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)  # same weights on every rank
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=4 * args.dim, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).to(device).train()
    if args.checkpoint == "hf":  # activation_checkpointing_enable: transformers >= 5 (gradient_... before)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model


def train(args: argparse.Namespace) -> dict:
    """On one rank: ``args.steps`` AdamW steps of the recipe and of the single-device reference."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    model = build(args, device)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(args.seed + 1)  # every replica's batches, the same on every rank
    batches = [[torch.randint(args.vocab, (args.batch, args.seq_len), generator=g).to(device) for _ in range(args.dp)]
               for _ in range(args.steps)]

    # ------------------------------------------------------------------ the recipe (README: Training)
    mesh = init_device_mesh(device.type, (args.dp, args.cp), mesh_dim_names=("dp", "cp"))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    rm = ringify(model, mesh["cp"], outputs="local", checkpoint="layers" if args.checkpoint == "layers" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    replica = mesh["dp"].get_local_rank()
    losses, ref_losses, grad_errors = [], [], []
    for step in range(args.steps):
        with torch.no_grad():  # the reference starts the step from the recipe's parameters (only to check)
            for p, ref in zip(model.parameters(), reference.parameters()):
                ref.copy_(p.full_tensor())
        ids = batches[step][replica]                     # this dp replica's batch, the same on its cp ranks
        loss = rm(input_ids=ids, labels=ids).loss        # the whole sequence's loss; logits stay local
        loss.backward()                                  # grads: DTensors sharded over dp, exact
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # (only to check them)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())
        losses.append(mean.item() / args.dp)
    # -------------------------------------------------------------------------------------------------
        total = 0.0
        for ids in batches[step]:                        # the single-device step on every replica's batch
            ref_loss = reference(input_ids=ids, labels=ids, use_cache=False).loss / args.dp
            ref_loss.backward()
            total += ref_loss.item()
        scale = max(p.grad.norm().item() for p in reference.parameters())
        grad_errors.append(max(((grads[n] - p.grad).norm() / max(p.grad.norm(), 1e-3 * scale)).item()
                               for n, p in reference.named_parameters()))
        reference.zero_grad(set_to_none=True)
        ref_losses.append(total)
    whole = sum(p.numel() * p.element_size() for p in reference.parameters())
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return {"losses": list(zip(ref_losses, losses, grad_errors)), "param_bytes": (local, whole),
            "regions": [r["kind"] for r in rm.report(cost=False).regions]}


def report(result: dict, args: argparse.Namespace) -> float:
    print(f"{'step':>4} {'single device':>14} {f'dp {args.dp} x ring {args.cp}':>14} {'loss diff':>9} {'grad diff':>9}")
    worst = 0.0
    for step, (ref, ring, grad) in enumerate(result["losses"]):
        diff = abs(ring - ref) / abs(ref)
        worst = max(worst, diff, grad)
        print(f"{step:>4} {ref:>14.6f} {ring:>14.6f} {diff:>9.1e} {grad:>9.1e}")
    local, whole = result["param_bytes"]
    regions = result["regions"]
    print(f"parameters per rank: {local / 2**10:.1f} KiB of {whole / 2**10:.1f} KiB (FSDP2 over dp={args.dp}); "
          f"{regions.count('fsdp')} FSDP2 modules, {regions.count('checkpoint')} recomputed regions")
    print(f"max relative difference (losses, gradients): {worst:.3e}")
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, default=2, help="data-parallel replicas (FSDP2)")
    p.add_argument("--cp", type=int, default=2, help="ring ranks per replica (the sequence split)")
    p.add_argument("--checkpoint", choices=["hf", "layers", "none"], default="hf",
                   help="hf: the model's gradient_checkpointing_enable(); layers: ringify recomputes every layer")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=61, help="any length >= cp; odd on purpose")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=97)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if "RANK" in os.environ:  # torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
        if dist.get_world_size() != args.dp * args.cp:
            raise SystemExit(f"--dp {args.dp} x --cp {args.cp} != {dist.get_world_size()} processes")
        result = train(args)
        worst = report(result, args) if dist.get_rank() == 0 else 0.0
        dist.destroy_process_group()
        if os.environ["RANK"] != "0":
            return
    else:
        from ringify.launch import LocalRanks

        with LocalRanks(args.dp * args.cp) as ranks:
            result = ranks.run(train, args, timeout=600)[0]
        worst = report(result, args)
    assert worst < 1e-5, f"the recipe and the single-device run differ: {worst:.3e}"


if __name__ == "__main__":
    main()
