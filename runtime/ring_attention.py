"""Exact ring attention over a process group.

Each rank holds a shard of the sequence (queries, keys and values laid out by a layout from
:mod:`layout`). Key/value blocks travel around the ring; at every step a rank posts the transfer of
the next block *before* computing on the current one, so the transfer hides behind the compute.
Partial results merge by log-sum-exp in fp32, so the result is the attention of the whole sequence.

Backward: dQ accumulates locally; the dK/dV accumulators travel the ring one step behind their
blocks, each rank adding its share, and arrive back on the block's owner after the last step.

Masks: any block mask (see :mod:`.block_mask`) is evaluated per piece of (query shard, key block),
on global positions, so no rank ever builds an [S, S] mask; pieces whose keys are all hidden are
skipped (with ``fill = -inf``). Masked calls use the plain-torch block kernels on every device (on CPU
torch's fused flash kernel where it applies). Floating mask arguments that require grad (an additive
bias computed from a parameter, as T5's relative position bias) get exact gradients: their backward
runs the plain-torch block kernels, which give each piece's dS (see :class:`.block_attention.MaskGradients`).

Registered as ``torch.ops.ringify.ring_attention`` (with a fake implementation and autograd), so a
function that calls it works under ``torch.export`` and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
import math
import os
import struct

import torch

from . import block_attention, fused_attention, mask_structure
from .block_mask import block_mask_fn, register_block_mask
from .comm import RingComm, RingInputError, all_gather_ints, all_gather_strings, default_timeout, group_name
from .comm import rank_and_size, resolve_group
from .layout import LAYOUTS, check_layout, layout_positions, shard_lengths

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KV_TAG, _DKV_TAG = 10, 20  # k and v (and dK and dV) go as two messages: tags +0 and +1


# --------------------------------------------------------------------------------------------------
# per-block kernels


def _extended(mask: str, fill: float) -> bool:
    """Block mask or finite fill: torch kernels and the two-part lse state [2, B, H, S_local]."""
    return bool(mask) or fill != float("-inf")


def _block_kernels(device_type: str, mask: str, fill: float, softcap: float = 0.0):
    """The block kernels for a call. CPU: torch's fused flash kernel per piece (:mod:`.fused_attention`: masks
    classified per tile), the plain-torch tiles where it cannot go (soft-capping, a fill that does not
    hide). CUDA: Triton without a mask, the plain-torch tiles with one. ``RINGIFY_KERNEL`` overrides."""
    choice = _kernel_choice()
    if choice in ("auto", "fused") and fused_attention.available(device_type, opt_in=choice == "fused") and \
            fused_attention.supports(mask, fill, softcap):
        return fused_attention.fused_block_forward, fused_attention.fused_block_backward
    if _extended(mask, fill) or softcap or choice == "fused":
        return block_attention.torch_block_forward, block_attention.torch_block_backward
    return _kernels(device_type)


def _kernel_choice() -> str:
    choice = os.environ.get("RINGIFY_KERNEL", "auto")
    if choice not in ("auto", "torch", "triton", "fused"):
        raise ValueError(f"RINGIFY_KERNEL must be auto, fused, torch or triton, got {choice!r}")
    return choice


def _kernel_options(mask: str, mask_args, fill: float, softcap: float) -> dict:
    """The keyword arguments of the block kernels beyond the plain ones (the Triton kernels take none)."""
    options = {"mask_fn": _bound_mask(mask, mask_args), "fill": fill} if _extended(mask, fill) else {}
    if softcap:
        options["softcap"] = softcap
    return options


def _bound_mask(mask: str, mask_args):
    """``(q_pos, k_pos) -> mask`` for the kernels, or None. The arguments are detached: the forward and decoding
    never build a graph through the mask (gradients into its arguments: :func:`_mask_gradients`)."""
    if not mask:
        return None
    fn = block_mask_fn(mask)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in mask_args)
    return lambda q_pos, k_pos: fn(q_pos, k_pos, *args)


def _differentiable(mask: str, mask_args, mask_grad) -> list[bool]:
    """Per mask argument: whether backward returns its gradient (a floating tensor flagged in ``mask_grad``)."""
    flags = list(mask_grad or ()) + [False] * (len(mask_args) - len(mask_grad or ()))
    return [bool(mask) and bool(n) and a.is_floating_point() for a, n in zip(mask_args, flags)]


def _mask_gradients(mask: str, mask_args, needs):
    """The bound mask of a backward that differentiates the mask's arguments (see
    :class:`.block_attention.MaskGradients`), or None when none is asked for."""
    if not any(needs):
        return None
    return block_attention.MaskGradients(block_mask_fn(mask), list(mask_args), needs)


def _fill_bits(fill: float) -> int:
    return struct.unpack("<q", struct.pack("<d", fill))[0]


def _bits_fill(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


@functools.cache
def _kernels(device_type: str):
    """(forward, backward) block kernels: Triton on CUDA, plain torch elsewhere (RINGIFY_KERNEL overrides)."""
    choice = _kernel_choice()
    if choice == "triton" or (choice == "auto" and device_type == "cuda"):
        from .triton_attention import triton_available, triton_block_backward, triton_block_forward

        if triton_available():
            return triton_block_forward, triton_block_backward
        if choice == "triton":
            raise RuntimeError("RINGIFY_KERNEL=triton needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    return block_attention.torch_block_forward, block_attention.torch_block_backward


@functools.lru_cache(maxsize=256)
def _positions_on(seq_len: int, world: int, rank: int, layout: str, device: torch.device) -> torch.Tensor:
    return layout_positions(seq_len, world, rank, layout).to(device)


# --------------------------------------------------------------------------------------------------
# agreement: shapes, dtypes and options must match on every rank (checked on every call, one tiny all-gather)


def _local_problem(q, k, v, grad_out, sinks=None) -> str:
    """What is wrong with this rank's own inputs, or ''."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be 4-D [B, H, S_local, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape[:3] != v.shape[:3]:
        return f"k and v must agree in batch, heads and local length; got k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        return (
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, local length and head dim "
            "([B, H, S_local, D] and [B, H_kv, S_local, D])"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one dtype of fp32, bf16, fp16; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.device != k.device or q.device != v.device:
        return f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}"
    if sinks is not None and (sinks.shape != q.shape[1:2] or sinks.device != q.device
                              or not sinks.is_floating_point()):
        return (f"sinks must be a floating [H] = [{q.shape[1]}] tensor on {q.device}; got {sinks.dtype} "
                f"{tuple(sinks.shape)} on {sinks.device}")
    out_shape = (*q.shape[:3], v.shape[3])
    if grad_out is not None and grad_out.shape != out_shape:
        return f"the gradient of the output has shape {tuple(grad_out.shape)}, expected {out_shape}"
    return ""


