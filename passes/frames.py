"""Which tokens of a sequence a rank-local value holds: its *frame*.

A value computed from the sharded inputs holds this rank's rows of a sequence (its *base*, laid out over
the ranks). After a slice along the tokens (``logits[:, :-1]``, ``hidden[:, -k:]``) it holds only those
rows whose global positions fall in ``[start, stop)`` of the base (:mod:`ringify.runtime.token_slices`).
Frames are symbolic (sympy expressions of the sequence symbols), so the rewrite decides at rewrite time
which values pair the same tokens: two local values meet in a token-local op only with the same frame,
and a full tensor cut for them (``labels[:, 1:]``) is cut at that frame's rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
from torch import fx

from .fx import value
from .sequence import size_expr

_BIG = 2**62  # aten's "to the end" (sys.maxsize) and anything beyond it


@dataclass(frozen=True)
class Frame:
    """Positions ``[start, stop)`` of a base sequence of ``base`` tokens."""

    base: sympy.Expr
    start: sympy.Expr
    stop: sympy.Expr

    @property
    def is_whole(self) -> bool:
        """All of the base: nothing was sliced away (the default frame of every value)."""
        return self.start == 0 and sympy.expand(self.stop - self.base) == 0

    @property
    def length(self) -> sympy.Expr:
        return sympy.expand(self.stop - self.start)

    def narrowed(self, start: sympy.Expr, stop: sympy.Expr) -> "Frame":
        """The frame of ``[start, stop)`` relative to this one."""
        return Frame(self.base, sympy.expand(self.start + start), sympy.expand(self.start + stop))

    def __str__(self) -> str:
        return f"positions [{self.start}, {self.stop}) of {self.base}"


def whole(length) -> Frame:
    """The frame of a value that holds all of its own sequence (its token dim of size ``length``)."""
    length = size_expr(length)
    return Frame(length, sympy.Integer(0), length)


def _expr(bound) -> sympy.Expr | None:
    if bound is None:
        return None
    if isinstance(bound, fx.Node):
        return size_expr(value(bound))
    if isinstance(bound, (int, torch.SymInt)):
        return size_expr(bound)
    raise TypeError(f"not a slice bound: {bound!r}")


def _normal(bound: sympy.Expr, length: sympy.Expr) -> sympy.Expr:
    """Python's reading of a bound: a negative constant counts from the end, huge ones mean the end."""
    if bound.is_number:
        if bound >= _BIG:
            return length
        if bound < 0:
            return sympy.expand(length + bound)
    return bound


def slice_bounds(length, start, end) -> tuple[sympy.Expr, sympy.Expr]:
    """``[start, end)`` of ``x[start:end]`` along a dim of ``length`` tokens, as expressions in [0, length]."""
    length = size_expr(length)
    lo = _normal(_expr(start), length) if start is not None else sympy.Integer(0)
    hi = _normal(_expr(end), length) if end is not None else length
    return lo, hi


def select_index(length, index) -> sympy.Expr:
    """The position ``x.select(dim, index)`` picks along a dim of ``length`` tokens."""
    return _normal(_expr(index), size_expr(length))


def cuttable(size) -> bool:
    """A token dim that is one sequence, possibly lengthened or shortened by a constant (``S``, ``S + 1``,
    ``S - 1``), not one merged with other dims (``2*S``): only such a dim is laid out over the ranks."""
    if not isinstance(size, torch.SymInt):
        return False
    expr = size.node.expr
    symbols = list(expr.free_symbols)
    if len(symbols) != 1:
        return False
    poly = sympy.Poly(expr, symbols[0])
    return poly.degree() == 1 and poly.LC() == 1


__all__ = ["Frame", "cuttable", "select_index", "slice_bounds", "whole"]
