"""What the captured graph says about its attention: which nodes are attention, their shapes and dtype,
whether each is causal (by flag, by a comparison of positions, or by a lower-triangular table), and which
nodes only feed attention masks.

Questions about an ``fx`` graph that never change it, asked by :mod:`ringify.cost.profile` while it builds a
:class:`~ringify.cost.model.ModelProfile` (:func:`attention_shapes` writes its answers into one) and while
its fake-tensor run decides what to stub and what to skip.
"""

from __future__ import annotations

import torch
from torch import fx

from ..passes.fx import fetch_attr, value
from .model import ModelProfile


def _canonical_attention():
    from ..passes.attention import attention

    return attention


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def attention_nodes(graph: fx.Graph) -> list[fx.Node]:
    canonical = _canonical_attention()
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (canonical, _SDPA)]


def _int(x) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def attention_shapes(gm: fx.GraphModule, attention: list[dict], profile: ModelProfile) -> None:
    """Heads, kv heads, head dim, dtype, causal and masks from the summaries, else from the graph."""
    nodes = attention_nodes(gm.graph)
    profile.layers = max(len(attention or []), len(nodes))
    shapes = []
    v_dims = []
    for node in nodes:
        q, k, v = (value(a) for a in (*node.args[:3], None)[:3])
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4:
            shapes.append((_int(q.shape[0]), _int(q.shape[1]), _int(k.shape[1]), _int(q.shape[3]), q.dtype))
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            v_dims.append(_int(v.shape[3]))
    heads = [_int(a.get("num_heads")) for a in attention or []]
    kv_heads = [_int(a.get("num_kv_heads")) or _int(a.get("num_heads")) for a in attention or []]
    dims = [_int(a.get("head_dim")) for a in attention or []]
    profile.heads = max([h for h in heads if h] + [s[1] for s in shapes if s[1]] + [0])
    profile.kv_heads = max([h for h in kv_heads if h] + [s[2] for s in shapes if s[2]] + [0]) or profile.heads
    profile.head_dim = max([d for d in dims if d] + [s[3] for s in shapes if s[3]] + [0])
    v_dim = max([d for d in v_dims if d] + [0])
    profile.v_head_dim = v_dim if v_dim != profile.head_dim else 0
    dtypes = [s[4] for s in shapes]
    if not dtypes:
        dtypes = [p.dtype for p in gm.parameters() if p.is_floating_point()][:1] or [torch.float32]
    profile.dtype_bytes = max(torch.empty((), dtype=t).element_size() for t in dtypes)
    if not profile.hidden:
        profile.hidden = profile.heads * profile.head_dim
    if attention:
        profile.causal = all(_causal_like(a) for a in attention)
        profile.masked = any(bool(a.get("mask") or a.get("mask_kind")) for a in attention)
    if nodes and not profile.causal:
        unread: list = []
        profile.causal = all([_graph_causal(gm, n, unread=unread) for n in nodes])
        if unread and not profile.causal:
            profile.notes.append(f"the attention mask reads {unread[0]} on the meta device, whose values are unknown: "
                                 "counted as not causal (a causal mask would halve the ring step's compute)")
    flags = [bool(a.get("causal")) for a in attention or []] or [
        bool(n.kwargs.get("causal") or n.kwargs.get("is_causal")) for n in nodes]
    profile.causal_flag = bool(flags) and all(flags)
    if nodes and not attention:
        profile.masked = any(mask_arg(n) is not None for n in nodes)


_POSITION_COMPARISONS = {"le", "lt", "ge", "gt", "tril", "triu"}


def _causal_like(summary: dict) -> bool:
    """Causal, or masked by a comparison of positions (HF's causal masks): half of the block pairs work."""
    ops = {str(op).strip("_") for op in summary.get("mask_ops") or []}
    return bool(summary.get("causal")) or bool(ops & _POSITION_COMPARISONS)


