"""The view algebra: reshapes, permutations, broadcasts, copies and dtype casts.

Views move each token's data, they never combine two tokens, with one exception: a reshape that
cuts a token's elements across output rows (``(B, S, E) -> (B, S*E/2, 2)``). A reshape keeps tokens
whole when each token's elements stay together and in order (:func:`_view_keeps_tokens`). The
output's token dim may then merge the sequence with dims after it (``(S, B, E) -> (S*B, E)``, as
``nn.MultiheadAttention`` does) or before it (``(B, S, V) -> (B*S, V)`` for a loss); the factor a
merge adds (``B`` in ``S*B``) is :func:`token_inner`, and two values merged differently must not meet
(:func:`mixes_token_layouts`).
"""

from __future__ import annotations

import sympy
import torch
from torch import fx

from ..fx import arg, is_call, packet, value
from ..sequence import size_expr
from .base import LOCAL, MIX, Rule, operand, register

aten = torch.ops.aten

# views that may merge or split the token dim (checked by ``_view_keeps_tokens``); the others move it whole
RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten)
MOVES = (
    aten.transpose, aten.permute, aten.t, aten.unsqueeze, aten.squeeze, aten.expand, aten.broadcast_to,
    aten.contiguous, aten.clone, aten.alias, aten.detach, aten.view_as, aten.expand_as, aten.reshape_as,
    aten._to_copy, aten.to, aten.type_as, aten.lift_fresh_copy,
    # complex numbers: the real and imaginary parts, and a complex tensor as (..., 2) reals
    aten.view_as_real, aten.real, aten.imag,
)


@register(RESHAPES, MOVES)
class View(Rule):
    moves_tokens = True

    def classify(self, node, tokens) -> str:
        return LOCAL if _view_keeps_tokens(node, tokens) else MIX

    def emit(self, node, sharder):
        """A view's size at the token dim becomes -1: the captured size is an expression of the input lengths
        (``s0 + 1`` after a CLS token joined, ``s0 - 1`` after a slice) that this rank's sizes do not obey."""
        if packet(node) not in (aten.view, aten.reshape, aten._unsafe_view, aten.expand):
            return None
        dims, shape = sharder.seq.dims(node), node.args[1] if len(node.args) > 1 else None
        if len(dims) != 1 or not isinstance(shape, (list, tuple)) or not isinstance(shape[dims[0]], fx.Node):
            return None
        if packet(node) is aten.expand and dims[0] < len(shape) - value(operand(node)).dim():
            return None  # a new leading dim of an expand: -1 means "keep", which it cannot
        if any(isinstance(s, int) and s == -1 for s in shape) and packet(node) is not aten.expand:
            return None
        new = sharder.copy(node, sharder.get_local)
        new.args = (new.args[0], [-1 if d == dims[0] else s for d, s in enumerate(new.args[1])], *new.args[2:])
        return new


@register(aten.view_as_complex)
class ViewAsComplex(View):
    """``(..., 2)`` reals as complex numbers: it merges the trailing pair only, so tokens stay unless they are
    that pair (torchtitan's rotary: ``view_as_complex(xq.reshape(B, S, H, D // 2, 2))``)."""

    def classify(self, node, tokens) -> str:
        x = operand(node)
        return MIX if value(x).dim() - 1 in tokens.dims(x) else LOCAL


def _view_keeps_tokens(node: fx.Node, tokens) -> bool:
    """A view keeps tokens whole when each token's elements stay together and in order (module docstring).

    In row-major order a token step is ``stride`` elements apart; a view keeps that. The inner factor
    (``B`` in ``S*B``) is kept on the node for the next view.
    """
    x = operand(node)
    if not isinstance(x, fx.Node) or not isinstance(value(x), torch.Tensor):
        return True
    if not is_call(node, RESHAPES):
        return True  # transpose, permute, unsqueeze, expand...: tokens move, never mix
    inner = tokens.dims(x)
    if not inner:
        return True
    out_tokens = tokens.dims(node)
    if len(inner) != 1 or len(out_tokens) != 1:
        return False
    shape, out_shape = value(x).shape, value(node).shape
    stride = size_expr(token_inner(x, tokens)) * size_expr(_numel(shape[inner[0] + 1:]))
    inner_out = sympy.simplify(stride / size_expr(_numel(out_shape[out_tokens[0] + 1:])))
    if not _whole(inner_out) or not _integral(sympy.expand(size_expr(out_shape[out_tokens[0]]) / inner_out)):
        return False  # a token's elements would be split across output rows
    node.meta["ringify_token_inner"] = int(inner_out)
    return True


