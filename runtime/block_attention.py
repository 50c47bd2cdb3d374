"""Attention of a query shard against one key/value block, merged into a running result.

This is the plain-torch path (CPU, and the reference the Triton kernels are tested against). Both
kernels share one contract:

- positions are global and sorted ascending; under ``causal`` a key is visible iff ``k_pos <= q_pos``;
- the running state is (``out`` fp32 normalised output, ``lse`` fp32 log-sum-exp), updated in place;
  ``lse == -inf`` means "no visible key yet" and goes with ``out == 0``: never NaN;
- GQA/MQA: query head h reads key/value head ``h // (H // H_kv)``. Queries are folded to
  ``[B, H_kv, G*L, D]`` so the key/value heads are never repeated in memory.

Work is split along contiguous runs of positions (one run for ``contiguous``, two for ``zigzag``), so
causal pairs of runs that are fully masked are skipped and fully visible ones need no mask.
"""

from __future__ import annotations

import torch

from .layout import contiguous_runs

_MAX_RUN_PAIRS = 16  # beyond this (striped layouts), one masked matmul beats many tiny ones


def _plan(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool):
    """Yield (q_start, q_len, k_start, k_len, mask or None) for the pieces that have visible keys."""
    q_cpu, k_cpu = q_pos.cpu(), k_pos.cpu()
    q_runs, k_runs = contiguous_runs(q_cpu), contiguous_runs(k_cpu)
    if not causal:
        yield 0, len(q_cpu), 0, len(k_cpu), None
        return
    if len(q_runs) * len(k_runs) > _MAX_RUN_PAIRS:
        q_runs, k_runs = [(0, len(q_cpu))], [(0, len(k_cpu))]
    for qs, ql in q_runs:
        q_first, q_last = int(q_cpu[qs]), int(q_cpu[qs + ql - 1])
        for ks, kl in k_runs:
            k_first, k_last = int(k_cpu[ks]), int(k_cpu[ks + kl - 1])
            if k_first > q_last:
                continue  # every key comes after every query: nothing to compute
            if k_last <= q_first:
                yield qs, ql, ks, kl, None  # every key visible
                continue
            mask = k_pos[ks : ks + kl].unsqueeze(0) <= q_pos[qs : qs + ql].unsqueeze(1)
            yield qs, ql, ks, kl, mask


def _fold(x: torch.Tensor, kv_heads: int, start: int, length: int) -> torch.Tensor:
    """[B, H, L, D] rows start:start+length -> fp32 [B, H_kv, G*length, D] (G query heads per kv head)."""
    b, h, _, d = x.shape
    x = x[:, :, start : start + length].float()
    return x.reshape(b, kv_heads, (h // kv_heads) * length, d)


def _scores(q_f, k, scale, mask, group):
    s = torch.matmul(q_f, k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        b, hkv, _, lk = s.shape
        s.view(b, hkv, group, -1, lk).masked_fill_(~mask, float("-inf"))
    return s


def _finite(x: torch.Tensor) -> torch.Tensor:
    """-inf (no visible key) -> 0, so that ``exp(s - x)`` gives 0 instead of NaN."""
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def torch_block_forward(q, k, v, out, lse, q_pos, k_pos, *, scale: float, causal: bool) -> None:
    """Attend ``q`` to the block (``k``, ``v``) and merge into (``out``, ``lse``) in place."""
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    out5 = out.view(b, hkv, group, lq, -1)
    lse4 = lse.view(b, hkv, group, lq)
    for qs, ql, ks, kl, mask in _plan(q_pos, k_pos, causal):
        q_f = _fold(q, hkv, qs, ql)
        k_blk = k[:, :, ks : ks + kl].float()
        v_blk = v[:, :, ks : ks + kl].float()
        s = _scores(q_f, k_blk, scale, mask, group)
        blk_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _finite(blk_lse).unsqueeze(-1))
        blk_out = torch.matmul(p, v_blk).view(b, hkv, group, ql, -1)
        blk_lse = blk_lse.view(b, hkv, group, ql)

        old_out, old_lse = out5[:, :, :, qs : qs + ql], lse4[:, :, :, qs : qs + ql]
        new_lse = torch.logaddexp(old_lse, blk_lse)
        safe = _finite(new_lse)
        merged = old_out * torch.exp(old_lse - safe).unsqueeze(-1) + blk_out * torch.exp(blk_lse - safe).unsqueeze(-1)
        old_out.copy_(merged)
        old_lse.copy_(new_lse)


def torch_block_backward(q, k, v, do, lse, delta, dq, dk, dv, q_pos, k_pos, *, scale: float, causal: bool) -> None:
    """Accumulate this block's share of dq (into ``dq``) and of dk, dv (into ``dk``, ``dv``), in place.

    ``lse`` is the final log-sum-exp over all blocks and ``delta = rowsum(dO * O)``: with them each
    block's softmax probabilities are recomputed exactly, without the other blocks.
    """
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
        s = _scores(q_f, k_blk, scale, mask, group)
        p = torch.exp(s - _finite(lse_f))
        ds = p * (torch.matmul(do_f, v_blk.transpose(-1, -2)) - delta_f)
        dq5[:, :, :, qs : qs + ql] += torch.matmul(ds, k_blk).mul_(scale).view(b, hkv, group, ql, -1)
        dk[:, :, ks : ks + kl] += torch.matmul(ds.transpose(-1, -2), q_f).mul_(scale)
        dv[:, :, ks : ks + kl] += torch.matmul(p.transpose(-1, -2), do_f)
