"""Every model of the zoo, ringified on real gloo rings, as a new user would try it.

The zoo (tests/support/zoo.py) holds the named models and their relatives: other decoder families (Qwen2/3,
Gemma, Gemma2 with logit soft-capping, Gemma3, StableLM, Phi3, Falcon, OPT, GPT-BigCode with MQA,
mixture-of-experts Mixtral and Qwen2-MoE),
encoders (RoBERTa), sliding-window attention (Mistral, Gemma2), partial rotary (GPT-NeoX, Phi,
StableLM), packed documents, padding. Each must come out the same function: logits, loss and every parameter
gradient within 1e-5 (fp32), in eval and train mode. The models it must refuse are refused, naming the op.
"""

from __future__ import annotations

import pytest
import torch

from ringify import UnsupportedModelError, ringify
from zoo import REFUSE, ZOO, check_same_function

SEQ_PER_RANK = 4
# the rewrites the zoo alone exercises (soft-cap, expert layers, fused-qkv indexing), also on 1 and 4 ranks
FOUR_RANKS = [n for n in ("gemma2_softcap_swa", "mixtral_moe", "falcon_gqa") if n in ZOO]
# The hand-written models and one HF model run in the quick subset; the other HF relatives are slow.
QUICK = {"tiny_gpt", "einsum_encoder", "llama_sdpa_padded"}


def check_zoo_model(name: str, seed: int, seq_len: int, train: bool) -> dict:
    return check_same_function(ZOO[name](train=train), seed, seq_len, ffn_chunk_tokens=3)


def _params(names, world_sizes):
    out = []
    for name in names:
        marks = [] if name in QUICK else [pytest.mark.slow]
        out += [pytest.param(name, w, id=f"{name}-{w}", marks=marks) for w in world_sizes]
    return out


@pytest.mark.parametrize("name,world_size", _params(ZOO, [2, 3]) + _params(FOUR_RANKS, [1, 4]))
def test_relative_is_the_same_function(ranks, seed, name, world_size):
    train = seed % 2 == 1  # eval or train mode capture, drawn with the seed
    ranks(world_size).run(check_zoo_model, name, seed, SEQ_PER_RANK * world_size + 1, train)


_MIXING_OPS = {"cumsum": "aten.cumsum", "causal_conv1d": "aten.conv1d", "topk": "aten.topk", "sort": "aten.sort",
               "roll": "aten.roll"}


@pytest.mark.parametrize("name", list(REFUSE))
def test_sequence_mixers_refused(seed, name):
    zm = REFUSE[name]()
    args, kwargs = zm.make_inputs(seed, 9)
    with pytest.raises(UnsupportedModelError) as err:
        ringify(zm.model)(*args, **kwargs)
    message = str(err.value)
    assert message.startswith(f"`{_MIXING_OPS[name]}`") and "zoo.py" in message.split("mixes")[0], message
    assert "hint" in message.lower(), message


@pytest.mark.skipif("mixtral_moe" not in ZOO, reason="transformers not installed")
def test_mixture_of_experts_layers_run_whole_on_each_rank(seed):
    """The expert layers sort tokens by expert (argsort, grouped matmul) yet map each token to its own output:
    they are run whole on a shard, and the report says which modules were treated so."""
    zm = ZOO["mixtral_moe"]()
    args, kwargs = zm.make_inputs(seed, 9)
    rm = ringify(zm.model)
    rm(*args, **kwargs)
    report = rm.report()
    assert report.token_local_modules == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert "dropless mixture-of-experts" in report.to_markdown()
