"""Regions of a rewritten graph that must run as one unit, outlined into submodules.

Two kinds, both asked for by the user and kept through the rewrite:

- **checkpoint** regions: what the model ran under ``torch.utils.checkpoint`` (HF's
  ``gradient_checkpointing_enable()``, ``checkpoint_wrapper``, direct calls; marked at capture in
  ``meta["custom"][CHECKPOINT]``), or every layer with ``ringify(..., checkpoint="layers")``. Outlined,
  the region runs under ``torch.utils.checkpoint`` again, so its activations are recomputed in
  backward, ring attention included.
- **module** regions: the ops of an FSDP2-sharded module (by ``nn_module_stack``). Outlined, the region
  runs as that module's forward, inside FSDP2's own unshard/reshard and gradient hooks.

A region is the set of marked nodes closed under paths between them (an unmarked node that the
rewrite inserted between two of its nodes, a shard or a chunked feed-forward, joins it), so it can
become one call; torch's ``fuse_by_partitions`` does the outlining.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from ..errors import UnsupportedModelError
from .graph import to_digraph
from .fx import common_prefix, describe, module_paths

CHECKPOINT = "ringify_checkpoint"  # meta["custom"] key: the checkpoint region a node was captured in


def checkpoint_owners(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Node -> the checkpoint region (id) it was captured in."""
    return {n: n.meta["custom"][CHECKPOINT] for n in gm.graph.nodes
            if n.op not in ("placeholder", "get_attr", "output") and CHECKPOINT in (n.meta.get("custom") or {})}


def module_owners(gm: fx.GraphModule, modules: list[str], prefix: str = "") -> dict[fx.Node, str]:
    """Node -> the innermost of ``modules`` (paths relative to the model) that ran it."""
    wanted = set(modules)
    owners = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        inside = [p for p in module_paths(node, prefix) if p in wanted]
        if inside:
            owners[node] = inside[-1]
    return owners


def mark_checkpoints(owners: dict[fx.Node, Hashable], first_id: int) -> dict[Hashable, int]:
    """Put nodes in new checkpoint regions (``checkpoint="layers"``), one per owner (a layer), numbered from
    ``first_id``. A region the model marked inside a layer becomes part of the layer's; one spanning layers
    is recomputed layer by layer."""
    ids: dict[Hashable, int] = {}
    for node, owner in owners.items():
        node.meta["custom"] = {**(node.meta.get("custom") or {}), CHECKPOINT: ids.setdefault(owner, first_id + len(ids))}
    return ids


def repeated_layers(model: torch.nn.Module, gm: fx.GraphModule, is_attention: Callable[[fx.Node], bool],
                    prefix: str = "") -> list[str]:
    """Paths of the model's layers: the elements of each ``nn.ModuleList`` that hold an attention (the
    outermost such lists: encoder and decoder layers both, not the heads inside a layer)."""
    ran = {p for n in gm.graph.nodes if is_attention(n) for p in module_paths(n, prefix)}
    layers: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or any(path.startswith(p + ".") for p in layers):
            continue
        layers += [f"{path}.{i}" if path else str(i) for i in range(len(module))
                   if (f"{path}.{i}" if path else str(i)) in ran]
    return layers


def closed_regions(gm: fx.GraphModule, owners: dict[fx.Node, Hashable], kind: str) -> dict[Hashable, dict]:
    """Each owner's nodes plus the unowned nodes on paths between them (so the region can be one call).

    Refuses a region that another region's node lies inside of: the two interleave and neither can be
    one call."""
    g = to_digraph(gm.graph)
    groups: dict[Hashable, list[fx.Node]] = {}
    for node, key in owners.items():
        groups.setdefault(key, []).append(node)
    regions: dict[Hashable, dict] = {}
    for key, nodes in groups.items():
        below = {n for layer in nx.bfs_layers(g, nodes) for n in layer}
        above = {n for layer in nx.bfs_layers(g.reverse(copy=False), nodes) for n in layer}
        hull = below & above
        hull |= {n for n in below - hull if not n.users and n.op != "output" and n not in owners
                 and all(i in hull for i in n.all_input_nodes)}  # run-time asserts on the region's values
        foreign = [n for n in hull if owners.get(n, key) != key]
        if foreign:
            raise UnsupportedModelError(
                f"the {kind} region `{key}` and `{owners[foreign[0]]}` interleave in the rewritten graph "
                f"({describe(foreign[0])} lies between ops of `{key}`), so neither can run as one unit. Hint: "
                f"keep each {kind} region a contiguous part of the forward (one module call, one checkpoint call)."
            )
        regions[key] = dict.fromkeys(n for n in gm.graph.nodes if n in hull)
    claimed: dict[fx.Node, Hashable] = {}
    for key, nodes in regions.items():
        for n in nodes:
            if claimed.setdefault(n, key) != key:
                raise UnsupportedModelError(
                    f"{describe(n)} lies between the ops of both {kind} regions `{claimed[n]}` and `{key}`; "
                    f"they cannot run as separate units. Hint: keep each {kind} region a contiguous part of the forward."
                )
    return regions


