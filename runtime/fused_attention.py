"""Per-block attention from torch's own fused kernel that returns the log-sum-exp (CPU).

``aten._scaled_dot_product_flash_attention_for_cpu`` gives a block's output and log-sum-exp (GQA without
repeating k/v, an additive mask, ``is_causal``), and its backward takes the *global* output and
log-sum-exp: exactly this block's share of dq, dk, dv in a ring (PyTorch's context parallel calls the
CUDA flash ops the same way). A block pair (this rank's queries, one key/value block) is cut into tiles
of ``TILE`` queries by ``TILE`` keys, each classified from the positions and the block mask, as
FlexAttention's block mask does: no key visible -> skipped; every key visible -> no mask; the aligned
causal diagonal -> ``is_causal``; partly visible -> a mask tile. Consecutive tiles of one kind along the
keys, and query tiles with the same fully visible keys, run as one call.

The contract is :mod:`.block_attention`'s (sorted global positions, the running fp32 ``out``/``lse``
merged in place, the two-part state with a block mask or a finite fill), and so are the results, to
rounding. A hidden key (its score ``fill``, or a bias at or below ``HIDDEN``) weighs exactly nothing in
fp32 next to a visible one, so its tiles are skipped for query tiles whose every row sees its own
position: in a ring the blocks together hold every position of the queries, so such a row has a
visible key somewhere. A row that may see no key at all gets the softmax over filled scores that the
model computes (uniform, or over the bias): its query tile runs the plain-torch kernels, exact.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass

import torch

from . import block_attention
from .layout import contiguous_runs

TILE = 256
HIDDEN = -1e30  # a bias or fill at or below this is "hidden": exp(HIDDEN + any sane score - row max) == 0 in fp32
_MASK_CHUNK = 4  # key tiles per block-mask evaluation (bounds the mask's memory at TILE x 4 TILE)

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class _CPU:
    """``aten._scaled_dot_product_flash_attention_for_cpu``: GQA as it is, an additive fp32 mask, fp32 compute
    (16-bit inputs are upcast per block: the ring's fp32 merge then sees fp32 pieces)."""

    compute = torch.float32

    @staticmethod
    def forward(q, k, v, causal: bool, bias, scale: float):
        return _flash(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)

    @staticmethod
    def backward(do, q, k, v, out, lse, causal: bool, bias, scale: float):
        return _flash_backward(do, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)


class _CUDA:
    """``aten._scaled_dot_product_efficient_attention`` (the memory-efficient kernel: an additive mask and
    the log-sum-exp; its backward takes the global output and log-sum-exp, as PyTorch's context parallel
    calls it). Inputs in their own dtype; GQA by expanding k/v heads (views) and summing dk/dv per group.
    Opt-in (``RINGIFY_KERNEL=fused`` on CUDA); ``benchmarks/gpu_kernels.py`` measures and checks it."""

    compute = None  # the inputs' dtype

    @staticmethod
    def forward(q, k, v, causal: bool, bias, scale: float):
        (k, v), _ = _CUDA._expand(q, k, v)
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], -1, -1), True, 0.0,
            causal, scale=scale)
        return out, lse[..., : q.shape[2]].float()

    @staticmethod
    def backward(do, q, k, v, out, lse, causal: bool, bias, scale: float):
        (ke, ve), group = _CUDA._expand(q, k, v)
        attn_bias = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], -1, -1)
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            do, q, ke, ve, attn_bias, out, lse.contiguous(), zero, zero, 0.0, [True, True, True, False], causal,
            scale=scale)
        if group > 1:
            dk, dv = (t.unflatten(1, (k.shape[1], group)).sum(2) for t in (dk, dv))
        return dq, dk, dv

    @staticmethod
    def _expand(q, k, v):
        group = q.shape[1] // k.shape[1]
        if group == 1:
            return (k, v), 1
        return (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)), group


_BACKENDS = {"cpu": _CPU, "cuda": _CUDA}

FULL, CAUSAL, PARTIAL, EMPTY = "full", "causal", "partial", "empty"


