"""ringify: rewrite a PyTorch model into exact ring-parallel form."""

from .errors import UnsupportedModelError

__all__ = ["RingModule", "UnsupportedModelError", "load", "ringify"]
__version__ = "0.1.0"


def __getattr__(name):  # the compiler imports torch.export machinery: load it on first use
    if name in ("ringify", "RingModule"):
        from . import api

        return getattr(api, name)
    if name == "load":  # ringify.load(path, mesh): a program saved by `ringify convert`, on any world size
        from .saved import load

        return load
    raise AttributeError(f"module 'ringify' has no attribute {name!r}")
