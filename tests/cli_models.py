"""Factories the CLI tests name as ``tests.cli_models:NAME`` (``package.module:factory`` MODEL arguments)."""

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
