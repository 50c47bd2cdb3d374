"""Attention of a query shard against one key/value block, merged into a running result.

This is the plain-torch path (CPU, and the reference the Triton kernels are tested against). Both
kernels share one contract:

- positions are global and sorted ascending; under ``causal`` a key is visible iff ``k_pos <= q_pos``;
- the running state is (``out`` fp32 normalised output, ``lse`` fp32 log-sum-exp), updated in place;
  ``lse == -inf`` means "no visible key yet" and goes with ``out == 0``: never NaN;
- GQA/MQA: query head h reads key/value head ``h // (H // H_kv)``. Queries are folded to
  ``[B, H_kv, G*L, D]`` so the key/value heads are never repeated in memory.

Work is split along contiguous runs of positions (one run for ``contiguous``, two for ``zigzag``) and
each run into tiles of at most ``TILE`` positions, for queries and keys alike: the fp32 score tile of a
piece is at most ``[B, H, TILE, TILE]`` whatever the block length (a single rank never builds an S x S
matrix), causal tiles that are fully masked are skipped and fully visible ones need no mask.

Block masks (``mask_fn``, see :mod:`.block_mask`) and a finite ``fill`` use the *extended* state: the
running ``lse`` is then a two-part fp32 tensor ``[2, B, H, Lq]`` holding the row maximum of the scores
seen so far and the log of the sum of ``exp(score - maximum)``. One fp32 log-sum-exp cannot hold
``fill + log(n)`` when ``fill`` is huge (``torch.finfo(dtype).min``, as HuggingFace models use): the
``log(n)`` rounds away and a row whose keys are all filled would no longer get the uniform softmax the
unsharded model gives it. The two parts keep it exact: the merge compares maxima and adds sums.
"""

from __future__ import annotations

import math

import torch

from .layout import contiguous_runs

_MAX_RUN_PAIRS = 16  # beyond this (striped layouts), runs are ignored and tiles are masked
TILE = 256
"""Query rows and key columns per piece. A score tile is then 256 KiB of fp32 per (batch, head), so the
few alive at once (scores, dP) cost O(TILE^2), not O(S^2), while a 256-row matmul still dwarfs the ~20
torch calls of a piece; on CPU 256 beat 128 and 512 (fwd + bwd of one 2048-token causal block)."""


def _tiles(runs, size: int):
    """Cut (start, length) runs into consecutive pieces of at most ``size``."""
    for start, length in runs:
        for s in range(start, start + length, size):
            yield s, min(size, start + length - s)


def _plan(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, skip_hidden: bool = True):
    """Yield (q_start, q_len, k_start, k_len, mask) for the tiles that have visible keys.

    ``mask`` is None (every key visible) or a bool ``[q_len, k_len]`` causal keep-mask. With
    ``skip_hidden=False`` (finite fill: hidden keys still count) tiles with no visible key are yielded
    too, with ``mask=False``. Positions are sorted, so a tile's first and last positions bound it.
    """
    q_cpu, k_cpu = q_pos.cpu(), k_pos.cpu()
    q_runs, k_runs = [(0, len(q_cpu))], [(0, len(k_cpu))]
    if causal:
        runs = contiguous_runs(q_cpu), contiguous_runs(k_cpu)
        if len(runs[0]) * len(runs[1]) <= _MAX_RUN_PAIRS:
            q_runs, k_runs = runs
    for qs, ql in _tiles(q_runs, TILE):
        q_first, q_last = int(q_cpu[qs]), int(q_cpu[qs + ql - 1])
        for ks, kl in _tiles(k_runs, TILE):
            k_first, k_last = int(k_cpu[ks]), int(k_cpu[ks + kl - 1])
            if not causal or k_last <= q_first:
                yield qs, ql, ks, kl, None  # every key visible
            elif k_first > q_last:
                if not skip_hidden:
                    yield qs, ql, ks, kl, False  # every key comes after every query
            else:
                yield qs, ql, ks, kl, k_pos[ks : ks + kl].unsqueeze(0) <= q_pos[qs : qs + ql].unsqueeze(1)


