"""The Triton block-attention kernels against an fp64 reference of the same contract.

Without a GPU the kernels run in the Triton interpreter on CPU tensors. ``triton.jit`` chooses between
compiling and interpreting when it wraps a function, from TRITON_INTERPRET; for triton's own library
functions (``tl.max``, ``tl.sum``, ...) that is when triton is imported. So this module imports triton,
and loads a private copy of the kernel module, with TRITON_INTERPRET=1, and then puts the variable back:
other test modules, and the package's own kernel module, are left as they were. If another test module
imported triton first, nothing can be interpreted in this process and the module is skipped. With a GPU
none of this applies: the package's module runs compiled. Shapes are small: the interpreter is slow.
"""

import importlib
import importlib.util
import math

import pytest
import torch

from triton_interpret import interpret_mode

KERNELS = "ringify.runtime.triton_attention"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5
LOW_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


with interpret_mode():
    triton = pytest.importorskip("triton")
tl = triton.language
if DEVICE == "cpu" and isinstance(tl.max, triton.runtime.jit.JITFunction):
    pytest.skip(
        "triton was imported in this process (by another test module?) before TRITON_INTERPRET=1 was set, so "
        "its functions cannot be interpreted: run this module on its own, or with TRITON_INTERPRET=1 set",
        allow_module_level=True,
    )


def load_kernels():
    if DEVICE == "cuda":
        return importlib.import_module(KERNELS)
    origin = importlib.util.find_spec(KERNELS).origin
    spec = importlib.util.spec_from_file_location("_interpreted_triton_attention", origin)
    module = importlib.util.module_from_spec(spec)
    with interpret_mode():
        spec.loader.exec_module(module)
    return module


ta = load_kernels()


@pytest.fixture(autouse=True, scope="module")
def interpret_launches():
    """The interpreter reads TRITON_INTERPRET at launch too."""
    with interpret_mode():
        yield


# ----------------------------------------------------------------------------------------------------
# fp64 reference
# ----------------------------------------------------------------------------------------------------


def finite(x):
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def scores(q, k, q_pos, k_pos, scale, causal):
    """fp64 q @ k^T * scale with query head h on key head h // G, causal entries -inf."""
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(k_pos.cpu()[None, :] > q_pos.cpu()[:, None], -math.inf)
    return s


def reference_block(q, k, v, q_pos, k_pos, scale, causal):
    """(out, lse) of q attending to one block alone; a row that sees no key gets out 0, lse -inf."""
    s = scores(q, k, q_pos, k_pos, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - finite(lse)[..., None])
    return p @ v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1), lse