def _agree(q, k, v, group, causal: bool, layout: str, timeout_s: float, grad_out=None, mask: str = "",
           fill: float = float("-inf"), softcap: float = 0.0, sinks=None) -> list[int]:
    """Check that all ranks call with matching inputs; return every rank's local sequence length.

    One tiny all-gather per call. Every rank sees the same gathered facts and so raises the same
    error: a mistake on one rank never leaves the others hanging.
    """
    rank, world = rank_and_size(group)
    problem = _local_problem(q, k, v, grad_out, sinks)
    facts = [int(bool(problem)), 0, 0, 0, 0, 0, 0, int(causal), LAYOUTS.index(layout), int(bool(mask)),
             _fill_bits(fill), _fill_bits(softcap), 0, int(sinks is not None)]
    if not problem:
        b, h, s, d = q.shape
        facts[1:7] = [b, h, k.shape[1], s, d, _DTYPES.index(q.dtype)]
        facts[12] = v.shape[3]
    gathered = all_gather_ints(facts, group, q.device, timeout_s, "checking that ranks agree on ring-attention inputs")
    if any(f[0] for f in gathered):
        problems = all_gather_strings(problem, group)
        lines = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
        raise RingInputError("ring_attention got bad input:\n  " + "\n  ".join(lines))
    names = ("", "batch", "query heads", "kv heads", "", "head dim", "dtype", "causal", "layout", "mask", "fill",
             "softcap", "value head dim", "sinks")
    for i, name in enumerate(names):
        values = [f[i] for f in gathered]
        if name and len(set(values)) > 1:
            if name == "dtype":
                values = [_DTYPES[x] for x in values]
            elif name == "layout":
                values = [LAYOUTS[x] for x in values]
            elif name == "mask":
                values = ["a block mask" if x else "none" for x in values]
            elif name == "sinks":
                values = ["sinks" if x else "none" for x in values]
            elif name in ("fill", "softcap"):
                values = [_bits_fill(x) for x in values]
            raise RingInputError(
                f"ring_attention: ranks disagree on {name}: " + ", ".join(f"rank {r}: {x}" for r, x in enumerate(values))
                + ". Every rank must call with the same shapes (but the local length), dtype and options."
            )
    lengths = [f[4] for f in gathered]
    seq_len = sum(lengths)
    if seq_len < world or lengths != shard_lengths(seq_len, world, layout):
        expected = shard_lengths(seq_len, world, layout) if seq_len >= world else "at least 1 token each"
        raise RingInputError(
            f"ring_attention: local lengths {lengths} do not match the {layout!r} layout of a sequence of "
            f"{seq_len} tokens over {world} ranks (expected {expected}); cut inputs with "
            f"ringify.runtime.shard_sequence(x, dim, group, layout={layout!r})"
        )
    return lengths


