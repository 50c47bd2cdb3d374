"""``rm.generate``: the prompt's ring forward fills a key/value cache sharded over the ranks, then each new
token is decoded exactly over the distributed cache.

Three steps, as gpt-fast writes them: :func:`prefill` (the ring graph, storing each layer's keys and values,
nothing after them), :func:`decode_one_token` (the graph at the last position on every rank, attention over
the cache merged by log-sum-exp), :func:`generate` (the loop). The loop follows HF generation: positions
from the attention mask's cumsum, the mask extended by ones, ``eos_token_id``/``pad_token_id`` from the
model's ``generation_config`` when not given, finished rows padded, HF's own logits warpers for sampling.
The prompt's last token is run by the decode graph for the first logits (its key/value already cached):
the prefill never computes logits. Tokens are chosen on rank 0 and broadcast, so every rank returns the
same ones. See :mod:`ringify.passes.inference` for the graphs and :mod:`ringify.runtime.kv_cache`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import sympy
import torch
import torch.distributed as dist
from torch import fx

from .errors import UnsupportedModelError
from .runtime import kv_cache
from .runtime.comm import _wait, default_timeout, rank_and_size, resolve_group

# generation_config options HF would apply that rm.generate does not: refused rather than silently dropped
_UNSUPPORTED_CONFIG = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None,
                       "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                       "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None}
_UNSUPPORTED_SAMPLING = {"min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}


@dataclass
class Graphs:
    """What one prompt shape needs: the two graphs, how to call them, the cache slot, the longest sequence."""

    captured: object
    prefill: fx.GraphModule
    decode: fx.GraphModule
    slot: str
    layers: int
    max_positions: int | None
    inputs: "Inputs"


class Inputs:
    """The model call for a sequence so far, as HF generation makes it: ``input_ids``, ``position_ids`` from
    the mask's cumsum (when the model takes them), ``attention_mask`` only when some token is padding."""

    def __init__(self, model: torch.nn.Module, padded: bool):
        params = _parameters(model)
        required = [name for name, p in _signature_parameters(model)[1:] if p.default is inspect.Parameter.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                    and name not in ("attention_mask", "position_ids")]
        if required:
            raise UnsupportedModelError(
                f"{type(model).__name__}.forward requires {', '.join(f'`{n}`' for n in required)} besides the token ids; "
                "generation calls it with token ids (and mask, positions) alone. Hint: generate from the model itself, "
                "or convert it with example inputs that hold only the token ids.")
        self.keyword = "input_ids" in params
        self.positions = "position_ids" in params
        self.mask = padded and "attention_mask" in params
        self.no_cache = "use_cache" in params
        self.return_dict = "return_dict" in params and hasattr(model, "config")
        if padded and not self.mask:
            raise ValueError(f"{type(model).__name__}.forward takes no attention_mask: the prompt cannot be padded")

    def __call__(self, ids, mask, positions) -> tuple[tuple, dict]:
        kwargs: dict = {}
        if self.mask:
            kwargs["attention_mask"] = mask
        if self.positions:
            kwargs["position_ids"] = positions
        if self.no_cache:
            kwargs["use_cache"] = False
        if self.return_dict:
            kwargs["return_dict"] = True
        if self.keyword:
            return (), {"input_ids": ids, **kwargs}
        return (ids,), kwargs


def _signature_parameters(model) -> list:
    try:
        return list(inspect.signature(model.forward).parameters.items())
    except (TypeError, ValueError):
        return []


def _parameters(model) -> set:
    return {name for name, _ in _signature_parameters(model)}


def logits_of(out) -> torch.Tensor:
    """The logits of a model's output: ``.logits``, the output itself, or its first element."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UnsupportedModelError(f"generation needs a model that returns logits; it returned {type(out).__name__}")


# ------------------------------------------------------------------------------------------ the graphs


def build_graphs(rm, args, kwargs, inputs: Inputs) -> Graphs:
    """Capture the model once at the prompt's shape and derive the prefill and decode graphs."""
    from . import fsdp
    from .api import check_symbolic, dropless_experts
    from .passes.attention import canonicalize_attention
    from .passes.inference import attention_calls, decode_graph, prefill_graph
    from .passes.shard import shard_graph

    if fsdp.fsdp_modules(rm.model):
        raise UnsupportedModelError("rm.generate runs on whole parameters; this model is sharded with FSDP2. Hint: "
                                    "generate from an unsharded copy (e.g. load the full state dict into the plain model).")
    if getattr(getattr(rm.model, "config", None), "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(rm.model).__name__} is an encoder-decoder model; rm.generate decodes "
                                    "decoder-only models (token ids in, logits out).")
    captured = rm._capture(args, kwargs)
    check_symbolic(rm.model, captured, max(rm.world_size, 2))
    canonicalize_attention(captured.graph_module)
    ring, _ = shard_graph(captured.graph_module, captured.symbols, group=rm.group, layout=rm.layout,
                          world_size=rm.world_size, outputs="local", sync_grads=False,
                          token_local=dropless_experts(rm.model))
    slot = kv_cache.new_slot()
    return Graphs(captured, prefill_graph(ring, slot), decode_graph(ring, slot), slot, len(attention_calls(ring)),
                  max_positions(rm.model, captured), inputs)


