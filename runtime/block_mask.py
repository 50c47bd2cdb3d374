"""Block masks: any attention mask, evaluated one piece of the (query, key) grid at a time.

A block-mask function tells the ring which keys each query may attend to, by *global* position::

    fn(q_pos: LongTensor[Lq], k_pos: LongTensor[Lk], *mask_args: Tensor) -> Tensor

``q_pos`` and ``k_pos`` are sorted global positions of a piece of this rank's queries and of the key
block being computed, already on the device of the attention inputs; ``mask_args`` are the tensors
passed as ``ring_attention(..., mask_args=...)`` (padding flags, document ids, a bias table...), which
the function indexes with the positions. The result must broadcast to ``[B, H, Lq, Lk]`` (leading dims
may be 1 or absent; H is the number of *query* heads) and is either

- a bool KEEP-mask: True = attend; the scores of the other keys become ``fill`` (-inf by default), or
- a floating ADDITIVE bias, added to the scaled scores (like the float ``attn_mask`` of SDPA).

The function is called once per piece (never with the whole sequence), so it must not assume that it
sees all positions at once.

A floating argument that requires grad is differentiated through an additive result: T5's relative
position bias (``weight[bucket(k_pos - q_pos)]``, ``weight`` [buckets, H]), learned ALiBi slopes, Swin's
bias table. The bias joins the scores after the scale (and the soft-cap), so its gradient is the
scores' ``dS = P * (dP - rowsum(dO * O))``; backward re-evaluates the function per piece with autograd on
and backpropagates each piece's ``dS`` into the argument (each rank its own queries' share, summed over
the ranks by the caller as ``sync_grad`` does). Nothing to mark: ``requires_grad`` is enough. Such
backwards run the plain-torch block kernels. Examples::

    def sliding_window(q_pos, k_pos):                       # with causal=True: q - window < k <= q
        return (q_pos[:, None] - k_pos[None, :]) < 256

    def key_padding(q_pos, k_pos, keep):                    # keep: bool [B, S], True = real token
        return keep[:, None, None, k_pos]                   # [B, 1, 1, Lk]

    def documents(q_pos, k_pos, doc):                       # doc: int [B, S] document id per token
        same = doc[:, q_pos, None] == doc[:, None, k_pos]   # [B, Lq, Lk]
        return (same & (k_pos[None, :] <= q_pos[:, None])).unsqueeze(1)

The ring op takes the function by key (a string, so that graphs holding the op stay exportable):
:func:`register_block_mask` gives the key, :func:`block_mask_fn` gives the function back. The registry
is local to the process: every rank registers its own functions (a program exported with a mask runs
only where the same key is registered again). Registered functions are kept alive for the life of the
process, so register a function once rather than creating a new closure per call.
"""

from __future__ import annotations

from typing import Callable

import torch

BlockMaskFn = Callable[..., torch.Tensor]

_functions: dict[str, BlockMaskFn] = {}
_keys: dict[int, str] = {}  # id(fn) -> key; the function itself stays referenced in _functions


@torch.compiler.assume_constant_result  # under torch.compile: registered while tracing, the key a constant
def register_block_mask(fn: BlockMaskFn) -> str:
    """Key under which ``fn`` is registered ("mask0", "mask1", ...); the same function gets the same key."""
    key = _keys.get(id(fn))
    if key is not None:
        return key
    if not callable(fn):
        raise TypeError(f"a block mask must be callable (q_pos, k_pos, *mask_args) -> Tensor, got {type(fn).__name__}")
    key = f"mask{len(_functions)}"
    _functions[key] = fn
    _keys[id(fn)] = key
    return key


def block_mask_fn(key: str) -> BlockMaskFn:
    """The function registered under ``key`` by :func:`register_block_mask` in this process."""
    try:
        return _functions[key]
    except KeyError:
        known = ", ".join(_functions) or "none"
        raise KeyError(
            f"no block mask registered under {key!r} in this process (registered: {known}); call "
            "ringify.runtime.register_block_mask(fn) on every rank before running the op"
        ) from None
