"""A real process group on this machine's CPUs, for the demo, the tests and the benchmarks.

Spawning processes and importing torch costs seconds, so :class:`LocalRanks` keeps ``world_size``
processes alive with an initialised gloo group and runs functions on all of them at once.
Communication is real: every byte goes through torch.distributed over loopback TCP.
Functions must be importable (module level), as with ``torch.multiprocessing.spawn``.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import threading
import traceback
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    _thread_lock_for_tqdm()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            value = fn(*args)
            ForkingPickler.dumps(value)  # an unpicklable result must fail here, not hang the caller
            results.put((rank, True, value))
        except BaseException as err:  # report everything, including assertion failures
            results.put((rank, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    results.close()
    results.join_thread()
    os._exit(0)  # skip gloo's teardown, which waits on peers that may already be gone


def _thread_lock_for_tqdm() -> None:
    """torch.fx's Interpreter makes a tqdm bar, and tqdm a multiprocessing lock: a semaphore that this
    process's ``os._exit`` never unregisters ("leaked semaphore objects" at shutdown). A thread lock does."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


class RankFailure(AssertionError):
    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        super().__init__("\n".join(f"--- rank {r} ---\n{text}" for r, text in sorted(failures.items())))


class LocalRanks:
    """``world_size`` live processes in one gloo group; ``run(fn, *args)`` calls fn on every rank.

    Each process uses one torch thread, so ranks do not fight over cores.
    """

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [
            ctx.Process(target=_serve, args=(r, world_size, port, self._tasks[r], self._results), daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float = 180.0) -> list:
        """Results of ``fn(*args)`` per rank; raises :class:`RankFailure` if any rank raised."""
        for q in self._tasks:
            q.put((fn, args))
        values, failures = {}, {}
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"ranks did not finish {fn.__name__} within {timeout}s (hang?)") from None
            (values if ok else failures)[rank] = value
        if failures:
            raise RankFailure(failures)
        return [values[r] for r in range(self.world_size)]

    def __enter__(self) -> "LocalRanks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