def outline(gm: fx.GraphModule, regions: dict[Hashable, dict], wrap: Callable[[Hashable, fx.GraphModule], torch.nn.Module],
            name: Callable[[Hashable], str]) -> dict[Hashable, str]:
    """Replace each region by one ``call_module`` of ``wrap(key, body)`` named ``name(key)``; the bodies are
    GraphModules of the region's nodes (``fuse_by_partitions``), called with the values flowing in and
    returning a tuple of those flowing out."""
    keys = [k for k, nodes in regions.items() if nodes]
    if not keys:
        return {}
    prefix = "_ringify_region_"
    fuse_by_partitions(gm, [regions[k] for k in keys], prefix=prefix, always_return_tuple=True)
    names = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith(prefix):
            key = keys[int(node.target[len(prefix):])]
            body = getattr(gm, node.target)
            delattr(gm, node.target)
            names[key] = _free_name(gm, name(key))
            gm.add_submodule(names[key], wrap(key, body))
            node.target = names[key]
    gm.recompile()
    return names


def outline_nested(gm: fx.GraphModule, *, checkpoints: dict[int, dict], modules: dict[str, torch.nn.Module],
                   prefix: str = "", summary: list | None = None, _done: frozenset = frozenset()) -> list[dict]:
    """Outline every checkpoint region (``checkpoints``: id -> the model's options) and every module region
    (``modules``: path -> the FSDP2 module, whose ops run inside its hooks), nested as they nest.

    The regions not inside another one are outlined first, then each body in turn: a checkpoint inside a
    layer that FSDP2 shards (HF's checkpointing, ``checkpoint_wrapper`` then ``fully_shard``) runs inside the
    layer's hooks; a checkpoint around such a layer recomputes it, hooks and all, as FSDP2 expects. The
    same nodes in both: the module outside. Returns what was outlined, for the report."""
    from ..runtime.regions import Recompute, ThroughHooks

    summary = [] if summary is None else summary
    module_of, checkpoint_of = {}, {}
    for node in gm.graph.nodes:
        # asserts (no users) at a region's edge carry the neighbour's marks: they join whatever region holds
        # the values they check (closed_regions' sinks)
        if node.op in ("placeholder", "get_attr", "output") or not node.users:
            continue
        paths = [p for p in module_paths(node, prefix) if p in modules and ("module", p) not in _done]
        if paths:
            module_of[node] = ("module", paths[0])
        region = (node.meta.get("custom") or {}).get(CHECKPOINT)
        if region is not None and region in checkpoints and ("checkpoint", region) not in _done:
            checkpoint_of[node] = ("checkpoint", region)
    regions = {**closed_regions(gm, module_of, "module"), **closed_regions(gm, checkpoint_of, "checkpoint")}
    sets = {key: set(nodes) for key, nodes in regions.items()}
    outer = {}
    for key, nodes in regions.items():
        inside_other = False
        for other, other_nodes in sets.items():
            if other == key or not (sets[key] & other_nodes):
                continue
            if sets[key] == other_nodes:
                inside_other = key[0] == "checkpoint"  # the same nodes: the module outside
            elif sets[key] < other_nodes:
                inside_other = True
            elif not other_nodes < sets[key]:
                n = next(iter(sets[key] & other_nodes))
                raise UnsupportedModelError(
                    f"the {key[0]} region `{key[1]}` and the {other[0]} region `{other[1]}` overlap without one "
                    f"containing the other (both hold {describe(n)}), so they cannot be nested. Hint: checkpoint "
                    "whole modules (a layer), and shard whole modules with fully_shard.")
            if inside_other:
                break
        if not inside_other:
            outer[key] = nodes

    def wrap(key, body):
        kind, what = key
        if kind == "module":
            return ThroughHooks(modules[what], body, what)
        return Recompute(body, checkpoints[what])

    labels = {key: what if kind == "module" else  # the module every marked op of a region ran in (not its edge asserts)
              _label([n for n in outer[key] if checkpoint_of.get(n) == key and n.users], prefix) or str(what)
              for key in outer for kind, what in [key]}

    def name(key):
        return labels[key] if key[0] == "module" else f"recompute_{labels[key]}"

    names = outline(gm, outer, wrap, name)
    for key, attr in names.items():
        body = getattr(gm, attr).body
        ops = sum(1 for n in body.graph.nodes if n.op == "call_function")
        summary.append({"kind": "fsdp" if key[0] == "module" else "checkpoint", "name": attr,
                        "module": labels[key], "ops": ops,
                        "inside": sorted(k[1] for k in _done if k[0] == "module")})
        outline_nested(body, checkpoints=checkpoints, modules=modules, prefix=prefix, summary=summary,
                       _done=_done | {key})
    return summary


def _label(nodes, prefix: str) -> str:
    """The innermost module path that every node of a region ran in (``model.layers.3``), or ''."""
    common = common_prefix([module_paths(n, prefix) for n in nodes if n.meta.get("nn_module_stack")])
    return common[-1] if common else ""


def _free_name(gm: torch.nn.Module, base: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in base) or "region"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


__all__ = ["CHECKPOINT", "checkpoint_owners", "closed_regions", "mark_checkpoints", "module_owners", "module_paths",
           "outline", "outline_nested", "repeated_layers"]