@dataclass
class Piece:
    """Queries ``qs:qs+ql`` against keys ``ks:ks+kl`` of the block, in one fused call."""

    qs: int
    ql: int
    ks: int
    kl: int
    kind: str           # FULL (no mask), CAUSAL (aligned diagonal: is_causal) or PARTIAL (a mask tile)
    safe: bool = True   # PARTIAL: every query row sees its own position (a bias at or below HIDDEN hides)


def available(device_type: str, opt_in: bool = False) -> bool:
    """CPU by default; CUDA only when asked for (its path is checked by benchmarks/gpu_kernels.py on a GPU)."""
    return device_type == "cpu" or (opt_in and device_type in _BACKENDS)


def supports(mask_fn, fill: float, softcap: float) -> bool:
    """What the fused kernel takes: no soft-cap; a fill of -inf or one that hides (<= HIDDEN)."""
    return not softcap and (fill == float("-inf") or fill <= HIDDEN)


# ------------------------------------------------------------------------------------------- the plan


def _mask_4d(m, b: int, h: int, ql: int, kl: int) -> torch.Tensor:
    """A block mask's result as a 4-D tensor broadcasting to [B, H, ql, kl] (leading dims may be 1)."""
    if not isinstance(m, torch.Tensor) or not (m.dtype == torch.bool or m.is_floating_point()):
        what = f"a {m.dtype} tensor" if isinstance(m, torch.Tensor) else type(m).__name__
        raise TypeError(f"a block mask must return a bool keep-mask or a floating additive bias, got {what}")
    shape = (1,) * (4 - m.dim()) + tuple(m.shape)
    if len(shape) != 4 or shape[0] not in (1, b) or shape[1] not in (1, h) or shape[2] not in (1, ql) \
            or shape[3] not in (1, kl):
        raise ValueError(
            f"a block mask returned shape {tuple(m.shape)} for a piece of {ql} queries and {kl} keys; it must "
            f"broadcast to [B, H, Lq, Lk] = [{b}, {h}, {ql}, {kl}] (leading dims may be 1 or absent)")
    return m.reshape(shape).expand(shape[0], shape[1], ql, kl)


def _tiles(length: int, runs) -> list[tuple[int, int]]:
    """Index ranges of at most TILE that never straddle a break in the positions (a run boundary)."""
    out = []
    for start, n in runs:
        out += [(s, min(TILE, start + n - s)) for s in range(start, start + n, TILE)]
    return out


def _runs(pos_cpu: torch.Tensor) -> list[tuple[int, int]]:
    runs = contiguous_runs(pos_cpu)
    return runs if len(runs) <= 16 else [(0, len(pos_cpu))]  # striped: tiles ignore the runs, masks decide


class _Mask:
    """The keep/bias of (query tile, key tile) pairs: positions (causal) and the block mask, evaluated
    once per query tile and chunk of key tiles."""

    def __init__(self, q_pos, k_pos, causal: bool, mask_fn, fill: float, dims):
        self.q_pos, self.k_pos, self.causal, self.mask_fn, self.fill = q_pos, k_pos, causal, mask_fn, fill
        self.b, self.h = dims
        self._chunk = None

    def tile(self, qs, ql, k_tiles, j):
        """(keep bool or None, bias fp32 or None) of query tile ``qs`` against key tile ``k_tiles[j]``, both
        [B|1, H|1, ql, kl]; None = no key hidden / no bias."""
        ks, kl = k_tiles[j]
        keep, bias = None, None
        if self.causal:
            keep = (self.k_pos[ks:ks + kl].unsqueeze(0) <= self.q_pos[qs:qs + ql].unsqueeze(1)).view(1, 1, ql, kl)
        if self.mask_fn is not None:
            first = j - j % _MASK_CHUNK
            key = (qs, first)
            if self._chunk is None or self._chunk[0] != key:
                tiles = k_tiles[first:first + _MASK_CHUNK]
                start, stop = tiles[0][0], tiles[-1][0] + tiles[-1][1]
                span = self.k_pos[start:stop] if all(a[0] + a[1] == b[0] for a, b in zip(tiles, tiles[1:])) else \
                    torch.cat([self.k_pos[s:s + n] for s, n in tiles])
                m = _mask_4d(self.mask_fn(self.q_pos[qs:qs + ql], span), self.b, self.h, ql, len(span))
                self._chunk = (key, m, {t: sum(n for _, n in tiles[:i]) for i, t in enumerate(tiles)})
            _, m, offsets = self._chunk
            at = offsets[(ks, kl)]
            m = m[..., at:at + kl]
            if m.dtype == torch.bool:
                keep = m if keep is None else keep & m
            else:
                bias = m.float()
        return keep, bias


