"""Capture a model as an FX graph whose sequence dimension stays symbolic.

``torch.export.export(strict=False)`` in its training IR, before decompositions, so that
``scaled_dot_product_attention`` stays one node. The sequence dim of every input is marked
``Dim.AUTO``: sizes that follow from it (views, ``arange``, masks) become expressions of one symbol,
which is how the passes find the tokens in every tensor of the graph.

When export fails, ``torch.fx.symbolic_trace`` is the fallback (:func:`capture_symbolic_trace`): it
records the Python-level graph without running anything, then ``make_fx(pre_dispatch=True)`` replays
that graph on fake tensors whose sequence dim is symbolic, giving the same kind of aten graph as
export (training IR, SDPA one node, ``nn_module_stack`` and ``stack_trace`` kept). What it rescues:
models whose Python reads the *values* of buffers (``self.idx.tolist()``, ``int(self.depth)``: export
fakes buffers, symbolic_trace reads the real ones), ``torch._assert`` on tensor data (export must
guard on the data; fx keeps the assert as a node, replayed here as ``aten._assert_async``), and
outputs in plain dataclasses (not pytree nodes, which export rejects). Like a Python attribute read
during export, a buffer value read in Python is baked into the graph: change it and the graph is
stale. Python control flow on activations or on the sequence length fails in both frontends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import operator
import os
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import fx
from torch.export import Dim
from torch.fx import traceback as fx_traceback
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .errors import UnsupportedModelError
from .passes.fx import fetch_attr, value
from .passes.regions import CHECKPOINT


@dataclass
class Captured:
    graph_module: fx.GraphModule  # ``ExportedProgram.module()``: same parameters as the model
    symbols: set                  # sympy symbols of the sequence length
    seq_len: int
    flat: bool = False            # captured through FlatCall: call with ``FlatCall.tensors(args, kwargs)``
    program: object = None        # the ExportedProgram (what ``ringify convert`` saves); None for other frontends
    frontend: str = "export"      # "export" or "symbolic_trace" (the fallback, see capture_symbolic_trace)
    unflatten: Callable | None = None  # rebuilds the model's output from the graph's flat outputs (fallback only)
    checkpoints: dict = dataclasses.field(default_factory=dict)  # region id -> the model's checkpoint options
    module_prefix: str = ""       # what nn_module_stack paths carry before the model's own paths ("model." via FlatCall)
    parameter_paths: dict = dataclasses.field(default_factory=dict)  # get_attr target -> model path (FSDP2 only)

    def __call__(self, gm: fx.GraphModule, args, kwargs):
        out = gm(*FlatCall.tensors(args, kwargs)) if self.flat else gm(*args, **kwargs)
        return self.unflatten(out) if self.unflatten is not None else out


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

    def unflatten(self, tensors) -> tuple[tuple, dict]:
        """The call's ``(args, kwargs)`` with ``tensors`` in place of its tensors."""
        it = iter(tensors)
        leaves = [next(it) if t else c for t, c in zip(self.is_tensor, self.consts)]
        return tree_unflatten(leaves, self.spec)

    def forward(self, *tensors):
        args, kwargs = self.unflatten(tensors)
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


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, seq_dim: int = 1,
            frontend: str = "auto") -> Captured:
    """``model`` on these inputs as a graph with a symbolic sequence length.

    ``frontend``: ``"export"`` (torch.export, retried flattened), ``"symbolic_trace"`` (the fallback
    only), or ``"auto"``: export, and the fallback when export fails.
    """
    if frontend not in ("auto", "export", "symbolic_trace"):
        raise ValueError(f"frontend must be 'auto', 'export' or 'symbolic_trace', got {frontend!r}")
    sequence_length(args, kwargs, seq_dim)  # no sequence dim: say so before trying anything
    recorder = CheckpointRecorder()
    with recorder:
        captured = _capture(model, args, kwargs, seq_dim, frontend)
    captured.checkpoints = recorder.regions
    return captured


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict, seq_dim: int, frontend: str) -> Captured:
    if frontend == "symbolic_trace":
        return capture_symbolic_trace(model, args, kwargs, seq_dim)
    try:
        return capture_export(model, args, kwargs, seq_dim)
    except Exception as export_err:  # noqa: BLE001 - fall back, then report both
        if frontend == "export":
            raise _model_error(model, args, kwargs) or _export_refusal(model, export_err) from export_err
        try:
            return capture_symbolic_trace(model, args, kwargs, seq_dim)
        except Exception as fx_err:  # noqa: BLE001
            raise _model_error(model, args, kwargs) or _export_refusal(model, export_err, fx_err) from export_err


