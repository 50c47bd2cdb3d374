"""Cut a full sequence into this rank's shard, and put the shards back together.

Shards may have different lengths (any sequence length >= world size works); ``gather_sequence``
pads to the longest shard for the all-gather and drops the padding afterwards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import all_gather_ints, default_timeout, group_name, rank_and_size, resolve_group
from .layout import check_layout, layout_positions, shard_lengths


def _group(group):
    return resolve_group(group_name(group))


def shard_sequence(x: torch.Tensor, dim: int, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` (differentiable: gradients flow back to ``x``)."""
    check_layout(layout)
    rank, world = rank_and_size(_group(group))
    positions = layout_positions(x.size(dim), world, rank, layout)
    if layout == "contiguous" or world == 1:
        return x.narrow(dim, int(positions[0]), len(positions))
    return x.index_select(dim, positions.to(x.device))


class _GatherSequence(torch.autograd.Function):
    """All-gather of shards; backward keeps this rank's part of the full gradient.

    The backward assumes what ringify arranges: every rank computes the same function of the
    gathered tensor, so each rank's full gradient already holds everything its shard needs.
    """

    @staticmethod
    def forward(ctx, x_local, dim, group, layout, seq_len):
        rank, world = rank_and_size(group)
        ctx.dim, ctx.positions = dim, layout_positions(seq_len, world, rank, layout).to(x_local.device)
        if world == 1:
            return x_local.clone()
        lengths = shard_lengths(seq_len, world, layout)
        moved = x_local.movedim(dim, 0)
        padded = moved.new_zeros((max(lengths), *moved.shape[1:]))
        padded[: moved.shape[0]] = moved
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded, group=group)
        full = moved.new_empty((seq_len, *moved.shape[1:]))
        for r, (piece, n) in enumerate(zip(pieces, lengths)):
            full.index_copy_(0, layout_positions(seq_len, world, r, layout).to(full.device), piece[:n])
        return full.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full.index_select(ctx.dim, ctx.positions), None, None, None, None


def gather_sequence(x_local: torch.Tensor, dim: int, group=None, layout: str = "zigzag",
                    seq_len: int | None = None) -> torch.Tensor:
    """The full sequence from every rank's shard along ``dim``, in global order, on every rank.

    ``seq_len`` is the global length; when omitted the ranks exchange their shard lengths to find it.
    """
    check_layout(layout)
    pg = _group(group)
    rank, world = rank_and_size(pg)
    dim = dim % x_local.dim()
    if seq_len is None:
        lengths = all_gather_ints([x_local.size(dim)], pg, x_local.device, default_timeout(), "gathering shard lengths")
        seq_len = sum(n for (n,) in lengths)
    expected = shard_lengths(seq_len, world, layout)[rank]
    if x_local.size(dim) != expected:
        raise ValueError(
            f"rank {rank}: shard has {x_local.size(dim)} tokens along dim {dim}, but the {layout!r} layout of "
            f"{seq_len} tokens over {world} ranks gives it {expected}"
        )
    if world == 1:
        return x_local  # the whole sequence already: no copy, no extra tensor saved
    return _GatherSequence.apply(x_local, dim, pg, layout, seq_len)
