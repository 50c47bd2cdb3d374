"""Where the sequence lives in a captured graph, and what each op does with it.

Capture marks the sequence dimension of the inputs dynamic, so every tensor in the graph carries it
as a symbolic size (``s0``; a flattened batch-and-sequence dim shows as ``2*s0``). A dim whose size
mentions a sequence symbol is a *token dim*. Each op that touches token dims falls in one family,
DTensor-style (one rule per op family, views included):

- ``local``: token-local (elementwise, linear, norms over features, views that keep tokens whole):
  run it on this rank's shard;
- ``reduce``: a reduction over tokens (sums, means, losses): local partial plus a sum over ranks;
- ``positions``: ``arange`` over the sequence: becomes this rank's global positions; ``table``: a
  slice of a fixed-size table up to the sequence length (``buffer[:, :S]``): becomes its rows at them;
- ``mix``: anything else that mixes tokens (cumsum, shifts, convolution, sort, top-k, matmul over
  tokens...): only allowed on values computed from the inputs alone, which every rank holds in full.
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch import fx

aten = torch.ops.aten

LOCAL, REDUCE, POSITIONS, MIX, ATTENTION = "local", "reduce", "positions", "mix", "attention"
TABLE = "table"  # rows 0..S of a fixed table (Bert's position_ids buffer): becomes the rows at this rank's positions

# views and data movement that keep each token's data on its token (checked dim by dim below)
_VIEWS = {
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.t, aten.unsqueeze,
    aten.squeeze, aten.expand, aten.broadcast_to, aten.contiguous, aten.clone, aten.alias, aten.detach, aten.flatten,
    aten.unflatten, aten.view_as, aten.expand_as, aten.reshape_as, aten._to_copy, aten.to, aten.type_as,
    aten.lift_fresh_copy,
}
# views that may merge or split the token dim (checked by ``_view_keeps_tokens``); the other views move it whole
_RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten}
_FACTORIES = {
    aten.ones, aten.zeros, aten.full, aten.empty, aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty,
    aten.ones_like, aten.zeros_like, aten.full_like, aten.empty_like, aten.scalar_tensor, aten.empty_strided,
}
_ASSERTS = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
            aten._assert_async, aten.sym_constrain_range}
_LOSSES = {aten.cross_entropy_loss, aten.nll_loss, aten.nll_loss_nd, aten.mse_loss, aten.l1_loss,
           aten.smooth_l1_loss, aten.binary_cross_entropy_with_logits}


def packet(node: fx.Node):
    """The op overload packet of a call_function node (``aten.view`` for ``aten.view.default``), or the target."""
    return getattr(node.target, "overloadpacket", node.target)


def value(node) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


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


def _dim_arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _normal(dims, ndim: int) -> set[int]:
    if dims is None:
        return set(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return {d % ndim for d in dims} if ndim else set()


def _is_full_slice(node: fx.Node, dim: int) -> bool:
    """``slice(x, dim, start, end, step)`` that keeps every token of ``dim``."""
    start = _dim_arg(node, 2, "start", None)
    end = _dim_arg(node, 3, "end", None)
    step = _dim_arg(node, 4, "step", 1)
    size = value(node.args[0]).shape[dim]
    full_end = end is None or (isinstance(end, int) and end >= 2**62) or (
        isinstance(end, fx.Node) and value(end) is size
    )
    return start in (None, 0) and step == 1 and full_end


def _tokens_along(node: fx.Node, dims: set[int], symbols: set, arg: int = 0) -> bool:
    return bool(set(token_dims(node.args[arg], symbols)) & dims)


def classify(node: fx.Node, symbols: set) -> str:
    """The family of a call_function node that touches token dims (see the module docstring)."""
    family = _family(node, symbols)
    if family in (LOCAL, REDUCE) and mixes_token_layouts(node, symbols):
        return MIX
    return family


def _family(node: fx.Node, symbols: set) -> str:
    op = packet(node)
    if op in _ASSERTS or op is getattr(torch.ops.higher_order, "_guards_fn", None):
        return LOCAL
    if isinstance(node.target, type(operator.add)) or node.target in (operator.getitem,) or op is aten.sym_size:
        if node.target is operator.getitem:
            return _classify_getitem(node, symbols)
        return LOCAL  # SymInt arithmetic: recomputed from the local sizes
    if op is aten.arange:
        return POSITIONS
    if op in _FACTORIES:
        return LOCAL
    if op in _LOSSES:
        return REDUCE
    if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
        return LOCAL
    if op in _VIEWS:
        return LOCAL if _view_keeps_tokens(node, symbols) else MIX
    if op in (aten.sum, aten.mean):
        x = node.args[0]
        dims = _normal(_dim_arg(node, 1, "dim", None), value(x).dim())
        return REDUCE if set(token_dims(x, symbols)) & dims else LOCAL
    if op in (aten.amax, aten.amin, aten.var, aten.var_mean, aten.std, aten.norm, aten.linalg_vector_norm):
        x = node.args[0]
        dims = _normal(_dim_arg(node, 1, "dim", None), value(x).dim())
        return MIX if set(token_dims(x, symbols)) & dims else LOCAL
    if op in (aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax):
        x = node.args[0]
        return MIX if _tokens_along(node, _normal(node.args[1], value(x).dim()), symbols) else LOCAL
    if op in (aten.layer_norm, aten.native_layer_norm, aten.rms_norm):
        x = node.args[0]
        nd = value(x).dim()
        normalized = set(range(nd - len(node.args[1]), nd))
        return MIX if _tokens_along(node, normalized, symbols) else LOCAL
    if op in (aten.linear, aten.embedding):
        weight = node.args[0] if op is aten.embedding else node.args[1]
        if has_tokens(weight, symbols):
            return MIX
        if op is aten.linear and token_dims(node.args[0], symbols)[-1:] == [value(node.args[0]).dim() - 1]:
            return MIX  # tokens along the features a linear contracts
        return LOCAL
    if op in (aten.dropout, aten.native_dropout, aten.feature_dropout, aten.alpha_dropout):
        return LOCAL
    if op in (aten.matmul, aten.mm, aten.bmm, aten.addmm, aten.baddbmm):
        return _classify_matmul(node, symbols)
    if op in (aten.slice, aten.narrow):
        dim = _dim_arg(node, 1, "dim", 0) % value(node.args[0]).dim()
        if dim not in token_dims(node.args[0], symbols):
            if dim in token_dims(node, symbols):
                step = _dim_arg(node, 4, "step", 1) if op is aten.slice else 1
                return TABLE if step == 1 else MIX
            return LOCAL
        return LOCAL if op is aten.slice and _is_full_slice(node, dim) else MIX
    if op in (aten.select, aten.index_select, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind,
              aten.cat, aten.stack, aten.repeat_interleave):
        return _classify_along_dim(node, op, symbols)
    if op in (aten.pad, aten.constant_pad_nd):
        x = node.args[0]
        nd, pads = value(x).dim(), node.args[1]
        padded = {nd - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
        return MIX if set(token_dims(x, symbols)) & padded else LOCAL
    if op in (aten.gelu, aten.silu, aten.relu, aten.tanh, aten.sigmoid, aten.rsqrt):
        return LOCAL
    if op is aten.einsum:
        return _classify_einsum(node, symbols)
    if op is aten.index:
        return _classify_index(node, symbols)
    if op in _ALONG_ONE_DIM:
        index, default = _ALONG_ONE_DIM[op]
        dim = _dim_arg(node, index, "dim", default)
        x = node.args[0]
        if dim is None or not isinstance(value(x), torch.Tensor) or value(x).dim() == 0:
            return MIX
        return MIX if dim % value(x).dim() in token_dims(x, symbols) else LOCAL
    return MIX


# ops along one dim (arg index of ``dim``, its default): local unless that dim holds tokens (a router's top-k
# over experts, a cumsum over features); along the tokens they are scans, sorts and selections: mixing
_ALONG_ONE_DIM = {
    aten.cumsum: (1, None), aten.cumprod: (1, None), aten.logcumsumexp: (1, None), aten.cummax: (1, None),
    aten.cummin: (1, None), aten.sort: (1, -1), aten.argsort: (1, -1), aten.topk: (2, -1), aten.kthvalue: (2, -1),
    aten.argmax: (1, None), aten.argmin: (1, None), aten.mode: (1, -1), aten.median: (1, None),
    aten.nanmedian: (1, None), aten.max: (1, None), aten.min: (1, None),
}


def _classify_index(node: fx.Node, symbols: set) -> str:
    """``x[..., [i, j]]``: picking features with fixed indices is token-local (Falcon's fused q/k/v split);
    indexing along the tokens, or with indices that depend on them, mixes."""
    x, indices = node.args[0], node.args[1]
    tokens = set(token_dims(x, symbols))
    for dim, index in enumerate(indices):
        if index is not None and (dim in tokens or has_tokens(index, symbols)):
            return MIX
    return LOCAL


def _classify_getitem(node: fx.Node, symbols: set) -> str:
    source = node.args[0]
    if isinstance(source, fx.Node) and source.op == "call_function":
        return classify(source, symbols)
    return LOCAL


def _view_keeps_tokens(node: fx.Node, symbols: set) -> bool:
    """A view keeps tokens whole when each token's elements stay together and in order.

    In row-major order a token step is ``stride`` elements apart; a view keeps that. The output's token
    dim may merge the sequence with dims after it (``(S, B, E) -> (S*B, E)``, as nn.MultiheadAttention
    does) or before it (``(B, S, V) -> (B*S, V)`` for a loss): the shard of such a dim is the local
    tokens in the same place. The inner factor (``B`` in ``S*B``) is kept on the node for the next view.
    """
    x = node.args[0]
    if not isinstance(x, fx.Node) or not isinstance(value(x), torch.Tensor):
        return True
    op = packet(node)
    if op not in _RESHAPES:
        return True  # transpose, permute, unsqueeze, expand...: tokens move, never mix
    inner = token_dims(x, symbols)
    if not inner:
        return True
    out_tokens = token_dims(node, symbols)
    if len(inner) != 1 or len(out_tokens) != 1:
        return False
    shape, out_shape = value(x).shape, value(node).shape
    stride = size_expr(token_inner(x, symbols)) * size_expr(_numel(shape[inner[0] + 1:]))
    inner_out = sympy.simplify(stride / size_expr(_numel(out_shape[out_tokens[0] + 1:])))
    if not _whole(inner_out) or not _integral(sympy.expand(size_expr(out_shape[out_tokens[0]]) / inner_out)):
        return False  # a token's elements would be split across output rows
    node.meta["ringify_token_inner"] = int(inner_out)
    return True


def token_inner(node, symbols: set) -> int:
    """Elements of the token dim per token (``B`` when a view made it ``S*B``); 1 for a plain sequence dim.

    Set by ``_view_keeps_tokens`` on the views that merge; other ops keep the token dim of their first
    input with tokens, so the walk goes back to the last such view (or to an input: 1).
    """
    path, inner = [], 1
    while isinstance(node, fx.Node):
        if "ringify_token_inner" in node.meta:
            inner = node.meta["ringify_token_inner"]
            break
        if node.op != "call_function" or packet(node) in _RESHAPES:
            break
        path.append(node)
        node = next((a for a in node.all_input_nodes if has_tokens(a, symbols)), None)
    for visited in path:  # remembered: the residual stream would walk back through every layer each time
        visited.meta["ringify_token_inner"] = inner
    return inner


def mixes_token_layouts(node: fx.Node, symbols: set) -> bool:
    """Tensors whose token dims were merged differently (``S*B`` against ``B*S``) meet in one op.

    Globally and on a shard they pair different tokens, so the op cannot run on shards.
    """
    tensors = [a for a in node.all_input_nodes if isinstance(value(a), torch.Tensor) and has_tokens(a, symbols)]
    return len({token_inner(a, symbols) for a in tensors}) > 1


def size_expr(size) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression, so sizes compare and divide symbolically."""
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


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


def _classify_matmul(node: fx.Node, symbols: set) -> str:
    op = packet(node)
    if op in (aten.addmm, aten.baddbmm):
        a, b = node.args[1], node.args[2]
    else:
        a, b = node.args[0], node.args[1]
    a_tokens = token_dims(a, symbols)
    b_tokens = token_dims(b, symbols)
    a_nd, b_nd = value(a).dim(), value(b).dim()
    if a_tokens and b_tokens:
        return MIX  # tokens against tokens: attention-like, and not recognised as attention
    if a_tokens and (a_nd - 1) in a_tokens:
        return MIX  # contracting over tokens
    if b_tokens and (b_nd - 2 if b_nd > 1 else 0) in b_tokens:
        return MIX
    return LOCAL


def _classify_along_dim(node: fx.Node, op, symbols: set) -> str:
    if op in (aten.cat, aten.stack):
        tensors = node.args[0]
        dim = _dim_arg(node, 1, "dim", 0)
        nd = value(tensors[0]).dim() + (1 if op is aten.stack else 0)
        dim %= nd
        if op is aten.stack:
            return LOCAL
        return MIX if any(dim in token_dims(t, symbols) for t in tensors) else LOCAL
    x = node.args[0]
    # split/chunk/repeat_interleave(self, size, dim): dim comes third; select/index_select/unbind(self, dim, ...)
    third = op in (aten.split, aten.split_with_sizes, aten.chunk, aten.repeat_interleave)
    dim = _dim_arg(node, 2, "dim", None if op is aten.repeat_interleave else 0) if third else _dim_arg(node, 1, "dim", 0)
    if op is aten.index_select:
        if has_tokens(node.args[2], symbols):
            return MIX
    if op is aten.repeat_interleave and not isinstance(x, fx.Node):
        return MIX
    if dim is None:
        return MIX
    dim %= value(x).dim()
    return MIX if dim in token_dims(x, symbols) else LOCAL


def _classify_einsum(node: fx.Node, symbols: set) -> str:
    equation, operands = node.args[0], node.args[1]
    lhs, _, out = equation.replace(" ", "").partition("->")
    specs = lhs.split(",")
    token_letters: set[str] = set()
    for spec, t in zip(specs, operands):
        for d in token_dims(t, symbols):
            token_letters.add(spec[d])
    with_tokens = [t for t in operands if has_tokens(t, symbols)]
    if len(with_tokens) > 1 or not token_letters <= set(out):
        return MIX
    return LOCAL