def _fold(x: torch.Tensor, kv_heads: int, start: int, length: int) -> torch.Tensor:
    """[B, H, L, D] rows start:start+length -> fp32 [B, H_kv, G*length, D] (G query heads per kv head)."""
    b, h, _, d = x.shape
    x = x[:, :, start : start + length].float()
    return x.reshape(b, kv_heads, (h // kv_heads) * length, d)


def _capped(s: torch.Tensor, softcap: float, slope: bool = False):
    """``softcap * tanh(s / softcap)`` in place (Gemma-2's logit soft-capping); 0 = off.

    With ``slope`` also returns its derivative ``1 - tanh^2``, which backward multiplies into dS.
    """
    if not softcap:
        return s, None
    t = s.div_(softcap).tanh_()
    grad = (1.0 - t * t) if slope else None
    return t.mul_(softcap), grad


def _scores(q_f, k, scale, mask, group, softcap: float = 0.0, slope: bool = False):
    s, grad = _capped(torch.matmul(q_f, k.transpose(-1, -2)).mul_(scale), softcap, slope)
    if mask is not None:
        b, hkv, _, lk = s.shape
        s.view(b, hkv, group, -1, lk).masked_fill_(~mask, float("-inf"))
    return (s, grad) if slope else s


def _finite(x: torch.Tensor) -> torch.Tensor:
    """-inf (no visible key) -> 0, so that ``exp(s - x)`` gives 0 instead of NaN."""
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def torch_block_forward(q, k, v, out, lse, q_pos, k_pos, *, scale: float, causal: bool,
                        mask_fn=None, fill: float = float("-inf"), softcap: float = 0.0) -> None:
    """Attend ``q`` to the block (``k``, ``v``) and merge into (``out``, ``lse``) in place.

    ``mask_fn(q_pos_piece, k_pos_piece) -> Tensor``: a block mask already bound to its arguments
    (bool keep-mask or float additive bias, broadcastable to ``[B, H, Lq, Lk]``); ``fill``: the score
    of every hidden key (causal or bool mask). With either, ``lse`` is the two-part extended state
    ``[2, B, H, Lq]`` (see the module docstring; start it at ``(-inf, 0)``). ``softcap`` (0 = off):
    scores become ``softcap * tanh(score / softcap)`` before the mask, as Gemma-2 computes them.
    """
    if _extended(mask_fn, fill):
        return _masked_forward(q, k, v, out, lse, q_pos, k_pos, scale, causal, mask_fn, fill, softcap)
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    out5 = out.view(b, hkv, group, lq, -1)
    lse4 = lse.view(b, hkv, group, lq)
    for qs, ql, ks, kl, mask in _plan(q_pos, k_pos, causal):
        q_f = _fold(q, hkv, qs, ql)
        k_blk = k[:, :, ks : ks + kl].float()
        v_blk = v[:, :, ks : ks + kl].float()
        s = _scores(q_f, k_blk, scale, mask, group, softcap)
        blk_lse = torch.logsumexp(s, dim=-1)
        p = s.sub_(_finite(blk_lse).unsqueeze(-1)).exp_()  # in place: one score tile per piece
        blk_out = torch.matmul(p, v_blk).view(b, hkv, group, ql, -1)
        blk_lse = blk_lse.view(b, hkv, group, ql)

        old_out, old_lse = out5[:, :, :, qs : qs + ql], lse4[:, :, :, qs : qs + ql]
        new_lse = torch.logaddexp(old_lse, blk_lse)
        safe = _finite(new_lse)
        merged = old_out * torch.exp(old_lse - safe).unsqueeze(-1) + blk_out * torch.exp(blk_lse - safe).unsqueeze(-1)
        old_out.copy_(merged)
        old_lse.copy_(new_lse)


def torch_block_backward(q, k, v, do, lse, delta, dq, dk, dv, q_pos, k_pos, *, scale: float, causal: bool,
                         mask_fn=None, fill: float = float("-inf"), softcap: float = 0.0) -> None:
    """Accumulate this block's share of dq (into ``dq``) and of dk, dv (into ``dk``, ``dv``), in place.

    ``lse`` is the final log-sum-exp over all blocks and ``delta = rowsum(dO * O)``: with them each
    block's softmax probabilities are recomputed exactly, without the other blocks. ``mask_fn`` and
    ``fill`` and ``softcap`` as in :func:`torch_block_forward` (then ``lse`` is the two-part extended state).
    A :class:`MaskGradients` as ``mask_fn`` also accumulates the gradients of the mask's arguments.
    """
    if _extended(mask_fn, fill):
        return _masked_backward(q, k, v, do, lse, delta, dq, dk, dv, q_pos, k_pos, scale, causal, mask_fn, fill,
                                softcap)
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    dq5 = dq.view(b, hkv, group, lq, -1)
    for qs, ql, ks, kl, mask in _plan(q_pos, k_pos, causal):
        q_f = _fold(q, hkv, qs, ql)
        do_f = _fold(do, hkv, qs, ql)
        lse_f = _fold(lse.unsqueeze(-1), hkv, qs, ql)
        delta_f = _fold(delta.unsqueeze(-1), hkv, qs, ql)
        k_blk = k[:, :, ks : ks + kl].float()
        v_blk = v[:, :, ks : ks + kl].float()
        s, slope = _scores(q_f, k_blk, scale, mask, group, softcap, slope=True)
        p = s.sub_(_finite(lse_f)).exp_()
        dv[:, :, ks : ks + kl] += torch.matmul(p.transpose(-1, -2), do_f)
        ds = p.mul_(torch.matmul(do_f, v_blk.transpose(-1, -2)).sub_(delta_f))  # p is not needed any more
        if slope is not None:
            ds.mul_(slope)  # through the soft-cap: d(c tanh(x/c))/dx
        dq5[:, :, :, qs : qs + ql] += torch.matmul(ds, k_blk).mul_(scale).view(b, hkv, group, ql, -1)
        dk[:, :, ks : ks + kl] += torch.matmul(ds.transpose(-1, -2), q_f).mul_(scale)
        del s, p, ds, slope  # free this tile before the next one is made


# --------------------------------------------------------------------------------------------------
# block masks and finite fills: the extended (row maximum, log-sum) state


def _extended(mask_fn, fill: float) -> bool:
    """Whether a call needs the masked kernels and the two-part ``lse`` state."""
    return mask_fn is not None or fill != float("-inf")


def _mask_5d(m, b: int, hkv: int, group: int, ql: int, kl: int) -> torch.Tensor:
    """A block mask's result, viewed to broadcast against the folded scores ``[B, H_kv, G, Lq, Lk]``.

    Query head h is (kv head h // G, member h % G), so a mask with H heads reshapes to [H_kv, G]; a
    mask with one head stays one head (never repeated).
    """
    if not isinstance(m, torch.Tensor) or not (m.dtype == torch.bool or m.is_floating_point()):
        what = f"a {m.dtype} tensor" if isinstance(m, torch.Tensor) else type(m).__name__
        raise TypeError(f"a block mask must return a bool keep-mask or a floating additive bias, got {what}")
    h = hkv * group
    shape = (1,) * (4 - m.dim()) + tuple(m.shape)
    mb, mh, mq, mk = shape if len(shape) == 4 else (0, 0, 0, 0)
    if mb not in (1, b) or mh not in (1, h) or mq not in (1, ql) or mk not in (1, kl):
        raise ValueError(
            f"a block mask returned shape {tuple(m.shape)} for a piece of {ql} queries and {kl} keys; it must "
            f"broadcast to [B, H, Lq, Lk] = [{b}, {h}, {ql}, {kl}] (leading dims may be 1 or absent)"
        )
    m = m.reshape(shape)
    if mh == 1:
        return m.unsqueeze(1)
    return m.reshape(mb, hkv, group, mq, mk)


def _piece(mask_fn, q_pos, k_pos, qs, ql, ks, kl, visible, dims, fill):
    """(keep, bias) of one piece of the plan, or None when the piece cannot change the result.

    keep: None (no key hidden), False (every key hidden) or a bool tensor broadcastable to the
    folded scores; bias: None or a float tensor likewise. Hidden keys score ``fill``; with
    ``fill = -inf`` they weigh nothing, so pieces where every key is hidden are skipped.
    """
    if visible is False or mask_fn is None:
        return visible, None
    if isinstance(mask_fn, MaskGradients):  # the view to 5-D joins the graph that backward differentiates
        with _autograd_on():
            m = _mask_5d(mask_fn(q_pos[qs : qs + ql], k_pos[ks : ks + kl]), *dims, ql, kl)
    else:
        m = _mask_5d(mask_fn(q_pos[qs : qs + ql], k_pos[ks : ks + kl]), *dims, ql, kl)
    if m.dtype == torch.bool:
        if not bool(m.any()):
            return None if fill == float("-inf") else (False, None)
        if bool(m.all()):
            return visible, None
        return (m if visible is None else m & visible), None
    if fill == float("-inf") and bool(torch.isneginf(m).all()):
        return None
    return visible, m


class _autograd_on:
    """Autograd on, also inside a custom op's kernel (which runs with the autograd dispatch keys excluded and
    grad mode off): the mask function's graph is recorded and differentiated there, and nothing else is."""

    def __enter__(self):
        self._guards = [torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False),
                        torch.enable_grad()]
        for guard in self._guards:
            guard.__enter__()

    def __exit__(self, *exc):
        for guard in reversed(self._guards):
            guard.__exit__(*exc)


class MaskGradients:
    """A block mask bound to its arguments whose floating arguments get gradients (T5's relative position
    bias, a learned ALiBi slope: an additive bias computed from positions and a parameter).

    Called like any bound mask, ``(q_pos, k_pos) -> Tensor``, but with grad enabled on detached copies of the
    arguments flagged in ``needs``, so an additive result carries the graph back to them. The plain-torch
    backward (:func:`torch_block_backward`) hands it, per piece, ``dS`` (the gradient of the loss with
    respect to the final scores: the bias is added after the scale and after the soft-cap, so ``dBias = dS``
    exactly) and :meth:`accumulate` backpropagates it through the mask function into fp32 accumulators.
    Pieces the plan skips (every key hidden) have ``P = 0`` there, so they contribute nothing: skipping stays
    exact. Only the plain-torch kernels take it (the fused and Triton kernels do not expose ``dS``)."""

    def __init__(self, fn, args, needs):
        needs = [bool(n) and isinstance(a, torch.Tensor) and a.is_floating_point() for a, n in zip(args, needs)]
        self.fn = fn
        self.args = [a.detach().requires_grad_() if n else a for a, n in zip(args, needs)]
        self.needs = needs
        self.wanted = [a for a, n in zip(self.args, needs) if n]
        self.grads = [torch.zeros(a.shape, dtype=torch.float32, device=a.device) for a in self.wanted]

    def __call__(self, q_pos, k_pos):
        with _autograd_on():
            return self.fn(q_pos, k_pos, *self.args)

    def accumulate(self, bias: torch.Tensor, ds5: torch.Tensor) -> None:
        """Add d loss / d args of one piece: ``bias`` as :func:`_piece` returned it (the mask's result viewed
        to 5-D, with its graph), ``ds5`` the piece's dS ``[B, H_kv, G, Lq, Lk]``."""
        if not self.wanted or not bias.requires_grad:
            return
        dims = [i for i in range(5) if bias.shape[i] == 1 and ds5.shape[i] != 1]
        grad = ds5.sum(dims, keepdim=True) if dims else ds5
        with _autograd_on():
            grads = torch.autograd.grad(bias, self.wanted, grad.to(bias.dtype), allow_unused=True)
        for acc, g in zip(self.grads, grads):
            if g is not None:
                acc.add_(g)

    def results(self) -> list:
        """Per argument: its gradient (in its dtype) or None where none was asked for."""
        it = iter(self.grads)
        return [next(it).to(a.dtype) if n else None for a, n in zip(self.args, self.needs)]


def _masked_scores(q_f, k_blk, scale, keep, bias, fill, group, softcap: float = 0.0, slope: bool = False):
    """fp32 scaled (soft-capped) scores ``[B, H_kv, G*L, Lk]`` with the bias added and hidden keys set to
    ``fill``; with ``slope``, also the soft-cap's derivative (or None)."""
    b, hkv, rows, _ = q_f.shape
    kl = k_blk.shape[2]
    if keep is False:
        s = q_f.new_full((b, hkv, rows, kl), fill)
        return (s, None) if slope else s
    s, grad = _capped(torch.matmul(q_f, k_blk.transpose(-1, -2)).mul_(scale), softcap, slope)
    s5 = s.view(b, hkv, group, rows // group, kl)
    if bias is not None:
        s5.add_(bias.detach().to(torch.float32))  # after scale and soft-cap: d bias = dS
    if keep is not None:
        s5.masked_fill_(~keep, fill)
    return (s, grad) if slope else s


def _masked_forward(q, k, v, out, lse, q_pos, k_pos, scale, causal, mask_fn, fill, softcap=0.0) -> None:
    b, h, lq, _ = q.shape
    hkv = k.shape[1]
    group = h // hkv
    if fill != float("-inf") and not math.isfinite(fill):
        raise ValueError(f"fill must be -inf or finite, got {fill}")
    if lse.shape != (2, b, h, lq):
        raise ValueError(f"with a block mask or a finite fill, lse is the two-part state [2, B, H, Lq]; got {tuple(lse.shape)}")
    out5 = out.view(b, hkv, group, lq, -1)
    hi5, lo5 = lse[0].view(b, hkv, group, lq), lse[1].view(b, hkv, group, lq)
    dims = (b, hkv, group)
    for qs, ql, ks, kl, visible in _plan(q_pos, k_pos, causal, skip_hidden=fill == float("-inf")):
        piece = _piece(mask_fn, q_pos, k_pos, qs, ql, ks, kl, visible, dims, fill)
        if piece is None:
            continue
        keep, bias = piece
        s = _masked_scores(_fold(q, hkv, qs, ql), k[:, :, ks : ks + kl].float(), scale, keep, bias, fill, group,
                           softcap)
        blk_max = s.amax(-1, keepdim=True)
        e = s.sub_(_finite(blk_max)).exp_()
        blk_sum = e.sum(-1, keepdim=True)
        blk_out = torch.matmul(e, v[:, :, ks : ks + kl].float()).div_(torch.where(blk_sum > 0, blk_sum, 1.0))
        blk_out = blk_out.view(b, hkv, group, ql, -1)
        blk_max, blk_sum = blk_max.view(b, hkv, group, ql), blk_sum.view(b, hkv, group, ql)

        old_out, hi, lo = out5[:, :, :, qs : qs + ql], hi5[:, :, :, qs : qs + ql], lo5[:, :, :, qs : qs + ql]
        new_hi = torch.maximum(hi, blk_max)
        safe = _finite(new_hi)
        w_old = torch.exp(hi - safe + lo)  # the running sum and the block's, both relative to new_hi
        w_blk = torch.exp(blk_max - safe) * blk_sum
        total = w_old + w_blk
        norm = torch.where(total > 0, total, 1.0)
        merged = (old_out * w_old.unsqueeze(-1) + blk_out * w_blk.unsqueeze(-1)) / norm.unsqueeze(-1)
        old_out.copy_(merged)
        hi.copy_(new_hi)
        lo.copy_(torch.log(norm))  # 0 while no key is seen: the state is then (-inf, 0)


def _masked_backward(q, k, v, do, lse, delta, dq, dk, dv, q_pos, k_pos, scale, causal, mask_fn, fill,
                     softcap=0.0) -> None:
    b, h, lq, _ = q.shape
    hkv = k.shape[1]
    group = h // hkv
    finite_fill = fill != float("-inf")
    dq5 = dq.view(b, hkv, group, lq, -1)
    dims = (b, hkv, group)
    accumulate = getattr(mask_fn, "accumulate", None)  # a MaskGradients: gradients into the mask's arguments
    for qs, ql, ks, kl, visible in _plan(q_pos, k_pos, causal, skip_hidden=not finite_fill):
        piece = _piece(mask_fn, q_pos, k_pos, qs, ql, ks, kl, visible, dims, fill)
        if piece is None:
            continue
        keep, bias = piece
        q_f = _fold(q, hkv, qs, ql)
        do_f = _fold(do, hkv, qs, ql)
        hi_f = _fold(lse[0].unsqueeze(-1), hkv, qs, ql)
        lo_f = _fold(lse[1].unsqueeze(-1), hkv, qs, ql)
        k_blk = k[:, :, ks : ks + kl].float()
        v_blk = v[:, :, ks : ks + kl].float()
        s, slope = _masked_scores(q_f, k_blk, scale, keep, bias, fill, group, softcap, slope=True)
        p = s.sub_(_finite(hi_f)).sub_(lo_f).exp_()
        dv[:, :, ks : ks + kl] += torch.matmul(p.transpose(-1, -2), do_f)
        if keep is False:
            continue  # every score is the constant fill: nothing flows to q or k
        delta_f = _fold(delta.unsqueeze(-1), hkv, qs, ql)
        ds = p.mul_(torch.matmul(do_f, v_blk.transpose(-1, -2)).sub_(delta_f))
        if finite_fill and keep is not None:
            ds.view(b, hkv, group, ql, kl).masked_fill_(~keep, 0.0)  # a filled score is a constant
        if bias is not None and accumulate is not None:
            accumulate(bias, ds.view(b, hkv, group, ql, kl))  # the bias is added after the soft-cap: dS itself
        if slope is not None:
            ds.mul_(slope)  # through the soft-cap
        dq5[:, :, :, qs : qs + ql] += torch.matmul(ds, k_blk).mul_(scale).view(b, hkv, group, ql, -1)
        dk[:, :, ks : ks + kl] += torch.matmul(ds.transpose(-1, -2), q_f).mul_(scale)


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor], extended: bool, sinks=None):
    """One (out, lse) from partial results over disjoint key sets, in the order given (so every rank that
    merges the same list gets the same bits): the stable log-sum-exp merge of the ring, in fp32.

    ``outs``: normalised fp32 outputs ``[B, H, L, D]``; ``lses``: ``[B, H, L]``, or the two-part extended
    states ``[2, B, H, L]`` (row maximum, log of the sum relative to it). A part that saw no key
    (lse -inf) weighs nothing; a row no part saw gives output 0, as the kernels do.

    ``sinks``: attention sinks (GPT-OSS), a logit per query head (``[H]``) in every row's softmax
    denominator without a value. A sink is one more part, whose output is 0 and whose lse is ``sink_h``:
    merged last, once, it is exact, and a row that saw no key keeps output 0."""
    if sinks is not None:
        outs, lses = [*outs, outs[0].new_zeros(()).expand(outs[0].shape)], [*lses, _sink_lse(sinks, lses[0], extended)]
    his = [l[0] if extended else l for l in lses]
    los = [l[1] if extended else torch.zeros_like(l) for l in lses]
    hi = torch.stack(his).amax(0)
    safe = _finite(hi)
    weights = [torch.exp(h - safe + lo) for h, lo in zip(his, los)]
    total = torch.stack(weights).sum(0)
    norm = torch.where(total > 0, total, 1.0)
    out = sum(o * (w / norm).unsqueeze(-1) for o, w in zip(outs, weights))
    if extended:
        return out, torch.stack([hi, torch.log(norm)])
    return out, torch.where(total > 0, safe + torch.log(norm), float("-inf"))


