"""In-place writes: ``copy_``, ``fill_``, ``add_``... that change a tensor other nodes read.

A write is a node nobody uses (``key[..., :8].copy_(k_nope)``, DeepSeek-V3's ``expand_kv``): what it
changes is the base tensor it is a view of, and every view of that base. :func:`mutated_aliases`
names those, so the demand analysis (:mod:`ringify.passes.shard`) emits the write in each version
(full, local) in which one of them is needed. Element-wise writes (``copy_`` with broadcasting,
``fill_``, ``zero_``) are token-local like any element-wise op; the ``pointwise``-tagged ones (``add_``,
``mul_``) already are through :mod:`.pointwise`.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .base import register
from .pointwise import Pointwise

aten = torch.ops.aten


def _alias_of_first(node) -> tuple[bool, bool]:
    """(the output aliases the first argument, the op writes to it), from the op's schema: ``slice`` (True,
    False), ``copy_`` (True, True); ``getitem`` of an op whose outputs alias its input (``split``) aliases too."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False, False
    if node.target is operator.getitem:
        source = node.args[0]
        return (_alias_of_first(source)[0] if isinstance(source, fx.Node) else False), False
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments or not schema.returns:
        return False, False
    first, out = schema.arguments[0].alias_info, schema.returns[0].alias_info
    if first is None or out is None:
        return False, False
    if not (set(first.before_set) & set(out.after_set) or "*" in first.after_set):
        return False, False
    return True, bool(first.is_write)


def writes_in_place(node) -> bool:
    """``node`` writes to its first argument (``copy_``, ``add_``, ``index_put_``)."""
    return _alias_of_first(node)[1]


def mutated_aliases(node: fx.Node) -> set:
    """For an op that writes to its first argument in place: every node that sees the write (the base tensor the
    argument is a view of, and every view of that base), the op itself excluded; empty for any other node."""
    if not writes_in_place(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return set()
    root = node.args[0]
    while _alias_of_first(root)[0] and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    seen, todo = {root}, [root]
    while todo:
        for user in todo.pop().users:
            if user not in seen and user is not node and _alias_of_first(user)[0] and user.args[0] in seen:
                seen.add(user)
                todo.append(user)
    return seen


@register(aten.copy_, aten.copy, aten.fill_, aten.zero_)
class InPlaceElementwise(Pointwise):
    """``dst.copy_(src)`` (``src`` broadcast to ``dst``), ``fill_``, ``zero_``: each element of ``dst`` from the same
    element of ``src``, so token-local when their tokens line up (:class:`.pointwise.Pointwise`)."""


__all__ = ["mutated_aliases", "writes_in_place"]