class CheckpointRecorder:
    """While capturing: run ``torch.utils.checkpoint`` regions plainly and mark the nodes they make.

    Capture runs the forward once; neither the reentrant checkpoint (an autograd Function) nor the
    non-reentrant one (saved-tensor hooks) leaves a trace in the graph, so the recomputation the user
    asked for would be lost. Inside this context each outermost ``checkpoint(fn, ...)`` call (direct,
    through HF's ``gradient_checkpointing_enable()`` or ``checkpoint_wrapper``: all of them reach these
    two module functions) runs ``fn`` with ``meta["custom"][CHECKPOINT] = region id`` on every node it
    makes (``torch.fx.traceback.annotate`` under export, the tracer's own hook under symbolic_trace);
    ``regions[id]`` keeps the call's options (``context_fn``, ``preserve_rng_state``..., and the
    saved-tensor hooks the call ran under, such as HF's ``offload=True`` ``save_on_cpu``) for the rewritten graph, which checkpoints the same regions again (:mod:`ringify.passes.regions`).
    Nested checkpoints inside a region are part of it.
    """

    active: "CheckpointRecorder | None" = None  # the recorder in force (one capture at a time)

    def __init__(self):
        self.regions: dict[int, dict] = {}
        self.current: int | None = None
        self._ids = itertools.count()

    def __enter__(self) -> "CheckpointRecorder":
        self._saved = (torch_checkpoint.CheckpointFunction, torch_checkpoint._checkpoint_without_reentrant_generator,
                       _HOOKS.__enter__, _HOOKS.__exit__)
        torch_checkpoint.CheckpointFunction = _RecordedReentrant
        torch_checkpoint._checkpoint_without_reentrant_generator = _recorded_non_reentrant
        self.hooks: list = []  # saved-tensor hooks the model enters while capturing (HF's offload: save_on_cpu)
        enter, exit_ = _HOOKS.__enter__, _HOOKS.__exit__

        def entered(hooks, *a):
            self.hooks.append(hooks)
            return enter(hooks, *a)

        def exited(hooks, *a):
            if self.hooks and self.hooks[-1] is hooks:
                self.hooks.pop()
            return exit_(hooks, *a)

        _HOOKS.__enter__, _HOOKS.__exit__ = entered, exited
        self._outer, CheckpointRecorder.active = CheckpointRecorder.active, self
        return self

    def __exit__(self, *exc) -> None:
        (torch_checkpoint.CheckpointFunction, torch_checkpoint._checkpoint_without_reentrant_generator,
         _HOOKS.__enter__, _HOOKS.__exit__) = self._saved
        CheckpointRecorder.active = self._outer

    @contextlib.contextmanager
    def region(self, options: dict):
        if self.current is not None:  # nested: the outer region recomputes it
            yield
            return
        self.current = next(self._ids)
        if self.hooks:  # a checkpoint under save_on_cpu (HF's offload=True): its saved inputs go to the host
            options = {**options, "saved_tensors_hooks": self.hooks[-1]}
        self.regions[self.current] = options
        try:
            with fx_traceback.annotate({CHECKPOINT: self.current}):
                yield
        finally:
            self.current = None


_HOOKS = torch.autograd.graph.saved_tensors_hooks


