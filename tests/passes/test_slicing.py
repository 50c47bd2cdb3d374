"""Slices and selections of activations along the sequence, through ``ringify`` on real gloo rings.

A slice keeps the rows each rank holds in its range (a shard of a shorter sequence); one selected token
is handed to every rank by its owner; a CLS token joined in front makes a new sequence laid out anew.
Each model is checked against itself run whole (logits, loss, every gradient within 1e-5), and ops that
pair different tokens (a shift of an activation) are refused naming the op.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ringify import UnsupportedModelError, ringify
from ringify.verify import relative_error, worst_grad_error

V, D, H = 23, 16, 2


class _Block(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.o(y.transpose(1, 2).reshape(B, S, D))


class ShiftedLM(nn.Module):
    """``loss = CE(logits[:, :-1], labels[:, 1:])``; ``keep``: the head on the last ``keep`` tokens only; ``narrow``:
    the loss over ``logits.narrow(1, 1, S - 2)``; ``scale``: a learned scale of the loss (every rank repeats it)."""

    def __init__(self, keep: int = 0, narrow: bool = False):
        super().__init__()
        self.keep, self.narrow = keep, narrow
        self.emb, self.block, self.head = nn.Embedding(V, D), _Block(True), nn.Linear(D, V)
        self.scale = nn.Parameter(torch.tensor(1.7))

    def forward(self, ids, labels):
        h = self.block(self.emb(ids) * 2)
        S = ids.shape[1]
        if self.keep:
            h = h[:, -self.keep:]
        logits = self.head(h)
        if self.narrow:
            loss = F.cross_entropy(logits.narrow(1, 1, S - 2).reshape(-1, V), labels[:, 2:].reshape(-1))
        else:
            k = logits.shape[1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, S - k + 1:].reshape(-1))
        return logits, loss * self.scale


class ClsEncoder(nn.Module):
    """A CLS token joined in front, learned positions sliced to S + 1, a head on ``x[:, 0]``."""

    def __init__(self, max_len: int = 64):
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(5, D), _Block(False), nn.Linear(D, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(torch.randn(1, max_len, D) * 0.5)

    def forward(self, feats, target):
        x = torch.cat([self.cls.expand(feats.shape[0], -1, -1), self.embed(feats)], dim=1)
        x = self.block(x + self.pos[:, : x.shape[1]])
        logits = self.head(x[:, 0])
        return logits, F.cross_entropy(logits, target)


class Shift(nn.Module):
    """``x[:, 1:] - x[:, :-1]`` of an activation: pairs each token with its neighbour (refused)."""

    def __init__(self):
        super().__init__()
        self.emb, self.block = nn.Embedding(V, D), _Block(True)

    def forward(self, ids, labels):
        h = self.block(self.emb(ids))
        return (h[:, 1:] - h[:, :-1]).pow(2).mean()


def _inputs(name: str, seed: int, seq_len: int):
    g = torch.Generator().manual_seed(seed)
    if name == "cls":
        return torch.randn(2, seq_len, 5, generator=g), torch.randint(0, 3, (2,), generator=g)
    ids = torch.randint(0, V, (2, seq_len), generator=g)
    labels = torch.randint(0, V, (2, seq_len), generator=g)
    labels[0, seq_len // 2] = -100
    return ids, labels


_MODELS = {"shifted": ShiftedLM, "keep_last": lambda: ShiftedLM(keep=3), "narrow": lambda: ShiftedLM(narrow=True),
           "cls": ClsEncoder}


def check_model(name: str, seed: int, seq_len: int) -> dict:
    torch.manual_seed(seed)
    model = _MODELS[name]()
    reference = copy.deepcopy(model)
    args = _inputs(name, seed, seq_len)
    ref_logits, ref_loss = reference(*args)
    ref_loss.backward()
    logits, loss = ringify(model)(*args)
    loss.backward()
    errors = {"logits": relative_error(logits, ref_logits), "loss": relative_error(loss, ref_loss),
              "grad": worst_grad_error(model, reference)[0]}
    assert max(errors.values()) < 1e-5, (name, errors)
    return errors


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", list(_MODELS))
def test_slices_and_selections_are_the_same_function(ranks, seed, name, world_size):
    ranks(world_size).run(check_model, name, seed, 4 * world_size + 1)


def refusal(seq_len: int) -> str:
    with pytest.raises(UnsupportedModelError) as err:
        ringify(Shift())(*_inputs("shift", 0, seq_len))
    return str(err.value)


def test_pairing_neighbouring_tokens_is_refused(ranks):
    message = ranks(2).run(refusal, 9)[0]
    assert "aten.sub" in message and "different tokens" in message and "test_slicing.py" in message, message
