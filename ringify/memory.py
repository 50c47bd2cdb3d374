"""Peak tensor memory of a block of code, on any device (CPU included).

torch keeps allocator statistics for CUDA only, yet the claim "memory per rank stays flat as the ring
grows" must be checkable on the CPU gloo ranks the tests and benchmarks run on. :class:`PeakMemory`
is a :class:`~torch.utils._python_dispatch.TorchDispatchMode` (the mechanism behind torch's own
``MemTracker``) that sees every tensor an operator returns, counts each new untyped storage once by
its size in bytes, and subtracts it when the storage dies (a weakref finaliser). Tensors saved for
backward are live storages, so they count until autograd frees them.

Two things ``MemTracker`` misses are handled here: the bodies of Python custom ops
(``torch.library.custom_op``, such as ``ringify::ring_attention``), which a dispatch mode otherwise
sees as one opaque call, are run with the meter still watching; and storages that existed before the
block (inputs, views of them, in-place results) are never counted.

What it does not see: scratch memory an operator allocates and frees inside its own kernel, and
buffers that communication libraries keep outside torch tensors.

    with PeakMemory() as meter:
        loss = model(x).sum()
        loss.backward()
    meter.peak_bytes   # most bytes of tensors created in the block that were alive at once
"""

from __future__ import annotations

import weakref

import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakMemory"]


def _storages(tree) -> list[torch.UntypedStorage]:
    return [leaf.untyped_storage() for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as meter: ...``; then ``meter.peak_bytes`` (and ``meter.live_bytes``).

    ``peak_bytes``: the most bytes held at once by storages created inside the block, above what was
    live when it started. ``live_bytes``: those still alive now (also after the block ends).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}  # id of a tracked storage -> bytes counted for it
        self._finalizers: dict[int, weakref.finalize] = {}

    def _free(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key)
        self._finalizers.pop(key, None)

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        if not isinstance(size, int):  # a fake tensor's symbolic size (tracing inside the block): no memory
            return
        old = self._sizes.get(key)
        if old is None:
            if size == 0:
                return
            self._finalizers[key] = weakref.finalize(storage, self._free, key)
            old = 0
        self._sizes[key] = size  # a tracked storage may have been resized (out= ops)
        self.live_bytes += size - old
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = _maybe_get_opdef(func)
        if opdef is not None:
            # A Python custom op: run its body with this meter watching, so its temporaries count.
            devices = {leaf.device.type for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)}
            device = devices.pop() if len(devices) == 1 else None
            body = opdef._backend_fns.get(device) or opdef._backend_fns.get(None) or opdef._init_fn
            with self:
                return body(*args, **kwargs)
        result = func(*args, **kwargs)
        inputs = {id(s) for s in _storages((args, kwargs))}
        for storage in _storages(result):
            key = id(storage)
            # an output on an input's storage is new only if that storage was created in the block
            if key not in inputs or key in self._sizes:
                self._track(storage)
        return result