def _graph_causal(gm: fx.GraphModule, node: fx.Node, limit: int = 256, unread: list | None = None) -> bool:
    """Whether an attention node of the graph is causal or its mask is causal-like: built by comparing
    positions (``le``, ``tril``...) or read from a lower-triangular table (nanoGPT's ``bias`` buffer).
    Tables on the ``meta`` device have no values to check: their names go to ``unread``."""
    if node.kwargs.get("causal") or node.kwargs.get("is_causal"):
        return True
    mask = mask_arg(node)
    todo, seen = [mask] if isinstance(mask, fx.Node) else [], set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target)).split(".")[0].strip("_")
            if name in _POSITION_COMPARISONS:
                return True
            todo.extend(n.all_input_nodes)
        elif n.op == "get_attr":
            try:
                table = fetch_attr(gm, n.target)
            except AttributeError:
                continue
            if isinstance(table, torch.Tensor) and table.is_meta:  # no values to read (a plan without weights)
                if unread is not None:
                    unread.append(n.target)
                continue
            if isinstance(table, torch.Tensor) and table.dim() >= 2 and table.shape[-1] == table.shape[-2] > 1:
                square = table.reshape(-1, *table.shape[-2:])[0] != 0
                if torch.equal(square, square.tril()) and bool(square.diagonal().all()):
                    return True
    return False


def mask_arg(node: fx.Node):
    if node.target is _SDPA:
        return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("mask")


def mask_only(graph: fx.Graph, root: torch.nn.Module | None = None) -> set[fx.Node]:
    """Nodes whose values only feed attention masks (the ring evaluates those per block pair instead),
    also through the recomputed regions' calls (``root``'s :class:`~ringify.runtime.regions.Recompute`
    submodules) to the attention inside."""
    from ..runtime.regions import Recompute

    masks: set[fx.Node] = set()
    attn = set(attention_nodes(graph))
    mask_inputs: dict[fx.Node, set[int]] = {}  # a region call -> the positions of its mask-only inputs
    for node in graph.nodes:
        module = root.get_submodule(node.target) if root is not None and node.op == "call_module" else None
        if isinstance(module, Recompute):
            inner = mask_only(module.body.graph, module.body)
            places = [n for n in module.body.graph.nodes if n.op == "placeholder"]
            mask_inputs[node] = {i for i, p in enumerate(places)
                                 if p.users and all(u in inner or (u in set(attention_nodes(module.body.graph))
                                                                   and mask_arg(u) is p and p not in u.args[:3])
                                                    for u in p.users)}
    for node in reversed(graph.nodes):
        if node.op not in ("call_function", "call_method") or not node.users:
            continue
        ok = True
        for user in node.users:
            if user in masks:
                continue
            if user in attn and mask_arg(user) is node and node not in user.args[:3]:
                continue
            if user in mask_inputs and all(i in mask_inputs[user] for i, a in enumerate(user.args) if a is node):
                continue
            ok = False
            break
        if ok:
            masks.add(node)
    return masks


def masks_static(gm: fx.GraphModule, symbols: set) -> bool:
    """Whether every attention mask reads only buffers and positions (no graph input): the same tensors every
    step, so the fused kernels' cached tile plan is reused and no step evaluates a mask."""
    from ..passes.graph import to_digraph
    from ..passes.masks import block_mask

    import networkx as nx

    g = to_digraph(gm.graph)
    for node in attention_nodes(gm.graph):
        mask = mask_arg(node)
        if not isinstance(mask, fx.Node):
            continue
        for leaf in block_mask(mask, symbols).leaves:
            if isinstance(leaf, fx.Node) and any(a.op == "placeholder" for a in nx.ancestors(g, leaf) | {leaf}):
                return False
    return True


def graph_device(gm: fx.GraphModule) -> torch.device:
    """Where the graph's inputs live (``meta`` for a plan without weights): positions made here go there too."""
    for node in gm.graph.nodes:
        val = value(node)
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


def batch_of(gm: fx.GraphModule) -> int:
    for node in gm.graph.nodes:
        val = value(node)
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() >= 2:
            return _int(val.shape[0]) or 1
    return 1
