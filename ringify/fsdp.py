"""ringify with FSDP2 (``fully_shard``) on a 2-D mesh: data parallel x ring.

FSDP2 shards the parameters of each module it wraps over the data-parallel ranks; hooks around the
module's forward all-gather them before and free them after, and in backward gather them again and
reduce-scatter their gradients. The rewritten graph replaces the model's forward, so it keeps those
module boundaries: the ops of each FSDP2 module run as that module's forward
(:class:`ringify.runtime.regions.ThroughHooks`), reading the parameters the hooks put in place
(:class:`ringify.runtime.regions.LiveParameters`), and the whole graph runs as the root module's
forward. Nothing of FSDP2 is re-implemented: its hooks, collectives and gradient division are its own.

Capture traces the plain model that FSDP2 wraps: every FSDP2 module unsharded (FSDP2's own
``unshard()``) and its hooks off for the duration of the trace.

Gradients: the ring sums each parameter's gradient over the ring ranks (``sync_grad``, exactly the
single-replica gradient), then FSDP2 reduce-scatters the mean over the dp ranks: the mean over the dp
replicas of the single-device gradients.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import fx, nn

from .errors import UnsupportedModelError
from .runtime.collectives import sync_grad
from .runtime.comm import rank_and_size, resolve_group
from .runtime.regions import LiveParameters, ThroughHooks, run_as_forward

LIVE = "_ringify_live_parameters"  # the rewritten graph's LiveParameters submodule


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules FSDP2 wraps, by path ('' for the model itself)."""
    cls = _fsdp_module_class()
    if cls is None:
        return {}
    return {path: m for path, m in model.named_modules() if isinstance(m, cls)}


def check_composable(model: nn.Module, group: str) -> None:
    """Refuse the wrappings ringify cannot compose with, saying what to change."""
    from torch.nn.parallel import DistributedDataParallel

    for path, m in model.named_modules():
        where = f"`{path}`" if path else "the model itself"
        if isinstance(m, DistributedDataParallel):
            raise UnsupportedModelError(
                f"{where} is wrapped in DistributedDataParallel. Hint: wrap DDP around the ringified model instead: "
                "DDP(ringify(model, mesh['cp']), process_group=mesh['dp'].get_group()).")
        if type(m).__name__ == "FullyShardedDataParallel":
            raise UnsupportedModelError(
                f"{where} is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters ringify cannot read "
                "per module. Hint: use FSDP2: `fully_shard(layer, mesh=mesh['dp'])` on each layer and on the model.")
    modules = fsdp_modules(model)
    if not modules:
        return
    from torch.distributed.fsdp import fully_shard

    for path, m in modules.items():
        state = fully_shard.state(m)
        if len(getattr(state, "_modules", (m,))) > 1:
            raise UnsupportedModelError(
                f"`{path or type(model).__name__}` is sharded together with other modules by one "
                "fully_shard([...]) call; ringify runs each FSDP2 module's ops as that module's forward and "
                "cannot split one group's hooks. Hint: call fully_shard on each module separately.")
    ring = resolve_group(group)
    if ring is None or rank_and_size(ring)[1] == 1:
        return
    ring_ranks = set(dist.get_process_group_ranks(ring))
    me = dist.get_rank()
    for path, m in modules.items():
        for param in m.parameters():
            mesh = getattr(param, "device_mesh", None)
            if mesh is None:
                continue
            shared = set(mesh.mesh.flatten().tolist()) & ring_ranks - {me}
            if shared:
                raise UnsupportedModelError(
                    f"fully_shard of `{path or type(model).__name__}` shards over ranks "
                    f"{sorted(mesh.mesh.flatten().tolist())}, which share ranks {sorted(shared)} with the ring "
                    f"(ranks {sorted(ring_ranks)}): a rank cannot hold a parameter shard and a sequence shard for the "
                    "same peers. Hint: mesh = init_device_mesh(device, (dp, cp), mesh_dim_names=('dp', 'cp')); "
                    "fully_shard(..., mesh=mesh['dp']); ringify(model, mesh['cp']).")
            break


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """The model as FSDP2 wraps it, for capture: every FSDP2 module unsharded, its forward hooks off.

    Yields ``{id(parameter): path}`` of the parameters as they are then (the unsharded tensors capture
    sees). Costs the whole model's parameters on each rank for the duration of one trace."""
    modules = list(fsdp_modules(model).values())
    hooks = [(m._forward_pre_hooks.copy(), m._forward_hooks.copy()) for m in modules]
    for m in modules:
        m.unshard()
    try:
        for m in modules:
            m._forward_pre_hooks.clear()
            m._forward_hooks.clear()
        yield {id(p): path for path, p in model.named_parameters(remove_duplicate=False)}
    finally:
        for m, (pre, post) in zip(modules, hooks):
            m._forward_pre_hooks.update(pre)
            m._forward_hooks.update(post)
        for m in modules:
            m.reshard()