def _sink_lse(sinks: torch.Tensor, like: torch.Tensor, extended: bool) -> torch.Tensor:
    """The state of a part that is the sink alone: lse ``sink_h`` on every row (extended: ``(sink_h, 0)``)."""
    b, h, rows = (like[0] if extended else like).shape
    sink = sinks.to(torch.float32).view(1, h, 1).expand(b, h, rows)
    return torch.stack([sink, torch.zeros_like(sink)]) if extended else sink


def sink_grad(grad_out, out, lse, sinks, extended: bool, delta=None) -> torch.Tensor:
    """d loss / d sinks of these rows, from the output and lse *with* the sinks: the sink's probability is
    ``exp(sink_h - lse)`` and d sink_h = -sum over batch and rows of it times ``rowsum(dO * O)`` (``delta``)."""
    total = lse[0] + lse[1] if extended else lse
    if delta is None:
        delta = (grad_out.float() * out.float()).sum(-1)
    p_sink = torch.exp(sinks.to(torch.float32).view(1, -1, 1) - total)
    return (p_sink * delta).sum((0, 2)).neg_().to(sinks.dtype)


DECODE_BLOCK = 16384
"""Keys per piece when a few query rows (a decoded token) attend to a whole cache: [B, H, 1, 16384] fp32
scores are 64 KiB per (batch, head)."""