class _RecordedReentrant:
    """``torch.utils.checkpoint.CheckpointFunction`` while capturing (``use_reentrant=True``)."""

    @staticmethod
    def apply(function, preserve_rng_state, *args):
        with CheckpointRecorder.active.region({"preserve_rng_state": preserve_rng_state, "reentrant": True}):
            return function(*args)


def _recorded_non_reentrant(function, preserve_rng_state, context_fn, determinism_check, debug, early_stop,
                            *args, **kwargs):
    """``torch.utils.checkpoint._checkpoint_without_reentrant_generator`` while capturing: checkpoint
    runs ``function`` between its two steps, here inside the region."""
    options = {"preserve_rng_state": preserve_rng_state, "determinism_check": determinism_check, "debug": debug,
               "early_stop": early_stop}
    if context_fn is not torch_checkpoint.noop_context_fn:
        options["context_fn"] = context_fn  # selective checkpointing: the same policy on the rewritten region
    with CheckpointRecorder.active.region(options):
        yield


def _model_error(model: torch.nn.Module, args: tuple, kwargs: dict) -> UnsupportedModelError | None:
    """When capture fails: does the untouched model itself raise on these inputs? Then that is the error.

    Export reports a model's own check on a symbol (``sequence of length s75 is longer than 256``); the
    eager run names the real values. Run in eval mode without grad (no dropout, no running statistics
    updated), then put the mode back; only on this failure path.
    """
    if isinstance(model, torch.fx.GraphModule) or not isinstance(model, torch.nn.Module):
        return None
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the model's own error, reported as it is
        first = (str(err).strip().splitlines() or [""])[0]
        return UnsupportedModelError(
            f"{type(model).__name__} itself raises on these inputs, before any rewrite: {type(err).__name__}: "
            f"{first}\nHint: check the inputs (the sequence length, --seq-len on the command line) against what "
            "the model accepts."
        )
    finally:
        for m, training in modes.items():
            m.training = training
    return None


def capture_export(model: torch.nn.Module, args: tuple, kwargs: dict, seq_dim: int = 1) -> Captured:
    """``torch.export.export(strict=False)`` with ``Dim.AUTO`` on the sequence dim; retried flattened (FlatCall).
    Raises the first attempt's error when both fail."""
    seq_len = sequence_length(args, kwargs, seq_dim)
    flat = False
    try:
        dynamic = _dynamic_shapes(model, args, kwargs, seq_dim, seq_len)
        with fx_traceback.preserve_node_meta():  # annotate() (checkpoint regions) reaches export's nodes through it
            program = torch.export.export(model, tuple(args), dict(kwargs), strict=False, dynamic_shapes=dynamic)
    except Exception as first_err:  # noqa: BLE001 - retry flattened (see FlatCall), then report the first error
        try:
            wrapper = FlatCall(model, args, kwargs)
            tensors = FlatCall.tensors(args, kwargs)
            spec = tuple(_sequence_spec(t, seq_dim, seq_len) for t in tensors)
            with fx_traceback.preserve_node_meta():
                program = torch.export.export(wrapper, tensors, strict=False, dynamic_shapes=(spec,))
            flat = True
        except Exception:  # noqa: BLE001
            raise first_err from None
    captured = from_program(program, seq_len, seq_dim, flat)
    captured.module_prefix = "model." if flat else ""
    return captured


def _export_refusal(model, export_err: BaseException, fx_err: BaseException | None = None) -> UnsupportedModelError:
    if isinstance(export_err, UnsupportedModelError) and fx_err is None:
        return export_err
    first = "\n".join(str(export_err).strip().splitlines()[:6])
    message = f"torch.export could not capture {type(model).__name__}: {type(export_err).__name__}: {first}\n"
    if fx_err is not None:
        second = "\n".join(str(fx_err).strip().splitlines()[:4])
        message += f"The torch.fx.symbolic_trace fallback failed too: {type(fx_err).__name__}: {second}\n"
    fallback = "" if fx_err is None else " or torch.fx.symbolic_trace"
    message += (f"Hint: ringify needs a model that torch.export.export(model, args, kwargs, strict=False){fallback} "
                "can capture: no Python control flow on tensor values; for HuggingFace models pass use_cache=False.")
    return UnsupportedModelError(message)


