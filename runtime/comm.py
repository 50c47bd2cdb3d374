"""Process groups, the ring communicator, and the agreement check (every call).

Every byte that crosses devices goes through ``torch.distributed``. Waits are bounded: a peer that
died or skipped a call raises :class:`RingTimeoutError` instead of hanging the job.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

DEFAULT_GROUP = ""  # group name meaning "the default process group, or a single process if none"

_default_timeout_s = float(os.environ.get("RINGIFY_TIMEOUT", "300"))


class RingTimeoutError(RuntimeError):
    """A peer did not answer within the timeout (dead, hung, or not calling the same op)."""


class RingInputError(ValueError):
    """Inputs that disagree between ranks or do not fit the layout; raised on every rank."""


def set_default_timeout(seconds: float) -> None:
    """Seconds a rank waits for a peer before raising :class:`RingTimeoutError` (env: RINGIFY_TIMEOUT)."""
    global _default_timeout_s
    if seconds <= 0:
        raise ValueError(f"timeout must be positive, got {seconds}")
    _default_timeout_s = float(seconds)


def default_timeout() -> float:
    return _default_timeout_s


def group_name(group) -> str:
    """Name of a ProcessGroup or 1-D DeviceMesh (``None``: the default group), for custom-op arguments."""
    if group is None:
        return DEFAULT_GROUP
    if isinstance(group, str):  # already a name
        return group
    if hasattr(group, "get_group"):  # DeviceMesh
        if group.ndim != 1:
            names = getattr(group, "mesh_dim_names", None)
            raise ValueError(
                f"the ring needs a 1-D DeviceMesh, got a {group.ndim}-D one{f' (dims {names})' if names else ''}; pass "
                f"its sequence-parallel dimension, e.g. mesh[{(names or ('cp',))[-1]!r}] (and data-parallel "
                "wrappers such as fully_shard the other one)"
            )
        group = group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")
    return group.group_name


def resolve_group(name: str):
    """ProcessGroup for a name from :func:`group_name`; ``None`` when running as a single process."""
    if name == DEFAULT_GROUP:
        return distributed_c10d._get_default_group() if dist.is_initialized() else None
    return distributed_c10d._resolve_process_group(name)


def rank_and_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _wait(work, timeout_s: float, what: str, rank: int) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:
        raise RingTimeoutError(
            f"rank {rank}: no answer from a peer within {timeout_s:g}s while {what}. A peer died, hangs, or "
            "is not calling ring attention with the same arguments; the process group is no longer usable. "
            "Raise the limit with ringify.runtime.set_default_timeout() or RINGIFY_TIMEOUT if peers are "
            f"just slow. ({err})"
        ) from err


def all_gather_ints(values: list[int], group, device: torch.device, timeout_s: float, what: str) -> list[list[int]]:
    """Every rank's list of ints (same length on all ranks), with a bounded wait."""
    if rank_and_size(group)[1] == 1:
        return [values]
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    return [t.tolist() for t in all_gather_tensor(mine, group, timeout_s, what)]


def all_gather_tensor(mine: torch.Tensor, group, timeout_s: float, what: str) -> list[torch.Tensor]:
    """Every rank's ``mine`` (same shape on all ranks), with a bounded wait."""
    rank, world = rank_and_size(group)
    if world == 1:
        return [mine]
    gathered = [torch.empty_like(mine) for _ in range(world)]
    _wait(dist.all_gather(gathered, mine, group=group, async_op=True), timeout_s, what, rank)
    return gathered


def all_gather_strings(text: str, group) -> list[str]:
    """Every rank's string; only used on the error path, where all ranks already know to call it."""
    _, world = rank_and_size(group)
    if world == 1:
        return [text]
    out: list = [None] * world
    dist.all_gather_object(out, text, group=group)
    return out


class RingComm:
    """Sends to the next rank and receives from the previous one, asynchronously.

    ``exchange`` posts both transfers and returns at once, so the caller computes on the block it has
    while the next one is in flight; ``wait`` then blocks (boundedly) until both are done.
    """

    def __init__(self, group, timeout_s: float):
        self.group = group
        self.rank, self.world = rank_and_size(group)
        self.timeout_s = timeout_s
        self._next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self._prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def exchange(self, send, recv, tag: int) -> list:
        """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous one (a tensor
        or a sequence of tensors each, matched in order); returns the works to :meth:`wait` on."""
        sends = [send] if isinstance(send, torch.Tensor) else list(send)
        recvs = [recv] if isinstance(recv, torch.Tensor) else list(recv)
        ops = [dist.P2POp(dist.isend, t, self._next, group=self.group, tag=tag + i) for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, self._prev, group=self.group, tag=tag + i) for i, t in enumerate(recvs)]
        return dist.batch_isend_irecv(ops)

    def wait(self, works: list, what: str) -> None:
        for work in works:
            _wait(work, self.timeout_s, what, self.rank)
