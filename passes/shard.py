"""Rewrite a captured graph so that each rank computes only its own tokens.

Inputs arrive full and identical on every rank. Each node of the new graph exists in up to two
versions:

- **full**: the original value, computed from the full inputs. Only values that do not depend on
  parameters or on attention (positions, masks, label shifts, padding counts) may be full: they are
  O(sequence) and every rank can afford them. Ops that mix tokens (cumsum, shifts, ...) run here.
- **local**: this rank's tokens of the value (its rows at its global positions under the layout).
  Token-local ops run on local inputs; ``arange`` over the sequence becomes the global positions;
  attention becomes the ring; reductions over tokens become a local partial plus a sum over ranks.

A full value that a local op needs is cut with ``shard_like`` at that point (the cheapest one: as
late as possible, on the smallest value). A local value that a full op would need does not exist:
that is an op mixing the tokens of activations, and it is refused with the op, the module path and
the source line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import fx

from ..errors import UnsupportedModelError
from ..runtime import graph_calls
from ..runtime.block_mask import register_block_mask
from ..runtime.collectives import sync_grad
from .fx import describe, fetch_attr, is_assert, is_impure, map_aggregate, module_path, source_line, value
from .masks import block_mask
from .rules import ATTENTION, LOCAL, MIX, POSITIONS, REDUCE, TABLE, classify, rule_for
from .rules.base import operand
from .sequence import Tokens, has_tokens, token_dims

aten = torch.ops.aten


@dataclass
class ShardPlan:
    """What the rewrite did, for reports."""

    attention: list[dict] = field(default_factory=list)
    reductions: list[dict] = field(default_factory=list)
    positions: list[dict] = field(default_factory=list)
    full_ops: list[dict] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    synced_parameters: int = 0
    token_local_modules: list[str] = field(default_factory=list)  # run whole on this rank's tokens (MoE experts)


def _is_canonical_attention(node: fx.Node) -> bool:
    from .attention import attention

    return node.op == "call_function" and node.target is attention


def _info(node: fx.Node, **extra) -> dict:
    return {"node": node.name, "op": describe(node).split(" ")[0].strip("`"), "module": module_path(node),
            "source": source_line(node), **extra}


class _Sharder:
    def __init__(self, gm: fx.GraphModule, symbols: set, group: str, layout: str, outputs: str, sync_grads: bool,
                 world_size: int, token_local: tuple[str, ...] = ()):
        self.gm, self.symbols, self.group, self.layout = gm, symbols, group, layout
        self.seq = Tokens(symbols)
        self.token_local = tuple(token_local)
        self.outputs, self.sync_grads, self.world_size = outputs, sync_grads, world_size
        self.nodes = list(gm.graph.nodes)
        self.plan = ShardPlan()
        self.family: dict[fx.Node, str] = {}
        self.active: dict[fx.Node, bool] = {}
        self.masks: dict[fx.Node, object] = {}

    # ------------------------------------------------------------------ analysis
    def tokens(self, node) -> bool:
        return isinstance(node, fx.Node) and has_tokens(node, self.symbols)

    def analyse(self) -> None:
        params = {id(p) for p in self.gm.parameters()}
        for node in self.nodes:
            if node.op == "get_attr":
                self.active[node] = id(fetch_attr(self.gm, node.target)) in params
                continue
            inputs = node.all_input_nodes
            self.active[node] = any(self.active.get(i, False) for i in inputs)
            if node.op != "call_function":
                continue
            touches = self.tokens(node) or any(self.tokens(i) for i in inputs)
            if _is_canonical_attention(node):
                self.family[node] = ATTENTION
                self.active[node] = True
            elif node.meta.get("ringify_ffn"):
                self.family[node] = LOCAL
            elif touches and (inside := _inside(module_path(node), self.token_local)):
                self.family[node] = LOCAL  # sorts tokens by expert inside, yet each token's output is its own
                if inside not in self.plan.token_local_modules:
                    self.plan.token_local_modules.append(inside)
            elif touches:
                self.family[node] = classify(node, self.seq)

    def demands(self) -> None:
        """Which versions (full / local) of each node are needed, from the outputs back."""
        self.need_full: dict[fx.Node, fx.Node] = {}  # node -> a consumer that needs it full
        self.need_local: set[fx.Node] = set()
        self.compute_full: set[fx.Node] = set()
        self.compute_local: set[fx.Node] = set()
        self.needed: set[fx.Node] = set()
        for node in reversed(self.nodes):
            if node.op == "output":
                for arg in node.all_input_nodes:
                    self.needed.add(arg)
                    if self.tokens(arg):
                        (self.need_local.add(arg) if self.active[arg] else self.need_full.setdefault(arg, node))
                continue
            if is_assert(node):
                continue  # emitted only where the values it checks exist anyway
            fam = self.family.get(node)
            tokens = self.tokens(node)
            if not tokens:
                if not (node in self.needed or is_impure(node) or any(u in self.needed for u in node.users)):
                    continue
                self.needed.add(node)
                if node.op in ("placeholder", "get_attr"):
                    continue
                # a value without tokens (a loss, a count, a size): from local inputs if they are activations
                use_local = fam in (REDUCE, LOCAL, ATTENTION) and self.active[node]
                self._demand_inputs(node, local=use_local)
                continue
            wanted_full = node in self.need_full
            wanted_local = node in self.need_local
            if not (wanted_full or wanted_local):
                continue
            self.needed.add(node)
            if node.op == "placeholder":
                continue
            if wanted_full and self.active[node]:
                mixer, needed = self.blame(self.need_full[node], node)
                raise UnsupportedModelError(
                    f"{describe(mixer)} mixes the tokens of an activation "
                    f"(it needs all of {describe(needed)} across the sequence), so it cannot run on one rank's "
                    f"shard. {rule_for(mixer).hint(mixer) if mixer.op == 'call_function' else ''}ringify handles attention, token-local ops and reductions over "
                    "tokens; hint: move this op before the layers (on inputs) or replace it with attention, or "
                    "run this model without ringify."
                )
            if fam == ATTENTION:
                self.compute_local.add(node)
                self._demand_inputs(node, local=True)
                continue
            if fam in (POSITIONS, TABLE):
                if wanted_full:
                    self.compute_full.add(node)
                if wanted_local:
                    self.compute_local.add(node)
                self._demand_args(node)  # the end/start SymInts: full sizes
                if fam == TABLE:
                    self.needed.add(operand(node))
                continue
            if fam == MIX:
                self.compute_full.add(node)
                self._demand_inputs(node, local=False, consumer=node)
                continue
            # token-local
            if wanted_full:
                self.compute_full.add(node)
                self._demand_inputs(node, local=False, consumer=self.need_full[node])
            if wanted_local:
                self.compute_local.add(node)
                self._demand_inputs(node, local=True)

    def blame(self, consumer: fx.Node, node: fx.Node) -> tuple[fx.Node, fx.Node]:
        """The op that actually mixes tokens, and the activation it needs whole, for a refusal.

        ``consumer`` needs all of the activation ``node``. When ``node`` (or what it is a view or
        ``getitem`` of) mixes tokens itself, the refusal belongs to it, not to its consumer: a causal
        ``conv1d`` followed by ``[..., :S]`` is refused at the convolution, ``sort(...).values`` at
        ``aten.sort``. Walks up to the first mixing op whose own inputs are token-local activations.
        """
        seen: set[fx.Node] = set()
        while True:
            source = node
            while (self.family.get(source) != MIX and source.op == "call_function" and source.args
                   and isinstance(source.args[0], fx.Node) and rule_for(source).moves_tokens
                   and self.tokens(source.args[0]) and self.active.get(source.args[0])):
                source = source.args[0]  # views and getitems move tokens, never mix them
            if self.family.get(source) != MIX or source in seen:
                return consumer, node
            seen.add(source)
            inputs = [i for i in source.all_input_nodes if self.tokens(i) and self.active.get(i)]
            if not inputs:
                return consumer, node
            consumer, node = source, inputs[0]

    def _demand_args(self, node: fx.Node) -> None:
        """Every input with tokens is needed full (sizes and tables read at full length)."""
        for arg in node.all_input_nodes:
            self.needed.add(arg)
            if self.tokens(arg):
                self.need_full.setdefault(arg, node)

    def _demand_inputs(self, node: fx.Node, local: bool, consumer: fx.Node | None = None) -> None:
        if self.family.get(node) == ATTENTION:
            q, k, v, mask = _attention_args(node)
            for arg in (q, k, v):
                self.needed.add(arg)
                self.need_local.add(arg)
            if mask is not None:
                plan = self.masks.get(mask)
                if plan is None:
                    plan = self.masks[mask] = block_mask(mask, self.symbols)
                for leaf in plan.leaves:
                    self.needed.add(leaf)
                    if self.tokens(leaf):
                        if self.active.get(leaf):
                            raise UnsupportedModelError(
                                f"the attention mask of {describe(node)} depends on activations through "
                                f"{describe(leaf)}; ringify evaluates masks from positions, inputs and buffers only"
                            )
                        self.need_full.setdefault(leaf, node)
            return
        for arg in node.all_input_nodes:
            self.needed.add(arg)
            if not self.tokens(arg):
                continue
            if local:
                self.need_local.add(arg)
            else:
                self.need_full.setdefault(arg, consumer or node)

    # ------------------------------------------------------------------ emission
    def emit(self) -> fx.GraphModule:
        graph = fx.Graph()
        # the same calling convention (pytree in/out specs). A shallow copy: TreeSpecs are immutable, and a
        # deepcopy rebuilds their deprecated LeafSpec children (a FutureWarning on every capture)
        graph.set_codegen(copy.copy(self.gm.graph._codegen))
        self.graph = graph
        self.full: dict[fx.Node, fx.Node] = {}
        self.local: dict[fx.Node, fx.Node] = {}
        self.shared: dict[fx.Node, fx.Node] = {}
        for node in self.nodes:
            if node.op == "output":
                self.emit_output(node)
            elif is_assert(node):
                self.emit_assert(node)
            elif node not in self.needed:
                continue
            elif node.op == "placeholder":
                self.full[node] = self.shared[node] = graph.node_copy(node)
            elif node.op == "get_attr":
                copied = graph.node_copy(node)
                if self.active[node] and self.sync_grads and self.world_size > 1:
                    self.shared[node] = graph.call_function(sync_grad, (copied, self.group))
                    self.plan.synced_parameters += 1
                else:
                    self.shared[node] = copied
            elif not self.tokens(node):
                self.emit_tokenless(node)
            else:
                if node in self.compute_full:
                    self.full[node] = self.copy(node, self.get_full)
                    if self.family.get(node) == MIX:
                        self.plan.full_ops.append(_info(node))
                if node in self.compute_local:
                    self.local[node] = self.emit_local(node)
        return fx.GraphModule(self.gm, graph)

    def emit_assert(self, node: fx.Node) -> None:
        """Keep a metadata assert where the value it checks exists (local first); drop it otherwise."""
        for versions in (self.local, self.full, self.shared):
            if all(i in versions or i in self.shared for i in node.all_input_nodes):
                get = lambda n, v=versions: v.get(n, self.shared.get(n))  # noqa: E731
                self.copy(node, get)
                return

    def copy(self, node: fx.Node, get) -> fx.Node:
        new = self.graph.node_copy(node, lambda n: get(n))
        new.meta = dict(node.meta)
        return new

    def get_full(self, node: fx.Node) -> fx.Node:
        if node in self.shared:
            return self.shared[node]
        if node in self.full:
            return self.full[node]
        raise AssertionError(f"ringify: no full version of {node.name}")

    def get_local(self, node: fx.Node) -> fx.Node:
        if node in self.local:
            return self.local[node]
        if not self.tokens(node) and node in self.shared:
            return self.shared[node]
        if node in self.full:  # cut the full value here: the cheapest point
            self.local[node] = self.shard(node)
            return self.local[node]
        if node in self.shared:
            return self.shared[node]
        raise AssertionError(f"ringify: no local version of {node.name}")

    def shard(self, node: fx.Node) -> fx.Node:
        val = value(node)
        if isinstance(val, torch.SymInt):
            raise UnsupportedModelError(f"ringify cannot shard the size {describe(node)}")
        dims = token_dims(node, self.symbols)
        if len(dims) != 1 or not _is_plain_symbol(val.shape[dims[0]]):
            raise UnsupportedModelError(
                f"{describe(node)} produces a value with token dims {dims} of sizes "
                f"{[val.shape[d] for d in dims]} that ringify would have to cut into shards; only a single, "
                "unflattened sequence dim can be cut. Hint: keep the sequence dim separate until after the layers."
            )
        self.plan.shards.append(_info(node, dim=dims[0]))
        return self.graph.call_function(graph_calls.shard_like, (self.full[node], dims[0], self.group, self.layout))

    def emit_tokenless(self, node: fx.Node) -> None:
        fam = self.family.get(node)
        if fam == REDUCE and self.active[node]:
            self.shared[node] = rule_for(node).emit(node, self)
        elif node.op == "call_function" and self.active[node] and any(self.tokens(i) for i in node.all_input_nodes):
            self.shared[node] = self.copy(node, self.get_local)
        elif node.op in ("call_function", "call_module", "call_method"):
            self.shared[node] = self.copy(node, self.get_full)
        else:
            self.shared[node] = self.graph.node_copy(node, self.get_full)

    def emit_local(self, node: fx.Node) -> fx.Node:
        """The rank-local version of ``node``: the ring for attention, else its rule's emission or a copy on the
        local inputs."""
        if self.family.get(node) == ATTENTION:
            return self.emit_attention(node)
        new = rule_for(node).emit(node, self)
        return new if new is not None else self.copy(node, self.get_local)

    # what rules' emit() use
    def as_full(self, arg):
        """``arg`` (a node, a constant, or a list of them) in terms of the new graph's full values."""
        return fx.node.map_arg(arg, self.get_full)

    def as_local(self, arg):
        """``arg`` in terms of the new graph's local values (values without tokens: the shared ones)."""
        return fx.node.map_arg(arg, self.get_local)

    def record(self, kind: str, node: fx.Node, **extra) -> None:
        """Note a rewrite in the plan (``kind``: ``reductions``, ``positions``...), for the report."""
        getattr(self.plan, kind).append(_info(node, **extra))

    def emit_attention(self, node: fx.Node) -> fx.Node:
        q, k, v, mask = _attention_args(node)
        kwargs = node.kwargs
        if kwargs.get("dropout_p", 0.0) and self.gm.training:
            raise UnsupportedModelError(
                f"{describe(node)} applies dropout p={kwargs['dropout_p']} to attention probabilities in training; "
                "the ring cannot draw the same random mask. Hint: set the attention dropout to 0 (or call model.eval())."
            )
        mask_fn, mask_args, mask_kind = None, [], None
        if mask is not None:
            plan = self.masks[mask]
            mask_fn = register_block_mask(plan.fn)  # by key: the generated code holds a string
            mask_args = [self.get_full(leaf) if self.tokens(leaf) else self.shared[leaf] for leaf in plan.leaves]
            mask_kind = kwargs.get("mask_kind")
        info = dict(node.meta.get("ringify_attention") or {})
        self.plan.attention.append(_info(node, mask=mask_kind, mask_ops=getattr(self.masks.get(mask), "ops", []),
                                         mask_key=mask_fn,
                                         causal=bool(kwargs.get("causal")), **{k: v for k, v in info.items()
                                                                               if k not in ("module", "source", "mask", "mask_ops", "causal", "mask_key")}))
        fill = kwargs.get("fill", float("-inf"))
        if mask_kind == "add":
            fill = float("-inf")
        new = self.graph.call_function(
            graph_calls.ring_attention_call,
            (self.get_local(q), self.get_local(k), self.get_local(v), mask_args),
            dict(mask_fn=mask_fn, scale=float(kwargs["scale"]), causal=bool(kwargs.get("causal", False)),
                 fill=float(fill), softcap=float(kwargs.get("softcap", 0.0)), group=self.group, layout=self.layout),
        )
        new.meta = dict(node.meta)
        return new

    def emit_output(self, node: fx.Node) -> None:
        def out(arg):
            if not isinstance(arg, fx.Node):
                return arg
            if not self.tokens(arg):
                return self.shared[arg]
            if not self.active[arg]:
                return self.get_full(arg)
            local = self.get_local(arg)
            if self.outputs == "local":
                self.plan.outputs.append(_info(arg, kept="local"))
                return local
            dims = token_dims(arg, self.symbols)
            val = value(arg)
            if len(dims) != 1 or not _is_plain_symbol(val.shape[dims[0]]):
                raise UnsupportedModelError(
                    f"output {describe(arg)} has token dims {dims} that cannot be gathered; use outputs='local'"
                )
            seq_len = self.full_size(val.shape[dims[0]])
            self.plan.outputs.append(_info(arg, gathered_dim=dims[0]))
            return self.graph.call_function(graph_calls.gather_output, (local, dims[0], self.group, self.layout, seq_len))

        self.graph.output(map_aggregate(node.args[0], out))

    def full_size(self, size) -> fx.Node:
        """A node of the new graph giving the full length of the sequence symbol ``size``."""
        expr = size.node.expr
        for node in self.nodes:
            if node.op == "placeholder":
                for d, s in enumerate(getattr(value(node), "shape", ())):
                    if isinstance(s, torch.SymInt) and s.node.expr == expr:
                        return self.graph.call_function(aten.sym_size.int, (self.full[node], d))
        raise UnsupportedModelError(f"cannot find the input that gives the sequence length {expr}")


