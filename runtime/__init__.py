"""What runs on the devices: the ring, its per-block kernels, and the sequence layouts."""

from .block_mask import block_mask_fn, register_block_mask
from .comm import RingInputError, RingTimeoutError, default_timeout, set_default_timeout
from .layout import LAYOUTS, layout_positions, shard_lengths
from .ring_attention import ring_attention
from .sequence import gather_sequence, shard_sequence

__all__ = [
    "LAYOUTS",
    "RingInputError",
    "RingTimeoutError",
    "block_mask_fn",
    "default_timeout",
    "gather_sequence",
    "layout_positions",
    "register_block_mask",
    "ring_attention",
    "set_default_timeout",
    "shard_lengths",
    "shard_sequence",
]
