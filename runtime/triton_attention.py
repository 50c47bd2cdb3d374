"""Triton kernels for one step of ring attention: a query shard against one key/value block.

They keep the contract of :mod:`.block_attention` (the plain-torch path, and the reference they are
tested against): global positions sorted ascending, a causal key visible iff ``k_pos <= q_pos``, a
running fp32 (``out``, ``lse``) state where ``lse == -inf`` goes with ``out == 0``, and query head h
reading key/value head ``h // (H // H_kv)``.

The kernels follow the Triton fused-attention tutorial: fp32 accumulation, scores in base-2 units
(log2(e) is folded into the scale so that the softmax uses ``exp2``), an online softmax forward and a
two-kernel backward (one program per key tile for dk/dv, one per query tile for dq: no atomics). What
ring attention adds:

- the forward starts its online softmax from the running (``out``, ``lse``) of the earlier ring steps,
  so merging a block costs no extra pass over memory;
- the positions need not be contiguous (zigzag, striped layouts), so tile skipping cannot use tile
  indices. Because they are sorted, ``torch.searchsorted`` finds for each tile the span of the other
  side that is fully visible (no mask), partly visible (masked), or invisible (never visited).

Interpret mode (``TRITON_INTERPRET=1``, CPU tensors) is fixed when this module is imported, because
``triton.jit`` reads it when it wraps the kernels.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional off Linux x86-64; triton_available() then reports False
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")  # as triton reads it
_LOG2E = math.log2(math.e)


def _jit(fn):
    """``triton.jit``, or the plain function when triton is missing (the module imports; nothing launches)."""
    return fn if triton is None else triton.jit(fn)


def triton_available() -> bool:
    """True when the kernels can run: triton imports, and there is a CUDA device or interpret mode is on."""
    return triton is not None and (_INTERPRET or torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@_jit
def _lse_to_log2(lse):
    """Natural-log lse -> base-2 units of the scores. Rows that saw no key (-inf) get +inf, so that the
    backward's ``exp2(s - lse)`` is 0 for them instead of NaN."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@_jit
