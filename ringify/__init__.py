"""ringify: rewrite a PyTorch model into exact ring-parallel form."""

from .errors import UnsupportedModelError

__all__ = ["UnsupportedModelError"]
__version__ = "0.1.0"
