"""The chain between ``q @ k^T`` and the softmax: what each op does to the scores, and what they add up to.

Walking back from the softmax input, every op must be one of: a cast, a constant scale, a soft-cap
(``c * tanh(s / c)``, Gemma-2), a mask (``masked_fill`` / ``where`` / ``+ bias``), a shift the softmax does
not see (``+ c``, or ``s - s.max(-1, keepdim=True)``), the column of attention sinks appended by
``cat([s, sinks], -1)`` (GPT-OSS), or a view that splits a merged ``B*H`` dim into ``(B, H)`` (BLOOM's
``baddbmm(alibi, q, k^T).view(B, H, S, S)``). Anything else means this is not attention as the canonical
op defines it, and the walk says which op. `fold` turns the steps, in forward order, into the canonical
op's scale / softcap / mask / fill / sinks; several masks (BLOOM's ALiBi and padding mask, T5's relative
bias and padding mask) become one additive mask, the `MaskTerm` recipe the rewrite builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..fx import arg, value
from .canonical import NEG_INF
from .layouts import norm_dim, same, split_heads
from .ops import (ADD, CASTS, CAT, DIV, IDENTITY, MASKED_FILL, MUL, RESHAPE, SCORE_OPS, SUB, TANH, WHERE, row_max_of,
                  scalar, scale_of)
from .results import NoMatch, fmt, tensor_shape


@dataclass
class Step:
    kind: str  # 'cast' | 'scale' | 'shift' | 'fill' | 'where' | 'add' | 'softcap' | 'sinks' | 'split'
    node: fx.Node
    value: float = 1.0  # scale factor, fill value, or the heads of a split
    mask: fx.Node | None = None  # the mask, bias, or sink column
    keep_true: bool = True  # where(cond, scores, fill): True entries of cond keep the score
    extra: list[fx.Node] = field(default_factory=list)  # nodes that only serve this step (a row max)
    layout: str = ""  # the scores' layout letters at this step (set by the matcher)


@dataclass
class MaskTerm:
    """One step of a mask made of several, in forward order: ``add`` value * node, ``scale`` what came
    before by value, or ``fill`` it with value where node drops (``drop``: True entries drop)."""

    kind: str  # 'add' | 'scale' | 'fill'
    node: fx.Node | None = None
    layout: str = ""
    value: float = 1.0
    drop: bool = False


def _score_inputs(node: fx.Node) -> list[tuple[fx.Node, Step]]:
    """One step back from `node` along the scores chain: (upstream scores node, step) options."""
    t = node.target
    if t in CASTS or t in IDENTITY:
        if t in CASTS and isinstance(value(node.args[0]), torch.Tensor):
            if value(node.args[0]).device != value(node).device:
                raise NoMatch(f"scores change device at {fmt(node)}")
        return [(node.args[0], Step("cast", node))]
    if (s := scale_of(node)) is not None:
        return [(s[1], Step("scale", node, value=s[0]))]
    if t in MUL or t in DIV:
        raise NoMatch(f"scores are scaled by a non-constant at {fmt(node)}", "scale by a Python number")
    if t in TANH:  # soft-capping: c * tanh(scores / c), the scales around it are separate steps
        return [(node.args[0], Step("softcap", node))]
    if t in MASKED_FILL:
        x, m, fill_value = node.args[:3]
        fill = scalar(fill_value)
        if fill is None:
            raise NoMatch(f"masked_fill with a non-constant value at {fmt(node)}", "fill with a Python float")
        return [(x, Step("fill", node, value=fill, mask=m))]
    if t in WHERE:
        cond, a, b = node.args[:3]
        fa, fb = scalar(a), scalar(b)
        if fb is not None and isinstance(a, fx.Node):
            return [(a, Step("where", node, value=fb, mask=cond, keep_true=True))]
        if fa is not None and isinstance(b, fx.Node):
            return [(b, Step("where", node, value=fa, mask=cond, keep_true=False))]
        raise NoMatch(f"where() without a constant fill at {fmt(node)}", "use torch.where(mask, scores, float('-inf'))")
    if t in CAT:
        return [_sink_column(node)]
    if t in RESHAPE:
        heads = split_heads(node)
        if heads is None:
            raise NoMatch(f"the scores pass through {fmt(node)}, a reshape that does not split B*H into (B, H)",
                          "reshape the scores only to split a merged [B*H, S, S] into [B, H, S, S] (and back)")
        return [(node.args[0], Step("split", node, value=heads))]
    if t in ADD or t in SUB:
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
            raise NoMatch(f"add/sub with alpha at {fmt(node)}")
        a, b = node.args[:2]
        if scalar(b) is not None:  # a constant shift: softmax does not see it
            return [(a, Step("shift", node))]
        if scalar(a) is not None and t in ADD:
            return [(b, Step("shift", node))]
        if t in SUB:
            rowmax = row_max_of(b)
            if rowmax is not None and rowmax[0] is a:  # s - s.max(-1, keepdim=True): the stable-softmax shift
                return [(a, Step("shift", node, extra=rowmax[1]))]
            raise NoMatch(f"a tensor is subtracted from the scores at {fmt(node)}", "add a bias instead")
        return [(a, Step("add", node, mask=b)), (b, Step("add", node, mask=a))]
    raise NoMatch(f"the scores pass through {fmt(node)}, which is not a scale, mask or cast")


def _sink_column(node: fx.Node) -> tuple[fx.Node, Step]:
    """``cat([scores, sinks], -1)`` with a one-wide sinks column: attention sinks."""
    tensors, dim = arg(node, "tensors"), arg(node, "dim", 0)
    shape = tensor_shape(node)
    if (len(tensors) != 2 or not all(isinstance(x, fx.Node) for x in tensors)
            or norm_dim(dim, len(shape)) != len(shape) - 1 or not same(tensor_shape(tensors[1])[-1], 1)):
        raise NoMatch(
            f"the scores are concatenated with something at {fmt(node)}",
            "only one column of attention sinks may be appended: torch.cat([scores, sinks], dim=-1)",
        )
    return tensors[0], Step("sinks", node, mask=tensors[1])


def walk_scores(node, depth: int = 0) -> tuple[fx.Node, list[Step]]:
    """From a softmax input back to the q @ k^T op; returns (score op, steps in forward order)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        raise NoMatch(f"the softmax input comes from {getattr(node, 'name', node)!r}, not from q @ k^T")
    if node.target in SCORE_OPS:
        return node, []
    if depth > 24:
        raise NoMatch("the chain between q @ k^T and softmax is too long")
    found, errors = [], []
    for up, step in _score_inputs(node):
        try:
            score, steps = walk_scores(up, depth + 1)
            found.append((score, steps + [step]))
        except NoMatch as e:
            errors.append(e)
    if len(found) == 1:
        return found[0]
    if not found:
        raise errors[0]
    raise NoMatch(f"both operands of {fmt(node)} are products of two tensors; cannot tell scores from bias")