def _fwd_inner(acc, l_i, m_i, q, q_pos, K, V, KPos, stride_kn, stride_vn, Lk, qk_scale, lo, hi,
               offs_d, d_ok, offs_dv, dv_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr):
    """Online softmax over the key tiles starting in [lo, hi). Only MASKED tiles compute a mask: the causal
    one, and the ragged end of the block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = n_ok[None, :]
            if CAUSAL:
                k_pos = tl.load(KPos + offs_n, mask=n_ok, other=0)
                visible = visible & (k_pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # "safe max": a row that has seen nothing yet keeps m = -inf, and -inf - (-inf) would be NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _attn_fwd(Q, K, V, Out, Lse, QPos, KPos, KeyFull, KeyEnd,
              stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
              H, GROUP, Lq, Lk, qk_scale,
              D: tl.constexpr, HEAD_DIM: tl.constexpr, DV: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    # Keys [0, key_full) are visible to every row of the tile, keys from key_end on to none of them.
    key_full = tl.load(KeyFull + tile)
    key_end = tl.load(KeyEnd + tile)
    if key_end == 0:  # nothing to see: the running state stays as it is
        return
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    Out += b * stride_ob + h * stride_oh
    Lse += bh * Lq

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    offs_dv = tl.arange(0, HEAD_DIM_V)  # the value head dim may differ (multi-head latent attention)
    dv_ok = offs_dv < DV
    q_mask = m_ok[:, None] & d_ok[None, :]
    o_mask = m_ok[:, None] & dv_ok[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
    q_pos = tl.load(QPos + offs_m, mask=m_ok, other=0)

    # The running state of the earlier blocks is the initial online-softmax state: m = lse, l = 1,
    # acc = out (m = -inf, l = 0, acc = 0 for rows that have seen nothing).
    m_i = tl.load(Lse + offs_m, mask=m_ok, other=float("-inf")) * 1.4426950408889634
    l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    out_ptrs = Out + offs_m[:, None] * stride_om + offs_dv[None, :]
    acc = tl.load(out_ptrs, mask=o_mask, other=0.0)

    unmasked_end = key_full // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_pos, K, V, KPos, stride_kn, stride_vn, Lk, qk_scale,
                               0, unmasked_end, offs_d, d_ok, offs_dv, dv_ok, BLOCK_N, False, CAUSAL, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_pos, K, V, KPos, stride_kn, stride_vn, Lk, qk_scale,
                               unmasked_end, key_end, offs_d, d_ok, offs_dv, dv_ok, BLOCK_N, True, CAUSAL, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # l == 0: acc == 0 and m == -inf, so out = 0, lse = -inf
    tl.store(out_ptrs, acc / l_safe[:, None], mask=o_mask)
    tl.store(Lse + offs_m, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, mask=m_ok)


@_jit
def _bwd_dkdv_inner(dk, dv, k, v, k_pos, Q, DO, Lse, Delta, QPos, stride_qm, stride_dom, Lq, qk_scale,
                    lo, hi, offs_d, d_ok, offs_dv, dv_ok, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                    PRECISION: tl.constexpr):
    """dk, dv of one key tile from the query rows starting in [lo, hi), computed transposed (keys on
    rows). Rows past Lq load lse = -inf and so contribute p = 0: only MASKED tiles need the causal mask."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_dv[None, :], mask=m_ok[:, None] & dv_ok[None, :],
                     other=0.0)
        m = _lse_to_log2(tl.load(Lse + offs_m, mask=m_ok, other=float("-inf")))
        delta = tl.load(Delta + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if MASKED:
            q_pos = tl.load(QPos + offs_m, mask=m_ok, other=0)
            s_t = tl.where(k_pos[:, None] <= q_pos[None, :], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - m[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@_jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DVOut, QPos, KPos, QueryStart, QueryFull,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   H, H_KV, GROUP, Lq, Lk, scale, qk_scale,
                   D: tl.constexpr, HEAD_DIM: tl.constexpr, DV: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    # Query rows before query_start see none of this key tile, rows from query_full on see all of it. The
    # rows in between straddle the causal boundary: visit them in masked tiles up to `mid`, the rest unmasked.
    query_start = tl.load(QueryStart + tile)
    query_full = tl.load(QueryFull + tile)
    if query_start == Lq:
        return
    mid = tl.minimum(query_start + tl.cdiv(query_full - query_start, BLOCK_M) * BLOCK_M, Lq)
    bh_kv = tl.program_id(1).to(tl.int64)
    b = bh_kv // H_KV
    h_kv = bh_kv % H_KV

    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < Lk
    d_ok = offs_d < D
    offs_dv = tl.arange(0, HEAD_DIM_V)
    dv_ok = offs_dv < DV
    k_mask = n_ok[:, None] & d_ok[None, :]
    v_mask = n_ok[:, None] & dv_ok[None, :]
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=k_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :],
                mask=v_mask, other=0.0)
    k_pos = tl.load(KPos + offs_n, mask=n_ok, other=0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)
    for g in range(GROUP):  # the query heads that share this key/value head
        h = h_kv * GROUP + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        Lse_h = Lse + (b * H + h) * Lq
        Delta_h = Delta + (b * H + h) * Lq
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, k_pos, Qh, DOh, Lse_h, Delta_h, QPos, stride_qm, stride_dom,
                                     Lq, qk_scale, query_start, mid, offs_d, d_ok, offs_dv, dv_ok, BLOCK_M, True,
                                     PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, k_pos, Qh, DOh, Lse_h, Delta_h, QPos, stride_qm, stride_dom,
                                 Lq, qk_scale, mid, Lq, offs_d, d_ok, offs_dv, dv_ok, BLOCK_M, False, PRECISION)

    dk_ptrs = DK + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DVOut + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :]
    tl.store(dk_ptrs, tl.load(dk_ptrs, mask=k_mask) + dk * scale, mask=k_mask)
    tl.store(dv_ptrs, tl.load(dv_ptrs, mask=v_mask) + dv, mask=v_mask)


