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
import operator
from dataclasses import dataclass, field

import sympy
import torch
from torch import fx

from ..errors import UnsupportedModelError
from ..runtime import graph_calls
from ..runtime.block_mask import register_block_mask
from ..runtime.collectives import once_over_ranks, sync_grad
from .frames import Frame, cuttable, whole
from .fx import describe, fetch_attr, is_assert, is_impure, map_aggregate, module_path, source_line, value
from .masks import block_mask
from .rules import ATTENTION, JOIN, LOCAL, MIX, POSITIONS, REDUCE, SELECT, SLICE, TABLE, classify, rule_for
from .rules.base import operand
from .rules.mutation import mutated_aliases
from .sequence import Tokens, has_tokens, size_expr, token_dims

aten = torch.ops.aten


@dataclass
class ShardPlan:
    """What the rewrite did, for reports."""

    attention: list[dict] = field(default_factory=list)
    reductions: list[dict] = field(default_factory=list)
    positions: list[dict] = field(default_factory=list)
    full_ops: list[dict] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    slices: list[dict] = field(default_factory=list)  # slices / selected tokens of activations along the sequence
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
        self.param_only: set[fx.Node] = set()  # computed from parameters and constants alone (w.t(), a reshape)
        for node in self.nodes:
            if node.op == "get_attr":
                self.active[node] = id(fetch_attr(self.gm, node.target)) in params
                self.param_only.add(node)
                continue
            inputs = node.all_input_nodes
            self.active[node] = any(self.active.get(i, False) for i in inputs)
            if node.op == "call_function" and inputs and all(i in self.param_only for i in inputs):
                self.param_only.add(node)
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
                self._demand_as_held(node)
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
                if fam == SELECT and not self.active[node]:
                    self.family[node] = fam = MIX  # one token of a value every rank holds: read it there
                use_local = fam in (REDUCE, LOCAL, ATTENTION, SELECT) and self.active[node]
                self._demand_inputs(node, local=use_local)
                continue
            self._demand_write(node)
            wanted_full = node in self.need_full
            wanted_local = node in self.need_local
            if not (wanted_full or wanted_local):
                continue
            if fam in (SLICE, JOIN) and not self.active[node]:
                self.family[node] = fam = MIX  # of values every rank holds whole: computed there, cut after
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
            if fam == JOIN:  # whole from the local activations (gathered) and full inputs; cut where used
                self.compute_full.add(node)
                self._demand_as_held(node)
                continue
            # token-local
            if wanted_full:
                self.compute_full.add(node)
                self._demand_inputs(node, local=False, consumer=self.need_full[node])
            if wanted_local:
                self.compute_local.add(node)
                self._demand_inputs(node, local=True)

    def _demand_as_held(self, node: fx.Node) -> None:
        """Each input with tokens in the version it is held in: local if an activation, else full (outputs,
        joins)."""
        for arg in node.all_input_nodes:
            self.needed.add(arg)
            if self.tokens(arg):
                (self.need_local.add(arg) if self.active[arg] else self.need_full.setdefault(arg, node))

    def _demand_write(self, node: fx.Node) -> None:
        """An in-place write (``key[..., :8].copy_(k)``: a node without users) is needed in every version
        in which a tensor it changes (its base, any view of that) is needed (:mod:`.rules.mutation`)."""
        for alias in mutated_aliases(node):
            if alias in self.need_local:
                self.need_local.add(node)
            if alias in self.need_full:
                self.need_full.setdefault(node, self.need_full[alias])

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
            sinks = node.kwargs.get("sinks")
            if sinks is not None:
                if self.tokens(sinks):
                    raise UnsupportedModelError(f"the attention sinks of {describe(node)} depend on the sequence")
                self.needed.add(sinks)
            if mask is not None:
                plan = self.masks.get(mask)
                if plan is None:
                    plan = self.masks[mask] = block_mask(mask, self.symbols)
                for leaf in plan.leaves:
                    self.needed.add(leaf)
                    if self.active.get(leaf) and not (leaf in self.param_only and not self.tokens(leaf)):
                        raise UnsupportedModelError(
                            f"the attention mask of {describe(node)} depends on activations through "
                            f"{describe(leaf)}; ringify evaluates masks from positions, inputs, buffers and "
                            "parameters (a learned bias table) only")
                    if self.tokens(leaf):
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
        self.frames: dict[fx.Node, Frame] = {}  # the tokens a local value holds, where not all of its sequence
        self.bound: set[fx.Node] = set()  # local values whose rows are fixed (activations, positions): not re-cut
        self.reframed: dict[tuple, fx.Node] = {}  # local versions of other values at another frame
        self.once: dict[fx.Node, fx.Node] = {}
        self.replicated: set[fx.Node] = set()  # values without tokens summed or handed over from every rank
        self.current_frame: Frame | None = None
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
                    self.full[node] = rule_for(node).emit_full(node, self) or self.copy(node, self.get_full)
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

    def get_local(self, node: fx.Node, frame: Frame | None = None) -> fx.Node:
        """This rank's version of ``node`` holding the tokens of ``frame`` (default: the frame of the op being
        emitted, else the value's own). Values cut from full ones, and local copies of them, are cut again at
        another frame when an op pairs them with sliced activations (``labels[:, 1:]`` with ``logits[:, :-1]``)."""
        frame = frame if frame is not None else self.current_frame
        if not self.tokens(node):
            if node in self.local:
                return self.local[node]
            if node in self.shared:
                return self.shared[node]
        if node not in self.local and node in self.full:  # cut the full value here: the cheapest point
            self.local[node] = self.shard(node)
        if node not in self.local:
            if node in self.shared:
                return self.shared[node]
            raise AssertionError(f"ringify: no local version of {node.name}")
        if frame is None or frame == self.frame_of(node):
            return self.local[node]
        if node in self.bound:
            raise UnsupportedModelError(
                f"{describe(node)} holds the tokens of {self.frame_of(node)}, but is paired with a value holding "
                f"{frame}: the op pairs different tokens (a shift, x[:, 1:] - x[:, :-1]), which needs the tokens of "
                "neighbouring ranks. Hint: shift an input (the labels) rather than an activation.")
        key = (node, frame)
        if key not in self.reframed:
            saved, self.current_frame = self.current_frame, frame
            try:
                self.reframed[key] = (self.shard(node, frame) if node in self.full
                                      else self.copy(node, lambda n: self.get_local(n, frame)))
            finally:
                self.current_frame = saved
        return self.reframed[key]

    def frame_of(self, node: fx.Node) -> Frame:
        """The tokens this rank's version of ``node`` holds: a frame set by a slice, else its whole sequence."""
        if node in self.frames:
            return self.frames[node]
        dims = token_dims(node, self.symbols)
        return whole(value(node).shape[dims[0]]) if len(dims) == 1 else whole(0)

    def input_frame(self, node: fx.Node) -> Frame | None:
        """The frame an op runs at when its bound local inputs hold a slice of their sequence (None: whole
        sequences). Every bound input must then hold the same tokens, or the op pairs different ones."""
        frames = {}
        for i in node.all_input_nodes:
            if i in self.bound and i in self.local and self.tokens(i):
                frames.setdefault(self.frame_of(i), i)
        if all(f.is_whole for f in frames):
            return None  # whole sequences (of one base: merged views S*B and B*S are checked by the rules)
        if len(frames) > 1:
            (fa, a), (fb, b) = list(frames.items())[:2]
            raise UnsupportedModelError(
                f"{describe(node)} pairs {describe(a)} (tokens of {fa}) with {describe(b)} (tokens of {fb}): "
                "different tokens meet, which needs the tokens of neighbouring ranks. Hint: shift an input (the "
                "labels) rather than an activation, or slice both the same way.")
        return next(iter(frames), None)

    def frame_arg(self, frame: Frame):
        """``frame`` as the runtime reads it: None for a whole sequence, else (start, stop) nodes or ints."""
        if frame.is_whole:
            return None
        return (self.size_node(frame.start), self.size_node(frame.stop))

    def shard(self, node: fx.Node, frame: Frame | None = None) -> fx.Node:
        val = value(node)
        if isinstance(val, torch.SymInt):
            raise UnsupportedModelError(f"ringify cannot shard the size {describe(node)}")
        dims = token_dims(node, self.symbols)
        if len(dims) != 1 or not cuttable(val.shape[dims[0]]):
            raise UnsupportedModelError(
                f"{describe(node)} produces a value with token dims {dims} of sizes "
                f"{[val.shape[d] for d in dims]} that ringify would have to cut into shards; only a single, "
                "unflattened sequence dim can be cut. Hint: keep the sequence dim separate until after the layers."
            )
        if frame is not None and sympy.expand(size_expr(val.shape[dims[0]]) - frame.length) != 0:
            raise UnsupportedModelError(
                f"{describe(node)} has {val.shape[dims[0]]} tokens along dim {dims[0]}, but is paired with values "
                f"holding the tokens of {frame}: the op would pair different tokens.")
        self.plan.shards.append(_info(node, dim=dims[0], **({"frame": str(frame)} if frame is not None else {})))
        if frame is None or self.frame_arg(frame) is None:
            return self.graph.call_function(graph_calls.shard_like, (self.full[node], dims[0], self.group, self.layout))
        return self.graph.call_function(graph_calls.cut_full, (self.full[node], dims[0], self.size_node(frame.base),
                                                               self.frame_arg(frame), self.group, self.layout))

    def whole(self, node: fx.Node, dim: int) -> fx.Node:
        """``node`` whole on every rank, for an op that lays the sequence out anew (a join): a full value as it
        is, an activation gathered from every rank's rows."""
        if not (self.tokens(node) and self.active[node]):
            return self.get_full(node)
        frame = self.frame_of(node)
        return self.graph.call_function(graph_calls.regather, (self.get_local(node, frame), dim,
                                                               self.size_node(frame.base), self.frame_arg(frame),
                                                               self.group, self.layout))

    def size_node(self, expr):
        """A sympy size expression of the sequence symbols as an int or a node of the new graph."""
        expr = size_expr(expr) if not hasattr(expr, "free_symbols") else expr
        if expr.is_number:
            return int(expr)
        if expr.is_Symbol:
            return self.full_size(expr)
        if expr.is_Add or expr.is_Mul:
            terms = [self.size_node(a) for a in expr.args]
            combine = operator.add if expr.is_Add else operator.mul
            out = terms[0]
            for t in terms[1:]:
                out = self.graph.call_function(combine, (out, t))
            return out
        raise UnsupportedModelError(f"ringify cannot compute the size {expr} from the inputs")

    def emit_tokenless(self, node: fx.Node) -> None:
        fam = self.family.get(node)
        local_inputs = node.op == "call_function" and self.active[node] and any(self.tokens(i) for i in node.all_input_nodes)
        self.current_frame = self.input_frame(node) if local_inputs else None
        try:
            if fam in (REDUCE, SELECT) and self.active[node]:
                self.shared[node] = rule_for(node).emit(node, self)
                self.replicated.add(node)
            elif local_inputs:
                self.shared[node] = self.copy(node, self.get_local)
            elif node.op in ("call_function", "call_module", "call_method"):
                self.shared[node] = self.copy(node, self.repeated_input(node))
            else:
                self.shared[node] = self.graph.node_copy(node, self.get_full)
        finally:
            self.current_frame = None

    def repeated_input(self, node: fx.Node):
        """How an op without tokens reads its inputs. Where every rank repeats it on values summed or handed
        over from all ranks (a head on a selected CLS token, a learned scale of the loss), a parameter's gradient
        would be counted once per rank by the sum ``sync_grad`` makes: it is read through ``once_over_ranks``."""
        activations = [i for i in node.all_input_nodes if self.active.get(i) and i not in self.param_only]
        if not activations or not all(i in self.replicated for i in activations):
            return self.get_full
        self.replicated.add(node)
        if self.world_size == 1:
            return self.get_full

        def get(n: fx.Node) -> fx.Node:
            if not (self.active.get(n) and n in self.param_only):
                return self.get_full(n)
            if n not in self.once:
                self.once[n] = self.graph.call_function(once_over_ranks, (self.get_full(n), self.group))
            return self.once[n]
        return get

    def emit_local(self, node: fx.Node) -> fx.Node:
        """The rank-local version of ``node``: the ring for attention, else its rule's emission or a copy on the
        local inputs."""
        if self.family.get(node) == ATTENTION:
            self.bound.add(node)
            return self.emit_attention(node)
        frame = self.current_frame = self.input_frame(node)
        try:
            new = rule_for(node).emit(node, self)
            if new is None:
                new = self.copy(node, self.get_local)
                if frame is not None and node not in self.frames:
                    self.frames[node] = frame
        finally:
            self.current_frame = None
        if frame is not None or self.active[node] or self.family.get(node) in (POSITIONS, TABLE):
            self.bound.add(node)
        return new

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
        for x in (q, k, v):
            frame = self.frame_of(x)
            if self.frame_arg(frame) is not None:
                raise UnsupportedModelError(
                    f"{describe(node)} attends over {describe(x)}, which holds only the tokens of {frame} (a slice of "
                    "the sequence); the ring lays out whole sequences. Hint: slice after the attention layers.")
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
                 fill=float(fill), softcap=float(kwargs.get("softcap", 0.0)), group=self.group, layout=self.layout,
                 sinks=self.shared[kwargs["sinks"]] if kwargs.get("sinks") is not None else None),
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
            if len(dims) != 1 or not cuttable(val.shape[dims[0]]):
                raise UnsupportedModelError(
                    f"output {describe(arg)} has token dims {dims} that cannot be gathered; use outputs='local'"
                )
            self.plan.outputs.append(_info(arg, gathered_dim=dims[0]))
            frame = self.frame_of(arg)
            if self.frame_arg(frame) is not None:
                return self.graph.call_function(graph_calls.gather_frame, (local, dims[0], self.size_node(frame.base),
                                                                           self.frame_arg(frame), self.group, self.layout))
            seq_len = self.size_node(frame.base)
            return self.graph.call_function(graph_calls.gather_output, (local, dims[0], self.group, self.layout, seq_len))

        self.graph.output(map_aggregate(node.args[0], out))

    def full_size(self, size) -> fx.Node:
        """A node of the new graph giving the full length of the sequence symbol ``size`` (a SymInt or a symbol)."""
        expr = size.node.expr if isinstance(size, torch.SymInt) else size
        if not expr.is_Symbol:
            return self.size_node(expr)
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
