"""Turn the subgraph that builds an attention mask into a block-mask function.

A model builds its ``[.., Sq, Sk]`` mask from positions (``arange``), inputs (a padding mask,
document ids) and buffers (a ``tril`` table). Ring attention never holds the whole mask: it asks for
the block of each (query positions, key positions) pair. We get that block by walking back from the
mask and tracking which dims of each value are the query axis and the key axis:

- a value with at most one token dim is cheap: every rank computes it in full from its inputs
  (O(S)), and the block function picks the rows it needs with ``index_select``;
- a value with both axes (O(S^2)) is rebuilt from its inputs op by op, on the block's positions:
  elementwise ops, broadcasting views, slices from 0, advanced indexing, ``tril``/``triu``, factories
  and ``embedding`` of position-built indices (T5's relative position buckets: the block looks up
  ``weight[bucket(k_pos - q_pos)]``) have a rule; anything else is refused.

The result is a small ``GraphModule`` ``fn(q_pos, k_pos, *full_values)`` and the list of full
values (nodes of the captured graph) it reads; ring attention calls it once per block pair. Leaves
computed from parameters (a bias table) are marked `differentiable`: the mask then has a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..errors import UnsupportedModelError
from .fx import describe, fetch_attr, packet, value
from .sequence import size_expr, token_dims

aten = torch.ops.aten
Q, K = "q", "k"
_PASSTHROUGH = {aten._to_copy, aten.to, aten.type_as, aten.clone, aten.contiguous, aten.alias, aten.detach,
                aten.lift_fresh_copy}
_ELEMENTWISE = {aten.__and__, aten.__or__, aten.__xor__, aten.bitwise_and, aten.bitwise_or,
                aten.bitwise_xor, aten.bitwise_not, aten.logical_and, aten.logical_or, aten.logical_not,
                aten.logical_xor, aten.eq, aten.ne, aten.le, aten.lt, aten.ge, aten.gt, aten.where,
                aten.masked_fill, aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.abs, aten.remainder,
                aten.floor_divide, aten.minimum, aten.maximum, aten.clamp, aten.sign}
_LIKE = {aten.ones_like: 1, aten.zeros_like: 0, aten.empty_like: 0, aten.full_like: None}
_FACTORIES = {aten.ones, aten.zeros, aten.full, aten.new_ones, aten.new_zeros, aten.new_full, aten.empty,
              aten.new_empty, *_LIKE}


@dataclass
class BlockMask:
    """``fn(q_pos, k_pos, *leaves)`` gives the mask block; ``leaves`` are full values from the main graph."""

    fn: fx.GraphModule
    leaves: list[fx.Node]
    source: fx.Node
    ops: list[str] = field(default_factory=list)
    differentiable: tuple[int, ...] = ()  # indices into `leaves` of floating values computed from parameters


def _out_of_place(node: fx.Node):
    """``aten.masked_fill`` for ``aten.masked_fill_`` on a fresh tensor (``zeros_like(m).masked_fill_(m, -inf)``).

    The block is rebuilt out of place; that is the same value only when nothing else reads the tensor
    the op wrote into, which holds for the chained form above and is checked.
    """
    target = node.target
    name = getattr(getattr(target, "overloadpacket", None), "__name__", "")
    if not name.endswith("_") or name.endswith("__"):
        return target
    functional = getattr(getattr(aten, name[:-1], None), target._overloadname, None)
    written = node.args[0] if node.args else None
    if functional is None or not isinstance(written, fx.Node) or set(written.users) != {node}:
        return target  # no out-of-place twin, or someone else reads the written tensor: refused below
    return functional


def _is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(value(node), torch.Tensor)


def _right_aligned(axes: tuple, arg: fx.Node) -> tuple:
    """Axes of a broadcast operand: aligned right, none on its size-1 dims."""
    shape = value(arg).shape
    tail = axes[len(axes) - len(shape):] if len(shape) else ()
    return tuple(None if (isinstance(s, int) and s == 1) else a for s, a in zip(shape, tail))


class _Builder:
    def __init__(self, symbols: set, mask: fx.Node):
        self.symbols = symbols
        self.mask = mask
        self.graph = fx.Graph()
        self.q_pos = self.graph.placeholder("q_pos")
        self.k_pos = self.graph.placeholder("k_pos")
        self.leaves: dict[fx.Node, fx.Node] = {}
        self.memo: dict[tuple, fx.Node] = {}
        self.ops: list[str] = []

    # -- leaves: values every rank holds in full
    def leaf(self, node: fx.Node, axes: tuple) -> fx.Node:
        if node not in self.leaves:
            self.leaves[node] = self.graph.placeholder(f"full_{node.name}")
        out = self.leaves[node]
        for dim, axis in enumerate(axes):
            if axis is not None:
                pos = self.q_pos if axis == Q else self.k_pos
                out = self.graph.call_function(aten.index_select.default, (out, dim, pos))
        return out

    def can_be_leaf(self, node: fx.Node, axes: tuple) -> bool:
        if node.op in ("placeholder", "get_attr") or not _is_tensor(node):
            return True
        return len(token_dims(node, self.symbols)) <= 1 and len({a for a in axes if a}) <= 1

    # -- the walk
    def build(self, node, axes: tuple):
        if not isinstance(node, fx.Node):
            return node
        key = (node, axes)
        if key not in self.memo:
            if not any(axes) or self.can_be_leaf(node, axes) and not self._prefer_expand(node, axes):
                self.memo[key] = self.leaf(node, axes)
            else:
                self.memo[key] = self.expand(node, axes)
        return self.memo[key]

    def _prefer_expand(self, node, axes) -> bool:
        return packet(node) in _FACTORIES and node.op == "call_function"

    def refuse(self, node: fx.Node, why: str):
        raise UnsupportedModelError(
            f"the attention mask is built by {describe(node)}, which ringify cannot evaluate block by block "
            f"({why}). Hint: build the mask from elementwise comparisons of positions (arange), inputs and "
            "buffers, or pass is_causal=True / a [B, S] padding mask."
        )

    def size_arg(self, size, axis):
        if axis == Q:
            return self.graph.call_function(aten.sym_size.int, (self.q_pos, 0))
        if axis == K:
            return self.graph.call_function(aten.sym_size.int, (self.k_pos, 0))
        if isinstance(size, fx.Node):
            static = value(size)
            if isinstance(static, torch.SymInt) and static.node.expr.free_symbols & self.symbols:
                return -1
            return size
        return size

    def expand(self, node: fx.Node, axes: tuple) -> fx.Node:
        if node.op != "call_function":
            self.refuse(node, "a two-dimensional input that is not a placeholder or buffer")
        target = _out_of_place(node)
        op = getattr(target, "overloadpacket", target)
        self.ops.append(str(op).split(".")[-1])
        g = self.graph
        if op in _FACTORIES:
            return self.factory(node, axes)
        if op is aten.unsqueeze:
            dim = node.args[1] % len(axes)
            inner = self.build(node.args[0], axes[:dim] + axes[dim + 1:])
            return g.call_function(node.target, (inner, dim))
        if op is aten.expand:
            inner = self.build(node.args[0], _right_aligned(axes, node.args[0]))
            sizes = [self.size_arg(s, a) for s, a in zip(node.args[1], axes)]
            return g.call_function(node.target, (inner, sizes))
        if op is aten.slice:
            dim = node.args[1] % len(axes)
            start = node.args[2] if len(node.args) > 2 else 0
            step = node.args[4] if len(node.args) > 4 else 1
            inner = self.build(node.args[0], axes)
            if axes[dim] is None:
                return g.call_function(node.target, (inner, *node.args[1:]))
            if start not in (None, 0) or step != 1:
                self.refuse(node, "a slice along the query or key axis that does not start at 0")
            return inner  # slicing [0:S] then taking positions < S == taking the positions
        if op in _PASSTHROUGH:
            inner = self.build(node.args[0], axes)
            return g.call_function(node.target, (inner, *node.args[1:]), dict(node.kwargs))
        if op in (aten.transpose,):
            d0, d1 = (d % len(axes) for d in node.args[1:3])
            swapped = list(axes)
            swapped[d0], swapped[d1] = axes[d1], axes[d0]
            return g.call_function(node.target, (self.build(node.args[0], tuple(swapped)), *node.args[1:]))
        if op is aten.permute:
            perm = [d % len(axes) for d in node.args[1]]
            inner_axes = [None] * len(axes)
            for out_dim, in_dim in enumerate(perm):
                inner_axes[in_dim] = axes[out_dim]
            return g.call_function(node.target, (self.build(node.args[0], tuple(inner_axes)), node.args[1]))
        if op in (aten.view, aten.reshape, aten._unsafe_view, aten.unflatten, aten.flatten):
            return self.reshape(node, axes)
        if op in (aten.tril, aten.triu):
            return self.band(node, axes, upper=op is aten.triu)
        if op is aten.index:
            return self.index(node, axes)
        if op is aten.embedding:
            return self.embedding(node, axes)
        if op in _ELEMENTWISE or (isinstance(node.target, torch._ops.OpOverload)
                                  and torch.Tag.pointwise in node.target.tags):
            return self.pointwise(node, axes, target)
        self.refuse(node, f"no block rule for {op}")

    def reshape(self, node: fx.Node, axes: tuple) -> fx.Node:
        """Reshapes of the dims before the query/key axes (nn.MultiheadAttention's ``B*H`` <-> ``B, H``; the
        attention pass's ``unflatten`` of a merged mask term), rebuilt as a reshape to the block's sizes."""
        x = node.args[0]
        in_shape, out_shape = value(x).shape, value(node).shape
        first = next(i for i, a in enumerate(axes) if a is not None)
        tail = len(axes) - first
        if len(in_shape) < tail or ([size_expr(s) for s in in_shape[len(in_shape) - tail:]]
                                    != [size_expr(s) for s in out_shape[first:]]):
            self.refuse(node, "a reshape of the mask that touches its query or key axis")
        lead = [s if isinstance(s, int) else -1 for s in out_shape[:first]]
        if lead.count(-1) > 1:
            self.refuse(node, "a reshape of the mask with several dynamic batch dims")
        inner = self.build(x, (None,) * (len(in_shape) - tail) + axes[first:])
        sizes = lead + [self.size_arg(s, a) if a else s for s, a in zip(out_shape[first:], axes[first:])]
        if any(not isinstance(s, (int, fx.Node)) for s in sizes):
            self.refuse(node, "a reshape of the mask with a dynamic size")
        target = aten.reshape.default if packet(node) in (aten.unflatten, aten.flatten) else node.target
        return self.graph.call_function(target, (inner, sizes))

    def pointwise(self, node: fx.Node, axes: tuple, target) -> fx.Node:
        def arg(a):
            if _is_tensor(a):
                return self.build(a, _right_aligned(axes, a))
            if isinstance(a, fx.Node):
                self.refuse(node, "a non-tensor input that depends on the graph")
            return a
        args = tuple(arg(a) for a in node.args)
        kwargs = {k: arg(v) for k, v in node.kwargs.items()}
        return self.graph.call_function(target, args, kwargs)

    def index(self, node: fx.Node, axes: tuple) -> fx.Node:
        x, indices = node.args[0], list(node.args[1])
        used = [i for i, t in enumerate(indices) if t is not None]
        if used != list(range(used[0], used[0] + len(used))):
            self.refuse(node, "non-adjacent advanced indices")
        first, count = used[0], len(used)
        x_nd = value(x).dim()
        width = len(axes) - (x_nd - count)  # dims of the broadcast index shape
        index_axes = axes[first : first + width]
        x_axes = axes[:first] + (None,) * count + axes[first + width :]
        new_indices = [
            None if t is None else self.build(t, _right_aligned(index_axes, t)) for t in indices
        ]
        return self.graph.call_function(node.target, (self.build(x, x_axes), new_indices))

    def embedding(self, node: fx.Node, axes: tuple) -> fx.Node:
        """``weight[indices]``: the indices carry the query/key axes, the table (full on every rank) none."""
        if axes[-1] is not None:
            self.refuse(node, "an embedding whose feature dim is the query or key axis")
        weight, indices = node.args[:2]
        table = self.build(weight, (None,) * value(weight).dim())
        return self.graph.call_function(node.target, (table, self.build(indices, axes[:-1]), *node.args[2:]),
                                        dict(node.kwargs))

    def band(self, node: fx.Node, axes: tuple, upper: bool) -> fx.Node:
        if axes[-2:] != (Q, K):
            self.refuse(node, "tril/triu whose last two dims are not (query, key)")
        diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        inner = self.build(node.args[0], axes)
        return self.graph.call_function(band_block, (inner, self.q_pos, self.k_pos, diagonal, upper))

    def factory(self, node: fx.Node, axes: tuple) -> fx.Node:
        op = packet(node)
        dtype = node.kwargs.get("dtype") or value(node).dtype
        if op in _LIKE:  # the shape of a tensor this block does not need: the block's own
            sizes = [self.size_arg(None, a) if a else s for s, a in zip(value(node).shape, axes)]
            if any(not isinstance(s, (int, fx.Node)) for s in sizes):
                self.refuse(node, "a factory with a dynamic batch size")
            fill = _LIKE[op] if _LIKE[op] is not None else node.args[1]
            return self.graph.call_function(block_full, (sizes, fill, dtype, self.q_pos))
        size_index = 1 if op in (aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty) else 0
        sizes = [self.size_arg(s, a) for s, a in zip(node.args[size_index], axes)]
        sizes = [self.graph.call_function(aten.sym_size.int, (self.q_pos if a == Q else self.k_pos, 0))
                 if s == -1 else s for s, a in zip(sizes, axes)]
        fill = {aten.ones: 1, aten.new_ones: 1, aten.zeros: 0, aten.new_zeros: 0, aten.empty: 0,
                aten.new_empty: 0}.get(op)
        if fill is None:
            fill = node.args[size_index + 1]
        return self.graph.call_function(block_full, (sizes, fill, dtype, self.q_pos))


def band_block(x: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, diagonal: int, upper: bool):
    """``tril``/``triu`` of a block, by global positions (key j of query i kept iff j - i <= / >= diagonal)."""
    offset = k_pos.unsqueeze(0) - q_pos.unsqueeze(1)
    keep = offset >= diagonal if upper else offset <= diagonal
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def block_full(sizes, fill, dtype, like: torch.Tensor) -> torch.Tensor:
    return torch.full([int(s) for s in sizes], fill, dtype=dtype, device=like.device)


def block_mask(mask: fx.Node, symbols: set) -> BlockMask:
    """The block-mask function of ``mask`` (a node whose last two dims are queries and keys)."""
    shape = value(mask).shape
    if len(shape) < 2:
        raise UnsupportedModelError(f"attention mask {describe(mask)} has fewer than 2 dims")
    dims = set(token_dims(mask, symbols))
    axes = [None] * len(shape)
    if len(shape) - 2 in dims:
        axes[-2] = Q
    if len(shape) - 1 in dims:
        axes[-1] = K
    if dims - {len(shape) - 2, len(shape) - 1}:
        raise UnsupportedModelError(f"attention mask {describe(mask)} has a token dim that is not query or key")
    builder = _Builder(symbols, mask)
    out = builder.build(mask, tuple(axes))
    builder.graph.output(out)
    fn = fx.GraphModule(torch.nn.Module(), builder.graph, class_name="BlockMaskFn")
    leaves = list(builder.leaves)
    differentiable = tuple(i for i, leaf in enumerate(leaves) if _from_parameters(leaf))
    return BlockMask(fn, leaves, mask, builder.ops, differentiable)


def _from_parameters(leaf: fx.Node) -> bool:
    """A floating leaf that a parameter flows into (T5's bias table, ``weight.permute(...)``): the model
    trains it through the mask, so the ring must return its gradient."""
    val, gm = value(leaf), leaf.graph.owning_module
    if not isinstance(val, torch.Tensor) or not val.is_floating_point() or gm is None:
        return False
    params = {id(p) for p in gm.parameters()}
    seen, stack = set(), [leaf]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "get_attr" and id(fetch_attr(gm, node.target)) in params:
            return True
        stack.extend(node.all_input_nodes)
    return False