# --------------------------------------------------------------------------------------------------
# the ring


class _Ring:
    """What forward and backward share: the group, the positions of every shard, the buffers."""

    def __init__(self, q, k, v, group, causal, layout, timeout_s, lengths, fill=float("-inf")):
        self.rank, self.world = rank_and_size(group)
        self.comm = RingComm(group, timeout_s) if self.world > 1 else None
        self.skip_hidden = causal and fill == float("-inf")  # a finite fill: hidden keys still count
        seq_len = sum(lengths)
        self.host_positions = [layout_positions(seq_len, self.world, r, layout) for r in range(self.world)]
        self.positions = [_positions_on(seq_len, self.world, r, layout, q.device) for r in range(self.world)]
        # per rank: the shapes of its k and v blocks, [B, H_kv, n, D] and [B, H_kv, n, Dv] (MLA: Dv != D)
        self.block_shapes = [tuple(torch.Size((*t.shape[:2], n, t.shape[3])) for t in (k, v)) for n in lengths]

    def source(self, step: int) -> int:
        """Owner of the key/value block this rank holds at ``step``."""
        return (self.rank - step) % self.world

    def visible(self, src: int) -> bool:
        """Whether any key of ``src``'s block is visible to any of this rank's queries."""
        return not self.skip_hidden or int(self.host_positions[src][0]) <= int(self.host_positions[self.rank][-1])

    def buffers(self, dtype, device, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``count`` (k, v)-shaped pairs of flat buffers that fit the largest block."""
        most = [max(shapes[i].numel() for shapes in self.block_shapes) for i in (0, 1)]
        return [tuple(torch.empty(n, dtype=dtype, device=device) for n in most) for _ in range(count)]

    def kv_buffers(self, dtype, device) -> list:
        """Where key/value blocks are received: a block is computed on while the next one arrives, so two;
        on two ranks only the other rank's block ever arrives: one. (This rank's own block is sent as it is.)"""
        return self.buffers(dtype, device, 1 if self.world == 2 else 2) if self.world > 1 else []

    def view(self, pair, src: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A buffer pair seen as rank ``src``'s k and v blocks."""
        return tuple(buf[: shape.numel()].view(shape) for buf, shape in zip(pair, self.block_shapes[src]))