def _classify(keep, bias, safe: bool):
    """EMPTY, FULL or PARTIAL for a tile's keep/bias. A bias at or below HIDDEN hides only where the query
    tile is ``safe`` (every row sees its own position); -inf hides everywhere."""
    if keep is not None and not bool(keep.any()):
        return EMPTY
    hidden = None
    if bias is not None:
        hidden = torch.isneginf(bias) | (bias <= HIDDEN) if safe else torch.isneginf(bias)
        if keep is not None:
            hidden = hidden | ~keep
        if bool(hidden.all()):
            return EMPTY
        if not bool(hidden.any()) and not bool(bias.any()):
            return FULL
        return PARTIAL
    return FULL if keep is None or bool(keep.all()) else PARTIAL


def _bias_of(keep, bias, safe: bool) -> torch.Tensor:
    """The additive fp32 tile a PARTIAL piece runs with (-inf where hidden)."""
    if bias is None:
        return torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))
    out = bias.clone()
    if safe:
        out.masked_fill_(out <= HIDDEN, float("-inf"))
    if keep is not None:
        out = out.masked_fill(~keep, float("-inf"))
    return out


def _aligned_causal(qs, ql, ks, kl, q_pos, k_pos, keep, bias) -> bool:
    """Whether a tile is exactly the causal diagonal of the same positions (is_causal, no mask needed)."""
    if bias is not None or keep is None or ql != kl or not torch.equal(q_pos[qs:qs + ql], k_pos[ks:ks + kl]):
        return False
    tril = torch.ones(ql, kl, dtype=torch.bool, device=keep.device).tril_()
    return bool((keep == tril).all())


def safe_rows(q_pos, causal: bool, mask_fn, fill: float, dims) -> tuple[torch.Tensor | None, bool]:
    """(per query: whether it sees its own position, whether the block mask is an additive bias).

    A row that sees its own position (causal, and the block mask's diagonal) always has a visible key, so
    its hidden keys weigh exactly nothing, whatever their fill. None: every row (no block mask)."""
    if mask_fn is None:
        return None, False
    b, h = dims
    rows, is_bias = [], False
    for qs, ql in [(s, min(TILE, len(q_pos) - s)) for s in range(0, len(q_pos), TILE)]:
        p = q_pos[qs:qs + ql]
        m = _mask_4d(mask_fn(p, p), b, h, ql, ql).diagonal(dim1=-2, dim2=-1)  # [B|1, H|1, ql]
        is_bias = is_bias or m.is_floating_point()
        seen = m if m.dtype == torch.bool else m > HIDDEN
        rows.append(seen.reshape(-1, ql).all(0))
    return torch.cat(rows), is_bias


def _run_pieces(q_cpu, k_cpu, causal: bool) -> list[Piece] | None:
    """Pieces over whole runs of positions when no block mask is involved: every (query run, key run) pair
    is fully visible, hidden, or the aligned causal diagonal (the zigzag and contiguous layouts: runs of
    different ranks never interleave). None when some pair is none of these (then tiles decide)."""
    if not causal:
        return [Piece(0, len(q_cpu), 0, len(k_cpu), FULL)]
    q_runs, k_runs = contiguous_runs(q_cpu), contiguous_runs(k_cpu)
    if len(q_runs) * len(k_runs) > 16:
        return None
    pieces = []
    for qs, ql in q_runs:
        for ks, kl in k_runs:
            q_first, q_last, k_first, k_last = int(q_cpu[qs]), int(q_cpu[qs + ql - 1]), int(k_cpu[ks]), \
                int(k_cpu[ks + kl - 1])
            if k_last <= q_first:
                pieces.append(Piece(qs, ql, ks, kl, FULL))
            elif k_first > q_last:
                continue
            elif (qs, ql, q_first) == (ks, kl, k_first) or (ql == kl and q_first == k_first):
                pieces.append(Piece(qs, ql, ks, kl, CAUSAL))
            else:
                return None
    return pieces


