"""``aten.scaled_dot_product_attention``: already one node, so matching is reading its arguments.

`is_causal`, `attn_mask` (bool -> 'keep', float -> 'add'), `scale` (None -> D**-0.5), `dropout_p` and
`enable_gqa` come straight from the node; the layouts are the fixed ones SDPA documents. GQA spelled as
``repeat_kv`` / ``repeat_interleave`` before the call is undone by `resolve` like in any other form.
"""

from __future__ import annotations

import torch
from torch import fx

from ..fx import named_args, value
from .candidate import Candidate, MatchContext
from .layouts import Operand, batch_letters
from .results import NoMatch, tensor_shape


def match_sdpa(node: fx.Node, ctx: MatchContext) -> Candidate:
    a = named_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
        if isinstance(a.get(name), fx.Node):
            raise NoMatch(f"SDPA {name} is computed at run time")
    nd = len(tensor_shape(q))
    bl = batch_letters(nd, "scaled_dot_product_attention")
    if len(tensor_shape(k)) != nd or len(tensor_shape(v)) != nd:
        raise NoMatch("SDPA on query/key/value of different ranks")
    head_dim = tensor_shape(q)[-1]
    if a.get("scale") is not None:
        scale = float(a["scale"])
    elif isinstance(head_dim, int):
        scale = head_dim**-0.5
    else:
        raise NoMatch("SDPA without scale on a dynamic head dim", "pass scale= explicitly")
    mask_kind = None
    if mask is not None:
        mask_kind = "keep" if value(mask).dtype == torch.bool else "add"
    return Candidate(
        form="sdpa", anchor=node, out=node,
        q=Operand(q, bl + "SD"), k=Operand(k, bl + "KD"), v=Operand(v, bl + "KE"),
        score_layout=bl + "SK", out_layout=bl + "SE", region={node},
        scale=scale, causal=bool(a.get("is_causal", False)), dropout_p=float(a.get("dropout_p", 0.0)),
        mask=mask, mask_kind=mask_kind,
    )
