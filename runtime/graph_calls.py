"""The functions a ringified graph calls: shards, positions, the ring, and reductions over ranks.

Each is a plain function of tensors and constants, so the rewritten ``GraphModule`` stays readable
(``print(rm.graph_module.code)``) and runs under ``torch.compile``. ``group`` is a group name from
:func:`ringify.runtime.comm.group_name` ("" = the default group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .block_mask import register_block_mask
from .collectives import all_reduce_sum, local_positions
from .comm import rank_and_size, resolve_group
from .layout import LAST
from .ring_attention import ring_attention
from .sequence import gather_sequence
from .token_slices import cut_full, gather_frame, regather, select_token, slice_tokens


def shard_like(x: torch.Tensor, dim: int, group: str, layout: str) -> torch.Tensor:
    """This rank's tokens of a full tensor along ``dim`` (differentiable); on one rank, ``x`` itself."""
    if rank_and_size(resolve_group(group))[1] == 1 and layout != LAST:
        return x
    positions = local_positions(x.size(dim), group, layout, x.device)
    return x.index_select(dim, positions)


def local_arange(end, start, step, group: str, layout: str, dtype, device) -> torch.Tensor:
    """``arange(start, end)`` over the sequence, restricted to this rank's global positions."""
    if step != 1:
        raise ValueError("local_arange supports step 1 only")
    positions = local_positions(int(end) - int(start), group, layout, torch.device(device or "cpu"))
    out = positions + int(start) if start else positions
    return out.to(dtype) if dtype is not None else out


def table_rows(table: torch.Tensor, dim: int, start, length, group: str, layout: str) -> torch.Tensor:
    """``table.narrow(dim, start, length)`` restricted to this rank's global positions."""
    positions = local_positions(int(length), group, layout, table.device)
    return table.index_select(dim, positions + int(start) if start else positions)


def ring_attention_call(q, k, v, mask_args: list, *, mask_fn, scale: float, causal: bool, fill: float,
                        group: str, layout: str, softcap: float = 0.0, sinks=None) -> torch.Tensor:
    """Canonical attention (``ringify.passes.attention.attention``) on this rank's shards, by the ring.
    ``sinks``: None or the per-head sink logits ``[H]`` (a parameter: the graph passes it through ``sync_grad``)."""
    return ring_attention(q, k, v, group, causal=causal, scale=scale, layout=layout, mask=mask_fn,
                          mask_args=tuple(mask_args), fill=fill, softcap=softcap, sinks=sinks)


def sum_over_ranks(x: torch.Tensor, dims, keepdim: bool, dtype, group: str) -> torch.Tensor:
    """``x.sum(dims)`` of the whole sequence from this rank's tokens."""
    local = x.sum(dim=dims, keepdim=keepdim, dtype=dtype) if dims is not None else x.sum(dtype=dtype)
    return all_reduce_sum(local, group)


def mean_over_ranks(x: torch.Tensor, dims, keepdim: bool, dtype, group: str) -> torch.Tensor:
    """``x.mean(dims)``: global sum over global count (the count differs per rank with uneven shards)."""
    if dims is None:
        dims = list(range(x.dim()))
    dims = [d % x.dim() for d in dims] if not isinstance(dims, int) else [dims % x.dim()]
    count = 1
    for d in dims:
        count *= x.size(d)
    total = sum_over_ranks(x, dims, keepdim, dtype, group)
    counts = all_reduce_sum(torch.tensor(float(count), dtype=torch.float64, device=x.device), group)
    return total / counts.to(total.dtype)


def cross_entropy_over_ranks(logits, target, weight=None, reduction: int = 1, ignore_index: int = -100,
                             label_smoothing: float = 0.0, *, group: str) -> torch.Tensor:
    """``aten.cross_entropy_loss`` over the whole sequence: sum over ranks / count of non-ignored tokens."""
    total = F.cross_entropy(logits, target, weight=weight, reduction="sum", ignore_index=ignore_index,
                            label_smoothing=label_smoothing)
    total = all_reduce_sum(total, group)
    if reduction == 2:
        return total
    valid = target != ignore_index
    if weight is not None:
        count = (weight[target.clamp(min=0)] * valid).sum()
    else:
        count = valid.sum().to(total.dtype)
    count = all_reduce_sum(count.to(total.dtype).detach(), group)
    return total / count


def nll_over_ranks(logp, target, weight=None, reduction: int = 1, ignore_index: int = -100, *, group: str):
    total = all_reduce_sum(F.nll_loss(logp, target, weight=weight, reduction="sum", ignore_index=ignore_index), group)
    if reduction == 2:
        return total
    valid = target != ignore_index
    count = (weight[target.clamp(min=0)] * valid).sum() if weight is not None else valid.sum()
    return total / all_reduce_sum(count.to(total.dtype).detach(), group)


def pointwise_loss_over_ranks(kind: str, input, target, reduction: int = 1, beta: float = 1.0, *, group: str):
    """mse / l1 / smooth-l1 over the whole sequence (``beta``: smooth-l1's, as aten passes it)."""
    fn = {"mse_loss": F.mse_loss, "l1_loss": F.l1_loss,
          "smooth_l1_loss": lambda i, t, reduction: F.smooth_l1_loss(i, t, reduction=reduction, beta=beta)}[kind]
    total = all_reduce_sum(fn(input, target, reduction="sum"), group)
    if reduction == 2:
        return total
    count = all_reduce_sum(torch.tensor(float(input.numel()), dtype=torch.float64, device=input.device), group)
    return total / count.to(total.dtype)


def gather_output(x: torch.Tensor, dim: int, group: str, layout: str, seq_len) -> torch.Tensor:
    """The full sequence of an output on every rank (backward keeps this rank's part)."""
    return gather_sequence(x, dim, group, layout, int(seq_len))


__all__ = [
    "cross_entropy_over_ranks", "cut_full", "gather_frame", "regather", "select_token", "slice_tokens", "gather_output", "local_arange", "mean_over_ranks", "nll_over_ranks",
    "pointwise_loss_over_ranks", "register_block_mask", "ring_attention_call", "shard_like", "sum_over_ranks", "table_rows",
]