def ring_forward(q, k, v, group, causal: bool, scale: float, layout: str, timeout_s: float, mask: str = "",
                 mask_args=(), fill: float = float("-inf"), softcap: float = 0.0, sinks=None):
    """(out in q's dtype, lse fp32) of this rank's queries against the whole sequence.

    lse is ``[B, H, S_local]``, or with a block mask or a finite fill the two-part state
    ``[2, B, H, S_local]`` (row maximum, log of the sum relative to it) of the torch kernels.
    ``sinks`` (``[H]`` or None) join every row's softmax after the ring: out and lse include them.
    """
    lengths = _agree(q, k, v, group, causal, layout, timeout_s, mask=mask, fill=fill, softcap=softcap, sinks=sinks)
    ring = _Ring(q, k, v, group, causal, layout, timeout_s, lengths, fill)
    if mask:
        mask_structure.describe_once(mask, _bound_mask(mask, mask_args), sum(lengths), causal, q.device, min(lengths))
    forward_block, _ = _block_kernels(q.device.type, mask, fill, softcap)
    options = _kernel_options(mask, mask_args, fill, softcap)
    if forward_block is fused_attention.fused_block_forward:
        options["plan_key"] = (mask, tuple(mask_args))  # one tile plan for every layer that shares the mask
    out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=torch.float32, device=q.device)
    if _extended(mask, fill):
        lse = torch.zeros((2, *q.shape[:-1]), dtype=torch.float32, device=q.device)
        lse[0] = float("-inf")
    else:
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    q_pos = ring.positions[ring.rank]

    buffers = ring.kv_buffers(q.dtype, q.device)
    kv = (k.contiguous(), v.contiguous()) if ring.world > 1 else (k, v)  # sent as they are when contiguous
    for step in range(ring.world):
        src = ring.source(step)
        if step + 1 < ring.world:
            incoming = ring.view(buffers[step % len(buffers)], ring.source(step + 1))
            in_flight = ring.comm.exchange(kv, incoming, _KV_TAG)
        if ring.visible(src):
            forward_block(q, kv[0], kv[1], out, lse, q_pos, ring.positions[src], scale=scale, causal=causal, **options)
        if step + 1 < ring.world:
            ring.comm.wait(in_flight, f"receiving key/value block {step + 1} of {ring.world}")
            kv = incoming
    if sinks is not None:
        out, lse = block_attention.merge_partials([out], [lse], _extended(mask, fill), sinks)
    return out.to(q.dtype), lse


def ring_backward(grad_out, q, k, v, out, lse, group, causal: bool, scale: float, layout: str, timeout_s: float,
                  mask: str = "", mask_args=(), fill: float = float("-inf"), softcap: float = 0.0, sinks=None,
                  mask_grad=()):
    """(dq, dk, dv, d sinks, d mask_args) for this rank's shards; dK/dV travel the ring one step behind their
    blocks.

    ``out`` and ``lse`` are the forward's, sinks included: the sink column has no value, so the usual
    backward with them is exact for q, k, v. d sinks (None without sinks) is this rank's rows' share, as
    every parameter gradient of a ringified graph is (``sync_grad`` sums it over the ranks).

    ``mask_grad``: per mask argument, whether to differentiate it (floating arguments only); d mask_args is
    a list with the gradient or None per argument, again this rank's rows' share (its queries against every
    key block; ``sync_grad`` sums it). An additive bias joins the scores after the scale and the soft-cap,
    so its gradient is dS = P * (dP - rowsum(dO * O)) per piece, backpropagated through the mask function.
    Such a backward runs the plain-torch block kernels (the fused and Triton ones do not expose dS)."""
    lengths = _agree(q, k, v, group, causal, layout, timeout_s, grad_out=grad_out, mask=mask, fill=fill,
                     softcap=softcap, sinks=sinks)
    ring = _Ring(q, k, v, group, causal, layout, timeout_s, lengths, fill)
    mask_grads = _mask_gradients(mask, mask_args, _differentiable(mask, mask_args, mask_grad))
    if mask_grads is None:
        _, backward_block = _block_kernels(q.device.type, mask, fill, softcap)
        options = _kernel_options(mask, mask_args, fill, softcap)
    else:  # dS is needed per piece: the plain-torch kernels, on every device
        backward_block = block_attention.torch_block_backward
        options = {"mask_fn": mask_grads, "fill": fill, **({"softcap": softcap} if softcap else {})}
    fused = backward_block is fused_attention.fused_block_backward
    if fused:
        options["out"] = out  # the global output: the fused backward recomputes probabilities from it and lse
        options["plan_key"] = (mask, tuple(mask_args))
    # rowsum(dO * O): the plain-torch and Triton kernels take it; the fused backward derives it from out itself
    delta = None if fused else (grad_out.float() * out.float()).sum(-1)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    q_pos = ring.positions[ring.rank]

    kv_buffers = ring.kv_buffers(q.dtype, q.device)
    # fp32 dK/dV: this step's share is computed into one pair while the last step's is still in flight in the
    # other, and the accumulator of the next block arrives in a third (it ends as this rank's own block's)
    shares = ring.buffers(torch.float32, q.device, 2 if ring.world > 1 else 1)
    arriving = ring.buffers(torch.float32, q.device, 1)[0] if ring.world > 1 else None
    kv = (k.contiguous(), v.contiguous()) if ring.world > 1 else (k, v)  # sent as they are when contiguous
    grads_in_flight = None
    for step in range(ring.world):
        src = ring.source(step)
        if step + 1 < ring.world:
            incoming = ring.view(kv_buffers[step % len(kv_buffers)], ring.source(step + 1))
            kv_in_flight = ring.comm.exchange(kv, incoming, _KV_TAG)
        share = ring.view(shares[step % len(shares)], src)  # last sent two steps ago, and waited for since
        share[0].zero_()
        share[1].zero_()
        if ring.visible(src):
            backward_block(q, kv[0], kv[1], grad_out, lse, delta, dq, share[0], share[1],
                           q_pos, ring.positions[src], scale=scale, causal=causal, **options)
        if ring.world > 1:
            # add the shares of the ranks before us, then pass the accumulator on
            if grads_in_flight is not None:
                ring.comm.wait(grads_in_flight, f"receiving dK/dV accumulator at step {step} of {ring.world}")
                share[0].add_(accumulated[0])
                share[1].add_(accumulated[1])
            accumulated = ring.view(arriving, ring.source(step + 1))
            grads_in_flight = ring.comm.exchange(share, accumulated, _DKV_TAG)
        if step + 1 < ring.world:
            ring.comm.wait(kv_in_flight, f"receiving key/value block {step + 1} of {ring.world}")
            kv = incoming
    if ring.world > 1:
        ring.comm.wait(grads_in_flight, "receiving the final dK/dV of this rank's block")
        share = accumulated
    dk, dv = (g if g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(share, (k, v)))
    dsinks = None if sinks is None else block_attention.sink_grad(grad_out, out, lse, sinks, _extended(mask, fill),
                                                                  delta)
    dmask = mask_grads.results() if mask_grads is not None else [None] * len(mask_args)
    return dq.to(q.dtype), dk, dv, dsinks, dmask