def plan(q_pos, k_pos, causal: bool, mask_fn, fill: float, dims, safe=(None, False)):
    """(pieces, exact) for a block pair: the fused pieces, and the query tiles (start, length) that must
    run the plain-torch kernels instead: rows that may see no key while a finite fill or a finite bias
    counts (the softmax over the filled scores needs the two-part state). ``safe``: :func:`safe_rows`.

    Tiles are classified one by one; then each (query run, key run) pair whose tiles are all visible,
    all hidden, or exactly the causal staircase of the same positions becomes one call (a causal mask
    spelled as a block mask runs as ``causal=True`` does), and the rest run tile by tile."""
    q_cpu, k_cpu = q_pos.cpu(), k_pos.cpu()
    if mask_fn is None:  # positions alone decide: whole runs where they can (one call for a causal diagonal)
        pieces = _run_pieces(q_cpu, k_cpu, causal)
        if pieces is not None:
            return pieces, []
    q_runs, k_runs = _runs(q_cpu), _runs(k_cpu)
    q_tiles, k_tiles = _tiles(len(q_cpu), q_runs), _tiles(len(k_cpu), k_runs)
    rows_safe, is_bias = safe
    finite = fill != float("-inf") or is_bias
    masks = _Mask(q_pos, k_pos, causal, mask_fn, fill, dims)
    exact, grid = [], []  # grid[i][j]: (kind, keep, bias) of query tile i and key tile j; None: exact row
    for qs, ql in q_tiles:
        tile_safe = rows_safe is None or bool(rows_safe[qs:qs + ql].all())
        if finite and not tile_safe:
            exact.append((qs, ql))
            grid.append(None)
            continue
        row = []
        for j, (ks, kl) in enumerate(k_tiles):
            keep, bias = masks.tile(qs, ql, k_tiles, j)
            kind = _classify(keep, bias, tile_safe)
            if kind == PARTIAL and _aligned_causal(qs, ql, ks, kl, q_pos, k_pos, keep, bias):
                kind = CAUSAL
            row.append((kind, tile_safe))  # the mask tile itself is evaluated again when it runs: O(TILE^2) alive
        grid.append(row)
    pieces: list[Piece] = []
    fine: set[tuple[int, int]] = set()  # (query tile, key tile) pairs left to run tile by tile
    for qr in _tile_spans(q_runs, q_tiles):
        for kr in _tile_spans(k_runs, k_tiles):
            whole = _whole_run(grid, qr, kr, q_tiles, k_tiles, q_cpu, k_cpu)
            if whole is not None:
                pieces += whole
            else:
                fine |= {(i, j) for i in qr for j in kr}
    pieces += _tile_pieces(grid, fine, q_tiles, k_tiles)
    return pieces, exact


def _tile_spans(runs, tiles) -> list[range]:
    """For each run of positions, the range of tile indices that cut it."""
    spans, i = [], 0
    for start, n in runs:
        first = i
        while i < len(tiles) and tiles[i][0] < start + n:
            i += 1
        spans.append(range(first, i))
    return spans


