"""How a :class:`~ringify.cost.model.ModelProfile` is measured: :func:`profile_model` runs the captured,
unsharded graph on fake tensors (forward and backward, attention stubbed as the ring at one rank, feed-forward
chunked, checkpointed regions recomputed) at a few lengths, fits lines through the memory at its moments, and
measures the block kernels' scratch on tiny real tensors.

Apart from the analytic model (:mod:`ringify.cost.model`) because it needs the graph, ``FakeTensorMode``,
ringify's passes and kernels, and seconds of work, while the formulas need only the numbers it produces. See
"How memory is predicted" in ``docs/cost_model.md``.
"""

from __future__ import annotations

import functools

import torch
from torch import fx

from ..passes.fx import value
from .graph import (attention_nodes, attention_shapes, batch_of, graph_device, mask_arg, mask_only,
                    masks_static)
from .model import FP32_BYTES, ModelProfile, check_training_setup

__all__ = ["profile_model"]


def profile_model(model: torch.nn.Module, graph_module: fx.GraphModule, symbols: set, attention: list[dict], *,
                  batch: int, training: bool = True, outputs: str = "full", ffn_chunk_tokens: int | None = None,
                  layout: str = "zigzag", lengths: tuple[int, int] | None = None, optimizer: str = "none",
                  mixed_precision: bool = False, dp: int = 1, checkpoint: str | None = None,
                  module_prefix: str = "") -> ModelProfile:
    """The :class:`ModelProfile` of ``model`` from its captured, unsharded graph.

    ``graph_module``: ``ringify.capture.capture(...).graph_module`` (before or after the attention and
    feed-forward passes; it is not modified); ``symbols``: the sympy symbols of its sequence length;
    ``attention``: attention summaries (``AttentionMatch.summary()`` or report entries). ``outputs``,
    ``ffn_chunk_tokens`` and ``layout``: the ringify options the prediction is for (feed-forward blocks
    are chunked here if the graph is not yet). ``lengths``: the two sequence lengths of the fake runs.
    ``optimizer``, ``mixed_precision``, ``dp``: the training setup (:func:`check_training_setup`). The model
    may live on the ``meta`` device: nothing here reads parameter values. Activation checkpointing is costed
    as ringify runs it: the regions the model marks (captured in the graph), or every layer with
    ``checkpoint="layers"``, recomputed in backward (``module_prefix``: capture's ``Captured.module_prefix``).
    """
    check_training_setup(optimizer, dp)
    params = list(model.parameters())
    layer, root = _fsdp_units(model)
    profile = ModelProfile(
        model=type(model).__name__, batch=int(batch), training=bool(training), layout=layout, outputs=outputs,
        parameters=sum(p.numel() for p in params),
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()), lookup_bytes=_lookup_bytes(model),
        gradient_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad) if training else 0,
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        layer_parameters=layer, root_parameters=root, compute_dtype=_main_dtype(params),
        meta_device=bool(params) and all(p.is_meta for p in params),
        optimizer=optimizer, mixed_precision=bool(mixed_precision), dp=int(dp),
    )
    try:
        from ..runtime import block_attention

        profile.tile_tokens = int(getattr(block_attention, "TILE", 256))
    except ImportError:  # pragma: no cover
        pass
    gm = _prepared_copy(graph_module, symbols, ffn_chunk_tokens, profile)
    attention_shapes(gm, attention, profile)
    run_gm = _recompute_regions(gm, model, checkpoint, module_prefix, profile) if training else gm
    dtype = torch.bfloat16 if profile.dtype_bytes == 2 else torch.float32
    try:
        profile.kernel_workspace = _kernel_workspace(profile.tile_tokens, str(dtype).removeprefix("torch."),
                                                     profile.masked)
    except Exception as err:  # noqa: BLE001 - a kernel that cannot run here: assume what it was when written
        profile.kernel_workspace = {"forward": {"one_piece": [1.5, 3.0], "pieces": [2.5, 3.0]},
                                    "backward": {"one_piece": [2.1, 2.0], "pieces": [3.3, 2.0]}}
        profile.notes.append(f"block kernel workspace not measured ({type(err).__name__}: {err}); assumed")
    try:
        profile.fused_workspace = _fused_workspace(str(dtype).removeprefix("torch."))
    except Exception as err:  # noqa: BLE001
        profile.fused_workspace = {"forward": [65536, 2.0], "backward": [65536, 4.0]}
        profile.notes.append(f"fused kernel workspace not measured ({type(err).__name__}); assumed")
    try:
        _fit_profile(run_gm, symbols, profile, lengths)
    except Exception as err:  # noqa: BLE001 - any model: fall back to the analytic estimate, say so
        _analytic_profile(profile)
        profile.notes.append(f"fake-tensor run failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                             "analytic activation estimate")
    else:
        try:
            piece = _mask_piece_bytes(gm, symbols, profile.fit_lengths[0], profile.tile_tokens)
            profile.mask_piece_bytes = float(piece)
            from ..runtime import fused_attention

            chunk = fused_attention._MASK_CHUNK  # the fused kernels evaluate a mask for this many key tiles at once
            profile.mask_chunk_tiles = int(chunk)
            profile.mask_chunk_bytes = float(_mask_piece_bytes(gm, symbols, profile.fit_lengths[0],
                                                               profile.tile_tokens, chunk))
            profile.mask_static = masks_static(gm, symbols)
        except Exception as err:  # noqa: BLE001
            profile.notes.append(f"block mask evaluation not measured ({type(err).__name__})")
        if not profile.training:
            try:
                _fit_prefill(gm, symbols, profile)
            except Exception as err:  # noqa: BLE001 - the forward's attention moments stand in
                profile.notes.append(f"prefill not simulated ({type(err).__name__}); forward moments used")
    return profile


def _lookup_bytes(model: torch.nn.Module) -> int:
    """Bytes of embedding tables that only a lookup reads (decoding reads one row of them, not the table); a
    table tied to another module (an LM head) is read whole and is not counted here."""
    users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, torch.nn.Embedding) and users.get(id(m.weight)) == 1)


