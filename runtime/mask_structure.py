"""What a block mask is, in words, for reports: "causal", "sliding window 12", "causal + key padding".

A captured mask is a function of positions and of tensors the model computed (positions, padding,
document ids), so what it means shows only when it runs. At the first ring call with a mask, its keep-mask
is evaluated on a sample of query rows against every key of the sequence (a few dozen rows: cheap) and
the rows are read: the span of keys each sees, the keys every row misses (padding), spans that start
anew (packed documents). A description of a sample, for people; the kernels never rely on it.
"""

from __future__ import annotations

import torch

_descriptions: dict[str, str] = {}
_ROWS = 48


def described(key: str) -> str | None:
    """The description recorded for the block mask registered under ``key``, if it has run."""
    return _descriptions.get(key)


def describe_once(key: str, mask_fn, seq_len: int, causal: bool, device, piece: int | None = None) -> None:
    """Record a description of ``mask_fn`` (bound to its arguments) the first time ``key`` runs; ``piece``:
    the most queries or keys it is evaluated on at once (a shard's length: never more than the ring asks)."""
    if key in _descriptions:
        return
    try:
        _descriptions[key] = describe(mask_fn, seq_len, causal, device, piece)
    except Exception as err:  # noqa: BLE001 - a label for reports: never fail the call for it
        _descriptions[key] = f"block mask (not described: {type(err).__name__})"


def describe(mask_fn, seq_len: int, causal: bool, device="cpu", piece: int | None = None) -> str:
    rows = torch.unique(torch.cat([torch.linspace(0, seq_len - 1, _ROWS).round().long(),
                                   torch.tensor([0, 1, seq_len - 1])]).clamp_(0, seq_len - 1)).to(device)
    keys = torch.arange(seq_len, device=device)
    piece = piece or seq_len
    m = torch.cat([torch.cat([_broadcast(mask_fn(r, c), len(r), len(c)) for c in keys.split(piece)], -1)
                   for r in rows.split(piece)], -2)
    if m.is_floating_point():
        hidden = torch.isneginf(m) | (m <= -1e30)
        if not bool(hidden.any()):
            return "additive bias" + (" + causal" if causal else "")
        m = ~hidden
        bias = " (additive)"
    else:
        bias = ""
    m = m.reshape(-1, *m.shape[-2:]) if m.dim() > 2 else m.unsqueeze(0)  # [batch*heads, rows, keys]
    if causal:
        m = m & (keys[None, None, :] <= rows[None, :, None])
    return _words(m, rows) + bias


def _broadcast(m: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    shape = (1,) * (4 - m.dim()) + tuple(m.shape)
    return m.reshape(shape).expand(*shape[:2], lq, lk)


def _words(keep: torch.Tensor, rows: torch.Tensor) -> str:
    """Name keep-masks [N, R, S] seen by sample rows at positions ``rows``: the first structure that, with
    the keys it would show but no row sees taken out as padding, reproduces every sampled row exactly."""
    keys = torch.arange(keep.shape[-1], device=keep.device)
    q, k = rows[None, :, None], keys[None, None, :]
    lo = torch.where(keep, k, keep.shape[-1]).amin(-1, keepdim=True)  # [N, R, 1]: each row's first visible key
    causal = k <= q
    width = int(torch.where(keep.any(-1, keepdim=True) & (lo > 0), q - lo + 1, 0).amax())
    candidates = [("bidirectional", torch.ones_like(keep)), ("causal", causal)]
    if width > 0:
        candidates.append((f"sliding window {width}", causal & (k > q - width)))
    candidates.append(("causal, packed documents", causal & (k >= lo)))  # every row sees all of its own span
    for name, structure in candidates:
        fits, padded = _fits(keep, structure)
        if fits:
            return name + (" + key padding" if padded else "")
    return "causal, custom" if not bool((keep & ~causal).any()) else "custom"


def _fits(keep, structure) -> tuple[bool, bool]:
    """Whether ``keep`` is ``structure`` less some keys hidden from every row (padding), and whether any are."""
    seen = (keep & structure).any(-2, keepdim=True)
    padding = structure.any(-2, keepdim=True) & ~seen
    return bool((keep == (structure & ~padding)).all()), bool(padding.any())


__all__ = ["describe", "describe_once", "described"]
