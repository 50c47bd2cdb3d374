"""The key/value cache of generation, sharded over the ranks of the ring, and attention over it.

Prefill is the ring forward of the prompt: each attention layer stores this rank's keys and values as
the model computed them (after RoPE or whatever else it applies): ceil(S/W) tokens per rank, at the
layout's global positions. Decoding then runs the model at one position on every rank (the ``LAST``
layout): each attention layer attends the new query to this rank's shard and the partial results merge
by log-sum-exp across the ranks, in fp32 (one all-gather per layer, the merge rule of the ring). The new
token's key and value join the shard of the rank that holds the fewest tokens, so the shards stay
balanced; every rank knows every rank's count, so they agree without a message.

A rewritten graph names its cache by a slot (a string, like block masks, so the graph stays plain);
:func:`bound` points a slot at the cache of one generation.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

from .block_attention import attend_keys, merge_partials
from .comm import all_gather_tensor, default_timeout, rank_and_size, resolve_group
from .layout import layout_positions, shard_lengths


def slots_per_rank(prompt: int, new_tokens: int, world: int) -> int:
    """Cache slots a rank needs: its share of the prompt (ceil(S/W) at most, in every layout), then of the decoded
    tokens (the last one is never run; fewest-first keeps the shares even), and one to spare."""
    return -(-int(prompt) // int(world)) + -(-max(int(new_tokens) - 1, 0) // int(world)) + 1


class ShardedKVCache:
    """This rank's keys and values of every attention layer (``[B, H_kv, capacity, D]`` and ``[B, H_kv, capacity,
    Dv]``: the value head dim may differ, as in multi-head latent attention) and their global
    positions, sorted: the prompt's under the ring's layout, then the decoded tokens this rank took."""

    def __init__(self, group: str, capacity: int):
        self.group = group
        self.rank, self.world = rank_and_size(resolve_group(group))
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.positions = torch.empty(0, dtype=torch.long)
        self.length = 0                      # tokens this rank holds (in every layer)
        self.counts = [0] * self.world       # tokens each rank holds
        self.appending = False               # the token being decoded joins this rank's shard
        self.q_pos = self.k_pos = None       # this step's positions (one tensor each, shared by the layers)
        self.checked: set[int] = set()       # layers whose attention was seen to hide later tokens

    # -- prefill
    def begin(self, seq_len: int, layout: str, device) -> None:
        """The prompt of ``seq_len`` tokens is about to fill the cache under ``layout``."""
        self.counts = shard_lengths(seq_len, self.world, layout)
        mine = layout_positions(seq_len, self.world, self.rank, layout)
        if len(mine) > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens per rank, the prompt puts {len(mine)} on rank {self.rank}")
        self.positions = torch.empty(self.capacity, dtype=torch.long, device=device)
        self.positions[: len(mine)] = mine.to(device)
        self.length = len(mine)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer ``layer``'s keys and values of this rank's prompt tokens (``[B, H_kv, n, D]``, ``[.., Dv]``)."""
        if k.shape[2] != self.length:
            raise ValueError(f"layer {layer}: {k.shape[2]} keys for the {self.length} prompt tokens of rank {self.rank}")
        for table, x in ((self.keys, k), (self.values, v)):
            buf = x.new_empty((*x.shape[:2], self.capacity, x.shape[3]))
            buf[:, :, : self.length] = x
            table[layer] = buf

    # -- decoding
    def step(self, position: int, append: bool) -> None:
        """Decoding the token at global ``position``; ``append``: its key/value join the cache (False when the
        prompt's last token is run again for its logits: its key/value are cached already)."""
        self.appending = False
        if append:
            owner = min(range(self.world), key=lambda r: (self.counts[r], r))
            self.counts[owner] += 1
            if owner == self.rank:
                if self.length == self.capacity:
                    raise RuntimeError(f"rank {self.rank}: the key/value cache is full ({self.capacity} tokens)")
                self.positions[self.length] = position
                self.length += 1
                self.appending = True
        self.q_pos = torch.tensor([position], dtype=torch.long, device=self.positions.device)
        self.k_pos = self.positions[: self.length]

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """(keys, values) this rank's shard holds for ``layer``, with the new token's ``k``/``v`` (``[B, H_kv, 1,
        D]``) written in when it joins this rank."""
        if layer not in self.keys:
            raise RuntimeError(f"layer {layer} has no cache: run the prefill first")
        keys, values = self.keys[layer], self.values[layer]
        if self.appending:
            keys[:, :, self.length - 1] = k[:, :, 0]
            values[:, :, self.length - 1] = v[:, :, 0]
        return keys[:, :, : self.length], values[:, :, : self.length]

    def nbytes(self) -> int:
        """Bytes of this rank's cache buffers (allocated for ``capacity`` tokens)."""
        return sum(t.numel() * t.element_size() for t in itertools.chain(self.keys.values(), self.values.values()))