def _main_dtype(params: list) -> str:
    """The floating dtype that holds most parameters ("" without any)."""
    sizes: dict = {}
    for p in params:
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return str(max(sizes, key=sizes.get)).removeprefix("torch.") if sizes else ""


def _fsdp_units(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters of the largest block, parameters outside all blocks): the units FSDP2 unshards one at a time
    when each block of the model's largest ``nn.ModuleList`` is ``fully_shard``-ed and then the model itself
    (the README's recipe); the root unit stays unsharded through forward and backward."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    total = sum(p.numel() for p in model.parameters())
    if not lists:
        return 0, total
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    blocks = max(lists, key=count)
    return max(count(b) for b in blocks), total - count(blocks)


# ---------------------------------------------------------------------------- profile: the fake-tensor run


def _prepared_copy(gm: fx.GraphModule, symbols: set, ffn_chunk_tokens: int | None,
                   profile: ModelProfile) -> fx.GraphModule:
    """A copy of the graph (parameters shared) with attention canonical and feed-forward chunked."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copy = fx.GraphModule(gm, graph)
    try:
        from ..passes.attention import canonicalize_attention

        canonicalize_attention(copy, strict=False)
    except Exception as err:  # noqa: BLE001 - attention stays as it is; SDPA is still stubbed
        profile.notes.append(f"attention not canonicalised for the cost model ({type(err).__name__})")
    from ..passes.ffn import chunk_feed_forward, chunked_ffn, symbolic_token_dim

    chunked = [n for n in copy.graph.nodes if n.op == "call_function" and n.target is chunked_ffn]
    if chunked:
        profile.ffn_chunk_tokens = int(chunked[0].kwargs.get("chunk_tokens", 0)) or None
    elif ffn_chunk_tokens:
        try:
            if chunk_feed_forward(copy, lambda n: symbolic_token_dim(n, symbols), chunk_tokens=ffn_chunk_tokens):
                profile.ffn_chunk_tokens = int(ffn_chunk_tokens)
        except Exception as err:  # noqa: BLE001
            profile.notes.append(f"feed-forward not chunked for the cost model ({type(err).__name__})")
    for node in copy.graph.nodes:
        if node.op == "call_function" and node.target is chunked_ffn and not profile.hidden:
            profile.hidden = int((node.meta.get("ringify_ffn") or {}).get("hidden") or 0)
    return copy


def _recompute_regions(gm: fx.GraphModule, model: torch.nn.Module, checkpoint: str | None, prefix: str,
                       profile: ModelProfile) -> fx.GraphModule:
    """A copy of ``gm`` with the regions ringify recomputes in backward outlined (``ringify.passes.regions``),
    so that the fake run recomputes them too (:meth:`_Simulator.call_module`); ``gm`` itself if none."""
    from ..passes.regions import checkpoint_owners, mark_checkpoints, module_owners, outline_nested, repeated_layers

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    original, gm = gm, fx.GraphModule(gm, graph)
    for node in gm.graph.nodes:  # the copy's own meta (mark_checkpoints writes into it)
        node.meta = dict(node.meta)
    regions = {i: {} for i in set(checkpoint_owners(gm).values())}
    kind = "model" if regions else ""
    if checkpoint == "layers":
        canonical = set(attention_nodes(gm.graph))
        layers = repeated_layers(model, gm, lambda n: n in canonical, prefix)
        if layers:
            ids = mark_checkpoints(module_owners(gm, layers, prefix), first_id=max(regions, default=-1) + 1)
            regions.update({i: {} for i in ids.values()})
            kind = "layers"
        else:
            profile.notes.append("checkpoint='layers': no nn.ModuleList of layers found; nothing recomputed")
    if not regions:
        return original
    try:
        done = outline_nested(gm, checkpoints=regions, modules={}, prefix=prefix)
    except Exception as err:  # noqa: BLE001 - cost without recomputation, and say so
        profile.notes.append(f"checkpointed regions not outlined for the cost model ({type(err).__name__}: {err})")
        return original
    profile.checkpoint, profile.recomputed_regions = kind, len(done)
    return gm


class _Recorder:
    def __init__(self):
        self.meter = None
        self.forward_live: list[int] = []
        self.backward_live: list[int] = []
        self.backward_activations: list[int] = []  # live bytes less the parameter gradients made so far
        self.recompute_live: list[int] = []  # attention forwards run again in backward (checkpointed regions)
        self.recompute_activations: list[int] = []
        self.kv_copied = 0.0  # the most of K+V that an attention gets not contiguous (W > 1 sends a copy)


def _meter():
    """A :class:`ringify.memory.PeakMemory` that also knows which of its live bytes are parameter gradients
    (told by :meth:`gradient`, from the parameters' post-accumulate hooks), so the peak without them is
    known too: what a step holds when FSDP2 reduce-scatters each layer's gradients and frees them."""
    from ..memory import PeakMemory

    class GradientMeter(PeakMemory):
        def __init__(self):
            super().__init__()
            self.gradient_bytes, self.activation_peak, self._seen = 0, 0, set()
            self.live_at_activation_peak = 0  # gradients made by then included

        def gradient(self, param: torch.Tensor) -> None:
            if id(param) not in self._seen and param.grad is not None:
                self._seen.add(id(param))
                self.gradient_bytes += param.grad.untyped_storage().nbytes()

        @property
        def activation_bytes(self) -> int:
            return self.live_bytes - self.gradient_bytes

        def _track(self, storage) -> None:
            super()._track(storage)
            if self.activation_bytes > self.activation_peak:
                self.activation_peak, self.live_at_activation_peak = self.activation_bytes, self.live_bytes

    return GradientMeter()


class _RingStub(torch.autograd.Function):
    """Attention with ``ring_attention``'s memory at one rank (no [S, S] scores): saves q, k, v, out, lse."""

    @staticmethod
    def forward(ctx, q, k, v, recorder):
        if recorder.meter is not None and torch._C._current_graph_task_id() != -1:  # recomputed, in backward
            recorder.recompute_live.append(recorder.meter.live_bytes)
            recorder.recompute_activations.append(recorder.meter.activation_bytes)
        elif recorder.meter is not None:
            recorder.forward_live.append(recorder.meter.live_bytes)
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.recorder = recorder
        recorder.kv_copied = max(recorder.kv_copied, (int(not k.is_contiguous()) + int(not v.is_contiguous())) / 2)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        grad = grad.contiguous()  # as ring_attention's backward passes it on (a copy when it arrives transposed)
        recorder = ctx.recorder
        if recorder.meter is not None:
            recorder.backward_live.append(recorder.meter.live_bytes)
            recorder.backward_activations.append(recorder.meter.activation_bytes)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


class _Simulator(fx.Interpreter):
    """Runs the graph on fake tensors: parameters faked once, guards and mask-only nodes skipped,
    attention stubbed."""

    def __init__(self, gm: fx.GraphModule, fake_mode, recorder: _Recorder, keep: set | None = None,
                 fakes: dict | None = None):
        super().__init__(gm, garbage_collect_values=keep is None)
        self.fake_mode, self.recorder = fake_mode, recorder
        self.fakes: dict[int, torch.Tensor] = {} if fakes is None else fakes  # shared with the regions' bodies
        self.skip = mask_only(gm.graph, gm)
        if keep:  # these nodes (and what they need) are computed even if they only feed masks
            todo = list(keep)
            while todo:
                node = todo.pop()
                if node in self.skip:
                    self.skip.discard(node)
                    todo.extend(node.all_input_nodes)
        self.attention = set(attention_nodes(gm.graph))

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            if id(value) not in self.fakes:
                self.fakes[id(value)] = self.fake_mode.from_tensor(value)
            return self.fakes[id(value)]
        return value

    def run_node(self, node: fx.Node):
        if node in self.skip:
            return None
        if node in self.attention:
            q, k, v = (self.env[a] if isinstance(a, fx.Node) else a for a in node.args[:3])
            return _RingStub.apply(q, k, v, self.recorder)
        return super().run_node(node)

    def call_module(self, target, args, kwargs):
        if str(target).startswith("_guards"):  # export's input guards: the lengths here are hypothetical
            return None
        from ..runtime.regions import Recompute

        module = self.fetch_attr(target)
        if isinstance(module, Recompute):  # its body simulated the same way, under torch.utils.checkpoint
            body = _Simulator(module.body, self.fake_mode, self.recorder, fakes=self.fakes)

            def run(*a):
                # The interpreter keeps its values in ``env``, not in a Python frame: left there, they would outlive
                # the call as the region's compiled code never lets them. Its outputs would stay alive until the
                # region is recomputed; and the recomputation, which checkpoint stops by raising once the last
                # saved tensor is made (``early_stop``), would leave the values it had then, and with their
                # ``grad_fn`` the recomputed graph and all its saved tensors, alive through the region's whole
                # backward (in a real run they die with the frame, and each recomputed tensor once backward has
                # used it).
                try:
                    return body.run(*a, enable_io_processing=False)
                finally:
                    body.env = {}

            if not torch.is_grad_enabled():
                return run(*args)
            from torch.utils.checkpoint import checkpoint

            return checkpoint(run, *args, use_reentrant=False)
        return super().call_module(target, args, kwargs)


def _concrete(size, symbols: set, seq_len: int) -> int:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr.subs({s: seq_len for s in expr.free_symbols}))
    return int(size)


def _inputs(gm: fx.GraphModule, sim: _Simulator, symbols: set, seq_len: int, training: bool) -> list:
    """The graph's inputs as fake tensors with ``seq_len`` tokens (parameters faked beforehand)."""
    fake_mode = sim.fake_mode
    args = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            sim.fetch_attr(node.target)
        if node.op != "placeholder":
            continue
        val = value(node)
        if isinstance(val, torch.Tensor):
            shape = [_concrete(s, symbols, seq_len) for s in val.shape]
            with fake_mode:
                x = torch.zeros(shape, dtype=val.dtype, device=val.device)
            args.append(x.requires_grad_() if val.requires_grad and training else x)
        elif isinstance(val, torch.SymInt):
            args.append(_concrete(val, symbols, seq_len))
        else:
            args.append(val)
    return args


def _simulate(gm: fx.GraphModule, symbols: set, seq_len: int, training: bool) -> dict:
    """One fake forward (+ backward) at ``seq_len`` tokens: the meter's peak and the live bytes at its moments."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_leaves

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = _Recorder()
    sim = _Simulator(gm, fake_mode, recorder)
    args = _inputs(gm, sim, symbols, seq_len, training)
    meter = _meter()
    for param in sim.fakes.values():
        if param.requires_grad and param.is_leaf:
            param.register_post_accumulate_grad_hook(meter.gradient)
    with fake_mode, meter, torch.set_grad_enabled(training):
        recorder.meter = meter
        outs = [x for x in tree_leaves(sim.run(*args, enable_io_processing=False)) if isinstance(x, torch.Tensor)]
        after_forward = meter.live_bytes
        output_bytes = sum(o.untyped_storage().nbytes() for o in {id(o): o for o in outs}.values())
        if training:
            grads = [o for o in outs if o.requires_grad and o.is_floating_point()]
            losses = [o for o in grads if o.dim() == 0]
            if losses:
                torch.autograd.backward(losses)
            elif grads:
                torch.autograd.backward(grads, [torch.ones_like(o) for o in grads])
        recorder.meter = None
        del outs
    return {"peak": meter.peak_bytes, "after_forward": after_forward, "outputs": output_bytes,
            "activation_peak": meter.activation_peak, "activation_moment": meter.live_at_activation_peak,
            "gradients": meter.gradient_bytes,
            "attention_forward": recorder.forward_live, "attention_backward": recorder.backward_live,
            "attention_backward_activations": recorder.backward_activations,
            "attention_recompute": recorder.recompute_live,
            "attention_recompute_activations": recorder.recompute_activations, "kv_copied": recorder.kv_copied}


def _mask_piece_bytes(gm: fx.GraphModule, symbols: set, seq_len: int, tile: int, key_tiles: int = 1) -> int:
    """Peak bytes of evaluating each attention's block mask (``passes/masks.py``, as the ring does per piece)
    on one ``tile`` x ``tile`` piece, on fake tensors: a mask read from a table slices rows of the whole
    table first (nanoGPT's ``bias``: [tile, max_len])."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..memory import PeakMemory
    from ..passes.masks import block_mask

    masks = {}
    for node in attention_nodes(gm.graph):
        mask = mask_arg(node)
        if isinstance(mask, fx.Node) and mask not in masks:
            masks[mask] = block_mask(mask, symbols)
    if not masks:
        return 0
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    sim = _Simulator(gm, fake_mode, _Recorder(), keep={leaf for bm in masks.values() for leaf in bm.leaves})
    args = _inputs(gm, sim, symbols, seq_len, False)
    with fake_mode, torch.no_grad():
        sim.run(*args, enable_io_processing=False)
        pos = torch.arange(min(tile, seq_len), device=graph_device(gm))
        keys = torch.arange(min(key_tiles * tile, seq_len), device=graph_device(gm))
        worst = 0
        for bm in masks.values():
            leaves = [sim.env[leaf] if isinstance(leaf, fx.Node) else leaf for leaf in bm.leaves]
            with PeakMemory() as meter:
                bm.fn(pos, keys, *leaves)
            worst = max(worst, meter.peak_bytes)
    return worst


_LENGTHS = ((1024, 2048), (512, 1024), (256, 512), (64, 128), (16, 32))
_EXTEND_SECONDS = 2.0  # a third, longer run when the second took less than this


def _fit_profile(gm: fx.GraphModule, symbols: set, profile: ModelProfile, lengths) -> None:
    """Fake runs at two lengths (the first pair of :data:`_LENGTHS` the model takes), and at twice the
    second when that is quick; lines through them."""
    import time

    if not symbols:
        raise ValueError("the graph has no symbolic sequence length")
    errors, runs = [], {}
    for pair in [tuple(lengths)] if lengths else _LENGTHS:
        try:
            for n in pair:
                start = time.perf_counter()
                runs[n] = _simulate(gm, symbols, n, profile.training)
            break
        except Exception as err:  # noqa: BLE001 - e.g. a table shorter than this length: try shorter
            errors.append(err)
            runs.clear()
    else:
        raise errors[-1]
    if not lengths and time.perf_counter() - start < _EXTEND_SECONDS:
        try:
            runs[2 * pair[1]] = _simulate(gm, symbols, 2 * pair[1], profile.training)
        except Exception:  # noqa: BLE001 - two lengths are enough
            pass
    ns = sorted(runs)
    profile.method, profile.fit_lengths, profile.sim_batch = "fake-trace", ns, batch_of(gm)
    last = _chord(ns[-2], ns[-1], runs[ns[-2]]["after_forward"], runs[ns[-1]]["after_forward"])
    profile.activation_bytes_fixed, profile.activation_bytes_per_token = max(0.0, last[0]), last[1]
    profile.step_peak_lines = [_chord(a, b, runs[a]["peak"], runs[b]["peak"]) for a, b in zip(ns, ns[1:])]
    profile.activation_peak_lines = [_chord(a, b, runs[a]["activation_peak"], runs[b]["activation_peak"])
                                     for a, b in zip(ns, ns[1:])]
    # the moment of the activations' peak with the gradients made by then: once the sequence is long, the step's
    # peak is there (the start of backward), though at the fitted lengths it may still be at the end of backward
    profile.step_peak_lines += [_chord(a, b, runs[a]["activation_moment"], runs[b]["activation_moment"])
                                for a, b in zip(ns, ns[1:])]
    profile.attention_forward_lines = _events(runs, "attention_forward")
    profile.attention_backward_lines = _events(runs, "attention_backward")
    profile.attention_backward_activation_lines = _events(runs, "attention_backward_activations")
    if any(run["attention_recompute"] for run in runs.values()):
        profile.attention_recompute_lines = _events(runs, "attention_recompute")
        profile.attention_recompute_activation_lines = _events(runs, "attention_recompute_activations")
    profile.output_bytes_per_token = _chord(ns[-2], ns[-1], runs[ns[-2]]["outputs"], runs[ns[-1]]["outputs"])[1]
    profile.kv_copied = max(run["kv_copied"] for run in runs.values())


def _chord(a: int, b: int, ya: float, yb: float) -> list[float]:
    """The line ``[fixed, per_token]`` through (a, ya) and (b, yb), never falling with the length."""
    per_token = max(0.0, (yb - ya) / (b - a))
    return [float(yb - per_token * b), per_token]


def _events(runs: dict, key: str) -> list[list[float]]:
    """One line per attention call (the same call at the two longest lengths of ``runs``), or one through the
    largest when the calls do not pair up."""
    (a, b) = sorted(runs)[-2:]
    ra, rb = runs[a][key], runs[b][key]
    return [_chord(a, b, ya, yb) for ya, yb in zip(ra, rb)] if len(ra) == len(rb) else [
        _chord(a, b, max(ra, default=0), max(rb, default=0))]


def _prefill_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` returning each attention's keys and nothing else, as ``rm.generate``'s prefill graph does
    (``passes/inference.py``): what only the logits need (final norm, head) is dead code."""
    graph = fx.Graph()
    mapping: dict = {}
    graph.graph_copy(gm.graph, mapping)
    stores = []
    for node in attention_nodes(gm.graph):  # like kv_cache.store_kv: an empty tensor, the keys freed after use
        with graph.inserting_after(mapping[node.args[1]]):
            stores.append(graph.call_function(torch.ops.aten.new_empty.default, (mapping[node.args[1]], [0])))
    graph.output(tuple(stores))
    copy = fx.GraphModule(gm, graph)
    copy.graph.eliminate_dead_code()
    copy.recompile()
    return copy


def _fit_prefill(gm: fx.GraphModule, symbols: set, profile: ModelProfile) -> None:
    """Lines through fake runs of the prefill graph (no gradients) at the profile's two longest lengths."""
    prefill = _prefill_copy(gm)
    runs = {n: _simulate(prefill, symbols, n, False) for n in profile.fit_lengths[-2:]}
    a, b = sorted(runs)
    profile.prefill_peak_lines = [_chord(a, b, runs[a]["peak"], runs[b]["peak"])]
    profile.prefill_attention_lines = _events(runs, "attention_forward")


def _analytic_profile(profile: ModelProfile) -> None:
    """Korthikanti et al. (2022): ~34 * hidden bytes per token and layer in 16-bit, without the S^2 terms."""
    per_token = float(34 * profile.hidden * profile.layers * profile.dtype_bytes / 2)
    profile.method, profile.fit_lengths, profile.sim_batch = "analytic", [], profile.batch
    profile.activation_bytes_fixed, profile.activation_bytes_per_token = 0.0, per_token
    profile.step_peak_lines = [[float(profile.gradient_bytes), per_token]]
    profile.attention_forward_lines = [[0.0, per_token]]
    profile.attention_backward_lines = [[float(profile.gradient_bytes), per_token]]
    profile.activation_peak_lines = profile.attention_backward_activation_lines = [[0.0, per_token]]
    profile.output_bytes_per_token = 0.0


# ------------------------------------------------------------------------------ block kernel workspace


@functools.cache
def _fused_workspace(dtype_name: str) -> dict:
    """What the fused kernels keep alive beside the running state: a piece's output and the merge (forward),
    its dQ, dK, dV (backward), as [fixed bytes, bytes per fp32 element of q's shard], from their peaks on one
    causal block at two lengths (the block mask's own evaluation is added per model: ``mask_piece_bytes``)."""
    from ..memory import PeakMemory
    from ..runtime import fused_attention

    dtype = getattr(torch, dtype_name)
    b, h, hkv, d = 1, 2, 1, 16
    gen = torch.Generator().manual_seed(0)
    peaks = {}
    for length in (4 * fused_attention.TILE, 8 * fused_attention.TILE):
        q = torch.randn(b, h, length, d, generator=gen).to(dtype)
        k, v = (torch.randn(b, hkv, length, d, generator=gen).to(dtype) for _ in range(2))
        pos = torch.arange(length)
        lse = torch.full((b, h, length), float("-inf"))
        o = torch.zeros(b, h, length, d)
        with torch.no_grad(), PeakMemory() as fwd:
            fused_attention.fused_block_forward(q, k, v, o, lse, pos, pos, scale=d**-0.5, causal=True)
        do, delta = torch.randn(b, h, length, d, generator=gen).to(dtype), torch.randn(b, h, length, generator=gen)
        dq, dk, dv = torch.zeros(b, h, length, d), torch.zeros(b, hkv, length, d), torch.zeros(b, hkv, length, d)
        with torch.no_grad(), PeakMemory() as bwd:
            fused_attention.fused_block_backward(q, k, v, do, lse, delta, dq, dk, dv, pos, pos, scale=d**-0.5,
                                                 causal=True, out=o.to(dtype))
        peaks[length] = (fwd.peak_bytes, bwd.peak_bytes)
    (l1, (f1, b1)), (l2, (f2, b2)) = sorted(peaks.items())
    unit = b * h * d * FP32_BYTES
    out = {}
    for phase, p1, p2 in (("forward", f1, f2), ("backward", b1, b2)):
        rows = max(0.0, (p2 - p1) / ((l2 - l1) * unit))
        out[phase] = [round(max(0.0, p1 - rows * l1 * unit)), round(rows, 4)]
    return out


def _kernel_workspace(tile: int, dtype_name: str, masked: bool) -> dict:
    """What the torch block kernels keep alive (see ``ModelProfile.kernel_workspace``): their peak on a
    block of one T x T piece and of 2 x 2 pieces, solved for fp32 [B,H,T,T] tiles and [B,H,T,D] row
    blocks from two head dims. Tiny real tensors, once per process."""
    from ..memory import PeakMemory
    from ..runtime import block_attention

    dtype = getattr(torch, dtype_name)
    b, h, hkv = 1, 2, 1
    gen = torch.Generator().manual_seed(0)
    unit_tile, unit_row = b * h * tile * tile * FP32_BYTES, b * h * tile * FP32_BYTES
    result: dict = {"forward": {}, "backward": {}}
    for name, length in (("one_piece", tile), ("pieces", 2 * tile)):
        peaks = []
        for d in (16, 64):
            q = torch.randn(b, h, length, d, generator=gen).to(dtype)
            k, v = (torch.randn(b, hkv, length, d, generator=gen).to(dtype) for _ in range(2))
            pos = torch.arange(length)
            opts = {"scale": d**-0.5, "causal": False}
            if masked:
                opts.update(mask_fn=lambda qp, kp: kp.unsqueeze(0) <= qp.unsqueeze(1), fill=float("-inf"))
                lse = torch.zeros(2, b, h, length)
                lse[0] = float("-inf")
            else:
                lse = torch.full((b, h, length), float("-inf"))
            out = torch.zeros(b, h, length, d)
            with torch.no_grad(), PeakMemory() as fwd:
                block_attention.torch_block_forward(q, k, v, out, lse, pos, pos, **opts)
            do, delta = torch.randn(b, h, length, d, generator=gen).to(dtype), torch.randn(b, h, length, generator=gen)
            dq, dk, dv = torch.zeros(b, h, length, d), torch.zeros(b, hkv, length, d), torch.zeros(b, hkv, length, d)
            with torch.no_grad(), PeakMemory() as bwd:
                block_attention.torch_block_backward(q, k, v, do, lse, delta, dq, dk, dv, pos, pos, **opts)
            peaks.append((d, fwd.peak_bytes, bwd.peak_bytes))
        (d1, f1, b1), (d2, f2, b2) = peaks
        for phase, p1, p2 in (("forward", f1, f2), ("backward", b1, b2)):
            rows = max(0.0, (p2 - p1) / ((d2 - d1) * unit_row))
            result[phase][name] = [round(max(0.0, (p1 - rows * d1 * unit_row) / unit_tile), 4), round(rows, 4)]
    return result