# --------------------------------------------------------------------------------------------------
# custom op: exportable, compilable, differentiable


@torch.library.custom_op("ringify::ring_attention", mutates_args=())
def ring_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: str, causal: bool, scale: float, layout: str,
    timeout: float, mask: str, mask_args: list[torch.Tensor], fill: float, softcap: float,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse). ``mask``: key of a registered block mask ("" = none), called with ``mask_args``;
    ``fill``: score of hidden keys; ``softcap``: 0 or the logit cap; ``sinks``: None or the per-head sink
    logits [H]. lse is [2, B, H, S_local] when ``mask`` or a finite ``fill``."""
    return ring_forward(q, k, v, resolve_group(group), causal, scale, layout, timeout, mask, mask_args, fill,
                        softcap, sinks)


@ring_attention_op.register_fake
def _(q, k, v, group, causal, scale, layout, timeout, mask, mask_args, fill, softcap, sinks=None):
    lse_shape = (2, *q.shape[:-1]) if _extended(mask, fill) else q.shape[:-1]
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("ringify::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, group: str, causal: bool, scale: float, layout: str, timeout: float, mask: str,
    mask_args: list[torch.Tensor], fill: float, softcap: float, sinks: torch.Tensor | None = None,
    mask_grad: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(dq, dk, dv, d sinks, d mask_args); d sinks is empty without sinks (an op returns tensors), and so is
    the gradient of every mask argument not flagged in ``mask_grad`` (or not floating)."""
    dq, dk, dv, dsinks, dmask = ring_backward(grad_out, q, k, v, out, lse, resolve_group(group), causal, scale,
                                              layout, timeout, mask, mask_args, fill, softcap, sinks, mask_grad)
    dmask = [a.new_empty(0) if g is None else g for a, g in zip(mask_args, dmask)]
    return dq, dk, dv, q.new_empty(0) if dsinks is None else dsinks, dmask


@ring_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, group, causal, scale, layout, timeout, mask, mask_args, fill, softcap, sinks=None,
      mask_grad=None):
    dsinks = q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape)
    dmask = [a.new_empty(a.shape if n else 0) for a, n in zip(mask_args, _differentiable(mask, mask_args, mask_grad))]
    # contiguous, like the real ones
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks, dmask