_bound: dict[str, ShardedKVCache] = {}
_slots = itertools.count()


def new_slot() -> str:
    """A fresh slot name for a rewritten graph."""
    return f"kv{next(_slots)}"


@contextlib.contextmanager
def bound(slot: str, cache: ShardedKVCache):
    """Run graphs naming ``slot`` against ``cache``."""
    _bound[slot] = cache
    try:
        yield cache
    finally:
        _bound.pop(slot, None)


def cache_of(slot: str) -> ShardedKVCache:
    try:
        return _bound[slot]
    except KeyError:
        raise RuntimeError(f"no key/value cache is bound to {slot!r}: decoding graphs run inside rm.generate") from None


def store_kv(k: torch.Tensor, v: torch.Tensor, *, slot: str, layer: int) -> torch.Tensor:
    """Prefill: copy this rank's keys and values of ``layer`` into the cache. Returns an empty tensor (the prefill
    graph's output), so the layer's own k and v are freed once its attention has run."""
    cache_of(slot).store(layer, k, v)
    return k.new_empty(0)


def cache_attention(q, k, v, mask_args, *, slot: str, layer: int, mask_fn: str | None, scale: float, causal: bool,
                    fill: float, softcap: float, group: str, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the token being decoded (``q``: ``[B, H, 1, D]``) over the whole cache: this rank's shard,
    then the log-sum-exp merge of every rank's partial result (the same bits on every rank). ``sinks``
    (``[H]``, GPT-OSS) join the softmax once, in that merge, after every rank's part."""
    from .ring_attention import _bound_mask, _extended

    cache = cache_of(slot)
    if layer not in cache.checked:
        _check_causal(layer, mask_fn, mask_args, causal, int(cache.q_pos[0]) + 1, q.device)
        cache.checked.add(layer)
    keys, values = cache.attend(layer, k, v)
    extended = _extended(mask_fn or "", fill)
    out, lse = attend_keys(q, keys, values, cache.q_pos, cache.k_pos, scale=scale, causal=causal,
                           mask_fn=_bound_mask(mask_fn, mask_args), fill=fill, softcap=softcap)
    pg = resolve_group(group)
    if rank_and_size(pg)[1] == 1:
        outs, lses = [out], [lse]
    else:
        packed = torch.cat([out.flatten(), lse.flatten()])
        parts = all_gather_tensor(packed, pg, default_timeout(),
                                  f"merging layer {layer}'s decode attention over the ranks")
        n = out.numel()
        outs, lses = [p[:n].view(out.shape) for p in parts], [p[n:].view(lse.shape) for p in parts]
    if len(outs) == 1 and sinks is None:
        return out.to(q.dtype)
    merged, _ = merge_partials(outs, lses, extended, sinks)
    return merged.to(q.dtype)


def _check_causal(layer: int, mask_fn: str | None, mask_args, causal: bool, seq_len: int, device) -> None:
    """A cache holds each token's key/value as computed when the token came: right only if no token attends to
    later ones. Bidirectional attention is refused (the same verdict on every rank: the same mask, no message)."""
    if causal:
        return
    from .block_mask import block_mask_fn

    if mask_fn:
        n = min(seq_len, 16)
        pos = torch.arange(n, device=device)
        m = block_mask_fn(mask_fn)(pos, pos, *mask_args)
        visible = m if m.dtype == torch.bool else m > torch.finfo(torch.float32).min / 2
        visible = torch.broadcast_to(visible, (*visible.shape[:-2], n, n)).reshape(-1, n, n)
        if not bool(visible.triu(1).any()):
            return
    raise ValueError(f"attention layer {layer} lets tokens attend to later tokens (bidirectional): a key/value cache "
                     "cannot decode it. rm.generate needs a causal language model.")
