"""Capture a model as an FX graph whose sequence dimension stays symbolic.

``torch.export.export(strict=False)`` in its training IR, before decompositions, so that
``scaled_dot_product_attention`` stays one node. The sequence dim of every input is marked
``Dim.AUTO``: sizes that follow from it (views, ``arange``, masks) become expressions of one symbol,
which is how the passes find the tokens in every tensor of the graph.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.export import Dim
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .errors import UnsupportedModelError


@dataclass
class Captured:
    graph_module: fx.GraphModule  # ``ExportedProgram.module()``: same parameters as the model
    symbols: set                  # sympy symbols of the sequence length
    seq_len: int
    flat: bool = False            # captured through FlatCall: call with ``FlatCall.tensors(args, kwargs)``

    def __call__(self, gm: fx.GraphModule, args, kwargs):
        return gm(*FlatCall.tensors(args, kwargs)) if self.flat else gm(*args, **kwargs)


class FlatCall(torch.nn.Module):
    """``model`` called with its tensor inputs as positional args, the rest (flags, None) baked in.

    Why: torch 2.13's ``export`` with ``dynamic_shapes`` fails (``Must provide a tree_name when there
    might be a mismatch``) when a call passes anything through ``**kwargs`` (HF models take
    ``return_dict`` there). Flattened, the spec is a plain tuple. Parameters stay the model's own.
    """

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.model = model
        leaves, self.spec = tree_flatten((tuple(args), dict(kwargs)))
        self.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        self.consts = [None if t else x for t, x in zip(self.is_tensor, leaves)]

    @staticmethod
    def tensors(args, kwargs) -> tuple:
        return tuple(x for x in tree_flatten((tuple(args), dict(kwargs)))[0] if isinstance(x, torch.Tensor))

    def forward(self, *tensors):
        it = iter(tensors)
        leaves = [next(it) if t else c for t, c in zip(self.is_tensor, self.consts)]
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.model(*args, **kwargs)


def sequence_length(args, kwargs, seq_dim: int) -> int:
    """The sequence length: ``seq_dim`` of the first tensor input that has it."""
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > seq_dim:
            return leaf.size(seq_dim)
    raise UnsupportedModelError(
        f"no tensor input has a dim {seq_dim} to hold the sequence; pass seq_dim=... to ringify()"
    )


def signature(args, kwargs, training: bool) -> tuple:
    """What decides whether a captured graph can be reused: shapes, dtypes, devices, constants."""
    leaves, spec = tree_flatten((args, kwargs))
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.requires_grad))
        else:
            parts.append(repr(leaf))
    return (str(spec), tuple(parts), training, torch.is_grad_enabled())


def _sequence_spec(x, seq_dim: int, seq_len: int):
    """``Dim.AUTO`` on the sequence dim of a tensor input that has it; None (static) otherwise."""
    if isinstance(x, torch.Tensor) and x.dim() > seq_dim and x.size(seq_dim) == seq_len:
        return {seq_dim: Dim.AUTO}
    return None


def _dynamic_shapes(model: torch.nn.Module, args, kwargs, seq_dim: int, seq_len: int):
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: tree_map(lambda x: _sequence_spec(x, seq_dim, seq_len), v) for name, v in bound.arguments.items()}


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, seq_dim: int = 1) -> Captured:
    """Export ``model`` on these inputs with a symbolic sequence length."""
    seq_len = sequence_length(args, kwargs, seq_dim)
    flat = False
    try:
        dynamic = _dynamic_shapes(model, args, kwargs, seq_dim, seq_len)
        program = torch.export.export(model, tuple(args), dict(kwargs), strict=False, dynamic_shapes=dynamic)
    except Exception as first_err:  # noqa: BLE001 - retry flattened (see FlatCall), then report the first error
        try:
            wrapper = FlatCall(model, args, kwargs)
            tensors = FlatCall.tensors(args, kwargs)
            spec = tuple(_sequence_spec(t, seq_dim, seq_len) for t in tensors)
            program = torch.export.export(wrapper, tensors, strict=False, dynamic_shapes=(spec,))
            flat = True
        except Exception:  # noqa: BLE001
            err = first_err
            first = "\n".join(str(err).strip().splitlines()[:6])
            raise UnsupportedModelError(
                f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: {first}\n"
                "Hint: ringify needs a model that torch.export.export(model, args, kwargs, strict=False) can "
                "capture; for HuggingFace models pass use_cache=False."
            ) from err
    gm = program.module()
    inline_no_grad_regions(gm)
    symbols: set = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
            val = node.meta["val"]
            if val.dim() > seq_dim and isinstance(val.shape[seq_dim], torch.SymInt):
                symbols |= val.shape[seq_dim].node.expr.free_symbols
    return Captured(gm, symbols, seq_len, flat)


def inline_no_grad_regions(gm: fx.GraphModule) -> None:
    """Inline ``torch.no_grad()`` regions (``wrap_with_set_grad_enabled(False, ...)``) whose inputs need no grad.

    HF models compute rotary tables under ``no_grad``; inlined, the passes see their ``arange`` and
    compute the tables for this rank's positions only. Without inputs that need grad, the region means
    the same thing inlined.
    """
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not hop or node.args[0] is not False:
            continue
        inputs = node.args[2:]
        if any(getattr(i.meta.get("val"), "requires_grad", False) for i in inputs if isinstance(i, fx.Node)):
            continue
        body = getattr(gm, node.args[1].target)
        env: dict[fx.Node, object] = {}
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, inputs))
        results = None
        with gm.graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    results = inner.args[0]
                    continue
                if inner.op == "get_attr":
                    raise UnsupportedModelError("a no_grad region with its own attributes is not supported")
                env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
        outputs = [env[r] if isinstance(r, fx.Node) else r for r in results]
        for user in list(node.users):
            if user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