def reference_merge(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    w_a, w_b = (torch.exp(x - finite(lse))[..., None] for x in (lse_a, lse_b))
    return out_a * w_a + out_b * w_b, lse


def reference_grads(q, k, v, do, lse, delta, q_pos, k_pos, scale, causal):
    """One block's (dq, dk, dv) from the final lse and delta = rowsum(dO * O)."""
    b, h_kv, lk, _ = k.shape
    group = q.shape[1] // h_kv
    s = scores(q, k, q_pos, k_pos, scale, causal)
    p = torch.exp(s - torch.where(torch.isneginf(lse), math.inf, lse.double())[..., None])
    k64, v64 = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    ds = p * (do.double() @ v64.transpose(-1, -2) - delta.double()[..., None])
    per_head = lambda t: t.reshape(b, h_kv, group, lk, -1).sum(2)
    dq = ds @ k64 * scale
    return dq, per_head(ds.transpose(-1, -2) @ q.double() * scale), per_head(p.transpose(-1, -2) @ do.double())


# ----------------------------------------------------------------------------------------------------
# Inputs and checks
# ----------------------------------------------------------------------------------------------------


def positions(kind, lq, lk, gen):
    """Sorted global positions (q, k) of a query shard and a key block."""
    if kind == "contiguous":  # the diagonal block
        return torch.arange(lq), torch.arange(lk)
    if kind == "zigzag":  # two runs each: queries hold the first and the last, keys two in between
        a, b, n = lq // 2, lk // 2, lq + lk + 12
        q = torch.cat([torch.arange(a), torch.arange(n - (lq - a), n)])
        k = torch.cat([torch.arange(a + 2, a + 2 + b), torch.arange(a + b + 10, n - (lq - a) - 2)])
        return q, k
    if kind == "strided":  # ranks 1 and 2 of a striped world of 4: the first query sees no key
        return torch.arange(lq) * 4 + 1, torch.arange(lk) * 4 + 2
    if kind == "after":  # every key comes after every query
        return torch.arange(lq), torch.arange(lk) + lq
    if kind == "random":
        n = 2 * (lq + lk)
        return (torch.randperm(n, generator=gen)[:lq].sort().values,
                torch.randperm(n, generator=gen)[:lk].sort().values)
    raise ValueError(kind)


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def make_inputs(gen, b, h, h_kv, lq, lk, d, dtype=torch.float32):
    return randn(gen, b, h, lq, d, dtype=dtype), randn(gen, b, h_kv, lk, d, dtype=dtype), \
        randn(gen, b, h_kv, lk, d, dtype=dtype)


def fresh_state(b, h, lq, d):
    return torch.zeros(b, h, lq, d, device=DEVICE), torch.full((b, h, lq), -math.inf, device=DEVICE)


def check(actual, expected, tol, name=""):
    """No NaN, -inf exactly where expected, and ||actual - expected|| / ||expected|| <= tol elsewhere."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert not actual.isnan().any(), f"{name}: NaN"
    inf = expected.isinf()
    assert torch.equal(actual.isinf(), inf) and torch.equal(actual[inf], expected[inf]), f"{name}: -inf rows differ"
    diff = (actual[~inf] - expected[~inf]).norm().item()
    norm = expected[~inf].norm().item()
    error = diff / norm if norm > 0 else diff
    assert error <= tol if norm > 0 else diff == 0, f"{name}: relative error {error:.2e} > {tol:.0e}"


# (B, H, H_kv, Lq, Lk, D, positions, causal, (block_m, block_n)): one key per case rather than a full
# product, to keep the interpreter run short. Lengths of 37 leave ragged tiles; D = 40 pads the head dim;
# None tiles use the defaults (a single tile under these lengths).
CASES = [
    (1, 4, 4, 37, 37, 16, "contiguous", True, (16, 16)),
    (2, 4, 2, 37, 16, 64, "zigzag", True, (16, 32)),
    (1, 4, 1, 16, 37, 16, "strided", True, (16, 16)),
    (1, 4, 2, 37, 37, 40, "random", True, (32, 16)),
    (1, 4, 1, 37, 37, 64, "random", False, (16, 16)),
    (2, 4, 4, 16, 37, 16, "contiguous", False, (None, None)),
    (1, 4, 2, 37, 16, 16, "after", True, (16, 16)),
]
CASE_IDS = [f"{c[6]}-{'causal' if c[7] else 'full'}-h{c[1]}kv{c[2]}-q{c[3]}k{c[4]}d{c[5]}" for c in CASES]


def run_forward(q, k, v, state, q_pos, k_pos, causal, tiles):
    out, lse = state
    ta.triton_block_forward(q, k, v, out, lse, q_pos.to(DEVICE), k_pos.to(DEVICE), scale=q.shape[-1] ** -0.5,
                            causal=causal, block_m=tiles[0], block_n=tiles[1])
    return out, lse


def run_backward(q, k, v, do, lse, delta, q_pos, k_pos, causal, tiles, gen):
    """Gradients accumulated onto random initial dq, dk, dv; returns (initial, final) of each."""
    init = [randn(gen, *t.shape) for t in (q, k, v)]
    grads = [t.clone() for t in init]
    ta.triton_block_backward(q, k, v, do, lse, delta, *grads, q_pos.to(DEVICE), k_pos.to(DEVICE),
                             scale=q.shape[-1] ** -0.5, causal=causal, block_m=tiles[0], block_n=tiles[1])
    return init, grads


def check_grads(init, grads, expected, tol):
    for name, a, g, e in zip(("dq", "dk", "dv"), init, grads, expected):
        check(g.double().cpu() - a.double().cpu(), e, tol, name)


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------


def test_available():
    assert ta.triton_available()


@pytest.mark.parametrize("block", [2, 16])
@pytest.mark.parametrize("kind", ["zigzag", "strided", "random"])
def test_tile_plan_is_tight(seed, kind, block):
    """The host-side plan that the kernels' causal tile skipping relies on. Per query tile: keys before
    `full` are visible to all of its rows, keys from `end` on to none (and neither bound can move). Per key
    tile: query rows before `start` see none of its keys, rows from `full` on see all of them."""
    q_pos, k_pos = positions(kind, 37, 23, torch.Generator().manual_seed(seed))
    visible = k_pos[None, :] <= q_pos[:, None]
    lq, lk = visible.shape
    for t, (full, end) in enumerate(zip(*(x.tolist() for x in ta._key_bounds(q_pos, k_pos, block, True)))):
        rows = visible[t * block : (t + 1) * block]
        assert rows[:, :full].all() and not rows[:, end:].any()
        assert (full == lk or not rows[:, full].all()) and (end == 0 or rows[:, end - 1].any())
    for t, (start, full) in enumerate(zip(*(x.tolist() for x in ta._query_bounds(q_pos, k_pos, block, True)))):
        cols = visible[:, t * block : (t + 1) * block]
        assert not cols[:start].any() and cols[full:].all()
        assert (start == lq or cols[start].any()) and (full == 0 or not cols[full - 1].all())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_fp32(seed, case):
    b, h, h_kv, lq, lk, d, kind, causal, tiles = case
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = positions(kind, lq, lk, gen)
    q, k, v = make_inputs(gen, b, h, h_kv, lq, lk, d)
    out, lse = run_forward(q, k, v, fresh_state(b, h, lq, d), q_pos, k_pos, causal, tiles)
    ref_out, ref_lse = reference_block(q.cpu(), k.cpu(), v.cpu(), q_pos, k_pos, d**-0.5, causal)
    check(out, ref_out, FP32_TOL, "out")
    check(lse, ref_lse, FP32_TOL, "lse")
    if kind == "after":
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward_fp32(seed, case):
    b, h, h_kv, lq, lk, d, kind, causal, tiles = case
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = positions(kind, lq, lk, gen)
    q, k, v = make_inputs(gen, b, h, h_kv, lq, lk, d)
    do = randn(gen, b, h, lq, d)
    # the final lse also counts other blocks (random here, -inf for a few rows); delta is any row vector
    other = torch.randn(b, h, lq, generator=gen, dtype=torch.float64) + 2
    other[..., ::5] = -math.inf
    lse = torch.logaddexp(reference_block(q.cpu(), k.cpu(), v.cpu(), q_pos, k_pos, d**-0.5, causal)[1], other)
    delta = torch.randn(b, h, lq, generator=gen, dtype=torch.float64)
    lse32, delta32 = lse.float().to(DEVICE), delta.float().to(DEVICE)
    init, grads = run_backward(q, k, v, do, lse32, delta32, q_pos, k_pos, causal, tiles, gen)
    expected = reference_grads(q.cpu(), k.cpu(), v.cpu(), do.cpu(), lse32.cpu(), delta32.cpu(), q_pos, k_pos,
                               d**-0.5, causal)
    check_grads(init, grads, expected, FP32_TOL)


# (positions, causal, D, Dv): multi-head latent attention's value head dim of its own, wider and narrower than
# q/k's, both padded (6 -> 16, 12 -> 16, 24 -> 32), and ragged tiles of 16
VALUE_DIM_CASES = [("zigzag", True, 6, 12), ("random", False, 24, 8)]


@pytest.mark.parametrize("kind,causal,d,dv", VALUE_DIM_CASES, ids=[f"{c[0]}-d{c[2]}-dv{c[3]}" for c in VALUE_DIM_CASES])
def test_value_head_dim_of_its_own(seed, kind, causal, d, dv):
    gen = torch.Generator().manual_seed(seed)
    b, h, h_kv, lq, lk = 1, 4, 2, 21, 19
    q_pos, k_pos = positions(kind, lq, lk, gen)
    q, k, v = randn(gen, b, h, lq, d), randn(gen, b, h_kv, lk, d), randn(gen, b, h_kv, lk, dv)
    out, lse = run_forward(q, k, v, fresh_state(b, h, lq, dv), q_pos, k_pos, causal, (16, 16))
    ref_out, ref_lse = reference_block(q.cpu(), k.cpu(), v.cpu(), q_pos, k_pos, d**-0.5, causal)
    check(out, ref_out, FP32_TOL, "out")
    check(lse, ref_lse, FP32_TOL, "lse")
    do = randn(gen, b, h, lq, dv)
    delta = (do.double().cpu() * ref_out).sum(-1).float().to(DEVICE)
    init, grads = run_backward(q, k, v, do, lse, delta, q_pos, k_pos, causal, (16, 16), gen)
    expected = reference_grads(q.cpu(), k.cpu(), v.cpu(), do.cpu(), lse.cpu(), delta.cpu(), q_pos, k_pos, d**-0.5,
                               causal)
    check_grads(init, grads, expected, FP32_TOL)


def test_merges_into_existing_state(seed):
    """The running state of earlier blocks (random here; some rows still -inf) is merged by log-sum-exp."""
    gen = torch.Generator().manual_seed(seed)
    b, h, h_kv, lq, lk, d = 2, 4, 1, 37, 37, 16
    q_pos, k_pos = positions("zigzag", lq, lk, gen)
    q, k, v = make_inputs(gen, b, h, h_kv, lq, lk, d)
    lse = torch.randn(b, h, lq, generator=gen, dtype=torch.float64) + 3
    lse[..., ::4] = -math.inf  # among them rows 0-17, which see no key of this block either
    out = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64).masked_fill(torch.isneginf(lse)[..., None], 0)
    state = run_forward(q, k, v, (out.float().to(DEVICE), lse.float().to(DEVICE)), q_pos, k_pos, True, (16, 16))
    blk_out, blk_lse = reference_block(q.cpu(), k.cpu(), v.cpu(), q_pos, k_pos, d**-0.5, True)
    ref_out, ref_lse = reference_merge(out.float().double(), lse.float().double(), blk_out, blk_lse)
    assert torch.isneginf(ref_lse).any()
    check(state[0], ref_out, FP32_TOL, "out")
    check(state[1], ref_lse, FP32_TOL, "lse")


@pytest.mark.parametrize("heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
def test_two_blocks_merge_like_one(seed, heads):
    """Two calls on interleaved key blocks, the second merging into the state of the first, equal one
    attention over all the keys."""
    h, h_kv = heads
    gen = torch.Generator().manual_seed(seed)
    q_pos = torch.randperm(80, generator=gen)[:37].sort().values
    k_pos = torch.arange(80)
    first, second = k_pos[k_pos % 3 == 0], k_pos[k_pos % 3 != 0]  # every third key, the rest
    q, k, v = make_inputs(gen, 1, h, h_kv, 37, 80, 16)
    state = fresh_state(1, h, 37, 16)
    for block in (first, second):
        run_forward(q, k[:, :, block], v[:, :, block], state, q_pos, block, True, (16, 16))
    ref_out, ref_lse = reference_block(q.cpu(), k.cpu(), v.cpu(), q_pos, k_pos, 0.25, True)
    check(state[0], ref_out, FP32_TOL, "out")
    check(state[1], ref_lse, FP32_TOL, "lse")


def test_invisible_block_leaves_state_unchanged(seed):
    """A block entirely after the queries adds nothing, including to rows that have seen nothing yet."""
    gen = torch.Generator().manual_seed(seed)
    q_pos = torch.arange(37) * 2
    early = torch.arange(16) * 4 + 1  # the first query sees none of these
    q, k, v = make_inputs(gen, 1, 4, 2, 37, 16, 16)
    state = run_forward(q, k, v, fresh_state(1, 4, 37, 16), q_pos, early, True, (16, 16))
    before = [t.clone() for t in state]
    assert torch.isneginf(before[1][..., 0]).all() and torch.isfinite(before[1][..., 1:]).all()
    _, k2, v2 = make_inputs(gen, 1, 4, 2, 37, 16, 16)
    run_forward(q, k2, v2, state, q_pos, torch.arange(16) + 100, True, (16, 16))
    assert torch.equal(state[0], before[0]) and torch.equal(state[1], before[1])


def test_strided_views(seed):
    """[B, L, H, D] tensors seen as [B, H, L, D], and a head dim with stride 2, give the same result."""
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = positions("zigzag", 37, 37, gen)
    b, h, h_kv, d = 2, 4, 2, 16
    q = randn(gen, b, 37, h, d).transpose(1, 2)
    k = randn(gen, b, 37, h_kv, d).transpose(1, 2)
    v = randn(gen, b, 37, h_kv, 2 * d).transpose(1, 2)[..., ::2]
    do = randn(gen, b, 37, h, d).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.stride(-1) == 1)
    out, lse = run_forward(q, k, v, fresh_state(b, h, 37, d), q_pos, k_pos, True, (16, 16))
    ref_out, ref_lse = reference_block(q.cpu(), k.cpu(), v.cpu(), q_pos, k_pos, d**-0.5, True)
    check(out, ref_out, FP32_TOL, "out")
    delta = (do * out).sum(-1)
    init, grads = run_backward(q, k, v, do, lse, delta, q_pos, k_pos, True, (16, 16), gen)
    expected = reference_grads(q.cpu(), k.cpu(), v.cpu(), do.cpu(), lse.cpu(), delta.cpu(), q_pos, k_pos,
                               d**-0.5, True)
    check_grads(init, grads, expected, FP32_TOL)


def test_ring_of_two_blocks_matches_autograd(seed):
    """Forward over both blocks of a zigzag ring step, then backward per block with the final lse and
    delta, equal autograd through fp64 softmax attention over all keys."""
    gen = torch.Generator().manual_seed(seed)
    b, h, h_kv, d = 1, 4, 2, 16
    q_pos = torch.cat([torch.arange(0, 19), torch.arange(57, 75)])  # zigzag rank 0 of 2, 75 tokens
    blocks = [q_pos, torch.arange(19, 57)]  # its own keys, then rank 1's
    q = randn(gen, b, h, 37, d)
    kv = [make_inputs(gen, b, h, h_kv, 37, len(p), d)[1:] for p in blocks]
    do = randn(gen, b, h, 37, d)
    state = fresh_state(b, h, 37, d)
    for (k, v), k_pos in zip(kv, blocks):
        run_forward(q, k, v, state, q_pos, k_pos, True, (16, 16))
    out, lse = state
    delta = (do * out).sum(-1)
    grads = []
    for (k, v), k_pos in zip(kv, blocks):
        init, g = run_backward(q, k, v, do, lse, delta, q_pos, k_pos, True, (16, 32), gen)
        grads.append([(x - i).cpu() for x, i in zip(g, init)])

    q64 = q.cpu().double().requires_grad_()
    k64, v64 = (torch.cat([t[i].cpu() for t in kv], dim=2).double().requires_grad_() for i in (0, 1))
    k_all = torch.cat(blocks)
    mask = k_all[None, :] > q_pos[:, None]
    group = h // h_kv
    s = (q64 @ k64.repeat_interleave(group, dim=1).transpose(-1, -2) * d**-0.5).masked_fill(mask, -math.inf)
    ref = torch.softmax(s, dim=-1) @ v64.repeat_interleave(group, dim=1)
    ref.backward(do.cpu().double())
    check(out, ref, FP32_TOL, "out")
    check(grads[0][0] + grads[1][0], q64.grad, FP32_TOL, "dq")
    lk0 = len(blocks[0])
    check(torch.cat([grads[0][1], grads[1][1]], dim=2), k64.grad, FP32_TOL, "dk")
    check(torch.cat([grads[0][2], grads[1][2]], dim=2), v64.grad, FP32_TOL, "dv")
    assert k64.grad[:, :, :lk0].abs().sum() > 0 and k64.grad[:, :, lk0:].abs().sum() > 0


# Key rows past Lk in a ragged dk/dv tile overflow to inf and NaN there; they are never stored.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_very_negative_scores(seed, causal):
    """Scores near -180, so that exp(0 - lse) overflows fp32: no inf or NaN reaches the results."""
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = positions("random", 37, 37, gen)
    q = randn(gen, 1, 4, 37, 16).abs() + 6
    k = -(randn(gen, 1, 2, 37, 16).abs() + 6)
    v, do = randn(gen, 1, 2, 37, 16), randn(gen, 1, 4, 37, 16)
    out, lse = run_forward(q, k, v, fresh_state(1, 4, 37, 16), q_pos, k_pos, causal, (16, 16))
    ref_out, ref_lse = reference_block(q.cpu(), k.cpu(), v.cpu(), q_pos, k_pos, 0.25, causal)
    assert ref_lse[~torch.isneginf(ref_lse)].max() < -100
    # fp32 scores this large carry ~1e-5 absolute error, which p = exp(s - lse) inherits; dq = ds @ k then
    # cancels the large component that all keys share, which costs another factor of ~10
    check(out, ref_out, 1e-4, "out")
    check(lse, ref_lse, 1e-4, "lse")
    delta = (do * out).sum(-1)
    init, grads = run_backward(q, k, v, do, lse, delta, q_pos, k_pos, causal, (16, 16), gen)
    expected = reference_grads(q.cpu(), k.cpu(), v.cpu(), do.cpu(), lse.cpu(), delta.cpu(), q_pos, k_pos, 0.25,
                               causal)
    check_grads(init, grads, expected, 1e-3)


def _bf16_dot_probe(X, Y):
    i = tl.arange(0, 16)
    x = tl.load(X + i[:, None] * 16 + i[None, :])
    tl.store(Y + i[:, None] * 16 + i[None, :], tl.dot(x, x))


def bf16_dot_works() -> bool:
    """False under interpreters that multiply the raw bit patterns of bf16 tl.dot operands (triton 3.9:
    triton-lang/triton#11584, not supported yet)."""
    with interpret_mode():
        probe = triton.jit(_bf16_dot_probe)
    x = torch.randn(16, 16).bfloat16().to(DEVICE)
    y = torch.empty(16, 16, device=DEVICE)
    probe[(1,)](x, y)
    return torch.allclose(y, x.float() @ x.float(), rtol=1e-2, atol=1e-2)


LOW_CASES = [
    (torch.float16, (2, 4, 2, 37, 37, 64, "zigzag", True, (16, 32))),
    (torch.float16, (1, 4, 1, 37, 16, 16, "random", False, (16, 16))),
    (torch.bfloat16, (1, 4, 2, 37, 37, 16, "random", True, (16, 16))),
]


@pytest.mark.parametrize("dtype,case", LOW_CASES, ids=["fp16-zigzag", "fp16-full", "bf16-random"])
def test_low_precision(seed, dtype, case):
    """fp16/bf16 inputs, fp32 state and gradients, against fp64 on the same rounded inputs."""
    if dtype == torch.bfloat16 and not bf16_dot_works():
        pytest.skip("the Triton interpreter does not support bf16 tl.dot (triton-lang/triton#11584)")
    b, h, h_kv, lq, lk, d, kind, causal, tiles = case
    gen = torch.Generator().manual_seed(seed)
    q_pos, k_pos = positions(kind, lq, lk, gen)
    q, k, v = make_inputs(gen, b, h, h_kv, lq, lk, d, dtype=dtype)
    do = randn(gen, b, h, lq, d, dtype=dtype)
    out, lse = run_forward(q, k, v, fresh_state(b, h, lq, d), q_pos, k_pos, causal, tiles)
    ref_out, ref_lse = reference_block(q.cpu(), k.cpu(), v.cpu(), q_pos, k_pos, d**-0.5, causal)
    check(out, ref_out, LOW_TOL[dtype], "out")
    check(lse, ref_lse, LOW_TOL[dtype], "lse")
    delta = (do.float() * out).sum(-1)
    init, grads = run_backward(q, k, v, do, lse, delta, q_pos, k_pos, causal, tiles, gen)
    expected = reference_grads(q.cpu(), k.cpu(), v.cpu(), do.cpu(), lse.cpu(), delta.cpu(), q_pos, k_pos,
                               d**-0.5, causal)
    check_grads(init, grads, expected, LOW_TOL[dtype])