def max_positions(model, captured) -> int | None:
    """The longest sequence the model takes: its config's position count, or the bound export proved on the
    sequence length (a learned position table, an explicit check); None if unbounded."""
    limits = []
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            limits.append(getattr(config, name))
            break
    program = getattr(captured, "program", None)
    for symbol, bounds in (getattr(program, "range_constraints", None) or {}).items():
        upper = bounds.upper
        if symbol in captured.symbols and isinstance(upper, sympy.Integer):
            limits.append(int(upper))
    return min(limits) if limits else None


# ------------------------------------------------------------------------------------------ the three steps


def prefill(graphs: Graphs, cache: kv_cache.ShardedKVCache, ids, mask, positions, layout: str) -> None:
    """The prompt's ring forward; each attention layer leaves this rank's keys and values in ``cache``."""
    cache.begin(ids.shape[1], layout, ids.device)
    args, kwargs = graphs.inputs(ids, mask, positions)
    graphs.captured(graphs.prefill, args, kwargs)


def decode_one_token(graphs: Graphs, cache: kv_cache.ShardedKVCache, ids, mask, positions, append: bool) -> torch.Tensor:
    """fp32 logits ``[B, V]`` of the last token of ``ids`` (the sequence so far), the same on every rank."""
    cache.step(ids.shape[1] - 1, append)
    args, kwargs = graphs.inputs(ids, mask, positions)
    logits = logits_of(graphs.captured(graphs.decode, args, kwargs))
    return logits[:, -1].to(torch.float32)


@torch.no_grad()
def generate(rm, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask=None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
             pad_token_id=None, generator: torch.Generator | None = None, output_scores: bool = False,
             on_token=None):
    """See :meth:`ringify.api.RingModule.generate`."""
    model = rm.model
    eos, pad = _special_tokens(model, eos_token_id, pad_token_id)
    _check_request(rm, input_ids, attention_mask, max_new_tokens, (do_sample, temperature, top_k, top_p, eos, pad))
    batch, prompt = input_ids.shape
    if attention_mask is None:  # HF: padding where the pad token is (unless it is also the eos token)
        attention_mask = input_ids.ne(pad).long() if pad is not None and pad not in eos and bool((input_ids == pad).any()) \
            else torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    inputs = Inputs(model, padded=not bool(attention_mask.all()))
    total = prompt + max_new_tokens
    ids = input_ids.new_empty((batch, total))
    ids[:, :prompt] = input_ids
    mask = attention_mask.new_ones((batch, total))
    mask[:, :prompt] = attention_mask
    positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 0)  # HF's position ids; new tokens continue them
    graphs = rm._generation_graphs(*inputs(input_ids, attention_mask, positions[:, :prompt]), inputs)
    if graphs.max_positions is not None and total - 1 > graphs.max_positions:
        raise ValueError(f"a prompt of {prompt} tokens and max_new_tokens={max_new_tokens} run the model on {total - 1} "
                         f"positions, but {type(model).__name__} takes at most {graphs.max_positions}. Hint: "
                         f"max_new_tokens <= {graphs.max_positions - prompt + 1}.")
    warpers = _warpers(model, do_sample, temperature, top_k, top_p)
    cache = kv_cache.ShardedKVCache(rm.group, kv_cache.slots_per_rank(prompt, max_new_tokens, rm.world_size))
    unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
    eos_t = torch.tensor(eos, dtype=ids.dtype, device=ids.device)
    scores_out = []
    length = prompt
    with kv_cache.bound(graphs.slot, cache):
        prefill(graphs, cache, ids[:, :prompt], mask[:, :prompt], positions[:, :prompt], rm.layout)
        logits = decode_one_token(graphs, cache, ids[:, :prompt], mask[:, :prompt], positions[:, :prompt], append=False)
        for step in range(max_new_tokens):
            scores = logits
            for warp in warpers:
                scores = warp(ids[:, :length], scores)
            if output_scores:
                scores_out.append(scores)
            if do_sample:
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
            else:
                chosen = torch.argmax(scores, dim=-1)
            chosen = _same_on_every_rank(chosen, rm.group)
            if eos:
                chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
            ids[:, length] = chosen
            length += 1
            if on_token is not None:
                on_token(step + 1, max_new_tokens)
            if eos:
                unfinished &= ~torch.isin(chosen, eos_t)
                if not bool(unfinished.any()):
                    break
            if step + 1 < max_new_tokens:
                logits = decode_one_token(graphs, cache, ids[:, :length], mask[:, :length], positions[:, :length],
                                          append=True)
    rm._last_cache_bytes = cache.nbytes()
    sequences = ids[:, :length].clone()
    return (sequences, tuple(scores_out)) if output_scores else sequences


