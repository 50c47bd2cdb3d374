"""TRITON_INTERPRET=1 for a moment: what the Triton kernel tests need on a machine without a GPU."""

import contextlib
import os

import torch

ON_CPU = not torch.cuda.is_available()


@contextlib.contextmanager
def interpret_mode():
    """TRITON_INTERPRET=1 inside (without a GPU), as it was outside."""
    saved = os.environ.get("TRITON_INTERPRET")
    if ON_CPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
