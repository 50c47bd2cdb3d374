"""Peak tensor memory of a training step with activation checkpointing: does ringify keep what it saves?

For an HF Llama (HF's activation checkpointing) and a hand-written GPT (``torch.utils.checkpoint`` per
block in its forward), one loss forward + backward on ``--seq-len`` tokens:

- the untouched model, without and with its checkpointing;
- ringify of the model without checkpointing, of the checkpointed model (the regions are kept), and
  ``ringify(model, checkpoint="layers")`` of the model that marks nothing;
- the ringified checkpointed variants on 2 and 3 gloo ranks at the same global length (per rank).

Target (issue 11): on one rank, ringify with checkpointing <= 1.05x the untouched checkpointed model.
:class:`ringify.memory.PeakMemory` counts the bytes of live tensors created during the step (parameter
gradients included, parameters and inputs excluded); one warm-up step (capture) first; one torch thread
per process.

    python benchmarks/training_memory.py [--seq-len 2048] [--out benchmarks/results/training_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import platform
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

from ringify import ringify
from ringify.launch import LocalRanks
from ringify.memory import PeakMemory
from ringify.models import TinyGPT, TinyGPTOutput

MIB = 2**20
TARGET = 1.05
LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1 << 16, attn_implementation="sdpa")
GPT = dict(vocab=256, d_model=128, n_head=4, n_layer=6, max_len=1 << 13)


class CheckpointedGPT(TinyGPT):
    """TinyGPT with ``torch.utils.checkpoint`` around each block in its own forward."""

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = checkpoint(block, x, use_reentrant=False)
        logits = self.lm_head(self.ln_f(x))
        return TinyGPTOutput(logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def llama(checkpointed: bool):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).train()
    if checkpointed:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


def gpt(checkpointed: bool):
    torch.manual_seed(0)
    return (CheckpointedGPT if checkpointed else TinyGPT)(**GPT).train()


VARIANTS = {  # name -> (builds the model, ringify options or None for untouched)
    "untouched": (False, None),
    "untouched + checkpointing": (True, None),
    "ringify": (False, {}),
    "ringify of the checkpointed model": (True, {}),
    "ringify checkpoint='layers'": (False, {"checkpoint": "layers"}),
}


def _call(model, ids, family: str):
    if family == "llama":
        return model(input_ids=ids, labels=ids, use_cache=False)
    return model(ids, ids)


def measure(family: str, variant: str, seq_len: int) -> float:
    """Peak MiB of one loss forward + backward on this rank, after a warm-up step."""
    checkpointed, options = VARIANTS[variant]
    model = (llama if family == "llama" else gpt)(checkpointed)
    net = model if options is None else ringify(model, **options)
    ids = torch.randint(256, (1, seq_len), generator=torch.Generator().manual_seed(1))

    def step():
        _call(net, ids, family).loss.backward()
        for p in model.parameters():
            p.grad = None

    step()
    with PeakMemory() as meter:
        step()
    return meter.peak_bytes / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--out", default="benchmarks/results/training_memory_cpu.json")
    args = parser.parse_args()
    rows = []
    with LocalRanks(1) as one:
        for family in ("llama", "gpt"):
            for variant in VARIANTS:
                peak = one.run(measure, family, variant, args.seq_len, timeout=900)[0]
                rows.append({"model": family, "variant": variant, "world": 1, "peak_mib": peak})
    for world in args.worlds:
        with LocalRanks(world) as ranks:
            for family in ("llama", "gpt"):
                for variant in ("ringify of the checkpointed model", "ringify checkpoint='layers'"):
                    peaks = ranks.run(measure, family, variant, args.seq_len, timeout=900)
                    rows.append({"model": family, "variant": variant, "world": world, "peak_mib": max(peaks)})
    base = {r["model"]: r["peak_mib"] for r in rows if r["variant"] == "untouched + checkpointing"}
    for r in rows:
        r["vs_untouched_checkpointed"] = r["peak_mib"] / base[r["model"]]
    met = all(r["vs_untouched_checkpointed"] <= TARGET for r in rows
              if r["world"] == 1 and r["variant"] in ("ringify of the checkpointed model", "ringify checkpoint='layers'"))
    result = {"date": datetime.date.today().isoformat(), "benchmark": "training_memory", "device": "cpu, gloo",
              "platform": platform.platform(), "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
              "dtype": "float32", "seq_len": args.seq_len, "llama": LLAMA, "gpt": GPT, "target_ratio": TARGET,
              "target_met": met, "rows": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nloss forward + backward, {args.seq_len} tokens (global), peak tensor MiB per rank, fp32 -> {out}")
    print("llama: HF Llama 6 layers hidden 128 (HF activation checkpointing); gpt: TinyGPT 6 layers d 128 "
          "(torch.utils.checkpoint per block)")
    print(f"{'model':<6} {'variant':<36} {'world':>5} {'peak MiB':>9} {'vs untouched+ckpt':>18}")
    for r in rows:
        print(f"{r['model']:<6} {r['variant']:<36} {r['world']:>5} {r['peak_mib']:>9.1f} "
              f"{r['vs_untouched_checkpointed']:>18.2f}")
    print(f"target: ringify with checkpointing on one rank <= {TARGET}x the untouched checkpointed model: "
          f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
