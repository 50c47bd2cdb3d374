"""The collectives a ringified model needs besides the ring: sums over ranks and gradient sync.

Both follow ringify's convention that every rank computes the same loss and calls ``backward`` on
it. A sum over ranks then has the identity as its backward (each rank already holds the gradient of
the shared loss), and parameter gradients, which each rank computes for its own tokens only, are
summed over ranks in backward.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .comm import group_name, rank_and_size, resolve_group
from .layout import cached, layout_positions


@torch.library.custom_op("ringify::all_reduce_sum", mutates_args=())
def all_reduce_sum_op(x: torch.Tensor, group: str) -> torch.Tensor:
    out = x.clone()
    pg = resolve_group(group)
    if rank_and_size(pg)[1] > 1:
        dist.all_reduce(out, group=pg)
    return out


@all_reduce_sum_op.register_fake
def _(x, group):
    return torch.empty_like(x)  # same strides as the clone


def _all_reduce_setup(ctx, inputs, output):
    pass


def _all_reduce_backward(ctx, grad):
    return grad, None  # every rank backpropagates the same loss: the sum's gradient is the identity


all_reduce_sum_op.register_autograd(_all_reduce_backward, setup_context=_all_reduce_setup)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (differentiable, identity backward)."""
    return all_reduce_sum_op(x, group if isinstance(group, str) else group_name(group))


class _SyncGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (each rank saw only its own tokens)."""

    @staticmethod
    def forward(ctx, param, group):
        ctx.group = group
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum_op(grad.contiguous(), ctx.group), None


def sync_grad(param: torch.Tensor, group: str) -> torch.Tensor:
    """``param`` as used by a ringified graph: its gradient is summed over the ring in backward."""
    if not (torch.is_grad_enabled() and param.requires_grad) or rank_and_size(resolve_group(group))[1] == 1:
        return param
    return _SyncGrad.apply(param, group)


class _OnceOverRanks(torch.autograd.Function):
    """Identity forward; backward keeps the gradient on rank 0 only (zeros elsewhere)."""

    @staticmethod
    def forward(ctx, param, group):
        ctx.rank = rank_and_size(resolve_group(group))[0]
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.rank == 0 else torch.zeros_like(grad)), None


def once_over_ranks(param: torch.Tensor, group: str) -> torch.Tensor:
    """``param`` as used by a computation every rank repeats on the same values (a head on a selected CLS
    token, a learned scale of the loss): each rank would add the same gradient, and ``sync_grad``'s sum would
    count it once per rank; rank 0 alone contributes it."""
    if not (torch.is_grad_enabled() and param.requires_grad) or rank_and_size(resolve_group(group))[1] == 1:
        return param
    return _OnceOverRanks.apply(param, group)


@functools.lru_cache(maxsize=64)
def _positions(seq_len: int, group: str, layout: str, device: torch.device) -> torch.Tensor:
    rank, world = rank_and_size(resolve_group(group))
    return layout_positions(seq_len, world, rank, layout).to(device)


def local_positions(seq_len: int, group: str, layout: str, device: torch.device) -> torch.Tensor:
    """Sorted global positions (int64) of this rank's tokens under ``layout``."""
    return cached(_positions)(int(seq_len), group, layout, torch.device(device))


def take_positions(x: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``x`` restricted to ``positions`` along ``dim`` (the shard of a full tensor; differentiable)."""
    return x.index_select(dim, positions)
