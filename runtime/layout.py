"""Sequence layouts: which global token positions each rank of the ring holds.

Every layout works for any sequence length >= world size, divisible or not. Positions are always
sorted ascending, which the kernels rely on to skip causal blocks that are fully masked.

- ``contiguous``: rank r holds the r-th of W near-equal chunks. Simple, but under a causal mask the
  last rank does W times the work of the first.
- ``zigzag``: the sequence is cut into 2W near-equal chunks and rank r holds chunks r and 2W-1-r, so
  every rank does the same causal work.
- ``striped``: rank r holds tokens r, r+W, r+2W, ...: balanced at token granularity.

One more, internal to decoding (not a layout a user picks): ``LAST``, the last token only, on every rank.
A ringified graph run under it computes the token being decoded on every rank, its attention pointed
at the sharded key/value cache (:mod:`.kv_cache`).
"""

from __future__ import annotations

import functools

import torch

LAYOUTS = ("contiguous", "zigzag", "striped")
LAST = "last"  # decoding: every rank holds the last position (see the module docstring)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


@functools.lru_cache(maxsize=1024)
def _positions(seq_len: int, world_size: int, rank: int, layout: str) -> torch.Tensor:
    if layout == LAST:
        return torch.arange(seq_len - 1, seq_len)
    check_layout(layout)
    if seq_len < world_size:
        raise ValueError(
            f"sequence length {seq_len} is shorter than the world size {world_size}: every rank needs "
            "at least one token; use fewer ranks or a longer sequence"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    everything = torch.arange(seq_len)
    if layout == "contiguous":
        return everything.tensor_split(world_size)[rank]
    if layout == "zigzag":
        chunks = everything.tensor_split(2 * world_size)
        return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]])
    return everything[rank::world_size]


def cached(fn):
    """``fn`` (an ``lru_cache``), or the function it wraps while torch.compile traces: the cache is Python
    state that Dynamo would skip with a warning, and tracing the few index ops costs nothing at run time."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


def layout_positions(seq_len: int, world_size: int, rank: int, layout: str = "zigzag") -> torch.Tensor:
    """Global positions (int64, CPU, sorted ascending) of the tokens that ``rank`` holds."""
    return cached(_positions)(seq_len, world_size, rank, layout).clone()


def shard_lengths(seq_len: int, world_size: int, layout: str = "zigzag") -> list[int]:
    """Number of tokens each rank holds."""
    return [len(cached(_positions)(seq_len, world_size, r, layout)) for r in range(world_size)]


def contiguous_runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """Split sorted positions into maximal runs of consecutive integers, as (start index, length)."""
    if positions.numel() == 0:
        return []
    breaks = (torch.nonzero(positions.diff() != 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, positions.numel()]
    return [(s, e - s) for s, e in zip(starts, ends)]
