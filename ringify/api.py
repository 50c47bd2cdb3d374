"""``ringify(model, mesh)``: the model, rewritten to run its sequence around a ring of ranks.

Capture is lazy, like ``torch.compile``: the first call traces the model with its real inputs, the
passes rewrite the graph, and later calls with the same input signature reuse it; a new signature
(other shapes, dtypes, train/eval) captures again.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.distributed as dist
from torch import fx
from torch.utils._pytree import tree_flatten

from . import fsdp
from .capture import capture, sequence_length, signature
from .errors import UnsupportedModelError
from .passes.attention import canonicalize_attention
from .passes.ffn import chunk_feed_forward, find_feed_forward, symbolic_token_dim
from .passes.fx import value
from .passes.regions import mark_checkpoints, module_owners, outline_nested, repeated_layers
from .passes.shard import shard_graph
from .report import Report, add_mask_structures, build_report
from .runtime import graph_calls
from .runtime.collectives import local_positions
from .runtime.comm import all_gather_tensor, default_timeout, group_name, rank_and_size, resolve_group
from .runtime.layout import check_layout

CHECKPOINT_CHOICES = (None, "layers")


class RingModule(torch.nn.Module):
    """A ring-parallel version of ``model``: call it like the model, with full inputs on every rank."""

    def __init__(self, model: torch.nn.Module, mesh=None, *, layout: str = "zigzag", outputs: str = "full",
                 sync_grads: bool = True, seq_dim: int = 1, ffn_chunk_tokens: int | None = None,
                 check_inputs: bool = True, checkpoint: str | None = None):
        super().__init__()
        check_layout(layout)
        if outputs not in ("full", "local"):
            raise ValueError(f"outputs must be 'full' or 'local', got {outputs!r}")
        if checkpoint not in CHECKPOINT_CHOICES:
            raise ValueError(f"checkpoint must be None (keep the model's own checkpointing) or 'layers' (recompute "
                             f"every layer in backward), got {checkpoint!r}")
        self.model = model
        self.group = group_name(mesh)
        self.layout, self.outputs, self.sync_grads = layout, outputs, sync_grads
        self.seq_dim, self.ffn_chunk_tokens, self.check_inputs = seq_dim, ffn_chunk_tokens, check_inputs
        self.checkpoint = checkpoint
        self._graphs: dict[tuple, fx.GraphModule] = {}
        self._callers: dict[tuple, object] = {}
        self._reports: dict[tuple, Report] = {}
        self._last: tuple | None = None
        self._last_seq_len: int | None = None
        self._generation: dict[tuple, object] = {}

    @property
    def world_size(self) -> int:
        return rank_and_size(resolve_group(self.group))[1]

    @property
    def graph_module(self) -> fx.GraphModule:
        """The rewritten graph of the last call (``print(rm.graph_module.code)``)."""
        if self._last is None:
            raise RuntimeError("ringify captures on the first call: call the module once first")
        return self._graphs[self._last]

    def local_positions(self, seq_len: int | None = None, device=None) -> torch.Tensor:
        """Global positions (sorted, int64) of the tokens this rank holds, for a sequence of ``seq_len``
        (default: the last call's). With ``outputs="local"`` an output's sequence dim holds exactly these:
        ``full_logits[:, rm.local_positions()] == local_logits``."""
        if seq_len is None:
            if self._last_seq_len is None:
                raise RuntimeError("call the module once, or pass seq_len")
            seq_len = self._last_seq_len
        return local_positions(int(seq_len), self.group, self.layout, torch.device(device or "cpu"))

    def gather(self, local: torch.Tensor, dim: int | None = None, seq_len: int | None = None) -> torch.Tensor:
        """The full sequence of an ``outputs="local"`` output on every rank (``dim``: its sequence dim, default
        ``seq_dim``; ``seq_len``: default the last call's). Differentiable: backward keeps this rank's part."""
        from .runtime.sequence import gather_sequence

        dim = self.seq_dim if dim is None else dim
        seq_len = self._last_seq_len if seq_len is None else seq_len
        if seq_len is None:
            raise RuntimeError("call the module once, or pass seq_len")
        return gather_sequence(local, dim, self.group, self.layout, seq_len)

    def forward(self, *args, **kwargs):
        kwargs = self._without_cache(kwargs)
        key = self._prepare(args, kwargs)
        captured, gm = self._callers[key], self._graphs[key]
        # under FSDP2 the whole graph is the root module's forward (its hooks around it)
        return fsdp.call_under_root(self.model, lambda *a, **k: captured(gm, a, k), args, kwargs)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 pad_token_id=None, generator: torch.Generator | None = None, output_scores: bool = False,
                 on_token=None):
        """``[B, S + N]`` tokens, the same on every rank (call it on every rank with the same inputs).

        The prompt's ring forward fills a key/value cache sharded over the ranks (ceil(S/W) tokens each, no
        logits but the last position's); each new token runs the model at one position, its attention over
        every rank's shard merged by log-sum-exp. For HF causal LMs greedy decoding returns what
        ``model.generate(input_ids, max_new_tokens=N, do_sample=False)`` returns, left-padded batches included
        (``attention_mask``: 1 = token, 0 = padding; ``eos_token_id``/``pad_token_id`` default to the model's
        ``generation_config``; finished rows are padded and the loop stops when every row has finished).
        ``do_sample``: HF's temperature, top-k and top-p warpers, drawn with ``generator`` on rank 0 and
        broadcast. ``output_scores``: also return the processed scores of each step (``[B, V]`` fp32), as HF's
        ``scores``. ``on_token(done, total)``: called after each token (progress bars)."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, generator=generator, output_scores=output_scores, on_token=on_token)

    @torch.compiler.disable
    def _generation_graphs(self, args, kwargs, inputs):
        """The prefill and decode graphs for a prompt of this signature (captured once, reused for every step and
        every later prompt of the same shape)."""
        from .generate import build_graphs

        key = ("generate", signature(args, kwargs, self.model.training))
        if key not in self._generation:
            self._generation[key] = build_graphs(self, args, kwargs, inputs)
        return self._generation[key]

    @property
    def cache_bytes(self) -> int:
        """Bytes of this rank's key/value cache in the last ``generate`` (allocated for the prompt and the new tokens)."""
        return getattr(self, "_last_cache_bytes", 0)

    def _warn_gathered_outputs(self, captured, seq_len: int) -> None:
        """Warn once when ``outputs="full"`` would gather more to every rank than the rank's own parameters and
        gradients hold (logits: O(sequence x vocab), growing with the context instead of shrinking with W)."""
        if self.outputs != "full" or self.world_size == 1 or getattr(self, "_warned_outputs", False):
            return
        gathered = gathered_outputs(captured, self._reports[self._key_of(captured)], seq_len)
        total = sum(nbytes for _, _, nbytes in gathered)
        state = sum(_local(p).numel() * p.element_size() for p in self.model.parameters())
        state *= 2 if self.model.training else 1
        if total <= max(state, 2**20):
            return
        self._warned_outputs = True
        what = ", ".join(f"`{name}` {list(shape)}" for name, shape, _ in gathered)
        warnings.warn(
            f"ringify: outputs='full' gathers {what} to full length on every rank: {_gib(total)} per rank at "
            f"{seq_len} tokens, more than this rank's parameters and gradients ({_gib(state)}), and it grows with "
            "the context instead of shrinking with the ranks. For training pass outputs='local' (each rank keeps its "
            "tokens, at rm.local_positions(); a loss computed inside the model is still the whole sequence's) and "
            "get a full tensor only where needed with rm.gather(out.logits).", stacklevel=4)

    def _key_of(self, captured) -> tuple:
        return next(k for k, c in self._callers.items() if c is captured)

    def _without_cache(self, kwargs: dict) -> dict:
        """HF models build a key/value cache unless told not to (``use_cache`` defaults to the config's True);
        a ring forward has no use for one (``rm.generate`` keeps its own, sharded). Unless the caller says
        otherwise, ``use_cache=False`` is passed, as HF's own trainers do with checkpointing."""
        if "use_cache" in kwargs or not _takes(self.model, "use_cache"):
            return kwargs
        return {**kwargs, "use_cache": False}

    @torch.compiler.disable
    def _prepare(self, args, kwargs) -> tuple:
        """The key of this call's rewritten graph: captured and rewritten on a new input signature.

        Plain Python (capture, checks, a collective): under ``torch.compile(rm)`` it runs eagerly and
        the rewritten graph that ``forward`` calls is what gets compiled.
        """
        key = signature(args, kwargs, self.model.training)
        seq_len = self._last_seq_len = sequence_length(args, kwargs, self.seq_dim)
        if key not in self._graphs:
            world = self.world_size
            if seq_len < world:
                raise ValueError(f"the sequence has {seq_len} tokens but the ring has {world} ranks: each rank "
                                 "needs at least one token")
            if self.check_inputs:
                _check_identical(args, kwargs, self.group)
            self._graphs[key], self._reports[key], self._callers[key] = self._rewrite(args, kwargs, seq_len)
            self._warn_gathered_outputs(self._callers[key], seq_len)
        self._last = key
        return key

    def _rewrite(self, args, kwargs, seq_len: int):
        fsdp.check_composable(self.model, self.group)
        captured = self._capture(args, kwargs)
        gm, report = rewrite(self.model, captured, group=self.group, world_size=self.world_size, layout=self.layout,
                             outputs=self.outputs, sync_grads=self.sync_grads, ffn_chunk_tokens=self.ffn_chunk_tokens,
                             checkpoint=self.checkpoint)
        return gm, report, captured

    def _capture(self, args, kwargs):
        if not fsdp.fsdp_modules(self.model):
            return capture(self.model, args, kwargs, self.seq_dim)
        with fsdp.unsharded(self.model) as path_of:  # the plain model FSDP2 wraps
            captured = capture(self.model, args, kwargs, self.seq_dim)
            captured.parameter_paths = {name: path_of[id(t)] for name, t in
                                        captured.graph_module.named_parameters(remove_duplicate=False) if id(t) in path_of}
        return captured

    def report(self, hardware: str | None = None, *, cost: bool = True) -> Report:
        """What was found, rewritten and refused in the last captured graph, with a picture of the rewritten
        graph and the cost model on ``hardware`` (a :data:`ringify.cost.HARDWARE` name, default ``cpu-gloo``).
        ``cost=False``: the rewrite only, at once (the picture and the cost model take a few fake-tensor runs)."""
        if self._last is None:
            raise RuntimeError("ringify captures on the first call: call the module once, then report()")
        report = self._reports[self._last]
        add_mask_structures(report)
        if not cost:
            return report
        wanted = hardware or "cpu-gloo"
        if not report.cost or report.cost.get("estimate", {}).get("hardware", {}).get("name") != wanted:
            complete_report(report, self.model, self._callers[self._last], self._graphs[self._last], wanted,
                            outputs=self.outputs, ffn_chunk_tokens=self.ffn_chunk_tokens, checkpoint=self.checkpoint)
        return report


def rewrite(model: torch.nn.Module, captured, *, world_size: int, group: str = "", layout: str = "zigzag",
            outputs: str = "full", sync_grads: bool = True, ffn_chunk_tokens: int | None = None,
            checkpoint: str | None = None) -> tuple[fx.GraphModule, Report]:
    """The passes on a captured graph: the rank-local graph for ``world_size`` ranks and its report.

    Needs no process group (``group`` only names the one the graph will run on), so ``ringify report``
    can show what a model becomes on 8 ranks from one process. The report's picture and cost section
    come later, from :func:`complete_report` (they cost a few fake-tensor traces).
    """
    gm = captured.graph_module
    check_symbolic(model, captured, world_size)
    attention = canonicalize_attention(gm)
    token_dim = lambda n: symbolic_token_dim(n, captured.symbols)  # noqa: E731
    if ffn_chunk_tokens:
        ffn = chunk_feed_forward(gm, token_dim, chunk_tokens=ffn_chunk_tokens)
    else:  # found and reported, run whole (token-local as they are)
        ffn = find_feed_forward(gm, token_dim)
        for match in ffn:
            match.summary["chunk_tokens"] = None
    new, plan = shard_graph(gm, captured.symbols, group=group, layout=layout, world_size=world_size,
                            outputs=outputs, sync_grads=sync_grads, token_local=dropless_experts(model))
    regions = outline_regions(new, model, captured, checkpoint)
    report = build_report(model, attention, ffn, plan, world_size=world_size, seq_len=captured.seq_len, layout=layout)
    report.regions = regions
    return new, report


def check_symbolic(model: torch.nn.Module, captured, world_size: int) -> None:
    """Refuse a capture whose sequence length export specialised to a constant: the tokens are not in the graph."""
    seq_len = captured.seq_len
    if not captured.symbols and world_size > 1:
        sized = ([n for n, t in model.named_buffers() if seq_len in t.shape]
                 or [n for n, t in model.named_parameters() if t.dim() and t.shape[0] == seq_len])  # position tables
        why = (f"; it equals a size of {', '.join(f'`{n}`' for n in sized[:3])}: torch.export proves that slicing "
               f"such a table to the sequence takes all of it and bakes the length in. Hint: make the table longer "
               f"than the sequence (nanoGPT: block_size > T) or call with fewer than {seq_len} tokens"
               if sized else " (the model branches on it). Hint: remove the branch on the sequence length")
        raise UnsupportedModelError(
            f"the sequence length of {type(model).__name__} was specialised to {seq_len} during capture, so "
            f"ringify cannot find the tokens in the graph{why}."
        )


def outline_regions(gm: fx.GraphModule, model: torch.nn.Module, captured, checkpoint: str | None) -> list[dict]:
    """Keep the user's activation checkpointing and FSDP2's module boundaries in the rewritten graph.

    The regions the model ran under ``torch.utils.checkpoint`` (marked at capture), or every layer with
    ``checkpoint="layers"``, are recomputed in backward; the ops of each module FSDP2 wraps run as that
    module's forward, reading the parameters its hooks unshard. See :mod:`ringify.passes.regions`."""
    prefix = getattr(captured, "module_prefix", "")
    checkpoints = dict(getattr(captured, "checkpoints", {}) or {})
    if checkpoint == "layers":
        layers = repeated_layers(model, gm, _is_ring_call, prefix)
        if not layers:
            raise UnsupportedModelError(
                f"checkpoint='layers' recomputes each layer, but {type(model).__name__} has no nn.ModuleList of "
                "layers holding its attention. Hint: wrap the parts to recompute in torch.utils.checkpoint (ringify "
                "keeps them), or pass checkpoint=None.")
        ids = mark_checkpoints(module_owners(gm, layers, prefix), first_id=max(checkpoints, default=-1) + 1)
        checkpoints.update({i: {} for i in ids.values()})
    modules = {path: m for path, m in fsdp.fsdp_modules(model).items() if path}  # the root runs around it all
    if fsdp.fsdp_modules(model):
        fsdp.read_live_parameters(gm, model, getattr(captured, "parameter_paths", {}) or {}, prefix)
    regions = outline_nested(gm, checkpoints=checkpoints, modules=modules, prefix=prefix)
    if modules:
        fsdp.check_parameters_stay_inside(gm)
    for region in regions:
        region["origin"] = "layers" if checkpoint == "layers" and region["kind"] == "checkpoint" else "model"
    gm.recompile()
    return regions


def gathered_outputs(captured, report: Report, seq_len: int) -> list[tuple[str, tuple, int]]:
    """(name, full shape, bytes) of each output gathered to full length on every rank."""
    gathered = {o["node"] for o in report.outputs if "gathered_dim" in o}
    out = []
    for node in captured.graph_module.graph.nodes:
        val = value(node)
        if node.name in gathered and isinstance(val, torch.Tensor):
            shape = tuple(_at_length(d, captured.symbols, seq_len) for d in val.shape)
            out.append((node.name, shape, math.prod(shape) * val.element_size()))
    return out


def _at_length(size, symbols: set, seq_len: int) -> int:
    if isinstance(size, torch.SymInt):
        return int(size.node.expr.subs({s: seq_len for s in symbols}))
    return int(size)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _takes(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _is_ring_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is graph_calls.ring_attention_call


def dropless_experts(model: torch.nn.Module) -> tuple[str, ...]:
    """Paths of transformers' mixture-of-experts expert layers (Mixtral, Qwen-MoE, ...).

    They route every token to its top-k experts with no capacity limit, so each token's output depends on
    that token alone, though inside they sort the tokens by expert: run on a shard, they give the shard's
    rows of the full result. Recognised by the attributes ``transformers.integrations.moe`` gives them;
    a capacity-limited MoE (tokens dropped when an expert is full) is not token-local and is not listed.
    """
    return tuple(name for name, module in model.named_modules()
                 if name and hasattr(module, "_is_expert_parallel") and hasattr(module, "has_gate")
                 and not getattr(module, "_is_expert_parallel"))


def complete_report(report: Report, model, captured, new: fx.GraphModule, hardware: str | None = None, *,
                    outputs: str = "full", ffn_chunk_tokens: int | None = None, training: bool | None = None,
                    optimizer: str = "none", mixed_precision: bool = False, dp: int = 1,
                    checkpoint: str | None = None, new_tokens: int = 128) -> Report:
    """Add the rewritten graph's picture and the cost model for ``hardware`` (a :data:`ringify.cost.HARDWARE`
    name; default ``cpu-gloo``) to ``report``; ``training`` (default: the model's mode) counts backward too.
    ``optimizer`` ("none", "sgd", "adam"), ``mixed_precision`` (fp32 master parameters, gradients and states
    as FSDP2's MixedPrecisionPolicy keeps them) and ``dp`` (FSDP2 ranks sharding them) describe the training
    step to cost; the defaults cost what the model itself holds (see :mod:`ringify.cost`). ``checkpoint``: the
    ringify option (the model's own checkpointing is always costed; "layers" recomputes every layer).
    Inference adds what ``rm.generate`` of ``new_tokens`` after a prompt of the report's length costs."""
    from .cost import HARDWARE, cost_summary, profile_model
    from .report import graph_summary

    report.graph = graph_summary(new)
    attention = [entry for layer in report.layers.values() for entry in layer.get("attention", [])]
    batch = _batch_size(captured)
    profile = profile_model(model, captured.graph_module, captured.symbols, attention, batch=batch,
                            training=model.training if training is None else training, outputs=outputs, ffn_chunk_tokens=ffn_chunk_tokens,
                            layout=report.layout, optimizer=optimizer, mixed_precision=mixed_precision, dp=dp,
                            checkpoint=checkpoint, module_prefix=getattr(captured, "module_prefix", ""))
    report.cost = cost_summary(profile, report.seq_len, report.world_size, HARDWARE[hardware or "cpu-gloo"],
                               new_tokens=new_tokens)
    return report


def _batch_size(captured) -> int:
    for node in captured.graph_module.graph.nodes:
        val = value(node)
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() >= 2:
            return int(val.shape[0]) if not isinstance(val.shape[0], torch.SymInt) else 1
    return 1


def _check_identical(args, kwargs, group: str, timeout_s: float | None = None) -> None:
    """Inputs must be full and identical on every rank: compare a checksum of each tensor once.

    Through the runtime's bounded all-gather: a rank that skips the call makes the others raise
    ``RingTimeoutError`` within the timeout instead of hanging. The number of checksums goes first, so
    ranks passing different numbers of tensors are told so instead of gathering mismatched sizes."""
    pg = resolve_group(group)
    if rank_and_size(pg)[1] == 1:
        return
    sums = []
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor):
            flat = leaf.detach().reshape(-1).double()
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973)
            sums += [float(leaf.numel()), flat.sum().item(), (flat * weights).sum().item()]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(pg) == "nccl" else torch.device("cpu")
    timeout_s = default_timeout() if timeout_s is None else timeout_s
    what = "checking that every rank got the same inputs (ringify's first call)"
    counts = all_gather_tensor(torch.tensor([len(sums)], dtype=torch.float64, device=device), pg, timeout_s, what)
    if len({int(c.item()) for c in counts}) > 1:
        raise ValueError(f"ringify: the ranks pass different numbers of tensors ({[int(c.item()) for c in counts]}). "
                         "Every rank must call the ringified model with the same full-length inputs.")
    gathered = all_gather_tensor(torch.tensor(sums, dtype=torch.float64, device=device), pg, timeout_s, what)
    differing = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if differing:
        raise ValueError(
            f"ringify: the inputs differ between ranks (ranks {differing} differ from rank 0). Every rank must "
            "call the ringified model with the same full-length inputs; ringify cuts each rank's shard itself."
        )


def ringify(model: torch.nn.Module, mesh=None, **options) -> RingModule:
    """Rewrite ``model`` so each rank of ``mesh`` (1-D DeviceMesh, ProcessGroup, or None = default group)
    holds only its shard of the sequence. Options: ``layout`` ('zigzag', 'contiguous', 'striped'),
    ``outputs`` ('full' or 'local': this rank's tokens, at ``rm.local_positions()``), ``sync_grads`` (sum
    parameter gradients over ranks in backward; off when DDP/FSDP over the same ranks sums them),
    ``seq_dim`` (the inputs' sequence dim, 1), ``ffn_chunk_tokens`` (None, the default: feed-forward blocks
    run whole; N: in chunks of N tokens recomputed in backward, which drops their intermediate activations
    at the price of one more feed-forward forward: benchmarks/step_speed.py and model_memory.py measure it),
    ``checkpoint`` (None: keep the model's own activation checkpointing; 'layers': recompute every layer)."""
    return RingModule(model, mesh, **options)
