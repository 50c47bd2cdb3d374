"""Capture frontends: torch.export first, torch.fx.symbolic_trace when export cannot capture the model.

The fallback exists for hand-written models whose Python export cannot trace but fx can, because
symbolic_trace runs nothing on tensors it does not have to:

- Python reading the *values* of buffers (``int(self.n_active)``, ``self.idx.tolist()``): export
  traces buffers as fake tensors, so this is a data-dependent guard; symbolic_trace sees the real
  buffer and bakes the value in, as export would for a Python int attribute;
- ``torch._assert`` on tensor data (the fx-traceable assert): export must guard on the data; fx keeps
  the assert as a node, replayed as ``aten._assert_async``;
- outputs in a plain dataclass, which is no pytree node and which export therefore rejects.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ringify import UnsupportedModelError, ringify
from ringify.capture import capture
from ringify.passes.fx import module_path, source_line
from ringify.verify import relative_error

VOCAB, D, HEADS = 61, 32, 4


# ----------------------------------------------------------------------------------------- models


class Block(nn.Module):
    """Pre-norm transformer block: causal SDPA attention and a GELU MLP."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, S, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, S, D))
        return x + self.mlp(self.ln2(x))


@dataclasses.dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class GrowingGPT(nn.Module):
    """A GPT grown by progressive stacking: blocks are added during training, and ``n_active`` (a buffer,
    so that a checkpoint resumes at the depth it was saved at) says how many of them run.

    ``self.blocks[: int(self.n_active)]`` reads the buffer's value in Python: torch.export traces buffers
    as fake tensors and fails on it (data-dependent guard); symbolic_trace sees the real buffer. The output
    is a plain dataclass, which export rejects too.
    """

    def __init__(self, n_layer=3, n_active=2, max_len=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(max_len, D)
        self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
        self.register_buffer("n_active", torch.tensor(n_active))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks[: int(self.n_active)]:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return LMOutput(logits, loss)


class PlainGPT(nn.Module):
    """What both frontends capture: the same blocks, a tuple out."""

    def __init__(self, max_len=64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(max_len, D)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class CheckedIds(PlainGPT):
    """Validates its input with the fx-traceable ``torch._assert``: export cannot guard on the data."""

    def forward(self, idx, targets):
        torch._assert(((idx >= 0) & (idx < VOCAB)).all(), "token id out of range")
        return super().forward(idx, targets)


class SelectedFeatures(PlainGPT):
    """Keeps the features listed in a buffer: ``.tolist()`` of a buffer, a data-dependent guard for export."""

    def __init__(self):
        super().__init__()
        self.register_buffer("keep", torch.tensor([0, 3, 5, 7, 11]))

    def forward(self, idx, targets):
        logits, loss = super().forward(idx, targets)
        return logits[..., self.keep.tolist()], loss


class DataclassOut(PlainGPT):
    def forward(self, idx, targets):
        return LMOutput(*super().forward(idx, targets))


class DataDependent(PlainGPT):
    """Python control flow on activations: neither frontend can capture it."""

    def forward(self, idx, targets):
        logits, loss = super().forward(idx, targets)
        if logits.mean() > 0:
            loss = loss * 2
        return logits, loss


class ScanHead(CheckedIds):
    """Needs the fallback, then mixes tokens with a cumsum: refused with the op and its line."""

    def forward(self, idx, targets):
        logits, loss = super().forward(idx, targets)
        return logits.cumsum(1), loss


def inputs(seed: int, seq_len: int, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (batch, seq_len), generator=g)
    targets = torch.randint(0, VOCAB, (batch, seq_len), generator=g)
    targets[0, : seq_len // 3] = -100
    return idx, targets


def _logits(out):
    return out.logits if isinstance(out, LMOutput) else out[0]


def _ops(gm) -> collections.Counter:
    skip = ("_assert", "sym_size", "_guards_fn", "getitem")
    return collections.Counter(str(n.target) for n in gm.graph.nodes
                               if n.op == "call_function" and not any(s in str(n.target) for s in skip))


# ----------------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("cls", [GrowingGPT, CheckedIds, SelectedFeatures, DataclassOut])
def test_falls_back_when_export_fails(cls):
    torch.manual_seed(0)
    model = cls()
    idx, targets = inputs(0, 11)
    with pytest.raises(UnsupportedModelError, match="torch.export could not capture"):
        capture(model, (idx, targets), {}, frontend="export")
    captured = capture(model, (idx, targets), {})
    assert captured.frontend == "symbolic_trace" and captured.program is None
    assert captured.symbols, "the sequence length must stay symbolic"
    # the graph is the model's function at any length, not only the traced one
    for seq_len in (11, 17):
        idx, targets = inputs(seq_len, seq_len)
        out, ref = captured(captured.graph_module, (idx, targets), {}), model(idx, targets)
        assert type(out) is type(ref)
        assert relative_error(_logits(out), _logits(ref)) < 1e-6


def test_tensor_assert_is_kept():
    model = CheckedIds()
    captured = capture(model, inputs(0, 9), {})
    asserts = [n for n in captured.graph_module.graph.nodes if n.target is torch.ops.aten._assert_async.msg]
    assert len(asserts) == 1
    idx, targets = inputs(1, 12)
    idx[0, 3] = VOCAB
    with pytest.raises(RuntimeError, match="token id out of range"):
        captured(captured.graph_module, (idx, targets), {})


def test_export_is_still_first():
    model = PlainGPT()
    captured = capture(model, inputs(0, 9), {})
    assert captured.frontend == "export" and captured.program is not None


def test_fallback_graph_is_exports_training_ir():
    """Forced on a model export captures: the same aten ops, SDPA whole, module paths and source lines kept."""
    model = PlainGPT()
    args = inputs(0, 13)
    exported = capture(model, args, {}, frontend="export")
    traced = capture(model, args, {}, frontend="symbolic_trace")
    assert traced.frontend == "symbolic_trace"
    assert _ops(traced.graph_module) == _ops(exported.graph_module)
    nodes = list(traced.graph_module.graph.nodes)
    sdpa = [n for n in nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert [module_path(n) for n in sdpa] == ["blocks.0", "blocks.1"]
    lines = [source_line(n) for n in sdpa]
    assert all(re.search(r"test_capture\.py:\d+ \(y = F\.scaled_dot_product_attention", line) for line in lines), lines
    linears = [module_path(n) for n in traced.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert linears[:2] == ["blocks.0.qkv", "blocks.0.proj"], linears
    placeholders = [n for n in traced.graph_module.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == ["idx", "targets"]
    assert all(isinstance(n.meta["val"].shape[1], torch.SymInt) and not isinstance(n.meta["val"].shape[0], torch.SymInt)
               for n in placeholders)


def test_fallback_uses_the_models_parameters():
    torch.manual_seed(0)
    model = GrowingGPT()
    reference = copy.deepcopy(model)
    attributes = set(vars(model))
    idx, targets = inputs(1, 10)
    captured = capture(model, (idx, targets), {}, frontend="symbolic_trace")
    assert set(vars(model)) == attributes, "tracing must not leave constants on the model"
    params = {id(p) for p in model.parameters()}
    assert {id(p) for p in captured.graph_module.parameters()} <= params
    captured(captured.graph_module, (idx, targets), {}).loss.backward()
    reference(idx, targets).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name.startswith("blocks.2."):  # not active: no gradient on either side
            assert p.grad is None and q.grad is None
        else:
            assert relative_error(p.grad, q.grad) < 1e-6, name


def test_keyword_and_default_arguments():
    model = GrowingGPT()
    idx, targets = inputs(2, 9)
    captured = capture(model, (), {"idx": idx}, frontend="symbolic_trace")  # targets=None: no loss
    out = captured(captured.graph_module, (), {"idx": idx})
    assert out.loss is None and relative_error(out.logits, model(idx).logits) < 1e-6


def test_both_frontends_failing_is_refused_with_both_errors():
    with pytest.raises(UnsupportedModelError) as err:
        capture(DataDependent(), inputs(0, 9), {})
    message = str(err.value)
    assert "torch.export could not capture DataDependent" in message and "symbolic_trace fallback failed" in message


def test_unknown_frontend():
    with pytest.raises(ValueError, match="frontend"):
        capture(PlainGPT(), inputs(0, 9), {}, frontend="jit")


def test_refusal_through_the_fallback_names_op_and_line():
    rm = ringify(ScanHead())
    with pytest.raises(UnsupportedModelError) as err:
        rm(*inputs(0, 9))
    message = str(err.value)
    assert message.startswith("`aten.cumsum`"), message
    assert re.search(r"test_capture\.py:\d+ \(return logits\.cumsum\(1\), loss\)", message), message


# ------------------------------------------------------------------------------- end to end on a ring


def check_growing_gpt(seed: int, seq_len: int) -> dict:
    torch.manual_seed(seed)
    model = GrowingGPT()
    reference = copy.deepcopy(model)
    idx, targets = inputs(seed, seq_len)
    ref = reference(idx, targets)
    ref.loss.backward()

    rm = ringify(model, ffn_chunk_tokens=4)
    out = rm(idx, targets)
    out.loss.backward()
    assert rm._callers[rm._last].frontend == "symbolic_trace"
    assert isinstance(out, LMOutput)
    errors = {"logits": relative_error(out.logits, ref.logits), "loss": relative_error(out.loss, ref.loss)}
    ref_params = dict(reference.named_parameters())
    errors["grad"] = max(relative_error(p.grad, ref_params[n].grad) for n, p in model.named_parameters()
                         if ref_params[n].grad is not None)
    assert all((p.grad is None) == (ref_params[n].grad is None) for n, p in model.named_parameters())
    assert max(errors.values()) < 1e-5, errors
    text = rm.report().to_markdown()
    assert "blocks.0" in text and "blocks.1" in text and "blocks.2" not in text, text
    return errors


@pytest.mark.parametrize("world_size", [2])
def test_fallback_model_ringified(ranks, seed, world_size):
    ranks(world_size).run(check_growing_gpt, seed, 8 * world_size + 3)


class NoGradRegions(GrowingGPT):
    """Rotary-style tables under ``@torch.no_grad()`` (inputs need no grad: inlined) and a no_grad block over
    an activation (kept: its ops must not compute gradients). symbolic_trace itself records neither."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)))

    @torch.no_grad()
    def table(self, n):
        return torch.outer(torch.arange(n).float(), self.inv_freq).cos().repeat(1, 2)

    def forward(self, idx, targets=None):
        x = self.wte(idx) * self.table(idx.size(1))
        with torch.no_grad():
            baseline = self.head(x)  # a detached baseline: no gradient reaches head.weight through it
        for block in self.blocks[: int(self.n_active)]:
            x = block(x)
        logits = self.head(self.ln_f(x)) - baseline
        return LMOutput(logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_no_grad_regions_survive_the_fallback():
    torch.manual_seed(0)
    model = NoGradRegions()
    reference = copy.deepcopy(model)
    idx, targets = inputs(3, 11)
    captured = capture(model, (idx, targets), {})
    assert captured.frontend == "symbolic_trace"
    toggles = [n.args[0] for n in captured.graph_module.graph.nodes if n.target is torch._C._set_grad_enabled]
    assert toggles == [False, True], toggles  # the table's region inlined, the baseline's kept
    assert any(n.target is torch.ops.aten.arange.default for n in captured.graph_module.graph.nodes)
    captured(captured.graph_module, (idx, targets), {}).loss.backward()
    reference(idx, targets).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert relative_error(p.grad, q.grad) < 1e-6, name
    assert torch.is_grad_enabled()


def test_sequence_as_long_as_the_mask_buffer_is_refused_with_the_fix(seed):
    """nanoGPT at T == block_size: export bakes T in; the refusal names the buffer and what to change."""
    from ringify.api import rewrite
    from ringify.models import TinyGPT, tiny_gpt_inputs

    model = TinyGPT(vocab=53, d_model=32, n_head=4, n_layer=1, max_len=24)
    captured = capture(model, (), tiny_gpt_inputs(seed, 2, 24, 53))
    with pytest.raises(UnsupportedModelError, match=r"h\.0\.attn\.bias.*block_size > T"):
        rewrite(model, captured, world_size=2)
    shorter = capture(model, (), tiny_gpt_inputs(seed, 2, 23, 53))
    rewrite(model, shorter, world_size=2)  # one token shorter than the table: symbolic, rewritten


def test_a_model_that_raises_on_its_inputs_gets_its_own_error(seed):
    """Past max_len TinyGPT raises; export would report it on a symbol (s75), the refusal names the length."""
    from ringify.models import TinyGPT, tiny_gpt_inputs

    model = TinyGPT(vocab=53, d_model=32, n_head=4, n_layer=1, max_len=16).train()
    with pytest.raises(UnsupportedModelError) as err:
        capture(model, (), tiny_gpt_inputs(seed, 2, 21, 53))
    first, *rest = str(err.value).splitlines()
    assert "TinyGPT itself raises on these inputs" in first and "21" in first and "max_len=16" in first, first
    assert rest and rest[0].startswith("Hint:"), rest
    assert all(m.training for m in model.modules())  # the eager try ran in eval mode and put the mode back
