"""FX node helpers, in one place: a node's value and shape, its arguments by name, the assert ops,
where it came from (module path, source line) and how to name it in an error.

Every pass, the cost model and the report read nodes through these, so that an op schema change or a
new assert op is handled once.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_aggregate  # noqa: F401  (re-exported: the one way to map over nested args)
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten

#: Ops that only check metadata or sizes at run time: they produce nothing a pass must keep or shard.
ASSERT_OPS = frozenset({aten._assert_tensor_metadata, aten._assert_scalar, aten._assert_async,
                        aten.sym_constrain_range_for_size, aten.sym_constrain_range})


def packet(node: fx.Node):
    """The op overload packet of a call_function node (``aten.view`` for ``aten.view.default``), or the target."""
    return getattr(node.target, "overloadpacket", node.target)


def is_call(node, targets) -> bool:
    """``node`` is a call_function of one of ``targets`` (overloads or packets)."""
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and (node.target in targets or packet(node) in targets))


def is_assert(node) -> bool:
    """A run-time metadata / size assert: never keeps a value alive, never sharded."""
    return is_call(node, ASSERT_OPS)


def value(node) -> Any:
    """The example value of a node (``meta['val']``: a FakeTensor, SymInt...), or a constant argument itself."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def shape(node) -> tuple:
    """The shape of a node's tensor value, () for anything else."""
    val = value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def ndim(node) -> int:
    val = value(node)
    return val.dim() if isinstance(val, torch.Tensor) else 0


def named_args(node: fx.Node) -> dict[str, Any]:
    """All arguments of a call_function node by their schema names, defaults filled in.

    ``named_args(slice_node)["end"]`` instead of ``node.args[3]`` with a length check: positional
    and keyword spellings of the same call read the same, and a default is never guessed by hand.
    Falls back to ``{"args": ..., **kwargs}`` for targets without a schema.
    """
    cached = node.meta.get("ringify_named_args")
    if cached is not None and cached[0] == (node.target, node.args, node.kwargs):
        return cached[1]
    pair = None
    if isinstance(node.target, torch._ops.OpOverload):
        try:
            pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        except Exception:  # pragma: no cover - a schema normalize_function cannot read
            pair = None
    if pair is not None:
        named = dict(pair.kwargs)
        for argument in node.target._schema.arguments:
            if argument.name not in named and argument.has_default_value():
                named[argument.name] = argument.default_value
    else:
        named = {"args": node.args, **node.kwargs}
    node.meta["ringify_named_args"] = ((node.target, node.args, node.kwargs), named)
    return named


def arg(node: fx.Node, name: str, default=None):
    """One argument of ``node`` by its schema name (``arg(n, "dim")``), ``default`` if the schema has none."""
    named = named_args(node)
    return named[name] if name in named and named[name] is not None else default


def fetch_attr(module: torch.nn.Module, target: str):
    """The object a ``get_attr`` node's dotted ``target`` names."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def is_impure(node: fx.Node) -> bool:
    """A node DCE must keep: a module call or an op with side effects."""
    return node.op == "call_module" or (node.op == "call_function" and node.is_impure())


#: One frame of a ``stack_trace``: (file, line, function, code); the code line is absent when the source
#: could not be read, and then the next frame is not taken for it.
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)(?:\n(?![ \t]*File ")[ \t]*(.*))?')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
#: The ``nn_module_stack`` export's metadata hook gives a node made by a pass when its argument had none.
_EMPTY_STACK = "_empty_nn_module_stack_from_metadata_hook"


def common_prefix(lists) -> list:
    """The longest list of leading items all of ``lists`` share (``[]`` for none)."""
    prefix = []
    for items in zip(*lists):
        if any(i != items[0] for i in items):
            break
        prefix.append(items[0])
    return prefix


def stack_path(stack: dict | None) -> str:
    """Qualified path of the innermost module of an ``nn_module_stack`` (``model.layers.0.self_attn``), or ''.

    '' too for export's placeholder stack (a node a pass made, whose argument had no stack)."""
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    if path == _EMPTY_STACK:
        return ""
    # export prefixes paths with L['self'] / L__self__ in some versions
    return re.sub(r"^L\['self'\]\.?|^L__self__\.?", "", path).replace("._modules['", ".").replace("']", "")


def module_path(node: fx.Node) -> str:
    """Qualified path of the innermost module that ran ``node`` (``model.layers.0.self_attn``), or ''."""
    return stack_path(node.meta.get("nn_module_stack"))


def module_paths(node: fx.Node, prefix: str = "") -> list[str]:
    """Paths of the modules that ran ``node``, outermost first, relative to the model (``prefix`` removed)."""
    paths = []
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = str(path)
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        elif prefix and path + "." == prefix:
            continue  # the wrapper's own entry
        paths.append(path)
    return paths


def module_type(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack or list(stack.values())[-1][0] == _EMPTY_STACK:
        return ""
    kind = list(stack.values())[-1][1]
    return getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].rstrip("'>"))


def frames(node: fx.Node) -> list[tuple[str, str, str, str]]:
    """The frames of ``node``'s ``stack_trace``, outermost first: (file, line, function, code)."""
    return _FRAME.findall(node.meta.get("stack_trace") or "")


def source_line(node: fx.Node) -> str:
    """``file.py:123 (code)`` of the user's line that produced ``node``, or ''.

    The innermost frame outside torch itself: for an op inside ``nn.Conv1d`` that is the line calling
    the module (``self.conv(h)``), not ``torch/nn/modules/conv.py``."""
    found = frames(node)
    if not found:
        return ""
    outside = [f for f in found if not f[0].startswith(_TORCH_DIR)]
    path, line, _, code = (outside or found)[-1]
    return f"{path}:{line} ({code.strip()})" if code.strip() else f"{path}:{line}"


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