@_jit
def _bwd_dq_inner(dq, q, do, m, delta, q_pos, K, V, KPos, stride_kn, stride_vn, Lk, qk_scale, lo, hi,
                  offs_d, d_ok, offs_dv, dv_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  PRECISION: tl.constexpr):
    """dq of one query tile from the key tiles starting in [lo, hi). MASKED tiles mask the causal entries
    and the keys past Lk: those load as zeros, but exp2(0 - lse) may overflow and inf * 0 is NaN."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = n_ok[None, :]
            if CAUSAL:
                k_pos = tl.load(KPos + offs_n, mask=n_ok, other=0)
                visible = visible & (k_pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s - m[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@_jit
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, QPos, KPos, KeyFull, KeyEnd,
                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm,
                 H, GROUP, Lq, Lk, scale, qk_scale,
                 D: tl.constexpr, HEAD_DIM: tl.constexpr, DV: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    key_full = tl.load(KeyFull + tile)
    key_end = tl.load(KeyEnd + tile)
    if key_end == 0:
        return
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    offs_dv = tl.arange(0, HEAD_DIM_V)
    dv_ok = offs_dv < DV
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    m = _lse_to_log2(tl.load(Lse + bh * Lq + offs_m, mask=m_ok, other=float("-inf")))
    delta = tl.load(Delta + bh * Lq + offs_m, mask=m_ok, other=0.0)
    q_pos = tl.load(QPos + offs_m, mask=m_ok, other=0)

    unmasked_end = key_full // BLOCK_N * BLOCK_N
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, m, delta, q_pos, K, V, KPos, stride_kn, stride_vn, Lk, qk_scale,
                       0, unmasked_end, offs_d, d_ok, offs_dv, dv_ok, BLOCK_N, False, CAUSAL, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, m, delta, q_pos, K, V, KPos, stride_kn, stride_vn, Lk, qk_scale,
                       unmasked_end, key_end, offs_d, d_ok, offs_dv, dv_ok, BLOCK_N, True, CAUSAL, PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, tl.load(dq_ptrs, mask=q_mask) + dq * scale, mask=q_mask)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, dk/dv and dq kernels, by input width and padded
# head dim. They are compiled for sm_90 and sm_80 with at most a few dozen bytes of register spills, but
# their speed is untuned: autotuning would rerun kernels that update their outputs in place. dk/dv
# programs own a large key tile and loop over small query tiles, dq programs the other way round. fp32
# dots run on CUDA cores (exact "ieee" products) with their operands in registers: smaller tiles.
_TILES = {
    "16bit": {
        64: dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 3), dq=(128, 32, 4, 3)),
        128: dict(fwd=(128, 32, 8, 2), dkdv=(32, 64, 8, 2), dq=(64, 32, 4, 2)),
        256: dict(fwd=(64, 32, 8, 2), dkdv=(16, 32, 8, 2), dq=(64, 16, 8, 2)),
    },
    "fp32": {
        32: dict(fwd=(64, 32, 4, 3), dkdv=(32, 64, 8, 3), dq=(64, 32, 4, 3)),
        64: dict(fwd=(64, 32, 8, 2), dkdv=(16, 64, 8, 1), dq=(64, 32, 8, 2)),
        128: dict(fwd=(32, 16, 8, 2), dkdv=(16, 64, 8, 1), dq=(32, 16, 8, 1)),
    },
}


def _launch_config(kernel: str, q: torch.Tensor, v: torch.Tensor, causal: bool, block_m, block_n) -> dict:
    """Constexprs and launch options of ``kernel``; ``block_m``/``block_n`` override the tile sizes. The value
    head dim has a padded width of its own (``HEAD_DIM_V``); the tiles follow the wider of the two."""
    head_dim, head_dim_v = (max(16, triton.next_power_of_2(t.shape[-1])) for t in (q, v))
    table = _TILES["fp32" if q.dtype == torch.float32 else "16bit"]
    fits = [hd for hd in table if hd >= max(head_dim, head_dim_v)]
    bm, bn, num_warps, num_stages = table[min(fits) if fits else max(table)][kernel]
    for block in (block_m, block_n):
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"tile sizes must be powers of two, at least 16 (for tl.dot); got {block}")
    return dict(D=q.shape[-1], HEAD_DIM=head_dim, DV=v.shape[-1], HEAD_DIM_V=head_dim_v, BLOCK_M=block_m or bm,
                BLOCK_N=block_n or bn, CAUSAL=causal, PRECISION=_precision(q.dtype), num_warps=num_warps,
                num_stages=num_stages)


def _tile_ends(pos: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position of each tile of ``block`` consecutive entries."""
    first = torch.arange(0, pos.numel(), block, device=pos.device)
    last = (first + block - 1).clamp_(max=pos.numel() - 1)
    return pos[first], pos[last]


