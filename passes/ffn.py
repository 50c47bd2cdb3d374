"""Feed-forward blocks: find them in a captured graph and run them chunked over the tokens.

A feed-forward block maps each token on its own, through an intermediate that is usually 4x (or 8/3x,
gated) the hidden size. Chunked over the sequence, with each chunk recomputed in backward, only one
chunk's intermediate is ever alive (Liu et al., blockwise transformers), and the function is unchanged.

Spellings matched (on the ATen training IR of ``torch.export``):

- ``mlp``:   ``proj(x, W1, b1) -> act [-> identity dropout] -> proj(., W2, b2)``
- ``gated``: ``act(proj(x, Wg, bg)) * proj(x, Wu, bu) -> proj(., Wd, bd)`` (SwiGLU, GeGLU; either
  operand order), or *fused*: one ``proj(x, W, b)`` whose ``chunk(2, -1)`` / ``split`` halves are the
  gate and the up branch.

``proj`` is ``aten.linear`` or GPT-2's ``Conv1D`` (``view(x, [-1, D])``, ``addmm(b, ., W)``, view
back). ``act`` is any entry of :data:`ACTIVATIONS`: a region of the graph matches an activation when it
is isomorphic (networkx) to that activation's own traced ATen graph, operators and constants included,
and the runtime then calls the very same function, so the chunked block runs the same ops per token.
Dropout inside a block is absorbed only when it is the identity (``train=False`` or ``p=0``): a random
dropout cannot be chunked and still draw the same mask.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import checkpoint

from ..runtime.graph_calls import graph_call
from .fx import common_prefix, frames, named_args, stack_path, value

__all__ = ["ACTIVATIONS", "FFNMatch", "chunk_feed_forward", "chunked_ffn", "find_feed_forward",
           "symbolic_token_dim"]

aten = torch.ops.aten

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": torch.relu,
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    # GPT-2's NewGELUActivation (tanh GELU written out), op for op
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
}

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_MAX_ACTIVATION_NODES = 16


# ---------------------------------------------------------------------------------------------- runtime

def _linear(x, w, b):
    return F.linear(x, w, b)


def _conv1d(x, w, b):  # transformers.pytorch_utils.Conv1D: weight [in, out]
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[-1])


_PROJ = {"linear": _linear, "conv1d": _conv1d}


def _ffn(x, *weights, kind: str, activation: str, proj: str, gate_half: int):
    lin, act = _PROJ[proj], ACTIVATIONS[activation]
    if kind == "mlp":
        w1, b1, w2, b2 = weights
        return lin(act(lin(x, w1, b1)), w2, b2)
    if kind == "gated":
        wg, bg, wu, bu, wd, bd = weights
        return lin(act(lin(x, wg, bg)) * lin(x, wu, bu), wd, bd)
    if kind == "gated_fused":
        w, b, wd, bd = weights
        halves = lin(x, w, b).chunk(2, dim=-1)
        return lin(act(halves[gate_half]) * halves[1 - gate_half], wd, bd)
    raise ValueError(f"unknown feed-forward kind {kind!r}")


@graph_call("ffn", "chunked FFN")
def chunked_ffn(x: torch.Tensor, *weights, kind: str, activation: str, token_dim: int, chunk_tokens: int,
                proj: str = "linear", gate_half: int = 0) -> torch.Tensor:
    """The feed-forward block ``kind`` applied to ``x`` in chunks of ``chunk_tokens`` along ``token_dim``.

    ``weights``: ``(W1, b1, W2, b2)`` for ``mlp``; ``(Wg, bg, Wu, bu, Wd, bd)`` for ``gated``;
    ``(W, b, Wd, bd)`` for ``gated_fused`` (``gate_half`` of ``W``'s output is the gate); biases may be
    None. With autograd recording, each chunk runs under non-reentrant checkpoint, so its intermediate
    is dropped after forward and recomputed in backward.
    """
    body = functools.partial(_ffn, kind=kind, activation=activation, proj=proj, gate_half=gate_half)
    record = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights))
    outs = [checkpoint(body, chunk, *weights, use_reentrant=False) if record else body(chunk, *weights)
            for chunk in x.split(chunk_tokens, dim=token_dim)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=token_dim)


# --------------------------------------------------------------------------------------------- analysis

def symbolic_token_dim(node: fx.Node, symbols: set | None = None) -> int | None:
    """The one dim of ``node``'s value whose size is symbolic (the captured sequence), else None.

    With ``symbols`` (sympy symbols of the sequence length), only sizes that mention one of them count,
    so other dynamic dims (a dynamic batch) do not make the answer ambiguous.
    """
    val = value(node)
    if not isinstance(val, torch.Tensor):
        return None
    dims = [d for d, size in enumerate(val.shape) if isinstance(size, torch.SymInt)
            and (symbols is None or size.node.expr.free_symbols & set(symbols))]
    return dims[0] if len(dims) == 1 else None


@dataclass
class FFNMatch:
    kind: str                    # "mlp" | "gated" | "gated_fused" (the runtime's kind)
    activation: str              # a key of ACTIVATIONS
    proj: str                    # "linear" | "conv1d"
    x: fx.Node                   # the block's input
    weights: tuple               # nodes (or None for a missing bias), in chunked_ffn's order
    output: fx.Node              # the node whose value the block produces
    nodes: list[fx.Node]         # every node the block absorbs, output included
    token_dim: int
    gate_half: int = 0
    intermediate: int | None = None  # features per token of the activation (one half, when gated)
    summary: dict = field(default_factory=dict)  # also stored as meta["ringify_ffn"] on rewrite
    replacement: fx.Node | None = None           # the chunked_ffn node, after chunk_feed_forward


@dataclass
class _Proj:
    x: fx.Node
    weight: object
    bias: object
    out: fx.Node
    nodes: list[fx.Node]
    spelling: str


def _same_sizes(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _projection(node: fx.Node) -> _Proj | None:
    """``node`` as the output of ``linear(x, W, b)`` or of GPT-2's Conv1D spelling, else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        kw = named_args(node)
        if not isinstance(kw["input"], fx.Node):
            return None
        return _Proj(kw["input"], kw["weight"], kw["bias"], node, [node], "linear")
    mm = node.args[0] if node.target in _VIEWS else None
    if not (isinstance(mm, fx.Node) and mm.target is aten.addmm.default):
        return None
    kw = named_args(mm)
    flat = kw["mat1"]
    if kw["beta"] != 1 or kw["alpha"] != 1 or not (isinstance(flat, fx.Node) and flat.target in _VIEWS):
        return None
    x = flat.args[0]
    xv, fv, ov, wv = value(x), value(flat), value(node), value(kw["mat2"])
    if not all(isinstance(v, torch.Tensor) for v in (xv, fv, ov, wv)) or xv.dim() < 2 or fv.dim() != 2:
        return None
    if not (_same_sizes(fv.shape[1:], xv.shape[-1:]) and _same_sizes(ov.shape, (*xv.shape[:-1], wv.shape[-1]))):
        return None
    return _Proj(x, kw["mat2"], kw["input"], node, [flat, mm, node], "conv1d")


def _skip_identity_dropout(node, absorbed: list) -> fx.Node:
    while isinstance(node, fx.Node) and node.target is aten.dropout.default:
        kw = named_args(node)
        if kw["train"] and kw["p"] != 0:
            break
        absorbed.append(node)
        node = kw["input"]
    return node


def _signature(node: fx.Node):
    kw = named_args(node)
    return node.target, tuple(sorted(((str(k), "<node>" if isinstance(v, fx.Node) else repr(v)) for k, v in kw.items())))


def _as_digraph(region: list[fx.Node], start: fx.Node, end: fx.Node) -> nx.DiGraph:
    """``region`` (call_function nodes from ``start``, exclusive, to ``end``) as a labelled DiGraph."""
    g = nx.DiGraph()
    g.add_node(start, sig="input", end=False)
    for node in region:
        g.add_node(node, sig=_signature(node), end=node is end)
        for name, arg in named_args(node).items():
            if isinstance(arg, fx.Node):
                names = g.edges[arg, node]["args"] if g.has_edge(arg, node) else ()
                g.add_edge(arg, node, args=tuple(sorted(names + (name,))))
    return g


def _unary(fn):
    return lambda x: fn(x)


@functools.cache
def _activation_graphs() -> dict[str, nx.DiGraph]:
    graphs = {}
    for name, fn in ACTIVATIONS.items():
        traced = make_fx(_unary(fn), pre_dispatch=True)(torch.randn(2, 3))
        nodes = list(traced.graph.nodes)
        inp = next(n for n in nodes if n.op == "placeholder")
        end = next(n for n in nodes if n.op == "output").args[0]
        graphs[name] = _as_digraph([n for n in nodes if n.op == "call_function"], inp, end)
    return graphs


def _is_stop(node: fx.Node) -> bool:
    return _projection(node) is not None or _fused_half(node) is not None


def _activation(end: fx.Node) -> tuple[str, list[fx.Node], fx.Node] | None:
    """``end`` as an activation of one projection output (or fused half): (name, region, start), else None."""
    region, starts, todo = [], set(), [end]
    while todo:
        node = todo.pop()
        if node in region or node in starts:
            continue
        if node is not end and _is_stop(node):
            starts.add(node)
            continue
        if node.op != "call_function" or len(region) >= _MAX_ACTIVATION_NODES:
            return None
        region.append(node)
        todo.extend(node.all_input_nodes)
    if len(starts) != 1:
        return None
    start = starts.pop()
    g = _as_digraph(region, start, end)
    for name, pattern in _activation_graphs().items():
        if nx.is_isomorphic(g, pattern, node_match=operator.eq, edge_match=operator.eq):
            return name, region, start
    return None


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def _fused_half(node: fx.Node):
    """``node`` as ``getitem(chunk(h, 2, -1) or split(h, I/2, -1), i)`` -> (split node, i), else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    split, index = node.args
    if not (isinstance(split, fx.Node) and split.target in (aten.chunk.default, aten.split.Tensor)):
        return None
    val, h = value(split), value(split.args[0])
    dim = named_args(split)["dim"]
    if not isinstance(h, torch.Tensor) or dim % h.dim() != h.dim() - 1 or len(val) != 2:
        return None
    if not statically_known_true(val[0].shape[-1] == val[1].shape[-1]):
        return None
    return split, index


def _match_at(down: _Proj, token_dims) -> FFNMatch | None:
    """The block that ends in the projection ``down``, else None."""
    absorbed = list(down.nodes)
    end = _skip_identity_dropout(down.x, absorbed)
    if not isinstance(end, fx.Node) or end.op != "call_function":
        return None
    match = None
    found = _activation(end)
    up = found and _projection(found[2])
    if up:  # mlp: up projection -> activation
        act, region, _ = found
        match = FFNMatch("mlp", act, up.spelling, up.x, (up.weight, up.bias, down.weight, down.bias),
                         down.out, up.nodes + region + absorbed, 0)
    elif end.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in end.args[:2]):
        for gate_branch, up_out in (end.args[:2], end.args[1::-1]):  # gated: act(gate) * up
            match = _gated(end, gate_branch, up_out, down, absorbed)
            if match:
                break
    if match is None or match.proj != down.spelling:
        return None
    inner = value(end)
    match.intermediate = int(inner.shape[-1]) if isinstance(inner, torch.Tensor) else None
    return _check(match, token_dims)


def _gated(end, gate_branch, up_out, down, absorbed) -> FFNMatch | None:
    found = _activation(gate_branch)
    if not found:
        return None
    act, region, gate = found
    half = _fused_half(up_out)
    if half is not None:  # fused: the two halves of one projection
        split, up_index = half
        proj = _projection(split.args[0])
        if not proj or _fused_half(gate) != (split, 1 - up_index):
            return None
        return FFNMatch("gated_fused", act, proj.spelling, proj.x, (proj.weight, proj.bias, down.weight, down.bias),
                        down.out, proj.nodes + [split, gate, up_out] + region + [end] + absorbed, 0,
                        gate_half=1 - up_index)
    up, gate = _projection(up_out), _projection(gate)
    if not (up and gate) or gate.out is up.out or gate.x is not up.x or gate.spelling != up.spelling:
        return None
    return FFNMatch("gated", act, up.spelling, up.x, (gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias),
                    down.out, gate.nodes + region + up.nodes + [end] + absorbed, 0)


def _check(match: FFNMatch, token_dims) -> FFNMatch | None:
    """Token dim of the input known and not the feature dim; weights token-free; intermediates private."""
    xv = value(match.x)
    dim = token_dims(match.x)
    if not isinstance(xv, torch.Tensor) or dim is None or dim % xv.dim() == xv.dim() - 1:
        return None
    if not all(w is None or (isinstance(w, fx.Node) and token_dims(w) is None) for w in match.weights):
        return None
    inside = set(match.nodes)
    if len(inside) != len(match.nodes) or match.x in inside:
        return None
    if any(u not in inside for n in match.nodes if n is not match.output for u in n.users):
        return None
    match.nodes.sort(key=_position(match.x.graph))
    match.token_dim = dim % xv.dim()
    match.summary = _summary(match)
    return match


def _module_stack(nodes: list[fx.Node]) -> dict:
    """The nn_module_stack entries all of ``nodes`` share: the innermost module holding the block."""
    return dict(common_prefix([list((n.meta.get("nn_module_stack") or {}).items()) for n in nodes]))


def _summary(match: FFNMatch) -> dict:
    stack = _module_stack(match.nodes)
    # the deepest source line every node of the block comes from: where the block is written or called
    shared = common_prefix([frames(n) for n in match.nodes])
    out = value(match.output)
    return {
        "kind": "mlp" if match.kind == "mlp" else "gated",
        "fused": match.kind == "gated_fused",
        "activation": match.activation,
        "proj": match.proj,
        "module_path": stack_path(stack),
        "source": f"{shared[-1][0]}:{shared[-1][1]}" if shared else "",
        "hidden": int(value(match.x).shape[-1]),
        "intermediate": match.intermediate,
        "out_features": int(out.shape[-1]) if isinstance(out, torch.Tensor) else None,
        "token_dim": match.token_dim,
        "nodes": [n.name for n in match.nodes],
    }


def find_feed_forward(gm: fx.GraphModule, token_dims: Callable[[fx.Node], int | None] = symbolic_token_dim
                      ) -> list[FFNMatch]:
    """Every feed-forward block of ``gm`` (in graph order), without changing the graph."""
    matches, taken = [], set()
    for node in gm.graph.nodes:
        down = _projection(node)
        match = down and _match_at(down, token_dims)
        if match and not taken.intersection(match.nodes):
            taken.update(match.nodes)
            matches.append(match)
    return matches


def chunk_feed_forward(gm: fx.GraphModule, token_dims: Callable[[fx.Node], int | None] = symbolic_token_dim,
                       *, chunk_tokens: int = 256) -> list[FFNMatch]:
    """Replace each feed-forward block of ``gm`` by one :func:`chunked_ffn` call; returns the matches."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    matches = find_feed_forward(gm, token_dims)
    for m in matches:
        with gm.graph.inserting_before(m.output):
            new = gm.graph.call_function(chunked_ffn, (m.x, *m.weights), {
                "kind": m.kind, "activation": m.activation, "token_dim": m.token_dim,
                "chunk_tokens": chunk_tokens, "proj": m.proj, "gate_half": m.gate_half})
        new.meta["val"] = value(m.output)
        new.meta["nn_module_stack"] = _module_stack(m.nodes)
        new.meta["stack_trace"] = m.nodes[0].meta.get("stack_trace")
        m.summary["chunk_tokens"] = chunk_tokens
        new.meta["ringify_ffn"] = m.summary
        m.output.replace_all_uses_with(new)
        m.replacement = new
        for node in reversed(m.nodes):  # explicitly: DCE keeps dropout (a seeded op) even with train=False
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return matches
