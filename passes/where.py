"""Where a node came from: module path and source line, for errors and reports."""

from __future__ import annotations

import os
import re

import torch
from torch import fx

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def module_path(node: fx.Node) -> str:
    """Qualified path of the innermost module that ran ``node`` (``model.layers.0.self_attn``), or ''."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # export prefixes paths with L['self'] / L__self__ in some versions
    return re.sub(r"^L\['self'\]\.?|^L__self__\.?", "", str(path)).replace("._modules['", ".").replace("']", "")


def module_type(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    kind = list(stack.values())[-1][1]
    return getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].rstrip("'>"))


def source_line(node: fx.Node) -> str:
    """``file.py:123 (code)`` of the user's line that produced ``node``, or ''.

    The innermost frame outside torch itself: for an op inside ``nn.Conv1d`` that is the line calling
    the module (``self.conv(h)``), not ``torch/nn/modules/conv.py``."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return ""
    outside = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    path, line, _, code = (outside or frames)[-1]
    return f"{path}:{line} ({code.strip()})"


def op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    overload = getattr(target, "overloadpacket", None)
    if overload is not None:
        name = f"aten.{overload.__name__}"
    return name


def describe(node: fx.Node) -> str:
    """``aten.cumsum`` in ``model.mixer`` at ``file.py:12 (x.cumsum(1))``: what a user needs to find it."""
    parts = [f"`{op_name(node)}` (node {node.name})"]
    path = module_path(node)
    parts.append(f"in module `{path}`" if path else "at the top level of the model")
    line = source_line(node)
    if line:
        parts.append(f"at {line}")
    return " ".join(parts)