def from_program(program, seq_len: int, seq_dim: int = 1, flat: bool = False) -> Captured:
    """The graph of an ``ExportedProgram`` (just exported, or loaded from a ``.pt2``) ready for the passes."""
    gm = program.module()
    inline_no_grad_regions(gm)
    symbols: set = set()
    for node in gm.graph.nodes:
        val = value(node)
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            if val.dim() > seq_dim and isinstance(val.shape[seq_dim], torch.SymInt):
                symbols |= val.shape[seq_dim].node.expr.free_symbols
    return Captured(gm, symbols, seq_len, flat, program=program)


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
        if any(getattr(value(i), "requires_grad", False) for i in inputs if isinstance(i, fx.Node)):
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


# ------------------------------------------------------------------ the torch.fx.symbolic_trace fallback

_FX_DIR = os.path.dirname(fx.__file__) + os.sep


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer, recording each node's stack trace without torch.fx's frames (or FlatCall's)."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def trace(self, root, concrete_args=None) -> fx.Graph:
        """Trace, recording grad-mode switches (``torch.no_grad()`` blocks, ``@torch.no_grad`` methods) as
        ``torch._C._set_grad_enabled`` nodes: symbolic_trace runs them at trace time and keeps nothing, so
        the region's ops would silently compute gradients. ``make_fx(pre_dispatch=True)`` keeps them when
        the graph is replayed."""
        set_grad_enabled = torch._C._set_grad_enabled

        def record(mode: bool):
            set_grad_enabled(mode)
            self.create_proxy("call_function", set_grad_enabled, (bool(mode),), {})

        torch._C._set_grad_enabled = record
        try:
            return super().trace(root, concrete_args)
        finally:
            torch._C._set_grad_enabled = set_grad_enabled

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        recorder = CheckpointRecorder.active
        if recorder is not None and recorder.current is not None:  # annotate() does not reach symbolic_trace
            node.meta.setdefault("custom", {})[CHECKPOINT] = recorder.current
        return node

    def _filter_traceback_frames(self, summary: traceback.StackSummary) -> traceback.StackSummary:
        frames = super()._filter_traceback_frames(summary)
        return traceback.StackSummary.from_list(
            [f for f in frames if not f.filename.startswith(_FX_DIR) and f.filename != __file__])  # FlatCall's frame


def _traceable_assert(condition, message):
    """``torch._assert`` as replayed on fake tensors: a tensor condition becomes ``aten._assert_async`` (a check
    at run time) instead of a Python ``bool`` of data the tracer does not have."""
    if isinstance(condition, torch.Tensor):
        torch._assert_async(condition, message)
    else:
        assert condition, message


class _Replay(torch.nn.Module):
    """Runs a symbolically traced graph node by node, so that each aten op ``make_fx`` records while replaying
    a node inherits that node's ``nn_module_stack`` and ``stack_trace`` (``preserve_node_meta``)."""

    def __init__(self, traced: fx.GraphModule):
        super().__init__()
        self.traced = traced

    def forward(self, *values):
        with fx.traceback.preserve_node_meta():
            return fx.Interpreter(self.traced).run(*values)


def capture_symbolic_trace(model: torch.nn.Module, args: tuple, kwargs: dict, seq_dim: int = 1) -> Captured:
    """The fallback frontend: ``torch.fx.symbolic_trace``, then shapes propagated symbolically.

    1. A ``torch.fx.Tracer`` (what ``symbolic_trace`` uses) traces the model called through
       :class:`FlatCall`: its tensors are proxies, everything else (flags, ``None``, defaults) is what
       the call passed. Module paths land in ``nn_module_stack``, source lines in ``stack_trace``.
    2. ``make_fx(pre_dispatch=True)`` replays that graph node by node on fake tensors (one ``ShapeEnv``;
       the sequence dim of each input dynamic, every other dim static), with the parameters and buffers
       passed in as fake inputs: an aten graph in export's training IR (``scaled_dot_product_attention``,
       ``linear``, ``matmul`` stay whole) whose ``meta['val']`` carry the sequence symbol.
    3. Those parameter inputs become ``get_attr`` nodes of the model's own parameters and buffers, as
       in ``ExportedProgram.module()``. The graph takes the call's tensors flattened (``flat=True``) and
       returns its outputs flattened; ``Captured.unflatten`` rebuilds the model's output.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._symbolic_trace import PH
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    seq_len = sequence_length(args, kwargs, seq_dim)
    wrapper = FlatCall(model, args, kwargs)
    tensors = FlatCall.tensors(args, kwargs)
    tracer = _Tracer()
    graph = tracer.trace(wrapper, concrete_args=tuple(PH for _ in tensors))  # placeholders input_0, input_1...
    traced = fx.GraphModule(wrapper, graph, class_name=type(model).__name__)
    for node in traced.graph.nodes:
        if node.op == "call_function" and node.target is torch._assert:
            node.target = _traceable_assert
        if "nn_module_stack" in node.meta:
            node.meta["nn_module_stack"] = _unwrapped_stack(node.meta["nn_module_stack"])
    traced.recompile()

    state = dict(traced.named_parameters(remove_duplicate=False))
    state.update(traced.named_buffers(remove_duplicate=False))
    names = list(state)
    replay = _Replay(traced)
    rebuild: dict[str, Callable] = {}

    def run(state_values, *inputs):
        out = torch.func.functional_call(replay, {f"traced.{n}": v for n, v in zip(names, state_values)}, inputs)
        leaves, rebuild["fn"] = _flatten_output(out)
        return tuple(leaves)

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake_input(t: torch.Tensor):
        dynamic = [DimDynamic.DYNAMIC if d == seq_dim and size == seq_len else DimDynamic.STATIC
                   for d, size in enumerate(t.shape)]
        return fake_mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))

    fake_state = [fake_mode.from_tensor(t, static_shapes=True) for t in state.values()]
    fake_inputs = [fake_input(t) for t in tensors]
    traced_aten = make_fx(run, tracing_mode="symbolic", pre_dispatch=True)(fake_state, *fake_inputs)

    # a fresh graph: the parameter inputs become get_attr nodes of the model's own tensors, named as in the model
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, object] = {}
    leaf_grad: dict[fx.Node, bool] = {}  # whether each input or parameter needs grad (make_fx's vals are detached)
    state_inputs = iter(names)
    input_names, input_tensors = iter(_input_names(model, args, kwargs)), iter(tensors)
    for node in traced_aten.graph.nodes:
        if node.op == "placeholder":
            name = next(state_inputs, None)
            if name is not None:
                target = name.removeprefix("model.")  # FlatCall holds the model as ``model``
                attrs[target] = state[name]
                env[node] = graph.get_attr(target)
                leaf_grad[env[node]] = state[name].requires_grad
            else:
                env[node] = graph.placeholder(next(input_names))
                leaf_grad[env[node]] = next(input_tensors).requires_grad
            env[node].meta = dict(node.meta)
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "get_attr":  # constants make_fx made (``torch.tensor(...)`` in forward)
            target = node.target
            while target in attrs:
                target = "_" + target
            env[node].target = target
            attrs[target] = fetch_attr(traced_aten, node.target)
    _drop_no_grad_toggles(graph, leaf_grad)
    gm = fx.GraphModule(attrs, graph, class_name=type(model).__name__)
    gm.graph.eliminate_dead_code()
    gm.recompile()

    symbols: set = set()
    for node in gm.graph.nodes:
        val = value(node)
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() > seq_dim:
            if isinstance(val.shape[seq_dim], torch.SymInt):
                symbols |= val.shape[seq_dim].node.expr.free_symbols
    return Captured(gm, symbols, seq_len, flat=True, frontend="symbolic_trace", unflatten=rebuild["fn"])


def _unwrapped_stack(stack: dict) -> dict:
    """``nn_module_stack`` of a node traced through FlatCall, as if traced from the model itself: the
    model's own entry (path ``model``) dropped, ``model.`` taken off the paths under it."""
    out = {}
    for key, (path, kind) in stack.items():
        if path == "model":
            continue
        path = path.removeprefix("model.")
        out[key.removeprefix("model.") if isinstance(key, str) else key] = (path, kind)
    return out


def _input_names(model: torch.nn.Module, args, kwargs) -> list[str]:
    """Names for the flattened tensor inputs: the parameter or keyword they were passed as (``ids``, ``labels``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        positional = []
    names = []
    for i, x in enumerate(args):
        base = positional[i] if i < len(positional) else f"arg{i}"
        names += [base] * sum(isinstance(t, torch.Tensor) for t in tree_flatten(x)[0])
    for key, x in kwargs.items():
        names += [key] * sum(isinstance(t, torch.Tensor) for t in tree_flatten(x)[0])
    return names


def _flatten_output(out) -> tuple[list, Callable]:
    """The tensors (and other leaves) of a model's output and a function rebuilding it from them.

    Pytrees (tuples, dicts, registered classes such as HF's ``ModelOutput``) and plain dataclasses,
    which torch's pytree treats as opaque leaves."""
    leaves, spec = tree_flatten(out)
    parts: list[tuple[int, Callable | None]] = []
    flat: list = []
    for leaf in leaves:
        if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            fields = [f.name for f in dataclasses.fields(leaf) if f.init]
            inner, inner_rebuild = _flatten_output({name: getattr(leaf, name) for name in fields})
            parts.append((len(inner), lambda xs, cls=type(leaf), r=inner_rebuild: cls(**r(xs))))
            flat.extend(inner)
        else:
            parts.append((1, None))
            flat.append(leaf)

    def rebuild(values):
        values, rebuilt, at = list(values), [], 0
        for count, fn in parts:
            rebuilt.append(values[at] if fn is None else fn(values[at:at + count]))
            at += count
        return tree_unflatten(rebuilt, spec)

    return flat, rebuild


def _drop_no_grad_toggles(graph: fx.Graph, leaf_grad: dict[fx.Node, bool]) -> None:
    """Remove ``torch._C._set_grad_enabled`` toggles around regions whose inputs need no grad.

    ``make_fx(pre_dispatch=True)`` records ``torch.no_grad()`` blocks as these toggles (export turns them
    into ``wrap_with_set_grad_enabled`` regions, which :func:`inline_no_grad_regions` inlines under the
    same condition): without inputs that need grad, the region computes the same thing with grad on.
    Other regions keep their toggles. ``leaf_grad``: whether each input and parameter node needs grad.
    The graph starts in the grad mode it was captured in (part of the capture's signature).
    """
    toggle = torch._C._set_grad_enabled
    is_toggle = lambda n: n.op == "call_function" and n.target is toggle  # noqa: E731
    needs_grad: dict[fx.Node, bool] = {}
    mode_before: dict[fx.Node, bool] = {}
    enabled = torch.is_grad_enabled()
    for node in graph.nodes:
        if is_toggle(node):
            mode_before[node] = enabled
            enabled = bool(node.args[0])
        elif node in leaf_grad:
            needs_grad[node] = leaf_grad[node]
        else:
            needs_grad[node] = enabled and any(needs_grad.get(i, False) for i in node.all_input_nodes)
    nodes = list(graph.nodes)
    toggles = [i for i, n in enumerate(nodes) if is_toggle(n)]
    for i, j in zip(toggles, toggles[1:]):
        start, end = nodes[i], nodes[j]
        if not (mode_before[start] and start.args[0] is False and end.args[0] is True):
            continue  # only a no_grad region entered from grad mode and left back to it
        region = set(nodes[i + 1:j])
        inputs = {a for n in region for a in n.all_input_nodes if a not in region}
        if not any(needs_grad.get(a, False) for a in inputs):
            graph.erase_node(start)
            graph.erase_node(end)
