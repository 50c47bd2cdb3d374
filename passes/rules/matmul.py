"""Products: mm, bmm, addmm, baddbmm, matmul, linear and einsum, each read as one einsum equation.

One rule then covers them all: a product is token-local when a single operand holds tokens and no
token letter is contracted (summed over). Tokens against tokens is attention-like (and was not
recognised as attention); contracting tokens sums over the sequence. A bias (addmm, baddbmm, linear)
broadcasts onto the output, so its token dims must be the output's token dims.
"""

from __future__ import annotations

import torch
from torch import fx

from ..fx import arg, ndim, packet
from .base import LOCAL, MIX, Rule, operand, register

aten = torch.ops.aten

# letters of broadcast (batch, "...") dims, counted from the right: never an einsum letter, so never a collision
_BROADCAST = "αβγδεζηθικλμνξοπρστυφχψω"


def _batch(n: int) -> str:
    """Letters of ``n`` right-aligned broadcast dims: shared with any other operand's at the same place."""
    return _BROADCAST[:n][::-1]


def _matmul(na: int, nb: int) -> tuple[list[str], str]:
    """``torch.matmul``'s broadcasting as an equation (1-D operands included)."""
    a = "k" if na == 1 else _batch(na - 2) + "ik"
    b = "k" if nb == 1 else _batch(nb - 2) + "kj"
    out = _batch(max(na, nb) - 2) + ("i" if na > 1 else "") + ("j" if nb > 1 else "")
    return [a, b], out


def _einsum(equation: str, operands: list) -> tuple[list[str], str]:
    """An einsum equation with ``...`` spelled out as broadcast letters, and its implicit output made explicit."""
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    specs = []
    for spec, t in zip(lhs.split(","), operands):
        if "..." in spec:
            spec = spec.replace("...", _batch(ndim(t) - (len(spec) - 3)))
        specs.append(spec)
    longest = max((ndim(t) - len(s.replace("...", "")) for s, t in zip(lhs.split(","), operands) if "..." in s),
                  default=0)
    if arrow:
        out = out.replace("...", _batch(longest))
    else:  # implicit: the letters seen once, sorted, after the broadcast dims
        counts = {c: "".join(specs).count(c) for c in "".join(specs) if c not in _BROADCAST}
        out = _batch(longest) + "".join(sorted(c for c, n in counts.items() if n == 1))
    return specs, out


def equation(node: fx.Node) -> tuple[list[str], str, list, fx.Node | None]:
    """(operand specs, output spec, operands, bias) of a product node."""
    op = packet(node)
    if op is aten.einsum:
        operands = list(arg(node, "tensors"))
        specs, out = _einsum(arg(node, "equation"), operands)
        return specs, out, operands, None
    if op is aten.linear:
        x, weight = operand(node), arg(node, "weight")
        batch = _batch(ndim(x) - 1)
        return [batch + "k", "jk"], batch + "j", [x, weight], arg(node, "bias")
    if op in (aten.addmm, aten.baddbmm):
        a, b = (arg(node, "mat1"), arg(node, "mat2")) if op is aten.addmm else (arg(node, "batch1"), arg(node, "batch2"))
        bias = operand(node)
    else:
        a, b = operand(node), arg(node, "mat2" if op in (aten.mm, aten.bmm) else "other")
        bias = None
    specs, out = _matmul(ndim(a), ndim(b))
    return specs, out, [a, b], bias


@register(aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.matmul, aten.linear, aten.einsum)
class Product(Rule):
    def classify(self, node, tokens) -> str:
        specs, out, operands, bias = equation(node)
        letters: set[str] = set()
        holding = 0
        for spec, t in zip(specs, operands):
            dims = tokens.dims(t)
            holding += bool(dims)
            letters |= {spec[d] for d in dims}
        if holding > 1 or not letters <= set(out):
            return MIX  # tokens against tokens, or summed over
        if tokens.has(bias):
            aligned = out[len(out) - ndim(bias):] if ndim(bias) else ""
            if not {aligned[d] for d in tokens.dims(bias)} <= letters:
                return MIX
        return LOCAL