def attend_keys(q, k, v, q_pos, k_pos, *, scale: float, causal: bool, mask_fn=None, fill: float = float("-inf"),
                softcap: float = 0.0):
    """(fp32 out, lse) of a few query rows (``q``: ``[B, H, Lq, D]``, decoding) against every key of ``k``/``v``,
    with the kernels' semantics and state (two-part lse with a mask or a finite fill). Keys go in blocks of
    ``DECODE_BLOCK``, not in the ring kernels' runs and tiles: a cache's positions are scattered (decoded
    tokens join the ranks in turn), and per tile one query row costs more in Python than in arithmetic."""
    b, h, lq, _ = q.shape
    hkv = k.shape[1]
    group = h // hkv
    extended = _extended(mask_fn, fill)
    q_f = _fold(q, hkv, 0, lq)
    outs, lses = [], []
    for ks in range(0, k.shape[2], DECODE_BLOCK):
        kl = min(DECODE_BLOCK, k.shape[2] - ks)
        visible = None
        if causal:
            seen = k_pos[ks : ks + kl].unsqueeze(0) <= q_pos.unsqueeze(1)
            visible = None if bool(seen.all()) else seen
        k_blk, v_blk = k[:, :, ks : ks + kl].float(), v[:, :, ks : ks + kl].float()
        if extended:
            piece = _piece(mask_fn, q_pos, k_pos, 0, lq, ks, kl, visible, (b, hkv, group), fill)
            if piece is None:
                continue
            s = _masked_scores(q_f, k_blk, scale, *piece, fill, group, softcap)
        else:
            s = _scores(q_f, k_blk, scale, visible, group, softcap)
        hi = s.amax(-1)
        e = s.sub_(_finite(hi).unsqueeze(-1)).exp_()
        total = e.sum(-1)
        norm = torch.where(total > 0, total, 1.0)
        outs.append(torch.matmul(e, v_blk).div_(norm.unsqueeze(-1)).view(b, h, lq, -1))
        hi, norm = hi.view(b, h, lq), norm.view(b, h, lq)
        lses.append(torch.stack([hi, torch.log(norm)]) if extended
                    else torch.where(total.view(b, h, lq) > 0, _finite(hi) + torch.log(norm), float("-inf")))
    if not outs:
        lse = torch.full((b, h, lq), float("-inf"), dtype=torch.float32, device=q.device)
        lse = torch.stack([lse, torch.zeros_like(lse)]) if extended else lse
        return q.new_zeros((b, h, lq, v.shape[-1]), dtype=torch.float32), lse
    return (outs[0], lses[0]) if len(outs) == 1 else merge_partials(outs, lses, extended)