def _inside(path: str, modules: tuple[str, ...]) -> str:
    """The module of ``modules`` that ``path`` is (or is inside), or ''. ``path`` may carry the prefix of a
    wrapper the model was captured through (``model.`` of capture's FlatCall)."""
    path = "." + path + "."
    return next((m for m in modules if f".{m}." in path), "")


def _is_plain_symbol(size) -> bool:
    return isinstance(size, torch.SymInt) and size.node.expr.is_Symbol


def _attention_args(node: fx.Node):
    args = list(node.args) + [None] * (4 - len(node.args))
    q, k, v, mask = args[:4]
    mask = node.kwargs.get("mask", mask)
    return q, k, v, mask


def shard_graph(gm: fx.GraphModule, symbols: set, *, group: str, layout: str, world_size: int,
                outputs: str = "full", sync_grads: bool = True, token_local: tuple[str, ...] = ()
                ) -> tuple[fx.GraphModule, ShardPlan]:
    """The rank-local version of ``gm`` (see the module docstring) and what was done.

    ``token_local``: module paths whose every op runs on this rank's tokens as it is, because the module
    maps each token to its own output (dropless mixture-of-experts layers sort tokens by expert inside).
    """
    sharder = _Sharder(gm, symbols, group, layout, outputs, sync_grads, world_size, token_local)
    sharder.analyse()
    sharder.demands()
    new = sharder.emit()
    new.graph.eliminate_dead_code()
    new.recompile()
    return new, sharder.plan


__all__ = ["ShardPlan", "shard_graph"]
