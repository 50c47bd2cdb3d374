"""PeakMemory counts live tensor bytes exactly: new storages once, frees, saved tensors, custom-op bodies."""

import random

import torch

from ringify.memory import PeakMemory

F32 = 4
SMALL = 64  # bytes of scalars (the loss, its gradient seed) on top of the big tensors


@torch.library.custom_op("ringify_test::twice_plus_one", mutates_args=())
def twice_plus_one(x: torch.Tensor) -> torch.Tensor:
    doubled = x * 2  # a temporary inside the op body: must count towards the peak
    return doubled + 1


def sizes(seed, count):
    rng = random.Random(seed)
    return [rng.randrange(1_000, 200_000) for _ in range(count)]


def test_one_allocation_counts_its_bytes(seed):
    (n,) = sizes(seed, 1)
    with PeakMemory() as meter:
        x = torch.randn(n)
        view = x[1:].view(-1, 1)  # views share the storage: counted once
    assert meter.peak_bytes == F32 * n
    assert meter.live_bytes == F32 * n
    del x, view
    assert meter.live_bytes == 0


def test_freed_memory_is_not_counted_twice(seed):
    n1, n2 = sizes(seed, 2)
    with PeakMemory() as meter:
        x = torch.randn(n1)
        del x
        y = torch.randn(n2)
    assert meter.peak_bytes == F32 * max(n1, n2)
    assert meter.live_bytes == F32 * n2 == F32 * y.numel()


def test_tensors_from_before_the_block_are_not_counted(seed):
    (n,) = sizes(seed, 1)
    x = torch.randn(n)
    with PeakMemory() as meter:
        x.mul_(1.5)
        view = x.view(-1)
        view[: n // 2].add_(0.25)
        y = x + 1
    assert meter.peak_bytes == F32 * y.numel()


def test_saved_tensors_and_backward(seed):
    (n,) = sizes(seed, 1)
    q = torch.randn(n, dtype=torch.float64).float().requires_grad_()
    with PeakMemory() as meter:
        loss = q.exp().sum()  # exp's result is saved for backward and held only by autograd
        saved = meter.live_bytes
        loss.backward()  # its gradient (n floats) is computed while the saved result is alive
    assert F32 * n <= saved <= F32 * n + SMALL
    assert 2 * F32 * n <= meter.peak_bytes <= 2 * F32 * n + SMALL
    assert F32 * n <= meter.live_bytes <= F32 * n + SMALL  # q.grad (and the loss); the saved result is freed
    torch.testing.assert_close(q.grad, q.detach().exp())


def test_custom_op_body_is_seen(seed):
    (n,) = sizes(seed, 1)
    x = torch.randn(n)
    with PeakMemory() as meter:
        out = twice_plus_one(x)
    assert meter.peak_bytes == 2 * F32 * n  # the temporary and the output were alive together
    assert meter.live_bytes == F32 * n
    torch.testing.assert_close(out, x * 2 + 1)