def _setup_context(ctx, inputs, output):
    q, k, v, group, causal, scale, layout, timeout, mask, mask_args, fill, softcap, *sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sinks[0] if sinks else None, *mask_args)
    ctx.mark_non_differentiable(lse)
    ctx.options = (group, causal, scale, layout, timeout, mask)
    ctx.fill, ctx.softcap = fill, softcap
    # floating mask arguments that require grad (T5's relative position bias table, learned slopes) get one
    ctx.mask_grad = _differentiable(mask, mask_args, [a.requires_grad for a in mask_args])


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, sinks, *mask_args = ctx.saved_tensors
    dq, dk, dv, dsinks, dmask = ring_attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, *ctx.options,
                                                           mask_args, ctx.fill, ctx.softcap, sinks, ctx.mask_grad)
    dmask = [g if n else None for g, n in zip(dmask, ctx.mask_grad)]
    grads = (dq, dk, dv, None, None, None, None, None, None, dmask, None, None)
    # the dispatcher drops a trailing argument at its default (sinks=None): a gradient only for one given
    return grads if sinks is None else (*grads, dsinks)


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)


def ring_attention(q, k, v, group=None, *, causal: bool = False, scale: float | None = None,
                   layout: str = "zigzag", timeout: float | None = None, mask=None, mask_args=(),
                   fill: float = float("-inf"), softcap: float = 0.0,
                   sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of the global sequence for this rank's queries.

    q: ``[B, H, S_local, D]``; k: ``[B, H_kv, S_local, D]``, v: ``[B, H_kv, S_local, Dv]`` with
    ``H % H_kv == 0`` (GQA/MQA without repeating k/v; ``Dv`` may differ from ``D``, as in multi-head latent
    attention); the output is ``[B, H, S_local, Dv]``. Shards are laid out by ``layout`` (see
    :func:`shard_sequence`); local lengths may differ by rank. ``group``: ProcessGroup, 1-D DeviceMesh, or
    None for the default group (or a single process when torch.distributed is not initialised). ``causal``
    masks by global position.
    ``timeout``: seconds to wait for a peer before raising ``RingTimeoutError``.

    ``mask``: a block-mask function ``fn(q_pos, k_pos, *mask_args) -> Tensor`` (or the key that
    :func:`register_block_mask` gave it) returning a bool keep-mask or a float additive bias that
    broadcasts to ``[B, H, Lq, Lk]`` for the given global positions; see :mod:`.block_mask`. It is
    called per piece, never with the whole sequence. ``mask_args``: tensors it reads (on the device of q).
    A floating one that requires grad gets its gradient through the additive bias the function computes
    from it (T5's relative position bias ``weight[bucket(k_pos - q_pos)]``, learned ALiBi slopes, Swin's
    bias table): each piece's dS backpropagated through the function, this rank's rows' share (summed
    over the ranks by the caller, as ``sync_grad`` does). Those backwards run the plain-torch block
    kernels (the fused and Triton kernels do not expose dS). With ``causal`` the two combine (a key must
    pass both).
    ``fill``: the score a hidden key takes (causal or bool mask): -inf (hidden keys weigh nothing;
    rows with no visible key give 0) or a finite value such as ``torch.finfo(dtype).min``, reproduced
    exactly (a row whose keys are all filled gets a uniform softmax, as in the unsharded model).
    ``softcap``: Gemma-2's logit soft-capping, scores ``softcap * tanh(score / softcap)`` before the
    mask (0 = off).
    ``sinks``: GPT-OSS's attention sinks, a learned logit per query head (``[H]``) that joins every row's
    softmax denominator and has no value: ``softmax(cat([scores, sink_h]))[..., :-1]``. Its gradient on
    each rank is that rank's rows' share (summed over the ranks by the caller, as ``sync_grad`` does).
    Calls with a mask, a finite fill or a soft-cap run the plain-torch block kernels, also on CUDA (the
    Triton kernels take none of them).
    """
    check_layout(layout)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if timeout is None:
        timeout = default_timeout()
    fill = float(fill)
    if math.isnan(fill) or fill == float("inf"):
        raise ValueError(f"fill must be -inf or a finite number, got {fill}")
    if mask is None:
        if len(mask_args):
            raise ValueError("mask_args were given without a mask")
        key = ""
        if not causal:
            fill = float("-inf")  # nothing is hidden: the fill cannot matter
    else:
        key = mask if isinstance(mask, str) else register_block_mask(mask)
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be 0 (off) or a positive number, got {softcap}")
    out, _ = ring_attention_op(q, k, v, group_name(group), bool(causal), float(scale), layout, float(timeout),
                               key, list(mask_args), fill, softcap, sinks)
    return out