def _key_bounds(q_pos, k_pos, block_m: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query tile (int32): keys [0, full) are visible to all of its rows, keys [end, Lk) to none."""
    if not causal:
        n_tiles = triton.cdiv(q_pos.numel(), block_m)
        full = torch.full((n_tiles,), k_pos.numel(), dtype=torch.int32, device=q_pos.device)
        return full, full
    first, last = _tile_ends(q_pos, block_m)
    return (torch.searchsorted(k_pos, first, right=True, out_int32=True),
            torch.searchsorted(k_pos, last, right=True, out_int32=True))


def _query_bounds(q_pos, k_pos, block_n: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key tile (int32): query rows [0, start) see none of its keys, rows [full, Lq) see all of them."""
    if not causal:
        zeros = torch.zeros(triton.cdiv(k_pos.numel(), block_n), dtype=torch.int32, device=k_pos.device)
        return zeros, zeros
    first, last = _tile_ends(k_pos, block_n)
    return (torch.searchsorted(q_pos, first, out_int32=True),
            torch.searchsorted(q_pos, last, out_int32=True))


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """Loads along the head dim must be contiguous to coalesce; any other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str:
    """Full fp32 products for fp32 inputs (tf32 would cost about 1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q, k, v, q_pos, k_pos, fp32_out: dict[str, tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    if triton is None:
        raise ImportError("the Triton attention kernels need triton, which is not installed")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"expected q [B, H, Lq, D], k [B, H_kv, Lk, D] and v [B, H_kv, Lk, Dv]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"k, v {tuple(k.shape)} do not fit q {tuple(q.shape)} (H must be a multiple of H_kv)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q_pos.shape != (lq,) or k_pos.shape != (k.shape[2],):
        raise ValueError(f"positions {tuple(q_pos.shape)}, {tuple(k_pos.shape)} do not match Lq={lq}, "
                         f"Lk={k.shape[2]}")
    if {q_pos.dtype, k_pos.dtype} != {torch.int64} or {q_pos.device, k_pos.device} != {q.device}:
        raise ValueError(f"positions must be int64 on {q.device}; got {q_pos.dtype} on {q_pos.device}, "
                         f"{k_pos.dtype} on {k_pos.device}")
    for name, (t, shape) in fp32_out.items():
        if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {shape}; got "
                             f"{t.dtype} {tuple(t.shape)}")


def triton_block_forward(q, k, v, out, lse, q_pos, k_pos, *, scale: float, causal: bool,
                         block_m: int | None = None, block_n: int | None = None) -> None:
    """Attend ``q`` [B, H, Lq, D] to the block ``k`` [B, H_kv, Lk, D], ``v`` [B, H_kv, Lk, Dv] and merge the
    result into the running ``out`` (fp32 [B, H, Lq, Dv]) and ``lse`` (fp32 [B, H, Lq], natural log) in place.

    ``q_pos`` and ``k_pos`` are the sorted int64 global positions of the rows. ``block_m``/``block_n``
    override the query/key tile sizes (powers of two, at least 16).
    """
    b, h, lq, d = q.shape
    h_kv, lk = k.shape[1], k.shape[2]
    _check(q, k, v, q_pos, k_pos, {"out": (out, (b, h, lq, v.shape[3])), "lse": (lse, (b, h, lq))})
    if lq == 0 or lk == 0 or b * h == 0:
        return
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    cfg = _launch_config("fwd", q, v, causal, block_m, block_n)
    key_full, key_end = _key_bounds(q_pos, k_pos, cfg["BLOCK_M"], causal)
    _attn_fwd[(triton.cdiv(lq, cfg["BLOCK_M"]), b * h)](
        q, k, v, out, lse, q_pos, k_pos, key_full, key_end,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        h, h // h_kv, lq, lk, scale * _LOG2E, **cfg,
    )


def triton_block_backward(q, k, v, do, lse, delta, dq, dk, dv, q_pos, k_pos, *, scale: float, causal: bool,
                          block_m: int | None = None, block_n: int | None = None) -> None:
    """Accumulate this block's gradients in place: ``dq`` (fp32 [B, H, Lq, D]) += ..., ``dk``, ``dv``
    (fp32, shaped as k and v) += ... (summed over the query heads of each GQA group); ``do`` is [B, H, Lq, Dv].

    ``lse`` is the final log-sum-exp of each query row over all blocks and ``delta = rowsum(dO * O)``
    (both fp32 [B, H, Lq]): with them this block's probabilities are recomputed exactly. Rows with
    ``lse == -inf`` contribute nothing. ``block_m``/``block_n`` override the query/key tile sizes of
    both kernels.
    """
    b, h, lq, d = q.shape
    h_kv, lk = k.shape[1], k.shape[2]
    if do.shape != (b, h, lq, v.shape[3]) or do.dtype != q.dtype:
        raise ValueError(f"do must be the output's shape {(b, h, lq, v.shape[3])} in q's dtype; got {do.dtype} "
                         f"{tuple(do.shape)}")
    _check(q, k, v, q_pos, k_pos, {"lse": (lse, (b, h, lq)), "delta": (delta, (b, h, lq)),
                                   "dq": (dq, (b, h, lq, d)), "dk": (dk, tuple(k.shape)), "dv": (dv, tuple(v.shape))})
    if lq == 0 or lk == 0 or b * h == 0:
        return
    q, k, v, do = _unit_stride(q), _unit_stride(k), _unit_stride(v), _unit_stride(do)
    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])

    cfg = _launch_config("dkdv", q, v, causal, block_m, block_n)
    query_start, query_full = _query_bounds(q_pos, k_pos, cfg["BLOCK_N"], causal)
    _attn_bwd_dkdv[(triton.cdiv(lk, cfg["BLOCK_N"]), b * h_kv)](
        q, k, v, do, lse, delta, dk, dv, q_pos, k_pos, query_start, query_full,
        *strides, *dk.stride()[:3], *dv.stride()[:3],
        h, h_kv, h // h_kv, lq, lk, scale, scale * _LOG2E, **cfg,
    )

    cfg = _launch_config("dq", q, v, causal, block_m, block_n)
    key_full, key_end = _key_bounds(q_pos, k_pos, cfg["BLOCK_M"], causal)
    _attn_bwd_dq[(triton.cdiv(lq, cfg["BLOCK_M"]), b * h)](
        q, k, v, do, lse, delta, dq, q_pos, k_pos, key_full, key_end,
        *strides, *dq.stride()[:3],
        h, h // h_kv, lq, lk, scale, scale * _LOG2E, **cfg,
    )
