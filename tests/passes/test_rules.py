"""One test per rule family of ringify.passes.rules: its ops on full inputs and on shards, compared.

Like DTensor's strategy validation: a rule claims what an op does to the sequence, and the claim is
checked against the full op. Each test asserts the families the rules give the ops of a small module,
then for token-local ops runs the module on every rank's shard of the inputs (in one process, every
layout's positions for 1..3 ranks) and compares with the rows of the full output; rules that emit
something else (reductions over ranks, positions, tables) run through ``ringify`` on gloo ranks and
compare outputs and gradients with the untouched module.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ringify import UnsupportedModelError, ringify
from ringify.capture import capture
from ringify.passes.fx import op_name
from ringify.passes.rules import JOIN, LOCAL, MIX, POSITIONS, REDUCE, SELECT, SLICE, TABLE, classify
from ringify.passes.sequence import Tokens
from ringify.runtime.layout import layout_positions
from ringify.verify import relative_error, worst_grad_error

B, S, D = 2, 7, 8  # S: the only size 7, so the sequence symbol is unambiguous


def families(module: nn.Module, *args) -> dict[str, set[str]]:
    """Op name -> the families its nodes get, for every call that touches the tokens of ``module(*args)``."""
    captured = capture(module, args, {}, 1)
    tokens = Tokens(captured.symbols)
    found: dict[str, set[str]] = {}
    for node in captured.graph_module.graph.nodes:
        if node.op == "call_function" and (tokens.has(node) or any(tokens.has(i) for i in node.all_input_nodes)):
            found.setdefault(op_name(node), set()).add(classify(node, tokens))
    return found


def assert_families(found: dict[str, set[str]], expected: dict[str, str]) -> None:
    for op, family in expected.items():
        assert found.get(op) == {family}, (op, found.get(op), found)


def on_shards(module: nn.Module, *args, seq_dim: int = 1) -> None:
    """``module`` on each rank's tokens equals the full output's rows at them: 1..3 ranks, every layout."""
    full = module(*args)
    seq_len = args[0].size(seq_dim)
    for world in (1, 2, 3):
        for layout in ("zigzag", "contiguous", "striped"):
            for rank in range(world):
                pos = layout_positions(seq_len, world, rank, layout)
                shard = [a.index_select(seq_dim, pos) if isinstance(a, torch.Tensor) and a.dim() > seq_dim
                         and a.size(seq_dim) == seq_len else a for a in args]
                out, want = module(*shard), full.index_select(seq_dim, pos)
                assert out.shape == want.shape and relative_error(out, want) < 1e-6, (world, layout, rank)


def on_ranks(case: str, seed: int, seq_len: int) -> dict:
    """On every rank: ``ringify(model)`` against the untouched model, outputs and every gradient within 1e-5."""
    torch.manual_seed(seed)
    model, args = CASES[case](seq_len)
    reference = copy.deepcopy(model)
    ref = reference(*args)
    ref[-1].backward()
    out = ringify(model)(*args)
    out[-1].backward()
    errors = {f"out{i}": relative_error(o, r) for i, (o, r) in enumerate(zip(out, ref))}
    errors["grad"], worst = worst_grad_error(model, reference)
    assert max(errors.values()) < 1e-5, (case, worst, errors)
    return errors


# ------------------------------------------------------------------------------------ pointwise


class Pointwise(nn.Module):
    """Elementwise, broadcasting, factories, dropout (p=0), complex construction."""

    def forward(self, x, y):
        h = torch.maximum(x, y) * torch.sigmoid(x) + F.gelu(y) - torch.where(x > 0, x, y).rsqrt().nan_to_num()
        h = h + torch.full_like(x, 0.5) + torch.ones_like(y) * F.dropout(x, 0.0)
        z = torch.polar(x.abs(), y) * torch.complex(x, y)  # complex numbers, elementwise
        return h + z.real - z.imag


def test_pointwise():
    x, y = torch.randn(B, S, D), torch.randn(B, S, D)
    assert_families(families(Pointwise(), x, y), {"aten.maximum": LOCAL, "aten.gelu": LOCAL, "aten.full_like": LOCAL,
                                                  "aten.polar": LOCAL, "aten.complex": LOCAL, "aten.where": LOCAL})
    on_shards(Pointwise(), x, y)


# ---------------------------------------------------------------------------------------- views


class Views(nn.Module):
    """Heads split and merged back, tokens merged with the batch, complex pairs (torchtitan's rotary)."""

    def forward(self, x):
        b, s, d = x.shape
        h = x.view(b, s, 2, d // 2).transpose(2, 3).reshape(b, s, d)
        flat = h.reshape(b * s, d).unsqueeze(0).squeeze(0)
        c = torch.view_as_complex(flat.float().reshape(b * s, d // 2, 2))
        c = c * c
        out = torch.view_as_real(c).flatten(1).view(b, s, d).permute(1, 0, 2).contiguous().transpose(0, 1)
        return out + torch.cat([c.real, c.imag], -1).view(b, s, d)


class OuterProduct(nn.Module):
    def forward(self, x):
        b, s, d = x.shape
        pairs = x[:, :, None] * x[:, None]        # [b, s, s, d]: every token against every other
        return pairs.reshape(b, s * s, d).sum()   # two token dims merged


def test_views():
    x = torch.randn(B, S, D)
    assert_families(families(Views(), x), {"aten.view": LOCAL, "aten.reshape": LOCAL, "aten.transpose": LOCAL,
                                           "aten.permute": LOCAL, "aten.view_as_complex": LOCAL,
                                           "aten.view_as_real": LOCAL, "aten.real": LOCAL, "aten.imag": LOCAL})
    on_shards(Views(), x)
    assert families(OuterProduct(), x)["aten.mul"] == families(OuterProduct(), x)["aten.reshape"] == {MIX}



class RepeatMoE(nn.Module):
    """Llama-4's MoE layout: ``flat.repeat(E, 1)`` ([E*T, D], row ``e*T + t``) scaled by the router's transposed
    scores, viewed as ``[E, T, D]`` for a bmm per expert, summed over experts, plus a shared expert; and repeats
    along features and into a new leading dim."""

    def __init__(self, dim=D, experts=3):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.w = nn.Parameter(torch.randn(experts, dim, dim) / dim ** 0.5)
        self.shared = nn.Linear(dim, dim)

    def forward(self, x, target=None):
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        scores = self.router(flat).sigmoid()
        experts = scores.shape[1]
        routed = flat.repeat(experts, 1) * scores.transpose(0, 1).reshape(-1, 1)
        out = torch.bmm(routed.view(experts, -1, d), self.w).view(-1, d)
        out = self.shared(flat) + out.reshape(experts, -1, d).sum(dim=0)
        out = out.view(b, s, d) + x.repeat(1, 1, 2)[..., d:] + x.repeat(2, 1, 1, 1).sum(0)
        return out if target is None else (out, F.mse_loss(out, target))


class RepeatSplitsTheCopies(nn.Module):
    """``[2*T, D].view(T, 2, D)`` pairs rows ``2t, 2t+1``: tokens of different copies, not a token with itself."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        flat = self.lin(x).reshape(-1, D)
        return flat.repeat(2, 1).view(-1, 2, D).sum()


def test_repeat_tiles_tokens_as_an_outer_factor(ranks, seed):
    x = torch.randn(B, S, D)
    found = families(RepeatMoE(), x)
    assert_families(found, {"aten.repeat": LOCAL, "aten.bmm": LOCAL, "aten.view": LOCAL, "aten.sum": LOCAL})
    on_shards(RepeatMoE(), x)
    for world in (2, 3):
        ranks(world).run(on_ranks, "repeat", seed, 4 * world + 1)
    split = families(RepeatSplitsTheCopies(), x)
    assert split["aten.repeat"] == {LOCAL} and split["aten.view"] == {MIX}, split
    with pytest.raises(UnsupportedModelError, match="aten.view"):
        ringify(RepeatSplitsTheCopies())(x)


class InPlaceWrites(nn.Module):
    """DeepSeek-V3's ``expand_kv``: ``new_empty`` filled by ``copy_`` into two slices (nodes nobody uses), then read;
    and a pointwise ``add_``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.rot = nn.Linear(D, 2)

    def forward(self, x, target=None):
        k = self.lin(x)
        key = k.new_empty(*k.shape[:-1], D + 2)
        key[..., :D].copy_(k)
        key[..., D:].copy_(self.rot(x).expand(*k.shape[:-1], 2))
        out = key.clone()
        out.add_(x.sum(-1, keepdim=True))
        return out if target is None else (out, F.mse_loss(out, target))


def test_in_place_writes(ranks, seed):
    x = torch.randn(B, S, D)
    found = families(InPlaceWrites(), x)
    assert_families(found, {"aten.copy_": LOCAL, "aten.new_empty": LOCAL, "aten.add_": LOCAL})
    on_shards(InPlaceWrites(), x)
    ranks(2).run(on_ranks, "writes", seed, 9)


# ----------------------------------------------------------------------------------- reductions


class PerToken(nn.Module):
    """Reductions and norms over the features: per token."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        h = self.norm(x) + F.rms_norm(x, (D,)) + x.sum(-1, keepdim=True) + x.mean(-1, keepdim=True)
        h = h + x.amax(-1, keepdim=True) + x.var(-1, keepdim=True) + x.norm(p=2, dim=-1, keepdim=True)
        return h + torch.linalg.vector_norm(x, dim=-1, keepdim=True) + torch.logsumexp(x, -1, keepdim=True)


class Losses(nn.Module):
    """Every loss and sum over the tokens that the rules rewrite into a local partial plus a sum over the ranks."""

    def __init__(self, vocab=5):
        super().__init__()
        self.head = nn.Linear(D, vocab)

    def forward(self, x, labels, target):
        logits = self.head(x)
        flat = logits.view(-1, logits.size(-1))
        loss = F.cross_entropy(flat, labels.view(-1), ignore_index=-100, label_smoothing=0.1)
        loss = loss + F.nll_loss(F.log_softmax(flat, -1), labels.view(-1).clamp(min=0), reduction="sum") / 50
        loss = loss + F.mse_loss(logits, target) + F.l1_loss(logits, target) + F.smooth_l1_loss(logits, target, beta=0.5)
        loss = loss + logits.sum() / 100 + logits.mean() + logits.sum(1).pow(2).mean() / 100 + x.mean((0, 1)).sum()
        return logits, loss


def _losses(seq_len):
    labels = torch.randint(0, 5, (B, seq_len))
    labels[0, 1] = -100
    return Losses(), (torch.randn(B, seq_len, D), labels, torch.randn(B, seq_len, 5))


def test_reductions_over_features_are_per_token():
    x = torch.randn(B, S, D)
    assert_families(families(PerToken(), x), {"aten.sum": LOCAL, "aten.mean": LOCAL, "aten.amax": LOCAL,
                                              "aten.var": LOCAL, "aten.rms_norm": LOCAL, "aten.layer_norm": LOCAL,
                                              "aten.linalg_vector_norm": LOCAL, "aten.logsumexp": LOCAL})
    on_shards(PerToken(), x)


def test_reductions_over_tokens(ranks, seed):
    model, args = _losses(S)
    found = families(model, *args)
    assert_families(found, {"aten.cross_entropy_loss": REDUCE, "aten.mse_loss": REDUCE, "aten.l1_loss": REDUCE,
                            "aten.smooth_l1_loss": REDUCE, "aten.sum": REDUCE})
    assert REDUCE in found["aten.mean"]
    for world in (2, 3):
        ranks(world).run(on_ranks, "losses", seed, 4 * world + 1)


class MaxOverTokens(nn.Module):
    def forward(self, x):
        return x - x.amax(1, keepdim=True) + x.var(1, keepdim=True) + x.sum(1, keepdim=True)


def test_reductions_that_are_no_sum_over_ranks_mix():
    found = families(MaxOverTokens(), torch.randn(B, S, D))
    assert found["aten.amax"] == found["aten.var"] == {MIX}
    assert found["aten.sum"] == {REDUCE}  # keepdim leaves a dim of 1, no tokens: a sum over the ranks


# --------------------------------------------------------------------------------------- matmul


class Products(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, D))
        self.lin = nn.Linear(D, D)
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        h = (x @ self.w) + torch.einsum("bsd,de->bse", x, self.w) + torch.einsum("...d,ed->...e", x, self.w)
        h = h + torch.addmm(self.bias, flat, self.w).view(b, s, d) + torch.mm(flat, self.w).view(b, s, d)
        h = h + torch.bmm(x, self.w.expand(b, d, d)) + torch.baddbmm(x, x, self.w.expand(b, d, d)) + self.lin(x)
        heads = x.view(b, s, 2, d // 2).transpose(1, 2)  # [b, 2, s, d/2]: tokens in a row dim of a batched matmul
        h = h + (heads @ self.w[: d // 2, : d // 2]).transpose(1, 2).reshape(b, s, d)
        return h + torch.einsum("bhsd,hd->bsh", heads, self.w[:2, : d // 2]).repeat(1, 1, d // 2)


class TokensMeetTokens(nn.Module):
    def forward(self, x):
        return ((x.transpose(1, 2) @ x).sum() + torch.einsum("bsd,bsd->bd", x, x).sum()
                + torch.einsum("bsd,btd->bst", x, x).sum())


def test_matmul():
    x = torch.randn(B, S, D)
    assert_families(families(Products(), x), {"aten.matmul": LOCAL, "aten.einsum": LOCAL, "aten.addmm": LOCAL,
                                              "aten.mm": LOCAL, "aten.bmm": LOCAL, "aten.baddbmm": LOCAL,
                                              "aten.linear": LOCAL})
    on_shards(Products(), x)
    found = families(TokensMeetTokens(), x)
    assert found["aten.matmul"] == found["aten.einsum"] == {MIX}


# ------------------------------------------------------------------------------------ positions


class Positions(nn.Module):
    """``arange`` over the sequence and fixed tables sliced to it (a buffer of ids, a buffer of rows, narrow)."""

    def __init__(self, max_len=64):
        super().__init__()
        self.pos = nn.Embedding(max_len, D)
        self.register_buffer("position_ids", torch.arange(max_len).expand(1, -1))
        self.register_buffer("table", torch.randn(max_len, D))
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        s = x.size(1)
        h = x + self.pos(torch.arange(s, device=x.device)) + self.pos(self.position_ids[:, :s])
        h = h + self.table[:s] + self.table.narrow(0, 2, s) + torch.arange(1, s + 1, dtype=x.dtype)[:, None]
        out = self.lin(h)
        return out, out.pow(2).mean()


def test_positions_and_tables(ranks, seed):
    found = families(Positions(), torch.randn(B, S, D))
    assert found["aten.arange"] == {POSITIONS}
    assert found["aten.slice"] >= {TABLE} and found["aten.narrow"] == {TABLE}
    for world in (2, 3):
        ranks(world).run(on_ranks, "positions", seed, 4 * world + 1)


# ------------------------------------------------------------------------------------ along dim


class AlongFeatures(nn.Module):
    def forward(self, x):
        d = x.size(-1)
        h = x.cumsum(-1) + x.softmax(-1) + x.log_softmax(-1) + x.sort(-1).values + x.argsort(-1).to(x.dtype)
        a, b = x.split(d // 2, -1)
        c, e = x.chunk(2, dim=-1)
        h = h + torch.cat([b, a], -1) + torch.cat([e, c], -1) + torch.stack([a, b], -1).flatten(-2)
        h = h + x.topk(2, -1).values.sum(-1, keepdim=True) + x.max(-1, keepdim=True).values + x.argmax(-1, True)
        h = h + F.pad(x[..., 1:], (0, 1)) + x[..., : d // 2].repeat_interleave(2, dim=-1)
        return h + sum(x.unbind(-1))[..., None]


class AlongTokens(nn.Module):
    def forward(self, x):
        return (x.cumsum(1) + x.softmax(1) + x.sort(1).values + torch.cat([x[:, 1:], x[:, :1]], 1)
                + x.topk(1, 1).values + F.pad(x, (0, 0, 1, 0))[:, 1:])


def test_along_dim():
    x = torch.randn(B, S, D)
    assert_families(families(AlongFeatures(), x), {
        "aten.cumsum": LOCAL, "aten.softmax": LOCAL, "aten.sort": LOCAL, "aten.split": LOCAL, "aten.chunk": LOCAL,
        "aten.cat": LOCAL, "aten.stack": LOCAL, "aten.topk": LOCAL, "aten.max": LOCAL, "aten.pad": LOCAL,
        "aten.repeat_interleave": LOCAL, "aten.unbind": LOCAL})
    on_shards(AlongFeatures(), x)
    found = families(AlongTokens(), x)
    for op in ("aten.cumsum", "aten.softmax", "aten.sort", "aten.topk", "aten.pad"):
        assert found[op] == {MIX}, (op, found)
    assert found["aten.cat"] == {JOIN}, found  # a new sequence: gathered whole, cut again (tests/passes/test_slicing.py)


# ------------------------------------------------------------------------------------ selection


class Selection(nn.Module):
    """Picking features: slices, selects, fixed indices, gathers and scatters along a dim without tokens."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, 4, bias=False)

    def forward(self, x):
        d = x.size(-1)
        h = x[..., : d // 2].repeat(1, 1, 2) + x[..., [1, 0, 3, 2, 5, 4, 7, 6]] + x.select(-1, 0)[..., None]
        h = h + x.index_select(-1, torch.tensor([7, 6, 5, 4, 3, 2, 1, 0]))
        logits = self.router(x)                                  # [b, s, experts]
        vals, idx = logits.topk(2, dim=-1)
        scores = torch.full_like(logits, float("-inf")).scatter(-1, idx, vals).sigmoid()
        picked = logits.gather(-1, idx) + torch.zeros_like(logits).scatter_add(-1, idx, vals).gather(-1, idx)
        return h + scores.sum(-1, keepdim=True) + picked.sum(-1, keepdim=True)


class SlicesTokens(nn.Module):
    def forward(self, x):
        return x[:, 1:].sum() + x[:, 0].sum() + x[:, ::2].sum() + x.index_select(1, torch.tensor([0])).sum()


def test_selection():
    x = torch.randn(B, S, D)
    assert_families(families(Selection(), x), {"aten.slice": LOCAL, "aten.index": LOCAL, "aten.select": LOCAL,
                                               "aten.index_select": LOCAL, "aten.scatter": LOCAL,
                                               "aten.gather": LOCAL, "aten.scatter_add": LOCAL})
    on_shards(Selection(), x)
    found = families(SlicesTokens(), x)  # along the tokens: plain slices and one token (tests/passes/test_slicing.py)
    assert found["aten.slice"] == {SLICE, MIX}, found  # x[:, 1:] keeps a frame; x[:, ::2] mixes
    assert found["aten.select"] == {SELECT} and found["aten.index_select"] == {MIX}, found


def test_unknown_ops_mix():
    class Flip(nn.Module):
        def forward(self, x):
            return x.flip(-1)

    assert families(Flip(), torch.randn(B, S, D)) == {"aten.flip": {MIX}}


# --------------------------------------------------- complex rotary tables (torchtitan) and a router (Llama 4)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """torchtitan's rotary table: [end, dim/2] complex64 from ``torch.polar``."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    freqs = torch.outer(torch.arange(end, device=freqs.device), freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    seqlen = x.shape[1]
    freqs_cis = freqs_cis[0:seqlen]
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq, xk, freqs_cis):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class TitanAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x, freqs_cis):
        bs, seqlen, _ = x.shape
        xq, xk, xv = (w(x).view(bs, seqlen, self.heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2), is_causal=True)
        # torchtitan spells this .contiguous().view(...); ringify drops that contiguous after SDPA (a separate bug)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


class TitanLM(nn.Module):
    """A torchtitan-style Llama: the complex ``freqs_cis`` buffer, sliced to the sequence in every layer."""

    def __init__(self, vocab=50, dim=32, heads=4, layers=2, max_len=64):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(attention_norm=nn.RMSNorm(dim), attention=TitanAttention(dim, heads),
                                                       ffn_norm=nn.RMSNorm(dim), w1=nn.Linear(dim, 2 * dim, bias=False),
                                                       w2=nn.Linear(2 * dim, dim, bias=False)))
                                    for _ in range(layers))
        self.norm, self.output = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(dim // heads, max_len * 2), persistent=False)

    def forward(self, tokens, labels):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = h + layer["attention"](layer["attention_norm"](h), self.freqs_cis)
            h = h + layer["w2"](F.silu(layer["w1"](layer["ffn_norm"](h))))
        logits = self.output(self.norm(h))
        return logits, F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))