def _term(step: Step) -> MaskTerm:
    """The mask step `step` as a `MaskTerm` on the right-aligned part of its scores layout."""
    layout = step.layout[len(step.layout) - len(tensor_shape(step.mask)):] if step.layout else ""
    if step.kind == "add":
        return MaskTerm("add", step.mask, layout, step.value)
    return MaskTerm("fill", step.mask, layout, step.value, drop=step.kind == "fill" or not step.keep_true)


def _combinable(recipe: list[MaskTerm], steps: list[Step]) -> None:
    """Several masks become one additive mask (see `fold`), exact when every fill is -inf (after the
    scales that follow it). A finite fill is not: where it drops every key of a row, the row's scores
    get no gradient in the model but would through the sum."""
    for i, term in enumerate(recipe):
        if term.kind != "fill":
            continue
        fill = term.value
        for later in recipe[i + 1:]:
            fill *= later.value if later.kind == "scale" else 1.0
        if fill != NEG_INF:
            node = next(s.node for s in steps if s.mask is term.node)
            raise NoMatch(
                f"{fmt(node)} fills the scores with {fill:g} next to a second mask; combined into one additive "
                "mask, a finite fill would let gradients into rows with no visible key",
                "fill with float('-inf'), or add the mask as a bias (scores + mask) like the other one",
            )


