"""Train a small Llama (GQA, RoPE) on a ring of ranks; check every step against a single device.

Every rank builds the same model and the same batch. The ringified model holds only this rank's
slice of the sequence; a deepcopy of the initial model trains on the full sequence in the same
process as the reference. Both take the same AdamW steps, so their loss curves must agree step for
step (fp32: relative difference < 1e-5).

    torchrun --nproc_per_node 3 examples/train_llama.py      # gloo on CPU, nccl on GPUs
    python examples/train_llama.py --world-size 3             # spawns 3 CPU gloo processes
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from ringify import ringify


def train(args: argparse.Namespace) -> list[tuple[float, float]]:
    """On one rank: `args.steps` AdamW steps of the ring model and of the reference; their losses."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    torch.manual_seed(args.seed)  # same weights and data on every rank
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=4 * args.dim, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).to(device)
    ref = copy.deepcopy(model)  # the single-device run
    ring = ringify(model)       # default process group, zigzag layout

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=args.lr)
    ids = torch.randint(args.vocab, (args.batch, args.seq_len), device=device)  # one batch to memorise

    losses = []
    for _ in range(args.steps):
        for m, o in ((ring, opt), (ref, ref_opt)):
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return list(zip(losses[1::2], losses[0::2]))  # (reference, ring) per step


def report(losses: list[tuple[float, float]], world_size: int) -> float:
    print(f"{'step':>4} {'single device':>14} {f'ring ({world_size} ranks)':>14} {'rel diff':>9}")
    worst = 0.0
    for step, (ref, ring) in enumerate(losses):
        diff = abs(ring - ref) / abs(ref)
        worst = max(worst, diff)
        print(f"{step:>4} {ref:>14.6f} {ring:>14.6f} {diff:>9.1e}")
    print(f"max relative difference: {worst:.3e}")
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=3, help="ranks to spawn when not under torchrun")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=61, help="any length >= world size; odd on purpose")
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
        losses, world_size = train(args), dist.get_world_size()
        if dist.get_rank() == 0:
            worst = report(losses, world_size)
        dist.destroy_process_group()
        if os.environ["RANK"] != "0":
            return
    else:
        from ringify.launch import LocalRanks

        with LocalRanks(args.world_size) as ranks:
            losses, world_size = ranks.run(train, args, timeout=600)[0], args.world_size
        worst = report(losses, world_size)
    assert worst < 1e-5, f"ring and single-device losses differ: {worst:.3e}"


if __name__ == "__main__":
    main()
