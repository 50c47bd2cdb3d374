"""Where the sequence lives in a captured graph.

Capture marks the sequence dimension of the inputs dynamic, so every tensor in the graph carries it
as a symbolic size (``s0``; a flattened batch-and-sequence dim shows as ``2*s0``). A dim whose size
mentions a sequence symbol is a *token dim*. What each op does with its token dims is decided by the
op's rule (:mod:`ringify.passes.rules`); this module only answers where the tokens are.
"""

from __future__ import annotations

import sympy
import torch
from torch import fx

from .fx import value


def sequence_symbols(placeholders: list[fx.Node], seq_dims: dict[str, int]) -> set[sympy.Symbol]:
    """Symbols of the sequence sizes of the inputs (``seq_dims``: placeholder name -> dim)."""
    symbols: set[sympy.Symbol] = set()
    for node in placeholders:
        if node.name in seq_dims:
            size = value(node).shape[seq_dims[node.name]]
            if isinstance(size, torch.SymInt):
                symbols |= size.node.expr.free_symbols
    return symbols


def mentions(size, symbols: set) -> bool:
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols & symbols)


def token_dims(node, symbols: set) -> list[int]:
    """Dims of ``node``'s tensor value whose size mentions a sequence symbol."""
    val = value(node)
    if isinstance(val, torch.Tensor):
        return [d for d, size in enumerate(val.shape) if mentions(size, symbols)]
    return []


def has_tokens(node, symbols: set) -> bool:
    """Whether the value (tensor, SymInt, or a list of them) depends on the sequence length."""
    val = value(node)
    vals = val if isinstance(val, (list, tuple)) else [val]
    for v in vals:
        if isinstance(v, torch.Tensor) and any(mentions(s, symbols) for s in v.shape):
            return True
        if isinstance(v, torch.SymInt) and mentions(v, symbols):
            return True
    return False


def size_expr(size) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression, so sizes compare and divide symbolically."""
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


class Tokens:
    """The sequence symbols of one graph, with the questions rules ask about them.

    Rules receive this rather than the bare symbol set, so a rule reads ``tokens.dims(x)`` and never
    threads the symbols through by hand.
    """

    def __init__(self, symbols: set):
        self.symbols = symbols

    def dims(self, node) -> list[int]:
        """Token dims of a node's tensor value ([] for anything else)."""
        return token_dims(node, self.symbols)

    def has(self, node) -> bool:
        """The node's value (tensor, size, list of them) depends on the sequence length."""
        return isinstance(node, fx.Node) and has_tokens(node, self.symbols)


__all__ = ["Tokens", "has_tokens", "mentions", "sequence_symbols", "size_expr", "token_dims"]
