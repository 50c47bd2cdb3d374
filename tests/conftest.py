"""Fixtures every part's tests share, and ``tests/support`` on the path: the zoo, the CLI's model factories,
the Triton interpreter switch and the report's samples import by their module names (``import zoo``), here and
in the processes the ring tests spawn (which inherit ``sys.path``)."""

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))

from ringify.launch import LocalRanks  # noqa: E402
from triton_interpret import ON_CPU, interpret_mode  # noqa: E402


def _import_triton_interpretable() -> None:
    """Import triton first, with TRITON_INTERPRET=1, on a machine without a GPU.

    Triton's own library functions (``tl.max``...) are wrapped for interpreting or compiling when triton
    is first imported. Other test modules import it through the package; if they came first, the kernel
    tests (tests/runtime/test_triton_kernels.py) could not run in the interpreter and would skip in ``make test``.
    The variable is put back at once: the package's own kernel module still sees it unset.
    """
    if not ON_CPU:
        return
    with interpret_mode():
        try:
            import triton  # noqa: F401
        except ImportError:
            pass


_import_triton_interpretable()


@pytest.fixture(scope="session")
def ranks():
    """ranks(world_size) -> a live LocalRanks, shared across the session."""
    pools: dict[int, LocalRanks] = {}

    def get(world_size: int) -> LocalRanks:
        if world_size not in pools:
            pools[world_size] = LocalRanks(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed on failure through the test id's locals); ``RINGIFY_TEST_SEED=N`` replays one."""
    return int(os.environ.get("RINGIFY_TEST_SEED") or random.randrange(2**31))
