import random

import pytest

from ringify.launch import LocalRanks


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
    """A fresh seed per test (printed on failure through the test id's locals)."""
    return random.randrange(2**31)
