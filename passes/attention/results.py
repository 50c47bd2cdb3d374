"""What the attention pass reports: a match (`AttentionMatch`), a refusal (`UnmatchedSoftmax`), and the
`NoMatch` a matcher raises to say why, with the hints that tell a user what would make it work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..fx import op_name, shape, value
from .canonical import NEG_INF

HINT_GENERAL = (
    "write attention as torch.nn.functional.scaled_dot_product_attention (attn_implementation='sdpa' "
    "for HuggingFace models), or as softmax((q @ k^T) * scale [+ mask], dim=-1) @ v"
)
HINT_SEQUENCE = (
    "a softmax over the sequence that is not attention mixes all positions, which ring attention "
    "cannot shard; keep that part (e.g. attention pooling) outside the module given to ringify"
)
HINT_WEIGHTS = (
    "do not return or reuse the attention probabilities (output_attentions=False for HuggingFace "
    "models, need_weights=False for nn.MultiheadAttention): ring attention never materialises them"
)


class NoMatch(Exception):
    """Raised by a matcher: `reason` (what it saw) and `hint` (what would make it work)."""

    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


def fmt(node: fx.Node) -> str:
    return f"`{node.name}` ({op_name(node)})"


def tensor_shape(node) -> tuple:
    """The shape of a tensor-valued node; a node without tensor metadata cannot be matched."""
    if not isinstance(value(node), torch.Tensor):
        raise NoMatch(f"no tensor metadata on `{getattr(node, 'name', node)}`", "capture with torch.export")
    return shape(node)


@dataclass
class AttentionMatch:
    """One attention found in a graph. Before `canonicalize_attention`, `output` is the node whose
    value the attention produces and query/key/value are the source tensors (see `layouts`); after,
    `output` is the `attention` call node and query/key/value/mask/sinks are its canonical inputs."""

    kind: str  # 'sdpa' | 'matmul' | 'bmm' | 'einsum' | 'mha' (any form inside nn.MultiheadAttention)
    form: str  # the op form: 'sdpa' | 'matmul' | 'bmm' | 'baddbmm' | 'einsum'
    output: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    scale: float
    causal: bool = False
    mask: fx.Node | None = None
    mask_kind: str | None = None
    fill: float = NEG_INF
    dropout_p: float = 0.0
    softcap: float = 0.0
    sinks: fx.Node | None = None  # per-query-head sink logits [H] (GPT-OSS); before the rewrite, their source
    gqa: bool = False
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    v_head_dim: int | None = None  # differs from head_dim in MLA (DeepSeek-V3)
    module_path: str = ""
    module_type: str = ""
    source: str = ""
    matched: set[str] = field(default_factory=set)
    layouts: dict[str, str] = field(default_factory=dict)
    _plan: Any = field(default=None, repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description, for reports (also stored as meta['ringify_attention'])."""

        def num(x):
            return x if isinstance(x, (int, float, type(None))) else str(x)

        return {
            "kind": self.kind,
            "form": self.form,
            "module_path": self.module_path,
            "module_type": self.module_type,
            "source": self.source,
            "scale": self.scale,
            "causal": self.causal,
            "mask": self.mask.name if self.mask is not None else None,
            "mask_kind": self.mask_kind,
            "fill": self.fill if self.mask_kind == "keep" else None,
            "dropout_p": self.dropout_p,
            "softcap": self.softcap,
            "sinks": self.sinks is not None,
            "gqa": self.gqa,
            "num_heads": num(self.num_heads),
            "num_kv_heads": num(self.num_kv_heads),
            "head_dim": num(self.head_dim),
            "v_head_dim": num(self.v_head_dim),
            "matched": sorted(self.matched),
        }


@dataclass
class UnmatchedSoftmax:
    """A softmax (or attention op) that looks like attention but could not be canonicalised."""

    node: fx.Node
    op: str
    module_path: str
    module_type: str
    source: str
    reason: str
    hint: str

    def message(self) -> str:
        where = self.module_path or "<root>"
        if self.module_type:
            where += f" ({self.module_type})"
        return (
            f"`{self.node.name}` ({self.op}) in module {where} at {self.source or '<unknown source>'}: "
            f"{self.reason}. Hint: {self.hint}"
        )


class AttentionMatches(list):
    """`list[AttentionMatch]`, plus what looked like attention but was not understood."""

    def __init__(self, matches=(), unmatched=()):
        super().__init__(matches)
        self.unmatched: list[UnmatchedSoftmax] = list(unmatched)

    @property
    def unmatched_softmax(self) -> list[fx.Node]:
        return [u.node for u in self.unmatched]