# ------------------------------------------------------------------------------------------ HF semantics


def _special_tokens(model, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """(eos ids, pad id): the arguments, else the model's generation_config, as HF generate takes them;
    with eos but no pad, finished rows are padded with the (first) eos, as HF does."""
    config = getattr(model, "generation_config", None)
    if config is not None:
        for name, default in _UNSUPPORTED_CONFIG.items():
            if getattr(config, name, default) not in (default, None, [], 0, 1.0):
                raise UnsupportedModelError(f"the model's generation_config sets {name}={getattr(config, name)!r}, which "
                                            "rm.generate does not apply. Hint: set it to its default to generate with ringify.")
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None and eos:
        pad = eos[0]
    return eos, (None if pad is None else int(pad))


def _warpers(model, do_sample: bool, temperature: float, top_k, top_p) -> list:
    """HF's logits warpers, in the order HF's generate applies them (temperature, top-k, top-p); ``top_k`` and
    ``top_p`` left None take the model's generation_config, then HF's defaults (top-k 50, top-p 1.0), as
    ``model.generate(do_sample=True)`` does. Sampling options HF would add and ringify does not are refused."""
    if not do_sample:
        return []
    try:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    except ImportError as err:
        raise ImportError("sampling uses HF's logits warpers: pip install transformers") from err
    config = getattr(model, "generation_config", None)
    for name, default in _UNSUPPORTED_SAMPLING.items():
        if getattr(config, name, None) not in (None, default):
            raise UnsupportedModelError(f"the model's generation_config sets {name}={getattr(config, name)!r}, which "
                                        "rm.generate does not apply when sampling. Hint: set it to None.")
    top_k = _configured(config, "top_k", top_k, 50)
    top_p = _configured(config, "top_p", top_p, 1.0)
    warpers = []
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


def _configured(config, name: str, given, default):
    """The argument, else the generation_config's value, else HF's default."""
    if given is not None:
        return given
    value = getattr(config, name, None)
    return default if value is None else value


def _check_request(rm, input_ids, attention_mask, max_new_tokens, options) -> None:
    """Shapes and options, then the same request on every rank (one bounded all-gather): every rank raises the
    same error, none hangs."""
    from .api import _check_identical

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError("input_ids must be an integer tensor [batch, prompt length]")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    world = rm.world_size
    if input_ids.shape[1] < max(world, 2):
        raise ValueError(f"the prompt has {input_ids.shape[1]} tokens but the ring has {world} ranks: each rank needs at "
                         f"least one prompt token (and a prompt at least 2 tokens); pass a prompt of >= {max(world, 2)} tokens")
    do_sample, temperature, top_k, top_p, eos, pad = options
    if do_sample and (temperature is None or temperature <= 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    flags = torch.tensor([max_new_tokens, float(do_sample), temperature or 0.0, top_k or 0, 1.0 if top_p is None else top_p,
                          -1 if pad is None else pad, *eos], dtype=torch.float64)
    _check_identical((input_ids, attention_mask, flags), {}, rm.group)


def _same_on_every_rank(tokens: torch.Tensor, group: str) -> torch.Tensor:
    """Rank 0's tokens on every rank (a bounded broadcast): sampling ranks agree whatever their generators."""
    pg = resolve_group(group)
    rank, world = rank_and_size(pg)
    if world == 1:
        return tokens
    tokens = tokens.contiguous()
    work = dist.broadcast(tokens, src=dist.get_global_rank(pg, 0), group=pg, async_op=True)
    _wait(work, default_timeout(), "receiving the chosen tokens from rank 0", rank)
    return tokens


__all__ = ["decode_one_token", "generate", "prefill"]