def _whole_run(grid, qr: range, kr: range, q_tiles, k_tiles, q_cpu, k_cpu) -> list[Piece] | None:
    """One piece (or none) for a (query run, key run) pair whose tiles are uniform: all FULL, all EMPTY, or
    the causal staircase of identical positions; None otherwise (or when a row runs the torch kernels)."""
    rows = [grid[i] for i in qr]
    if any(r is None for r in rows):
        return None
    kinds = [[rows[a][j][0] for j in kr] for a in range(len(qr))]
    qs, ks = q_tiles[qr[0]][0], k_tiles[kr[0]][0]
    ql = q_tiles[qr[-1]][0] + q_tiles[qr[-1]][1] - qs
    kl = k_tiles[kr[-1]][0] + k_tiles[kr[-1]][1] - ks
    flat = {k for row in kinds for k in row}
    if flat == {EMPTY}:
        return []
    if flat == {FULL}:
        return [Piece(qs, ql, ks, kl, FULL)]
    if len(qr) == len(kr) and ql == kl and torch.equal(q_cpu[qs:qs + ql], k_cpu[ks:ks + kl]) and all(
            kinds[a][b] == (FULL if b < a else CAUSAL if b == a else EMPTY)
            for a in range(len(qr)) for b in range(len(kr))):
        return [Piece(qs, ql, ks, kl, CAUSAL)]
    return None


def _tile_pieces(grid, fine: set, q_tiles, k_tiles) -> list[Piece]:
    """Pieces tile by tile: per query tile, runs of consecutive FULL key tiles as one call, CAUSAL and PARTIAL
    tiles alone; then query tiles with the same fully visible key ranges, one after another, as one call."""
    pieces, full_rows = [], []
    for i, (qs, ql) in enumerate(q_tiles):
        if grid[i] is None:
            continue
        full, j = [], 0
        while j < len(k_tiles):
            if (i, j) not in fine:
                j += 1
                continue
            kind, tile_safe = grid[i][j]
            ks, kl = k_tiles[j]
            if kind == FULL:
                end = j
                while end + 1 < len(k_tiles) and (i, end + 1) in fine and grid[i][end + 1][0] == FULL and \
                        k_tiles[end][0] + k_tiles[end][1] == k_tiles[end + 1][0]:
                    end += 1
                full.append((ks, k_tiles[end][0] + k_tiles[end][1] - ks))
                j = end + 1
                continue
            if kind == CAUSAL:
                pieces.append(Piece(qs, ql, ks, kl, CAUSAL))
            elif kind == PARTIAL:
                pieces.append(Piece(qs, ql, ks, kl, PARTIAL, tile_safe))
            j += 1
        full_rows.append((qs, ql, tuple(full)))
    i = 0
    while i < len(full_rows):
        qs, ql, full = full_rows[i]
        end = i
        while end + 1 < len(full_rows) and full_rows[end + 1][2] == full and \
                full_rows[end][0] + full_rows[end][1] == full_rows[end + 1][0]:
            end += 1
        rows = full_rows[end][0] + full_rows[end][1] - qs
        pieces += [Piece(qs, rows, ks, kl, FULL) for ks, kl in full]
        i = end + 1
    return pieces


# --------------------------------------------------------------------------------------------- kernels


def _extended(mask_fn, fill: float) -> bool:
    return mask_fn is not None or fill != float("-inf")


_PLANS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_PLAN_CACHE = 32  # block pairs: every layer of a forward and its backward read the same few


def cached_plan(plan_key, q_pos, k_pos, causal: bool, mask_fn, fill: float, dims):
    """:func:`plan` (with :func:`safe_rows`), computed once for all the attention layers of a step: they share
    the mask and its arguments, so the classification is the same. ``plan_key``: (mask key, mask
    arguments), or None (no cache). An entry holds weak references to the arguments and their versions,
    so a tensor freed, modified in place, or a new one at the same address never hits a stale plan."""
    def compute():
        safe = safe_rows(q_pos, causal, mask_fn, fill, dims) if _extended(mask_fn, fill) else (None, False)
        return plan(q_pos, k_pos, causal, mask_fn, fill, dims, safe)

    if plan_key is None or mask_fn is None:
        return compute()
    mask, args = plan_key
    tensors = (q_pos, k_pos, *args)
    key = (mask, causal, fill, dims, TILE, tuple((id(t), t._version) for t in tensors))
    hit = _PLANS.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
        _PLANS.move_to_end(key)
        return hit[1]
    result = compute()
    _PLANS[key] = (tuple(weakref.ref(t) for t in tensors), result)
    while len(_PLANS) > _PLAN_CACHE:
        _PLANS.popitem(last=False)
    return result


