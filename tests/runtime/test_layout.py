"""Layouts, shard_sequence and gather_sequence: any length >= world size, uneven shards."""

import pytest
import torch
import torch.distributed as dist

from ringify.runtime import LAYOUTS, gather_sequence, layout_positions, shard_lengths, shard_sequence
from ringify.runtime.layout import contiguous_runs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("seq_len", [8, 9, 17, 64, 101])
def test_positions_partition_the_sequence(layout, world_size, seq_len):
    if seq_len < world_size:
        pytest.skip("shorter than the world")
    shards = [layout_positions(seq_len, world_size, r, layout) for r in range(world_size)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(seq_len))
    for shard in shards:
        assert len(shard) >= 1 and torch.all(shard.diff() > 0)  # every rank has a token, sorted
    lengths = shard_lengths(seq_len, world_size, layout)
    assert lengths == [len(s) for s in shards] and max(lengths) - min(lengths) <= 2


def test_zigzag_balances_causal_work():
    """Rank r holds chunks r and 2W-1-r: the causal pairs each rank computes are equal."""
    world, seq_len = 4, 64
    work = [int(layout_positions(seq_len, world, r, "zigzag").add(1).sum()) for r in range(world)]
    assert len(set(work)) == 1
    assert layout_positions(seq_len, world, 1, "zigzag").tolist() == [*range(8, 16), *range(48, 56)]


def test_runs():
    assert contiguous_runs(torch.tensor([0, 1, 2, 13, 14])) == [(0, 3), (3, 2)]
    assert contiguous_runs(torch.tensor([1, 5, 9])) == [(0, 1), (1, 1), (2, 1)]


def test_shorter_than_world_is_refused():
    with pytest.raises(ValueError, match="shorter than the world size 4"):
        layout_positions(3, 4, 0, "zigzag")
    with pytest.raises(ValueError, match="unknown layout 'ring'"):
        layout_positions(8, 2, 0, "ring")


def round_trip(seed, seq_len, dim, layout):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, seq_len, 5, generator=g, dtype=torch.float64).requires_grad_()
    local = shard_sequence(x, dim, layout=layout)
    assert local.shape[dim] == shard_lengths(seq_len, dist.get_world_size(), layout)[dist.get_rank()]
    full = gather_sequence(local, dim, layout=layout)  # seq_len found by exchanging lengths
    assert torch.equal(full, x)
    weights = torch.randn(full.shape, generator=g, dtype=torch.float64)
    (full * weights).sum().backward()  # every rank: the same loss of the gathered tensor
    return x.grad, weights


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_gather_round_trip_and_gradient(ranks, seed, world_size, layout):
    for grad, weights in ranks(world_size).run(round_trip, seed, 4 * world_size + 3, 1, layout):
        # each rank's gradient reaches exactly the tokens it holds; together they cover the sequence
        assert torch.equal(grad[grad != 0], weights[grad != 0])
    grads = torch.stack([g for g, _ in ranks(world_size).run(round_trip, seed, 4 * world_size + 3, 1, layout)])
    assert torch.equal(grads.sum(0), weights)
