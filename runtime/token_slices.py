"""Slices and selections of a sharded sequence: the result lives where its tokens live.

A rank holds the rows of a sequence of ``seq_len`` tokens at its layout positions. A slice along the
sequence (``logits[:, :-1]``, ``x[:, -k:]``, ``narrow``) keeps the tokens at global positions
``[start, stop)``: each rank keeps the rows it holds in that range, renumbered from ``start`` (a *frame*
of the base sequence; a rank may keep none). Everything downstream of a slice is described by its frame
``(start, stop)`` over the base length, so a full tensor of the sliced length (``labels[:, 1:]``) is cut at
the same rows as the sliced activation it meets, and a loss over shifted logits pairs the same tokens on a
shard as on one device.

Selecting one token (``x[:, 0]``, a CLS head) gives a value without tokens: its owner rank contributes
the row and a sum over ranks hands it to every rank (backward: the owner's row gets the gradient, the
convention of :mod:`.collectives`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_reduce_sum, local_positions
from .comm import rank_and_size, resolve_group


def frame_positions(seq_len, frame, group: str, layout: str, device) -> torch.Tensor:
    """Positions within ``frame`` (sorted) of this rank's tokens of it: its rows, in order.

    ``frame`` is ``(start, stop)`` over a base sequence of ``seq_len`` tokens, or None for all of it.
    """
    positions = local_positions(int(seq_len), group, layout, torch.device(device))
    if frame is None:
        return positions
    start, stop = int(frame[0]), int(frame[1])
    return positions[(positions >= start) & (positions < stop)] - start


def frame_length(seq_len, frame) -> int:
    """Tokens in ``frame`` (all ``seq_len`` of the base for None)."""
    return int(seq_len) if frame is None else int(frame[1]) - int(frame[0])


def slice_tokens(x: torch.Tensor, dim: int, seq_len, frame, start, stop, group: str, layout: str) -> torch.Tensor:
    """This rank's rows of ``x`` (its tokens of ``frame``) whose frame position is in ``[start, stop)``
    (clamped to the frame's length already): the shard of the slice, whose frame is ``frame`` narrowed."""
    at = frame_positions(seq_len, frame, group, layout, x.device)
    keep = torch.nonzero((at >= int(start)) & (at < int(stop))).flatten()
    return x.index_select(dim, keep)


def cut_full(x: torch.Tensor, dim: int, seq_len, frame, group: str, layout: str) -> torch.Tensor:
    """This rank's rows of a full tensor whose ``dim`` runs over the tokens of ``frame`` (differentiable)."""
    return x.index_select(dim, frame_positions(seq_len, frame, group, layout, x.device))


def select_token(x: torch.Tensor, dim: int, seq_len, frame, index, group: str, layout: str) -> torch.Tensor:
    """``x.select(dim, index)`` over the whole frame, on every rank: the owner's row, summed over ranks."""
    at = frame_positions(seq_len, frame, group, layout, x.device)
    length = frame_length(seq_len, frame)
    index = int(index) % length
    hit = torch.nonzero(at == index).flatten()
    dim = dim % x.dim()
    if hit.numel():
        local = x.select(dim, int(hit[0]))
    else:  # another rank holds it: contribute zeros, still a function of x, so that this rank's backward runs
        local = x.narrow(dim, 0, 0).sum(dim)  # (its tokens reach the selected one through the ring: its backward
        # must run too); a sum over no rows, so an inf or NaN elsewhere in x cannot leak in
    return all_reduce_sum(local.contiguous(), group)


def gather_frame(x: torch.Tensor, dim: int, seq_len, frame, group: str, layout: str) -> torch.Tensor:
    """The whole frame of ``x`` on every rank: each rank's rows in place, summed over ranks."""
    length = frame_length(seq_len, frame)
    at = frame_positions(seq_len, frame, group, layout, x.device)
    dim = dim % x.dim()
    full = x.new_zeros((*x.shape[:dim], length, *x.shape[dim + 1:]))
    return all_reduce_sum(full.index_copy(dim, at, x), group)


class _Regather(torch.autograd.Function):
    """The whole sequence from every rank's rows, to be cut again under another layout: backward sums the
    full gradient over ranks (each rank's holds only its own new rows) before taking this rank's rows."""

    @staticmethod
    def forward(ctx, x, dim, at, length, group):
        ctx.dim, ctx.at, ctx.group = dim, at, group
        full = x.new_zeros((*x.shape[:dim], length, *x.shape[dim + 1:])).index_copy(dim, at, x)
        dist.all_reduce(full, group=group)
        return full

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.index_select(ctx.dim, ctx.at), None, None, None, None


def regather(x: torch.Tensor, dim: int, seq_len, frame, group: str, layout: str) -> torch.Tensor:
    """The whole frame of ``x`` on every rank, for an op that joins sequences (``cat([cls, x], 1)``: a new
    sequence, laid out anew); unlike :func:`gather_frame` each rank then uses other rows of it."""
    dim = dim % x.dim()
    length = frame_length(seq_len, frame)
    at = frame_positions(seq_len, frame, group, layout, x.device)
    pg = resolve_group(group)
    if rank_and_size(pg)[1] == 1 and at.numel() == length:
        return x
    return _Regather.apply(x, dim, at, length, pg)


__all__ = ["cut_full", "frame_positions", "gather_frame", "regather", "select_token", "slice_tokens"]