def _tile_bias(p: Piece, q_pos, k_pos, causal: bool, mask_fn, dims):
    """(additive fp32 mask tile or None, rows that see no key in it or None) for a piece, evaluated now."""
    if p.kind != PARTIAL:
        return None, None
    keep, bias = _Mask(q_pos, k_pos, causal, mask_fn, 0.0, dims).tile(p.qs, p.ql, [(p.ks, p.kl)], 0)
    b = _bias_of(keep, bias, p.safe)
    empty = torch.isneginf(b).all(-1)
    return b, (empty if bool(empty.any()) else None)


def fused_block_forward(q, k, v, out, lse, q_pos, k_pos, *, scale: float, causal: bool, mask_fn=None,
                        fill: float = float("-inf"), softcap: float = 0.0, plan_key=None) -> None:
    """Attend ``q`` to the block (``k``, ``v``) and merge into (``out``, ``lse``) in place; the arguments
    and the state are those of :func:`ringify.runtime.block_attention.torch_block_forward` (``plan_key``:
    see :func:`cached_plan`)."""
    if not supports(mask_fn, fill, softcap):
        return block_attention.torch_block_forward(q, k, v, out, lse, q_pos, k_pos, scale=scale, causal=causal,
                                                   mask_fn=mask_fn, fill=fill, softcap=softcap)
    extended = _extended(mask_fn, fill)
    dims = (q.shape[0], q.shape[1])
    pieces, exact = cached_plan(plan_key, q_pos, k_pos, causal, mask_fn, fill, dims)
    backend = _BACKENDS[q.device.type]
    dv = v.shape[-1]
    q32, k32, v32 = _widened([_as(t, backend.compute) for t in (q, k, v)], max(q.shape[-1], dv))
    for p in pieces:
        bias, empty_rows = _tile_bias(p, q_pos, k_pos, causal, mask_fn, dims)
        o, l = backend.forward(q32[:, :, p.qs:p.qs + p.ql], k32[:, :, p.ks:p.ks + p.kl], v32[:, :, p.ks:p.ks + p.kl],
                               p.kind == CAUSAL, bias, scale)
        o = o[..., :dv]
        if empty_rows is not None:  # the fused kernel gives those rows log-sum-exp 0 (and output 0)
            l = l.masked_fill(empty_rows.expand(l.shape), float("-inf"))
        _merge(out[:, :, p.qs:p.qs + p.ql], lse[..., p.qs:p.qs + p.ql], o, l, extended)
    for qs, ql in exact:
        block_attention.torch_block_forward(q[:, :, qs:qs + ql], k, v, out[:, :, qs:qs + ql], lse[..., qs:qs + ql],
                                            q_pos[qs:qs + ql], k_pos, scale=scale, causal=causal, mask_fn=mask_fn,
                                            fill=fill)


class _LazyDelta:
    """``rowsum(dO * O)`` computed for the rows asked for (``delta[..., rows]``), only when asked."""

    def __init__(self, do, out):
        self.do, self.out = do, out

    def __getitem__(self, index):
        index = index[-1] if isinstance(index, tuple) else index
        index = slice(None) if index is Ellipsis else index
        return (self.do[:, :, index].float() * self.out[:, :, index].float()).sum(-1)


def _as(t: torch.Tensor, dtype) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _widened(tensors, width: int) -> list[torch.Tensor]:
    """Tensors padded with zero columns to head dim ``width``. torch's fused kernels want one head dim for q,
    k and v; with a value head dim of its own (multi-head latent attention) the narrower side is padded:
    zero columns of q and k add exactly 0 to every score, zero columns of v give output columns of 0 (and
    the gradients of the padding are dropped), so the sliced result is exact."""
    return [t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in tensors]


