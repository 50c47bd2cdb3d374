"""Find attention in a captured FX graph and replace each occurrence by ONE canonical node.

Input: a `torch.fx.GraphModule` from `torch.export.export(..., strict=False).module()` (training
IR, aten ops, every node with `meta['val']`). Two families are recognised:

* `aten.scaled_dot_product_attention` (SDPA) nodes (`sdpa`);
* hand-written attention, anchored on a softmax over the last dim (`softmax`, `scores`): q @ k^T in any
  of matmul / bmm / baddbmm / einsum, 2-D..4-D; div/mul scales, also folded into q and/or k; Gemma-2's
  soft-cap; masked_fill / where / additive masks (several: summed into one additive mask); a view
  splitting [B*H, S, S] scores into [B, H, S, S] and back (BLOOM); fp32 softmax casts; a max-subtraction;
  GPT-OSS's attention sinks; dropout; nn.MultiheadAttention's spellings.

Each match is rewritten (`rewrite`) into `attention(q, k, v, mask, scale=..., causal=..., mask_kind=...,
fill=..., dropout_p=..., [softcap=..., sinks=...])`, the custom op `ringify::attention` (`canonical`) on
canonical `[B, H, S, D]` tensors (k/v un-repeated: GQA through `repeat_kv` or `repeat_interleave` is
stripped; the value head dim may differ, MLA), with view/permute nodes inserted around it so the rest of
the graph sees the original layout (`layouts`) and, where it relied on them, the original output's
strides. One mask is kept as it is; several (ALiBi or T5's relative bias next to a padding mask) are
combined by inserted nodes into one additive mask (a later pass turns the mask subgraph into a block
mask); only `causal=True` from SDPA's `is_causal` sets `causal`.

A softmax over a sequence-sized dim (or fed by a product of two activations) that cannot be
understood is never left silently: `find_attention` lists it in `.unmatched`, and
`canonicalize_attention` raises `UnsupportedModelError` naming the op, module and source line.
"""

from .canonical import NEG_INF, attention, reference
from .find import find_attention
from .results import AttentionMatch, AttentionMatches, UnmatchedSoftmax
from .rewrite import canonicalize_attention

__all__ = [
    "NEG_INF",
    "attention",
    "reference",
    "AttentionMatch",
    "AttentionMatches",
    "UnmatchedSoftmax",
    "find_attention",
    "canonicalize_attention",
]
