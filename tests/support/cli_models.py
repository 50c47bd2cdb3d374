"""Factories the CLI tests name as ``cli_models:NAME`` (``package.module:factory`` MODEL arguments)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ringify.models import TinyGPT, tiny_gpt_inputs

SEED = 1234


def tiny_gpt():
    """A seeded TinyGPT with example inputs: the same weights in every process that calls it."""
    torch.manual_seed(SEED)
    model = TinyGPT(vocab=61, d_model=32, n_head=4, n_layer=2, max_len=256)
    return model, tiny_gpt_inputs(SEED, batch=2, seq_len=41, vocab=61)


class RunningSum(nn.Module):
    """Mixes the tokens of an activation with cumsum: ringify must refuse it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x).cumsum(dim=1)


def running_sum():
    return RunningSum(), (torch.randn(1, 16, 8),)


def not_a_module():
    return "hello"


def tiny_gpt_meta():
    """TinyGPT built on the meta device, without example inputs: a plan without weights (``ringify report``)."""
    with torch.device("meta"):
        return TinyGPT(vocab=61, d_model=32, n_head=4, n_layer=2, max_len=256)


class ReadsItsBuffer(nn.Module):
    """Python reads a buffer's value (a layer count): fine with real tensors, impossible on meta."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("depth", torch.tensor(2))

    def forward(self, x):
        for _ in range(int(self.depth)):
            x = self.proj(x)
        return x


def reads_its_buffer_meta():
    with torch.device("meta"):
        model = ReadsItsBuffer()
    return model, (torch.randn(1, 16, 8),)


def tiny_llama():
    """A seeded tiny random LlamaForCausalLM (float32, eval; GQA, rotary): the model alone, its config names the
    vocabulary (``ringify generate`` draws prompts from it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).to(torch.float32).eval()