def _merge(out, lse, o, l, extended: bool) -> None:
    """Merge a piece's (output, log-sum-exp) into the running state, in place, in fp32 (into a state that has
    seen nothing yet: a copy)."""
    if bool(torch.isneginf(lse[0] if extended else lse).all()):
        out.copy_(o)
        if extended:
            lse[0].copy_(l)
            lse[1].zero_()
        else:
            lse.copy_(l)
        return
    if not extended:
        new = torch.logaddexp(lse, l)
        safe = block_attention._finite(new)
        out.copy_(out * torch.exp(lse - safe).unsqueeze(-1) + o * torch.exp(l - safe).unsqueeze(-1))
        lse.copy_(new)
        return
    hi, lo = lse[0], lse[1]
    new_hi = torch.maximum(hi, l)
    safe = block_attention._finite(new_hi)
    w_old = torch.exp(hi - safe + lo)
    w_new = torch.exp(l - safe)
    total = w_old + w_new
    norm = torch.where(total > 0, total, 1.0)
    out.copy_((out * w_old.unsqueeze(-1) + o * w_new.unsqueeze(-1)) / norm.unsqueeze(-1))
    hi.copy_(new_hi)
    lo.copy_(torch.log(norm))


def fused_block_backward(q, k, v, do, lse, delta, dq, dk, dv, q_pos, k_pos, *, scale: float, causal: bool,
                         mask_fn=None, fill: float = float("-inf"), softcap: float = 0.0, out=None,
                         plan_key=None) -> None:
    """This block's share of dq (into ``dq``) and of dk, dv (into ``dk``, ``dv``), in place, from the global
    output ``out`` and log-sum-exp ``lse`` (the fused backward recomputes the probabilities from them).
    A block mask whose arguments are differentiated (:class:`.block_attention.MaskGradients`: T5's relative
    position bias) runs the plain-torch kernels: torch's fused backward does not give dS, the bias's gradient."""
    if delta is None:  # rowsum(dO * O), which only the plain-torch kernels below need
        delta = _LazyDelta(do, out)
    if out is None or not supports(mask_fn, fill, softcap) or hasattr(mask_fn, "accumulate"):
        # a MaskGradients (gradients into the mask's arguments) needs dS per piece: the fused backward has none
        return block_attention.torch_block_backward(q, k, v, do, lse, delta[...], dq, dk, dv, q_pos, k_pos,
                                                    scale=scale, causal=causal, mask_fn=mask_fn, fill=fill,
                                                    softcap=softcap)
    extended = _extended(mask_fn, fill)
    dims = (q.shape[0], q.shape[1])
    pieces, exact = cached_plan(plan_key, q_pos, k_pos, causal, mask_fn, fill, dims)
    total = lse[0] + lse[1] if extended else lse
    total = torch.where(torch.isneginf(total), float("inf"), total)  # rows that saw no key: probabilities 0
    backend = _BACKENDS[q.device.type]
    d, d_v = q.shape[-1], v.shape[-1]
    q32, k32, v32, do32, out32 = _widened([_as(t, backend.compute) for t in (q, k, v, do, out)], max(d, d_v))
    for p in pieces:
        rows, keys = slice(p.qs, p.qs + p.ql), slice(p.ks, p.ks + p.kl)
        bias, _ = _tile_bias(p, q_pos, k_pos, causal, mask_fn, dims)
        gq, gk, gv = backend.backward(do32[:, :, rows], q32[:, :, rows], k32[:, :, keys], v32[:, :, keys],
                                      out32[:, :, rows], total[..., rows].contiguous(), p.kind == CAUSAL, bias, scale)
        dq[:, :, rows] += gq[..., :d]
        dk[:, :, keys] += gk[..., :d]
        dv[:, :, keys] += gv[..., :d_v]
    for qs, ql in exact:
        rows = slice(qs, qs + ql)
        block_attention.torch_block_backward(q[:, :, rows], k, v, do[:, :, rows], lse[..., rows], delta[..., rows],
                                             dq[:, :, rows], dk, dv, q_pos[rows], k_pos, scale=scale, causal=causal,
                                             mask_fn=mask_fn, fill=fill)


__all__ = ["HIDDEN", "Piece", "TILE", "available", "fused_block_backward", "fused_block_forward", "plan",
           "safe_rows", "supports"]