def token_inner(node, tokens) -> int:
    """Elements of the token dim per token (``B`` when a view made it ``S*B``); 1 for a plain sequence dim.

    Set by ``_view_keeps_tokens`` on the views that merge; other ops keep the token dim of their first
    input with tokens, so the walk goes back to the last such view (or to an input: 1).
    """
    path, inner = [], 1
    while isinstance(node, fx.Node):
        if "ringify_token_inner" in node.meta:
            inner = node.meta["ringify_token_inner"]
            break
        if node.op != "call_function" or packet(node) in RESHAPES:
            break
        path.append(node)
        node = next((a for a in node.all_input_nodes if tokens.has(a)), None)
    for visited in path:  # remembered: the residual stream would walk back through every layer each time
        visited.meta["ringify_token_inner"] = inner
    return inner


def mixes_token_layouts(node: fx.Node, tokens) -> bool:
    """Tensors whose token dims were merged differently (``S*B`` against ``B*S``) meet in one op.

    Globally and on a shard they pair different tokens, so the op cannot run on shards.
    """
    tensors = [a for a in node.all_input_nodes if isinstance(value(a), torch.Tensor) and tokens.has(a)]
    return len({token_inner(a, tokens) for a in tensors}) > 1


def _whole(expr) -> bool:
    return not expr.free_symbols and expr.is_integer and int(expr) >= 1


def _integral(expr) -> bool:
    """A size expression with whole coefficients (``2*s0 - 2``, not ``s0/2``)."""
    symbols = sorted(expr.free_symbols, key=str)
    if not symbols:
        return bool(expr.is_integer)
    try:
        return all(c.is_integer for c in sympy.Poly(expr, *symbols).coeffs())
    except sympy.PolynomialError:
        return False


def _numel(shape) -> object:
    total = 1
    for s in shape:
        total = total * s
    return total


@register(aten.repeat)
class Repeat(Rule):
    """``x.repeat(r0, r1, ...)``: copies of ``x`` tiled along each dim (new leading dims for extra counts).

    Along dims without tokens each token's row is tiled within itself. Along the token dim, ``r`` copies of
    the sequence one after the other (Llama-4's ``hidden.repeat(E, 1)``: ``[E*T, D]``, row ``e*T + t``) merge
    an *outer* factor ``r`` into it, as ``unsqueeze(0).expand(r, T, D).reshape(r*T, D)`` and ``(B, S, V) ->
    (B*S, V)`` do: a shard's rows are ``e*T + p`` for its positions ``p``, the layout the view algebra
    already tracks (the inner factor, :func:`token_inner`, is unchanged, so ``S*B`` against ``B*S`` is still
    caught by :func:`mixes_token_layouts`). Mixing: a repeat count that depends on the sequence, or tiling
    along a token dim of a value that holds tokens in more than one dim (a ``[S, S]`` mask)."""

    moves_tokens = True

    def classify(self, node, tokens) -> str:
        x = operand(node)
        repeats = arg(node, "repeats")
        if not isinstance(x, fx.Node) or not isinstance(value(x), torch.Tensor):
            return LOCAL
        counts = list(repeats)[len(repeats) - value(x).dim():]  # the counts of x's own dims (the rest are new)
        held = tokens.dims(x)
        tiled = [d for d in held if not (isinstance(counts[d], int) and counts[d] == 1)]
        if any(tokens.has(c) for c in counts if isinstance(c, fx.Node)) or (tiled and len(held) > 1):
            return MIX
        return LOCAL
