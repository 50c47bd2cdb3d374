"""A built-in small causal LM: the model that ``ringify demo`` and the tests ringify.

``TinyGPT`` is nanoGPT (Karpathy) shrunk: written the way people write GPTs by hand, not the way
HuggingFace does, so that the demo exercises the hand-written attention path of the passes (a
registered ``tril`` buffer sliced to ``[:T, :T]``, ``masked_fill(-inf)``, softmax, ``@ v``), a learned
position embedding indexed by ``arange(T)``, and a token-mean cross-entropy loss over the sequence.
No download, no dependency beyond torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TinyGPT", "TinyGPTOutput", "tiny_gpt_inputs"]


class TinyGPTOutput(NamedTuple):
    """``out.logits`` / ``out.loss`` like HuggingFace outputs; a NamedTuple so torch.export flattens it."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor]


# saved programs (``ringify convert``) record their output structure by this name
torch.utils._pytree._register_namedtuple(TinyGPTOutput, serialized_type_name="ringify.models.TinyGPTOutput")


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention, spelled by hand: the causal mask is a registered buffer, not ``is_causal``."""

    def __init__(self, d_model: int, n_head: int, max_len: int, dropout: float):
        super().__init__()
        assert d_model % n_head == 0
        self.n_head = n_head
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        # the mask as nanoGPT keeps it: [1, 1, max_len, max_len], 1 = may attend, sliced per call
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The feed-forward block: Linear(4x) -> GELU -> Linear, the shape the FFN pass chunks."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block, as in GPT-2 / nanoGPT."""

    def __init__(self, d_model: int, n_head: int, max_len: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, max_len, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A nanoGPT-style causal LM small enough for CPU tests and the ``ringify demo`` command.

    ``forward(idx, targets=None)`` returns ``TinyGPTOutput(logits, loss)``; ``loss`` is the mean
    cross entropy over the tokens whose target is not -100 (the targets are already aligned with
    ``idx``: no shift inside the model, as in nanoGPT), ``None`` without targets.
    """

    def __init__(self, vocab: int = 101, d_model: int = 64, n_head: int = 4, n_layer: int = 2,
                 max_len: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(max_len, d_model)  # learned positions: indexed by arange(T)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(d_model, n_head, max_len, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2: one parameter, two uses
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's init (std 0.02): keeps logits small, so fp32 comparisons are well conditioned
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None) -> TinyGPTOutput:
        B, T = idx.size()
        if T > self.max_len:
            raise ValueError(f"sequence of length {T} is longer than max_len={self.max_len}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return TinyGPTOutput(logits, loss)


def tiny_gpt_inputs(seed: int, batch: int = 2, seq_len: int = 16, vocab: int = 101) -> dict:
    """Fresh random ``idx`` and ``targets`` (with a few ignored -100 positions) for ``TinyGPT``.

    Random data, never constants: a sharding bug that swaps or drops tokens changes the result.
    At least one target per row stays real, so the mean loss is always defined.
    """
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (batch, seq_len), generator=g)
    targets = torch.randint(0, vocab, (batch, seq_len), generator=g)
    ignore = torch.rand(batch, seq_len, generator=g) < 0.15
    if seq_len > 1:  # at least one ignored target per row, so ignore_index is always exercised
        ignore[torch.arange(batch), torch.randint(1, seq_len, (batch,), generator=g)] = True
    ignore[:, 0] = False
    targets[ignore] = -100
    return dict(idx=idx, targets=targets)