def read_live_parameters(gm: fx.GraphModule, model: nn.Module, parameter_paths: dict[str, str],
                         prefix: str = "") -> int:
    """Replace the rewritten graph's reads of FSDP2-managed parameters (``get_attr``, fixed when the graph
    was built) by :class:`LiveParameters` reads by path, placed in the owning module's region: they run
    inside that module's forward and get the unsharded tensor FSDP2 put in place.

    ``parameter_paths``: get_attr target -> the parameter's path in ``model`` (recorded at capture)."""
    modules = fsdp_modules(model)
    gm.add_submodule(LIVE, LiveParameters(model))
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in parameter_paths:
            continue
        path = parameter_paths[node.target]
        owners = [p for p in sorted(modules, key=len) if p and (path.startswith(p + "."))]
        with gm.graph.inserting_before(node):
            read = gm.graph.call_module(LIVE, (path,))
        read.meta = dict(node.meta)
        # inside every FSDP2 module above the parameter, outermost first: fx.module_paths reads this
        read.meta["nn_module_stack"] = {f"ringify_owner_{i}": (prefix + p, type(modules[p]))
                                        for i, p in enumerate(owners)}
        node.replace_all_uses_with(read)
        gm.graph.erase_node(node)
        count += 1
    gm.recompile()
    return count


def check_parameters_stay_inside(gm: fx.GraphModule) -> None:
    """A parameter read inside an FSDP2 module's region must not flow out of it: outside the module's
    forward FSDP2 frees the unsharded tensor (tied weights across FSDP2 modules, a layer's weight used by
    another layer)."""
    for sub in gm.children():
        body = getattr(sub, "body", None)
        if not isinstance(body, fx.GraphModule):
            continue
        if isinstance(sub, ThroughHooks):
            _check_outputs(body, sub.path)
        check_parameters_stay_inside(body)


def _check_outputs(body: fx.GraphModule, path: str) -> None:
    for value in _flat(body.graph.output_node().args[0]):
        source = value
        while isinstance(source, fx.Node) and source.op == "call_function" and source.target is sync_grad:
            source = source.args[0]
        if isinstance(source, fx.Node) and source.op == "call_module" and source.target == LIVE:
            raise UnsupportedModelError(
                f"the parameter `{source.args[0]}` belongs to the FSDP2 module `{path}` but is used outside it "
                "(tied or shared weights across FSDP2 modules): FSDP2 frees it after the module's forward. Hint: "
                "fully_shard the module that holds both users (e.g. only the model itself) instead.")


def _flat(arg) -> list:
    out: list = []
    fx.node.map_aggregate(arg, lambda x: out.append(x))
    return out


def call_under_root(model: nn.Module, fn, args: tuple, kwargs: dict):
    """``fn(*args, **kwargs)`` as the forward of ``model`` when FSDP2 wraps it (its root hooks: lazy init,
    unshard of the root's own parameters, the backward's final callback); plainly otherwise."""
    cls = _fsdp_module_class()
    if cls is not None and isinstance(model, cls):
        return run_as_forward(model, fn, *args, **kwargs)
    return fn(*args, **kwargs)


__all__ = ["call_under_root", "check_composable", "check_parameters_stay_inside", "fsdp_modules",
           "read_live_parameters", "unsharded"]