def fold(steps: list[Step], scale: float = 1.0) -> dict:
    """The canonical op's scale / softcap / mask / fill / sinks from the steps (forward order), as
    `Candidate` fields. `scale` is a factor the score op itself applies (baddbmm's alpha).

    One mask is fed as it is. Several (an ALiBi or relative-position bias and a padding mask) are one
    additive mask, built from the `MaskTerm` recipe in the same order: ``(s + a) * c + b`` is
    ``s * c + (a * c + b)`` and ``masked_fill(s + a, drop, -inf)`` is ``s + where(drop, -inf, a)``; `mask` is
    then the first term (for the report) and `mask_recipe` the recipe."""
    mask, mask_kind, fill, invert, factor, layout = None, None, NEG_INF, False, 1.0, None
    capped_scale = None  # the scale inside tanh, once a soft-cap is seen (then `scale` counts the one outside)
    sinks, shifted, recipe = None, None, []
    for step in steps:
        if sinks is not None and step.kind not in ("cast", "shift"):
            raise NoMatch(f"the scores pass through {fmt(step.node)} after the attention sinks were appended",
                          "append the sinks last: scale, cap and mask the scores first")
        if step.kind == "shift":
            shifted = shifted or step.node
        elif step.kind == "sinks":
            if shifted is not None:  # softmax([s + c, sink]) != softmax([s, sink])
                raise NoMatch(f"the scores are shifted at {fmt(shifted)} before the attention sinks are appended")
            sinks = step.mask
        elif shifted is not None and (step.kind == "softcap" or (step.kind in ("fill", "where")
                                                                 and step.value != NEG_INF)):
            # tanh(s + c) and a finite fill next to s + c are not the same row up to a constant
            raise NoMatch(f"the scores are shifted at {fmt(shifted)} before {fmt(step.node)}",
                          "subtract the row max (or add a constant) right before the softmax, or not at all")
        elif step.kind == "softcap":
            if mask is not None or capped_scale is not None:
                raise NoMatch(
                    f"the scores pass through {fmt(step.node)} after a mask or a second tanh",
                    "soft-cap once, before the mask: c * tanh(scores / c) + mask",
                )
            capped_scale, scale = scale, 1.0
        elif step.kind == "scale":
            scale *= step.value
            if mask_kind == "add":
                factor *= step.value
            elif mask_kind == "keep":
                fill *= step.value
            if recipe:
                recipe.append(MaskTerm("scale", value=step.value))
        elif step.kind in ("fill", "where", "add"):
            if not isinstance(step.mask, fx.Node):
                raise NoMatch(f"the mask of {fmt(step.node)} is not a tensor")
            if step.kind != "add" and (value(step.mask) is None or value(step.mask).dtype != torch.bool):
                raise NoMatch(f"mask `{step.mask.name}` of {fmt(step.node)} is not a bool tensor")
            recipe.append(_term(step))
            if mask is not None:
                continue
            mask, layout = step.mask, recipe[-1].layout
            if step.kind == "add":
                mask_kind, factor = "add", step.value
            else:
                mask_kind, fill = "keep", step.value
                invert = step.kind == "fill" or not step.keep_true

    combined = None
    if sum(t.kind != "scale" for t in recipe) > 1:
        _combinable(recipe, steps)
        combined, mask_kind, fill, invert, factor = recipe, "add", NEG_INF, False, 1.0

    softcap = 0.0
    if capped_scale is not None:  # post * tanh(pre * s) == |post| * tanh(pre * post * s / |post|)
        if scale == 0:
            raise NoMatch("the soft-capped scores are multiplied by 0")
        softcap, scale = abs(scale), capped_scale * scale
    return dict(scale=scale, softcap=softcap, mask=mask, mask_kind=mask_kind, fill=fill, mask_invert=invert,
                mask_factor=factor, mask_layout=layout or None, mask_recipe=combined, sinks=sinks)
