"""The rule registry: one :class:`Rule` per op family, looked up by a node's target.

A rule owns both halves of what an op does to the sequence: :meth:`Rule.classify` names the node's
family (how the rewrite treats it), :meth:`Rule.emit` builds its rank-local form when copying the node
onto local inputs is not enough. Lookup order (:func:`rule_for`): the exact overload, then predicates
(``torch.Tag.pointwise``: ``aten.max.other`` is elementwise though ``aten.max`` is not), then the
overload packet, then :data:`MIXING` (refuse on activations: an op no rule proves token-local mixes).
"""

from __future__ import annotations

import operator
from typing import Callable, Iterable

from torch import fx

from ..fx import named_args, packet

LOCAL = "local"          # token-local: run on this rank's shard as it is
REDUCE = "reduce"        # a reduction over tokens: local partial plus a sum over ranks
POSITIONS = "positions"  # arange over the sequence: this rank's global positions
TABLE = "table"          # rows 0..S of a fixed table (Bert's position_ids): its rows at this rank's positions
MIX = "mix"              # mixes tokens: only on values every rank holds in full (from the inputs alone)
ATTENTION = "attention"  # canonical attention: the ring
SLICE = "slice"          # a slice of an activation along its tokens: the rows this rank holds in the range
SELECT = "select"        # one token of an activation: its owner's row, handed to every rank
JOIN = "join"            # activations joined along the tokens (cat([cls, x], 1)): a new sequence, laid out anew


class Rule:
    """How one op family treats token dims. The defaults: mixing, emitted as a copy on local inputs."""

    #: views and ``getitem`` move tokens and never mix them: a refusal looks through them for the mixer
    moves_tokens = False

    def classify(self, node: fx.Node, tokens) -> str:
        """The family of ``node`` (``tokens``: :class:`ringify.passes.sequence.Tokens`)."""
        return MIX

    def emit(self, node: fx.Node, sharder) -> fx.Node | None:
        """The rank-local version of ``node`` in ``sharder.graph``, or None: copy it onto the local inputs."""
        return None

    def emit_full(self, node: fx.Node, sharder) -> fx.Node | None:
        """The full version of ``node``, or None: copy it onto the full inputs."""
        return None

    def hint(self, node: fx.Node) -> str:
        """Why this op cannot run on a shard, for the refusal ('' when the generic text says it)."""
        return ""


MIXING = Rule()

_BY_TARGET: dict[object, Rule] = {}
_WHEN: list[tuple[Callable[[fx.Node], bool], Rule]] = []


def _flat(ops) -> Iterable:
    for op in ops:
        if isinstance(op, (list, tuple, set, frozenset)):
            yield from _flat(op)
        elif op is not None:
            yield op


def register(*ops):
    """Class decorator: one instance of the rule serves ``ops`` (overloads, packets, functions, or lists)."""
    def wrap(cls):
        rule = cls()
        for op in _flat(ops):
            _BY_TARGET[op] = rule
        return cls
    return wrap


def register_when(predicate: Callable[[fx.Node], bool]):
    """Class decorator: the rule serves every node ``predicate`` accepts (checked after exact overloads)."""
    def wrap(cls):
        _WHEN.append((predicate, cls()))
        return cls
    return wrap


def rule_for(node: fx.Node) -> Rule:
    """The rule of a call_function node (see the module docstring for the order)."""
    rule = _BY_TARGET.get(node.target)
    if rule is not None:
        return rule
    for predicate, rule in _WHEN:
        if predicate(node):
            return rule
    return _BY_TARGET.get(packet(node), MIXING)


def operand(node: fx.Node):
    """The first argument of ``node`` by its schema name (``self``, ``input``...): the tensor an op works on."""
    named = named_args(node)
    if "args" in named and isinstance(named["args"], tuple):
        return named["args"][0] if named["args"] else None
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments:
        return None
    name = schema.arguments[0].name
    return named.get("input" if name == "self" else name)  # normalize_function renames ``self``


def dim_set(dims, ndim: int) -> set[int]:
    """``dims`` (None, an int or a list; None or [] = every dim, as aten reads them) as non-negative dims."""
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return set(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return {d % ndim for d in dims} if ndim else set()


__all__ = ["ATTENTION", "JOIN", "LOCAL", "MIX", "MIXING", "POSITIONS", "REDUCE", "SELECT", "SLICE", "TABLE", "Rule", "dim_set", "operand",
           "register", "register_when", "rule_for"]
