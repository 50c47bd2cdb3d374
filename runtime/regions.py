"""How outlined regions of a rewritten graph run: recomputed in backward, or inside a module's hooks.

``ringify.passes.regions`` cuts the regions out; these modules are what the rewritten graph then calls.
They use the ecosystem's own machinery: ``torch.utils.checkpoint`` for recomputation, and the module's
own ``__call__`` (so FSDP2's unshard/reshard, gradient reduce-scatter and prefetch hooks) for a module's
ops.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

_CHECKPOINT_OPTIONS = ("preserve_rng_state", "determinism_check", "debug", "early_stop", "context_fn")


class Recompute(torch.nn.Module):
    """A region under ``torch.utils.checkpoint`` (non-reentrant): only its inputs are saved in forward, its
    activations (the ring attention's output and log-sum-exp among them) are recomputed in backward.

    ``options``: the model's own checkpoint call options (a selective-checkpoint ``context_fn``,
    ``preserve_rng_state``..., the saved-tensor hooks it ran under), applied to the rewritten region as
    they were to the original."""

    def __init__(self, body: torch.nn.Module, options: dict | None = None):
        super().__init__()
        self.body = body
        self.options = {k: v for k, v in (options or {}).items() if k in _CHECKPOINT_OPTIONS}
        self.hooks = (options or {}).get("saved_tensors_hooks")  # e.g. save_on_cpu: the saved inputs on the host

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.body(*args)
        with self.hooks or contextlib.nullcontext():
            return checkpoint(self.body, *args, use_reentrant=False, **self.options)


def run_as_forward(module: torch.nn.Module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run in place of ``module.forward``, through ``nn.Module.__call__``: the
    module's forward hooks run around it as around its own forward (FSDP2: unshard the parameters
    before, reshard and register the backward hooks that unshard again and reduce-scatter the gradients
    after). ``nn.Module.__call__`` itself, so a class's own ``__call__`` override is not involved."""
    object.__setattr__(module, "forward", fn)
    try:
        return torch.nn.Module.__call__(module, *args, **kwargs)
    finally:
        object.__delattr__(module, "forward")


class ThroughHooks(torch.nn.Module):
    """A region of the rewritten graph holding a module's ops, run as that module's forward
    (:func:`run_as_forward`). The module is referenced, not registered: it stays the user's."""

    def __init__(self, module: torch.nn.Module, body: torch.nn.Module, path: str):
        super().__init__()
        object.__setattr__(self, "module", module)
        self.body, self.path = body, path

    def forward(self, *args):
        return run_as_forward(self.module, lambda *a: self.body(*a), *args)

    def extra_repr(self) -> str:
        return f"module={self.path!r} ({type(self.module).__name__})"


class LiveParameters(torch.nn.Module):
    """Reads a parameter of the user's model by path when the graph runs, not when it was built.

    FSDP2 swaps a module's parameters between the sharded DTensor and the unsharded tensor in its hooks;
    the rewritten graph must read whatever the module holds at that moment (inside the module's forward:
    the unsharded one)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "model", model)

    def forward(self, path: str) -> torch.Tensor:
        param = self.model.get_parameter(path)
        if _is_dtensor(param):
            raise RuntimeError(
                f"ringify: the parameter `{path}` is still sharded (a DTensor) where the rewritten graph reads "
                "it: it is read outside the forward of the FSDP module that owns it. This is a bug in ringify's "
                "composition with FSDP2; please report it with the model."
            )
        return param


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


__all__ = ["LiveParameters", "Recompute", "ThroughHooks", "run_as_forward"]
