"""The functions a ringified graph calls: shards, positions, the ring, and reductions over ranks.

Each is a plain function of tensors and constants, so the rewritten ``GraphModule`` stays readable
(``print(rm.graph_module.code)``) and runs under ``torch.compile``. ``group`` is a group name from
:func:`ringify.runtime.comm.group_name` ("" = the default group).

Each one declares, with :func:`graph_call`, what the report's picture calls it (its kind and title), so
the picture follows a rename here instead of matching names; calls not declared are drawn as token-local ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block_mask import register_block_mask
from .collectives import all_reduce_sum, all_reduce_sum_op, local_positions, sync_grad
from .comm import rank_and_size, resolve_group
from .layout import LAST
from .ring_attention import ring_attention, ring_attention_op
from .sequence import gather_sequence, shard_sequence
from .token_slices import cut_full, gather_frame, regather, select_token, slice_tokens

#: The kinds of graph call the report tells apart ("parameter": a parameter read, counted, not drawn).
CALL_KINDS = ("shard", "position", "ring_attention", "ffn", "collective", "parameter")


@dataclass(frozen=True)
class GraphCall:
    """How the report draws a call of a function: its kind (one of :data:`CALL_KINDS`) and its title."""
    kind: str
    title: str


_OPS: dict[str, GraphCall] = {}  # qualified name of a custom op ("ringify::ring_attention") -> its declaration


def graph_call(kind: str, title: str):
    """Declare a function (or a ``torch.library`` custom op, which an exported graph holds instead of the
    function that calls it) a graph call of ``kind`` drawn as ``title``."""
    if kind not in CALL_KINDS:
        raise ValueError(f"graph_call kind {kind!r}: one of {CALL_KINDS}")

    def declare(fn):
        call = GraphCall(kind, title)
        if isinstance(fn, torch._library.custom_ops.CustomOpDef):
            _OPS[fn._qualname] = call
        else:
            fn.graph_call = call
        return fn
    return declare


def declared(target) -> GraphCall | None:
    """The declaration of an fx node's target: a declared function, or a declared op's overload or packet."""
    if isinstance(target, torch._ops.OpOverload):
        return _OPS.get(target._schema.name)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return _OPS.get(target._qualified_op_name)
    call = getattr(target, "graph_call", None)
    return call if isinstance(call, GraphCall) else None


# runtime functions and ops that graphs hold, declared here beside the calls defined below
graph_call("ring_attention", "ring attention")(ring_attention_op)  # an exported ring_attention_call
graph_call("collective", "all-reduce sum")(all_reduce_sum_op)       # an exported reduction over ranks
graph_call("ring_attention", "ring attention")(ring_attention)     # the public functions, where the model
graph_call("collective", "all-reduce sum")(all_reduce_sum)          # itself calls them
graph_call("collective", "gather sequence")(gather_sequence)
graph_call("shard", "shard")(shard_sequence)
graph_call("parameter", "gradient summed over ranks")(sync_grad)    # a parameter read: counted, not drawn


@graph_call("shard", "shard")
def shard_like(x: torch.Tensor, dim: int, group: str, layout: str) -> torch.Tensor:
    """This rank's tokens of a full tensor along ``dim`` (differentiable); on one rank, ``x`` itself."""
    if rank_and_size(resolve_group(group))[1] == 1 and layout != LAST:
        return x
    positions = local_positions(x.size(dim), group, layout, x.device)
    return x.index_select(dim, positions)


@graph_call("position", "local positions (arange)")
def local_arange(end, start, step, group: str, layout: str, dtype, device) -> torch.Tensor:
    """``arange(start, end)`` over the sequence, restricted to this rank's global positions."""
    if step != 1:
        raise ValueError("local_arange supports step 1 only")
    positions = local_positions(int(end) - int(start), group, layout, torch.device(device or "cpu"))
    out = positions + int(start) if start else positions
    return out.to(dtype) if dtype is not None else out


@graph_call("position", "table rows")
def table_rows(table: torch.Tensor, dim: int, start, length, group: str, layout: str) -> torch.Tensor:
    """``table.narrow(dim, start, length)`` restricted to this rank's global positions."""
    positions = local_positions(int(length), group, layout, table.device)
    return table.index_select(dim, positions + int(start) if start else positions)


@graph_call("ring_attention", "ring attention")
def ring_attention_call(q, k, v, mask_args: list, *, mask_fn, scale: float, causal: bool, fill: float,
                        group: str, layout: str, softcap: float = 0.0, sinks=None) -> torch.Tensor:
    """Canonical attention (``ringify.passes.attention.attention``) on this rank's shards, by the ring.
    ``sinks``: None or the per-head sink logits ``[H]`` (a parameter: the graph passes it through ``sync_grad``)."""
    return ring_attention(q, k, v, group, causal=causal, scale=scale, layout=layout, mask=mask_fn,
                          mask_args=tuple(mask_args), fill=fill, softcap=softcap, sinks=sinks)


@graph_call("collective", "sum over ranks")
def sum_over_ranks(x: torch.Tensor, dims, keepdim: bool, dtype, group: str) -> torch.Tensor:
    """``x.sum(dims)`` of the whole sequence from this rank's tokens."""
    local = x.sum(dim=dims, keepdim=keepdim, dtype=dtype) if dims is not None else x.sum(dtype=dtype)
    return all_reduce_sum(local, group)


@graph_call("collective", "mean over ranks")
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


@graph_call("collective", "cross-entropy over ranks")
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


@graph_call("collective", "NLL over ranks")
def nll_over_ranks(logp, target, weight=None, reduction: int = 1, ignore_index: int = -100, *, group: str):
    total = all_reduce_sum(F.nll_loss(logp, target, weight=weight, reduction="sum", ignore_index=ignore_index), group)
    if reduction == 2:
        return total
    valid = target != ignore_index
    count = (weight[target.clamp(min=0)] * valid).sum() if weight is not None else valid.sum()
    return total / all_reduce_sum(count.to(total.dtype).detach(), group)


@graph_call("collective", "loss over ranks")
def pointwise_loss_over_ranks(kind: str, input, target, reduction: int = 1, beta: float = 1.0, *, group: str):
    """mse / l1 / smooth-l1 over the whole sequence (``beta``: smooth-l1's, as aten passes it)."""
    fn = {"mse_loss": F.mse_loss, "l1_loss": F.l1_loss,
          "smooth_l1_loss": lambda i, t, reduction: F.smooth_l1_loss(i, t, reduction=reduction, beta=beta)}[kind]
    total = all_reduce_sum(fn(input, target, reduction="sum"), group)
    if reduction == 2:
        return total
    count = all_reduce_sum(torch.tensor(float(input.numel()), dtype=torch.float64, device=input.device), group)
    return total / count.to(total.dtype)


@graph_call("collective", "gather output")
def gather_output(x: torch.Tensor, dim: int, group: str, layout: str, seq_len) -> torch.Tensor:
    """The full sequence of an output on every rank (backward keeps this rank's part)."""
    return gather_sequence(x, dim, group, layout, int(seq_len))


__all__ = [
    "GraphCall", "graph_call", "declared",
    "cross_entropy_over_ranks", "cut_full", "gather_frame", "regather", "select_token", "slice_tokens", "gather_output", "local_arange", "mean_over_ranks", "nll_over_ranks",
    "pointwise_loss_over_ranks", "register_block_mask", "ring_attention_call", "shard_like", "sum_over_ranks", "table_rows",
]
