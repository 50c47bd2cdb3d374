"""ringify: rewrite a PyTorch model into exact ring-parallel form."""

from .errors import UnsupportedModelError

__all__ = ["RingModule", "UnsupportedModelError", "ringify"]
__version__ = "0.1.0"


def __getattr__(name):  # the compiler imports torch.export machinery: load it on first use
    if name in ("ringify", "RingModule"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ringify' has no attribute {name!r}")
