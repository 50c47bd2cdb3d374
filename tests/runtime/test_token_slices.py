"""Slices and selections of a sharded sequence (runtime/token_slices.py) on real gloo rings.

Each check runs the full op on one device and the sharded op on every rank, from the same random
inputs: values and gradients must agree, for any layout, world size and odd length.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ringify.runtime import shard_sequence
from ringify.runtime.collectives import all_reduce_sum, once_over_ranks, sync_grad
from ringify.runtime.comm import group_name
from ringify.runtime.token_slices import cut_full, gather_frame, select_token, slice_tokens
from ringify.verify import relative_error


def _shifted_loss(seed: int, seq_len: int, layout: str) -> dict:
    """``cross_entropy(logits[:, :-1], labels[:, 1:])`` from shards: loss and logits gradient exact."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, seq_len, 7, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 7, (2, seq_len), generator=g)
    labels[0, seq_len // 2] = -100
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    (ref_grad,) = torch.autograd.grad(ref, logits)

    group = group_name(None)
    local = shard_sequence(logits, 1, layout=layout)
    frame = (0, seq_len - 1)
    shifted = slice_tokens(local, 1, seq_len, None, 0, seq_len - 1, group, layout)
    targets = cut_full(labels[:, 1:], 1, seq_len, frame, group, layout)
    total = all_reduce_sum(F.cross_entropy(shifted.reshape(-1, 7), targets.reshape(-1), reduction="sum"), group)
    count = all_reduce_sum((targets != -100).sum().to(total.dtype), group)
    loss = total / count
    (grad,) = torch.autograd.grad(loss, logits)
    grad = all_reduce_sum(grad, group)  # each rank's own rows
    return {"loss": relative_error(loss, ref), "grad": relative_error(grad, ref_grad)}


def _nested_slice_and_gather(seed: int, seq_len: int, layout: str) -> float:
    """``x[:, 2:][:, :-1]`` as shards of frame (2, S-1), gathered back whole."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, seq_len, 4, generator=g)
    group = group_name(None)
    local = shard_sequence(x, 1, layout=layout)
    a = slice_tokens(local, 1, seq_len, None, 2, seq_len, group, layout)
    b = slice_tokens(a, 1, seq_len, (2, seq_len), 0, seq_len - 3, group, layout)
    return relative_error(gather_frame(b, 1, seq_len, (2, seq_len - 1), group, layout), x[:, 2:-1])


def _cls_head(seed: int, seq_len: int, layout: str) -> dict:
    """``head(x[:, 0])`` and ``head(x[:, -1])``: the selected token's owner contributes it; the head, which
    every rank repeats, counts its gradient once."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, seq_len, 5, generator=g).requires_grad_()
    head = torch.randn(3, 5, generator=g).requires_grad_()

    def loss_of(first, last, w):
        return (F.linear(first, w) ** 2).sum() + F.linear(last, w).sin().sum()

    ref = loss_of(x[:, 0], x[:, -1], head)
    ref_x, ref_w = torch.autograd.grad(ref, (x, head))
    group = group_name(None)
    local = shard_sequence(x, 1, layout=layout)
    w = once_over_ranks(sync_grad(head, group), group)
    loss = loss_of(select_token(local, 1, seq_len, None, 0, group, layout),
                   select_token(local, 1, seq_len, None, -1, group, layout), w)
    grad_x, grad_w = torch.autograd.grad(loss, (x, head), allow_unused=True, materialize_grads=True)
    return {"loss": relative_error(loss, ref), "x": relative_error(all_reduce_sum(grad_x, group), ref_x),
            "head": relative_error(grad_w, ref_w)}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "striped"])
def test_slices_and_selections_are_exact(ranks, seed, world_size, layout):
    seq_len = 3 * world_size + 2
    for errors in ranks(world_size).run(_shifted_loss, seed, seq_len, layout):
        assert max(errors.values()) < 1e-6, errors
    for error in ranks(world_size).run(_nested_slice_and_gather, seed, seq_len, layout):
        assert error == 0
    for errors in ranks(world_size).run(_cls_head, seed, seq_len, layout):
        assert max(errors.values()) < 1e-6, errors
