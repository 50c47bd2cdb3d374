"""The zoo itself: every model builds, runs forward + backward on fresh inputs, and draws fresh inputs.

These guard the test data the ringify tests rely on: a zoo model whose inputs were constant, or whose
loss ignored every token, would let a wrong rewrite pass.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

from zoo import REFUSE, ZOO, ZooModel

SEQ = 13
# Every builder is tiny: ~0.05 s for build + forward + backward (transformers' import, ~5 s, once),
# so none is marked slow.
ALL = [pytest.param(n, b, id=n) for n, b in ZOO.items()] + [
    pytest.param(f"refuse_{n}", b, id=f"refuse_{n}") for n, b in REFUSE.items()
]


def _tensors(inputs) -> list[torch.Tensor]:
    return [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,builder", ALL)
def test_forward_backward(name, builder, train, seed):
    zm: ZooModel = builder(train=train)
    assert zm.model.training is train
    args, kwargs = zm.make_inputs(seed, SEQ)
    out = zm.model(*args, **kwargs)
    assert out.logits.shape[:2] == (2, SEQ)
    assert out.loss is not None and out.loss.dim() == 0 and torch.isfinite(out.loss), name
    out.loss.backward()
    params = dict(zm.model.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in params.values()), name
    # dropout is 0 everywhere: train and eval mode compute the same function
    if train:
        zm.model.eval()
        with torch.no_grad():
            again = zm.model(*args, **kwargs)
        torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize("name,builder", ALL)
def test_inputs_are_fresh_and_random(name, builder, seed):
    zm: ZooModel = builder()
    a = _tensors(zm.make_inputs(seed, SEQ))
    b = _tensors(zm.make_inputs(seed + 1, SEQ))
    again = _tensors(zm.make_inputs(seed, SEQ))
    assert a, name
    # the same seed gives the same inputs (every rank of a ring draws the same batch) ...
    for x, y in zip(a, again):
        assert torch.equal(x, y), name
    # ... another seed other ones: the data (first input) always, most inputs in all
    assert not torch.equal(a[0], b[0]), name
    assert sum(not torch.equal(x, y) for x, y in zip(a, b)) * 2 >= len(a), name
    for x in a:  # never constant data: no all-zeros, all-ones, all-pad tensors
        assert x.numel() > 1 and x.unique().numel() > 1, (name, x)
        assert x.size(1) == SEQ, name


@pytest.mark.parametrize("name,builder", ALL)
def test_labels_and_padding(name, builder, seed):
    """Labels mix -100 with real targets; padding masks pad some keys but never a whole row."""
    zm: ZooModel = builder()
    args, kwargs = zm.make_inputs(seed, SEQ)
    labels = kwargs.get("labels", kwargs.get("targets"))
    if labels is not None:
        assert (labels == -100).any() and (labels != -100).any(), name
        assert (labels != -100).any(dim=1).all(), name  # every row has a real target
    mask = kwargs.get("attention_mask")
    if mask is None and name == "einsum_encoder":
        mask = ~args[1]  # key_padding_mask: True = pad
    if mask is not None:
        assert (mask == 0).any(), name
        assert mask.bool().any(dim=1).all() and mask[:, 0].bool().all(), name


@pytest.mark.parametrize("seq_len", [2, 3, 5])
@pytest.mark.parametrize("name,builder", [pytest.param(n, b, id=n) for n, b in ZOO.items()])
def test_short_sequences(name, builder, seq_len, seed):
    """Ring tests run at sequence lengths down to the world size: the inputs must still make sense."""
    zm: ZooModel = builder()
    args, kwargs = zm.make_inputs(seed, seq_len)
    assert all(x.size(1) == seq_len for x in _tensors((args, kwargs)))
    with torch.no_grad():
        out = zm.model(*args, **kwargs)
    assert out.logits.shape[:2] == (2, seq_len) and torch.isfinite(out.logits).all(), name
    assert torch.isfinite(out.loss), name


@pytest.mark.skipif("llama_packed" not in ZOO, reason="transformers not installed")
def test_packed_documents_are_independent(seed):
    """llama_packed means what it says: each document's logits are those of the document alone."""
    zm = ZOO["llama_packed"]()
    _, kw = zm.make_inputs(seed, SEQ)
    with torch.no_grad():
        packed = zm.model(**kw).logits
        pos = kw["position_ids"]
        for b in range(pos.size(0)):
            starts = (pos[b] == 0).nonzero().flatten().tolist() + [SEQ]
            assert len(starts) >= 3  # >= 2 documents per row
            for lo, hi in zip(starts, starts[1:]):
                alone = zm.model(input_ids=kw["input_ids"][b:b + 1, lo:hi], use_cache=False).logits
                torch.testing.assert_close(packed[b:b + 1, lo:hi], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("gemma2_softcap_swa" not in ZOO, reason="transformers not installed")
def test_gemma2_soft_cap_bends_the_scores(seed):
    """The soft-cap changes the function: a rewrite that dropped it would fail the ringify tests."""
    capped, plain = ZOO["gemma2_softcap_swa"](), ZOO["gemma2_softcap_swa"](attn_logit_softcapping=None)
    _, kw = capped.make_inputs(seed, SEQ)
    with torch.no_grad():
        a, b = capped.model(**kw).logits, plain.model(**kw).logits
    assert ((a - b).norm() / b.norm()).item() > 1e-2
