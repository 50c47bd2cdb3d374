"""The canonical attention: the one op every spelling of attention is rewritten into.

It is registered as the custom op ``ringify::attention`` (``torch.library``) rather than left a Python
function, so that a canonicalised graph keeps each attention as one opaque node through fake-tensor
propagation, ``torch.export`` and ``torch.compile``: the fake kernel gives the output shape (``[B, H, Sq, Dv]``)
without materialising the ``[Sq, Sk]`` scores, and the later passes find the node by its target. The
implementation is :func:`reference`, the single-device semantics that the ring must reproduce exactly.

The backward recomputes :func:`reference` under autograd (a reference is not a kernel: it trades a second
forward for not keeping the probabilities); a dropout mask is redrawn from the random state the forward
started from, so the gradient is that of the forward that ran.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")

__all__ = ["NEG_INF", "attention", "reference"]


def reference(q, k, v, mask=None, sinks=None, *, scale: float, causal: bool = False, mask_kind: str | None = None,
              fill: float | None = None, dropout_p: float = 0.0, softcap: float = 0.0) -> torch.Tensor:
    """Canonical attention. q [B,H,Sq,D]; k [B,H_kv,Sk,D], v [B,H_kv,Sk,Dv] with H % H_kv == 0 (GQA: query
    head h reads kv head h // (H//H_kv)), un-repeated; Dv may differ from D (MLA). Result [B,H,Sq,Dv].

    mask broadcastable to [B,H,Sq,Sk]: mask_kind 'keep' (bool, True=attend; other scores become `fill`,
    None = -inf), 'add' (float bias added to the scaled scores), or None.
    causal: key j visible to query i iff j <= i (positions), combined with the mask by AND; masked
    causal scores are -inf. softcap (0 = off): scaled scores become softcap * tanh(s / softcap)
    before the mask. sinks [H] (attention sinks, GPT-OSS): one extra logit per query head that takes
    part in the softmax normalisation and is dropped afterwards (it attends to nothing).
    Half-precision inputs are computed in fp32; the result has q's dtype.
    A query row with no visible key (every score -inf, and no sink) gives 0 with zero gradients, as SDPA
    does (a hand-written softmax would give NaN there).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-2, -1)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        if mask_kind == "keep":
            if mask.dtype != torch.bool:
                raise TypeError(f"attention: a 'keep' mask must be bool, got {mask.dtype}")
            s = s.masked_fill(mask.logical_not(), NEG_INF if fill is None else fill)
        elif mask_kind == "add":
            s = s + mask.to(ct)
        else:
            raise ValueError(f"attention: mask given with mask_kind={mask_kind!r}; use 'keep' or 'add'")
    if causal:
        sq, sk = s.shape[-2], s.shape[-1]
        visible = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(visible.logical_not(), NEG_INF)
    if sinks is not None:
        s = torch.cat([s, sinks.to(ct).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    empty = s.amax(dim=-1, keepdim=True) == NEG_INF
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if sinks is not None:
        p = p[..., :-1]
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=True)
    return torch.matmul(p, v.to(ct)).to(q.dtype)


# ``float fill=-inf`` cannot be written in a schema, and a custom op takes no keyword-only tensors: hence
# ``fill=None`` for -inf, and ``sinks`` positional (graph nodes still pass it by keyword).
_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? mask=None, Tensor? sinks=None, *, float scale, "
           "bool causal=False, str? mask_kind=None, float? fill=None, float dropout_p=0., float softcap=0.) -> Tensor")

_rng = threading.local()  # the random state a dropout forward started from, until its setup_context takes it


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@torch.library.custom_op("ringify::attention", mutates_args=(), schema=_SCHEMA)
def _attention(q, k, v, mask=None, sinks=None, *, scale, causal=False, mask_kind=None, fill=None, dropout_p=0.0,
               softcap=0.0):
    if dropout_p > 0.0:
        _rng.state = _rng_state(q.device)
    return reference(q, k, v, mask, sinks, scale=scale, causal=causal, mask_kind=mask_kind, fill=fill,
                     dropout_p=dropout_p, softcap=softcap)


@_attention.register_fake
def _(q, k, v, mask=None, sinks=None, *, scale, causal=False, mask_kind=None, fill=None, dropout_p=0.0, softcap=0.0):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "attention: q, k, v must be 4-D")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.options = dict(keyword_only_inputs)
    ctx.rng = getattr(_rng, "state", None) if ctx.options.get("dropout_p", 0.0) > 0.0 else None
    _rng.state = None


def _backward(ctx, grad):
    inputs = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t
              for t in ctx.saved_tensors]
    wrt = [t for t in inputs if t is not None and t.requires_grad]
    device = inputs[0].device
    with torch.enable_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if ctx.rng is not None:
            (torch.cuda.set_rng_state(ctx.rng, device) if device.type == "cuda" else torch.set_rng_state(ctx.rng))
        out = reference(*inputs, **ctx.options)
        grads = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


_attention.register_autograd(_backward, setup_context=_setup_context)

#: The canonical attention op (``torch.ops.ringify.attention.default``): call it like :func:`reference`; graph
#: nodes of it have ``node.target is attention``.
attention = torch.ops.ringify.attention.default