class RouterMoE(nn.Module):
    """Llama 4's router over ``[tokens, experts]`` logits: top-k, then ``full_like(-inf).scatter_`` of the kept."""

    def __init__(self, dim=D, experts=4, k=2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))

    def forward(self, x, target):
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        logits = self.router(flat)
        top_vals, top_idx = torch.topk(logits, self.k, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter_(1, top_idx, top_vals).sigmoid()
        gathered = torch.gather(logits, 1, top_idx).sum(1, keepdim=True)
        out = sum(scores[:, e:e + 1] * expert(flat) for e, expert in enumerate(self.experts)) + gathered
        out = out.view(b, s, d)
        return out, F.mse_loss(out, target)


def _titan(seq_len):
    ids = torch.randint(0, 50, (B, seq_len))
    return TitanLM(), (ids, torch.randint(0, 50, (B, seq_len)))


def _router(seq_len):
    return RouterMoE(), (torch.randn(B, seq_len, D), torch.randn(B, seq_len, D))


CASES = {"losses": _losses, "positions": lambda s: (Positions(), (torch.randn(B, s, D),)), "titan": _titan,
         "router": _router,
         "repeat": lambda s: (RepeatMoE(), (torch.randn(B, s, D), torch.randn(B, s, D))),
         "writes": lambda s: (InPlaceWrites(), (torch.randn(B, s, D), torch.randn(B, s, D + 2)))}


def test_complex_rotary_table(ranks, seed):
    """torchtitan's ``freqs_cis[0:T]``: a complex table sliced to the sequence, rows at each rank's positions."""
    model, args = _titan(S)
    found = families(model, *args)
    assert found["aten.slice"] == {TABLE} and found["aten.view_as_complex"] == {LOCAL}
    assert found["aten.view_as_real"] == {LOCAL} and found["aten.mul"] == {LOCAL}
    ranks(2).run(on_ranks, "titan", seed, 11)


def test_router_scatter_over_experts(ranks, seed):
    model, args = _router(S)
    found = families(model, *args)
    assert found["aten.scatter_"] | found.get("aten.scatter", set()) <= {LOCAL}, found
    assert found["aten.gather"] == found["aten.topk"] == {LOCAL}
    ranks(2).run(on_ranks, "router", seed, 9)


def test_scatter_along_the_tokens_is_refused():
    class ScatterTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            h = self.lin(x)
            idx = torch.zeros(h.shape, dtype=torch.long, device=x.device)
            return torch.zeros_like(h).scatter_add(1, idx, h).sum()

    model = ScatterTokens()
    assert families(model, torch.randn(B, S, D))["aten.scatter_add"] == {MIX}
    with pytest.raises(UnsupportedModelError, match="scatter_add"):
        ringify(model)(torch.randn(B, S, D))
