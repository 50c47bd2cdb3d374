"""The analytic cost model: memory per device, the ring step, the largest context and generation, from numbers.

Everything here is arithmetic on a :class:`ModelProfile` (what a model costs, independent of the sequence length
and the world size: plain numbers, JSON-able) and a :class:`Hardware` profile, so it needs no graph and no
torch run, and can be evaluated at many (sequence length, world size) pairs for reports and plans. How a
profile is measured is :mod:`ringify.cost.profile`; the formulas are in ``docs/cost_model.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

__all__ = ["HARDWARE", "OPTIMIZER_STATES", "Hardware", "ModelProfile", "cache_slots", "check_training_setup",
           "cost_summary", "estimate", "generation_estimate", "generation_summary", "max_context", "max_prompt",
           "min_block_tokens"]

GB = 1e9
GIB = 2**30
FP32_BYTES = 4  # bytes of an fp32 value: accumulators, lse, master copies
_BWD_FLOPS = 2.5  # backward FLOPs / forward FLOPs of attention (5 matmuls against 2)


# --------------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    flops: float      # achievable dense FLOP/s per device for attention/matmul (bf16 on GPUs; fp32 on CPU)
    bandwidth: float  # ring link bytes/s per direction per device
    memory: float     # device memory, bytes
    kernel: str = "triton"  # block kernels: "triton" (tiles on chip), "fused" (torch's fused CPU kernel per piece:
                            # temporaries of the piece's rows) or "torch" (fp32 score tiles in memory)
    memory_bandwidth: float = 2e12  # device memory bytes/s that a decoded token's weight and cache reads get
    latency: float = 1e-5           # seconds per ring step of a small collective (decoding's all-gather per layer)


# Where the numbers come from:
# - H100 SXM, measured by us: bf16 matmul ~739 TFLOP/s, SDPA flash attention ~350 TFLOP/s forward,
#   cuDNN attention ~620 TFLOP/s (989 TFLOP/s dense bf16 peak). ringify's block kernels are flash-style
#   Triton kernels, so the flash figure is used. NVLink 4: 900 GB/s bidirectional = 450 GB/s per
#   direction. InfiniBand NDR: 400 Gb/s per GPU = 50 GB/s. 80 GB HBM3 (torch sees 85.0e9 bytes; 80e9
#   leaves room for the CUDA context, NCCL and the allocator's fragmentation).
# - H200: the H100's compute (same GH100 die and clocks), NVLink 4, 141 GB HBM3e.
# - A100 SXM: 312 TFLOP/s dense bf16 peak; FlashAttention-2 (Dao, 2023) reaches 187-230 TFLOP/s
#   forward, 200e12 used. NVLink 3: 600 GB/s bidirectional = 300 GB/s per direction. InfiniBand HDR:
#   200 Gb/s per GPU = 25 GB/s. 80 GB HBM2e.
# - cpu-gloo: the test machine, one torch thread per rank, fp32: the torch block kernels ran at
#   6-14 GFLOP/s and gloo over loopback moved 0.2-1 GB/s per rank (benchmarks/results/ring_overlap_cpu.json);
#   memory: an illustrative 8 GiB per rank.
# Decoding (memory_bandwidth, latency): HBM3 3.35 TB/s on H100 SXM, HBM3e 4.8 TB/s on H200, HBM2e 2.04 TB/s on
#   A100 80GB; about 90% of that is used (what bandwidth-bound kernels reach). A small all-gather costs some
#   3 us per ring step inside an NVLink node and 8 us over InfiniBand (NCCL's latency-bound regime). cpu-gloo:
#   one thread streamed a 4096 x 4096 fp32 matrix-vector product at 23 GB/s on the test machine, and a gloo
#   all-gather of a few KiB took 0.26 ms on 2 ranks (more ranks than its 2 cores made it 2.4-3.9 ms).
HARDWARE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware("h100-nvlink", "H100 SXM 80GB, ring over NVLink 4 (one node)", 350e12, 450 * GB, 80 * GB,
                 memory_bandwidth=3.0e12, latency=3e-6),
        Hardware("h100-ib", "H100 SXM 80GB, ring over InfiniBand NDR 400 Gb/s per GPU", 350e12, 50 * GB, 80 * GB,
                 memory_bandwidth=3.0e12, latency=8e-6),
        Hardware("h200-nvlink", "H200 SXM 141GB, ring over NVLink 4 (one node)", 350e12, 450 * GB, 141 * GB,
                 memory_bandwidth=4.3e12, latency=3e-6),
        Hardware("a100-nvlink", "A100 SXM 80GB, ring over NVLink 3 (one node)", 200e12, 300 * GB, 80 * GB,
                 memory_bandwidth=1.8e12, latency=3e-6),
        Hardware("a100-ib", "A100 SXM 80GB, ring over InfiniBand HDR 200 Gb/s per GPU", 200e12, 25 * GB, 80 * GB,
                 memory_bandwidth=1.8e12, latency=8e-6),
        Hardware("cpu-gloo", "CPU processes, gloo over loopback, one thread per rank (tests, demo)", 10e9, 0.5 * GB,
                 8 * GIB, kernel="fused", memory_bandwidth=23e9, latency=2.6e-4),
    )
}


# ---------------------------------------------------------------------------------------------- profile


@dataclass
class ModelProfile:
    """What a model costs, independent of the sequence length and the world size.

    Memory is in bytes, as lines ``fixed + per_token * L`` in the number of tokens L one device holds
    (per-token bytes are for the whole batch of ``sim_batch`` rows and scaled to ``batch``), fitted to
    fake-tensor runs of the graph at ``fit_lengths`` (see ``docs/cost_model.md``). Everything is plain
    numbers: JSON via ``dataclasses.asdict``, back via ``ModelProfile(**d)``.
    """

    model: str = ""
    method: str = "fake-trace"           # "fake-trace" (measured on fake tensors) or "analytic" (fallback)
    layers: int = 0                      # attention layers (each one ring)
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    v_head_dim: int = 0                  # the value (and output) head dim where it differs (MLA); 0 = head_dim
    hidden: int = 0
    parameters: int = 0                  # count (tied weights once)
    parameter_bytes: int = 0             # in the dtype the graph computes in (the fake runs' parameters)
    buffer_bytes: int = 0                # persistent buffers (a causal-mask table, rotary frequencies)
    lookup_bytes: int = 0                # embedding tables no other module uses (a decoded token reads one row)
    gradient_bytes: int = 0              # parameters that require grad (0 without training)
    trainable_parameters: int = 0        # count of the parameters that require grad
    layer_parameters: int = 0            # the largest block of the largest nn.ModuleList (one FSDP2 unit)
    root_parameters: int = 0             # parameters outside the ModuleLists' blocks (the root FSDP2 unit)
    dtype_bytes: int = 2                 # of q, k, v
    compute_dtype: str = ""              # of the parameters as the graph computes (e.g. "bfloat16")
    meta_device: bool = False            # planned without weights: the parameters live on the meta device
    batch: int = 1
    training: bool = True
    # the training setup (see "Training state" in docs/cost_model.md)
    optimizer: str = "none"              # "none", "sgd" (momentum: 1 state per parameter), "adam" (2 states)
    mixed_precision: bool = False        # FSDP2 MixedPrecisionPolicy: fp32 master parameters, gradients and
                                         # optimizer states; compute in the graph's (16-bit) dtype
    dp: int = 1                          # FSDP2 data-parallel ranks that shard parameters, gradients, states
    checkpoint: str = ""                 # "" (no recomputation), "model" (the model's own checkpointing), "layers"
    recomputed_regions: int = 0          # regions recomputed in backward (activation checkpointing)
    causal: bool = False                 # every attention causal (or masked by a position comparison)
    causal_flag: bool = False            # every attention has the causal flag itself (not only a causal-like mask)
    masked: bool = False                 # some attention has a block mask: torch block kernels on any device
    layout: str = "zigzag"
    outputs: str = "full"                # "full": outputs with tokens are gathered to full length on every rank
    ffn_chunk_tokens: int | None = None
    tile_tokens: int = 256               # block_attention.TILE
    kv_copied: float = 0.0               # share of a K+V block the ring copies to send it (k or v not contiguous)
    # the fake-tensor runs (W = 1, ring internals excluded), in bytes
    activation_bytes_per_token: float = 0.0  # alive after forward: saved for backward + outputs (no S^2 terms)
    activation_bytes_fixed: float = 0.0
    # [fixed, per_token] lines. The peak of forward + backward (gradients made so far included) moves
    # between moments as the length grows (the end of backward while gradients dominate, its start once
    # activations do): one chord per pair of consecutive fit lengths, and one through the moment the
    # activations peak (with the gradients made by then), which the step's peak reaches once the sequence is
    # longer than the fitted ones; the estimate takes the largest.
    step_peak_lines: list = field(default_factory=list)
    attention_forward_lines: list = field(default_factory=list)   # alive when each attention forward starts
    attention_backward_lines: list = field(default_factory=list)  # alive when each attention backward starts
    # the same without the parameter gradients made so far (FSDP2 reduce-scatters and frees them per layer)
    activation_peak_lines: list = field(default_factory=list)
    attention_backward_activation_lines: list = field(default_factory=list)
    # activation checkpointing: alive when each attention forward that backward recomputes starts (a recomputed
    # region's), with the parameter gradients made so far, and without them; not among attention_forward_lines
    attention_recompute_lines: list = field(default_factory=list)
    attention_recompute_activation_lines: list = field(default_factory=list)
    output_bytes_per_token: float = 0.0      # the graph's outputs that have a token dim (logits)
    # inference only: the fake run of the prefill graph (cut after the last attention's keys, no gradients)
    prefill_peak_lines: list = field(default_factory=list)
    prefill_attention_lines: list = field(default_factory=list)  # alive when each of its attention forwards starts
    sim_batch: int = 1
    fit_lengths: list = field(default_factory=list)
    # torch block kernels' scratch, measured: how many fp32 [B, H, T, T] score tiles and [B, H, T, D] row
    # blocks are alive at once, {"forward"|"backward": {"one_piece"|"pieces": [tiles, rows]}} (one piece:
    # the block is a single T x T tile; pieces: more, and a finished piece's tile may outlive the next one's start)
    kernel_workspace: dict = field(default_factory=dict)
    fused_workspace: dict = field(default_factory=dict)  # {"forward"|"backward": [fixed bytes, per fp32 q element]}
    mask_chunk_bytes: float = 0.0        # evaluating the block mask on TILE queries x 4 TILE keys (fused kernels)
    mask_chunk_tiles: int = 4            # key tiles of that chunk (fused_attention._MASK_CHUNK)
    mask_static: bool = False            # every mask reads only buffers and positions: the fused kernels' tile
                                         # plan is cached across steps, so a step evaluates no mask
    mask_piece_bytes: float = 0.0            # evaluating the model's block mask on one T x T piece (peak)
    notes: list = field(default_factory=list)


OPTIMIZER_STATES = {"none": 0, "sgd": 1, "adam": 2}  # states per parameter: SGD's momentum; Adam's two moments


def check_training_setup(optimizer: str, dp: int) -> None:
    """Refuse a training setup the cost model does not know, naming what it knows."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)} (AdamW costs as adam), "
                         f"got {optimizer!r}")
    if int(dp) < 1:
        raise ValueError(f"dp (FSDP2 data-parallel ranks) must be >= 1, got {dp}")


# --------------------------------------------------------------------------------------------- estimate


def _shard_tokens(seq_len: int, world_size: int) -> int:
    return -(-int(seq_len) // int(world_size))


def _tile(profile: ModelProfile, local: int) -> tuple[int, bool]:
    """(rows and keys of the block kernel's score tile, whether a block is cut into several pieces) on the
    rank that decides: the kernels cut the layout's contiguous runs into TILE pieces, and some rank's
    shard is one run (zigzag: rank W-1 holds the adjacent chunks W-1 and W)."""
    tile = max(1, min(profile.tile_tokens, local))
    return tile, local > tile


def _lines(lines: list, tokens: int, scale: float) -> float:
    """The largest of ``fixed + per_token * tokens`` (per-token bytes scaled to the batch); 0 without lines."""
    return max((fixed + per_token * scale * tokens for fixed, per_token in lines), default=0.0)


def _v_dim(profile: ModelProfile) -> int:
    """The value head dim: the output's and dV's width, and the P @ V product's (MLA's differs from q/k's)."""
    return profile.v_head_dim or profile.head_dim


def _ring_terms(profile: ModelProfile, local: int, world_size: int, hardware: Hardware) -> dict:
    """Bytes of the ring on one device while one attention layer runs (forward, backward, and a forward that
    backward recomputes: activation checkpointing)."""
    b, h, hkv, d, dt = profile.batch, profile.heads, profile.kv_heads, profile.head_dim, profile.dtype_bytes
    dv = _v_dim(profile)
    kv_block = b * hkv * local * (d + dv)  # elements of one K+V block
    kind = hardware.kernel if hardware.kernel != "triton" or not profile.masked else "torch"  # CUDA: masks -> tiles
    torch_kernels = kind == "torch"
    t, pieces = _tile(profile, local)
    tile, rows = b * h * t * t * FP32_BYTES, b * h * t * d * FP32_BYTES
    mask = profile.mask_piece_bytes * t / max(1, profile.tile_tokens) * profile.batch / max(1, profile.sim_batch)
    # the fused kernels' classification chunk: T queries by up to 4 TILE keys, no more than the block has; from the
    # T x T piece, bytes per further key (the two measured at TILE rows), then, like the piece, linear in the rows
    full_tile, chunk_tiles = max(1, profile.tile_tokens), max(1, profile.mask_chunk_tiles)
    measured = profile.fit_lengths[0] if profile.fit_lengths else chunk_tiles * full_tile  # that run had no more keys
    span = min(chunk_tiles * full_tile, measured) - min(full_tile, measured)
    per_key = max(0.0, profile.mask_chunk_bytes - profile.mask_piece_bytes) / span if span > 0 else 0.0
    chunk_keys = max(0, min(chunk_tiles * full_tile, local) - full_tile)
    chunk = ((profile.mask_piece_bytes + per_key * chunk_keys) * t / full_tile * profile.batch
             / max(1, profile.sim_batch)) if profile.mask_chunk_bytes else 0.0

    def kernel(phase: str, recomputed: bool = False) -> float:
        """The kernel's scratch: its own tiles, or evaluating the block mask while the tiles of the piece
        before may still be alive."""
        ws = profile.kernel_workspace.get(phase) or {}
        one, many = ws.get("one_piece", [0.0, 0.0]), ws.get("pieces", [0.0, 0.0])
        tiles, row_blocks = many if pieces else one
        carried = max(0.0, many[0] - one[0]) if pieces else 0.0
        if kind == "fused":  # the piece's output (and dQ, dK, dV) beside the running state: rows of the block
            fixed, per_row = (profile.fused_workspace or {}).get(phase, [0.0, 0.0])
            # the block mask: classified (TILE x 4 TILE at a time) once per step, at the first forward, its plan
            # then shared by every layer and the backward, which evaluates only partly visible tiles (T x T), as
            # does a forward recomputed in backward (the same mask arguments as that backward's find the plan)
            first = phase == "forward" and not recomputed
            evaluated = 0.0 if profile.mask_static else (chunk if first else mask)
            return fixed + per_row * b * h * local * max(d, dv) * FP32_BYTES + evaluated  # heads padded to one width
        return max(tiles * tile + row_blocks * rows, mask + carried * tile) if torch_kernels else 0.0

    kernel_fwd, kernel_bwd = kernel("forward"), kernel("backward")
    # the fp32 running output (forward) and dQ (backward), allocated as the op starts: beside q's dtype, or in fp32
    # the result itself (which the fake run makes only when its stub returns)
    state_fwd = b * h * local * dv * FP32_BYTES
    state_bwd = b * h * local * (d + 1) * FP32_BYTES + kv_block * FP32_BYTES  # dQ, delta, the block's dK/dV
    ring = world_size > 1
    received = 1 if world_size == 2 else 2  # key/value receive buffers (runtime/ring_attention.py: _Ring.kv_buffers)
    received += profile.kv_copied  # and this rank's own block, copied to be sent when k or v is not contiguous
    return {
        "kv_forward": received * kv_block * dt if ring else 0,
        # the receive buffers, and two more fp32 dK/dV pairs: the share in flight and the accumulator arriving
        "kv_backward": (received * kv_block * dt + 2 * kv_block * FP32_BYTES) if ring else 0,
        "workspace_forward": kernel_fwd + state_fwd,
        "workspace_backward": kernel_bwd + state_bwd,
        "workspace_recompute": kernel("forward", recomputed=True) + state_fwd,
    }


def _training_state(profile: ModelProfile) -> dict:
    """Per-device bytes of what a step keeps besides activations: parameters (and buffers), gradients,
    optimizer states, and the compute-dtype copies FSDP2 all-gathers (see "Training state" in
    ``docs/cost_model.md``). Without FSDP (dp 1, no mixed precision) the gradients are the fake run's, in the
    model's dtype."""
    count, dp = profile.parameters, max(1, int(profile.dp))
    compute = profile.parameter_bytes / count if count else float(profile.dtype_bytes)
    trainable = profile.trainable_parameters or (profile.gradient_bytes / compute if compute else 0)
    master = FP32_BYTES if profile.mixed_precision else compute  # bytes per stored parameter, gradient, state
    fsdp = dp > 1 or profile.mixed_precision
    params = (count * master if profile.mixed_precision else profile.parameter_bytes) / dp + profile.buffer_bytes
    grads = states = gathered = 0.0
    if profile.training:
        grads = trainable * master / dp if fsdp else profile.gradient_bytes
        states = OPTIMIZER_STATES.get(profile.optimizer, 0) * trainable * master / dp
    if fsdp:  # the root unit's parameters (+ gradients) and two blocks' (computing and prefetched / gradients)
        units = 2 * profile.root_parameters + 2 * profile.layer_parameters if profile.training else (
            profile.root_parameters + 2 * profile.layer_parameters)
        gathered = units * compute
    return {"parameters": params, "gradients": grads, "optimizer_states": states, "gathered_parameters": gathered,
            "fsdp": fsdp}


def _activation_lines(profile: ModelProfile, lines: list, without_grads: list) -> list:
    """``without_grads`` when the profile has them, else ``lines`` less all gradients (older profiles)."""
    return without_grads or [[fixed - profile.gradient_bytes, per_token] for fixed, per_token in lines]


def _memory(profile: ModelProfile, seq_len: int, world_size: int, hardware: Hardware) -> dict:
    local = _shard_tokens(seq_len, world_size)
    scale = profile.batch / max(1, profile.sim_batch)
    ring = _ring_terms(profile, local, world_size, hardware)
    state = _training_state(profile)
    if state["fsdp"]:  # gradients leave as FSDP2 reduce-scatters them: the peak without them, plus its shards
        step_lines = _activation_lines(profile, profile.step_peak_lines, profile.activation_peak_lines)
        backward_lines = _activation_lines(profile, profile.attention_backward_lines,
                                           profile.attention_backward_activation_lines)
        recompute_lines = _activation_lines(profile, profile.attention_recompute_lines,
                                            profile.attention_recompute_activation_lines)
        held = 0.0
    else:  # every gradient stays where backward made it: the fake run's peak has them
        step_lines, backward_lines, held = profile.step_peak_lines, profile.attention_backward_lines, state["gradients"]
        recompute_lines = profile.attention_recompute_lines
    step = _lines(step_lines, local, scale)
    fwd = _lines(profile.attention_forward_lines, local, scale) + ring["kv_forward"] + ring["workspace_forward"]
    moments = [step, fwd]  # the step's own peak; inside an attention forward
    if profile.training:  # inside an attention backward
        moments.append(_lines(backward_lines, local, scale) + ring["kv_backward"] + ring["workspace_backward"])
        if recompute_lines:  # inside an attention forward that backward recomputes (activation checkpointing)
            moments.append(_lines(recompute_lines, local, scale) + ring["kv_forward"] + ring["workspace_recompute"])
        kv, workspace = ring["kv_backward"], ring["workspace_backward"]
    else:
        kv, workspace = ring["kv_forward"], ring["workspace_forward"]
    gathered = 0.0
    if profile.outputs == "full" and world_size > 1:
        output_bytes = profile.output_bytes_per_token * scale
        gathered = (int(seq_len) - local) * output_bytes
        # the all-gather itself, at the end of forward (runtime/sequence.py, _GatherSequence): beside what forward
        # leaves alive (the local outputs among it), the shard padded to the longest, one such piece from every
        # rank and the full output, at once; of the full output, all but a shard's length is ``gathered``
        after_forward = profile.activation_bytes_fixed + profile.activation_bytes_per_token * scale * local
        moments.append(after_forward + (world_size + 2) * local * output_bytes)
    peak = max(moments)
    activations = max(0, peak - held - kv - workspace)
    parts = {"parameters": state["parameters"], "gradients": state["gradients"],
             "optimizer_states": state["optimizer_states"], "gathered_parameters": state["gathered_parameters"],
             "activations": activations, "gathered_outputs": gathered, "kv_buffers": kv,
             "attention_workspace": workspace}
    out = {k: int(v) for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["fits"] = bool(out["total"] <= hardware.memory)
    return out


def _fraction(profile: ModelProfile) -> float:
    return 0.5 if profile.causal else 1.0


def _step(profile: ModelProfile, block: int, hardware: Hardware, ring: bool = True) -> tuple[int, float, float, bool]:
    """(bytes sent, compute seconds, transfer seconds, transfer hidden in every phase) of one ring step."""
    b, h, hkv, dt = profile.batch, profile.heads, profile.kv_heads, profile.dtype_bytes
    width = profile.head_dim + _v_dim(profile)  # Q K^T runs over the q/k head dim, P V over the value head dim
    fwd_flops = 2.0 * b * h * block * block * width * _fraction(profile)
    phases = [(fwd_flops, b * hkv * block * width * dt)]
    if profile.training:
        phases.append((_BWD_FLOPS * fwd_flops, b * hkv * block * width * (dt + FP32_BYTES)))
    if not ring:
        phases = [(flops, 0) for flops, _ in phases]
    sent = sum(nbytes for _, nbytes in phases)
    compute = sum(flops for flops, _ in phases) / hardware.flops
    transfer = sent / hardware.bandwidth
    hidden = all(flops / hardware.flops >= nbytes / hardware.bandwidth for flops, nbytes in phases)
    return int(sent), compute, transfer, hidden


def min_block_tokens(profile: ModelProfile, hardware: Hardware) -> int:
    """The smallest block (tokens per device) whose compute hides its transfer in every phase.

    forward ``c >= (H_kv/H) * b * flops / (2 f bandwidth)``; backward
    ``c >= (H_kv/H) * (b + 4) * flops / (5 f bandwidth)`` (see ``docs/cost_model.md``).
    """
    if not profile.heads or not profile.head_dim:
        return 0
    ratio = profile.kv_heads / profile.heads * hardware.flops / hardware.bandwidth / _fraction(profile)
    need = [ratio * profile.dtype_bytes / 2]
    if profile.training:
        need.append(ratio * (profile.dtype_bytes + FP32_BYTES) / (2 * _BWD_FLOPS))
    c = max(need)
    block = max(1, math.ceil(c - 1e-9))
    while block > 1 and _step(profile, block - 1, hardware)[3]:  # rounding: the smallest that really hides
        block -= 1
    while not _step(profile, block, hardware)[3]:
        block += 1
    return block


def estimate(profile: ModelProfile, seq_len: int, world_size: int, hardware: Hardware, *,
             block_tokens: int | None = None) -> dict:
    """Memory per device and the ring step at ``seq_len`` global tokens on ``world_size`` devices.

    ``per_device`` (bytes): ``parameters`` (and buffers), ``gradients`` (all of them, as after backward),
    ``optimizer_states``, ``gathered_parameters`` (FSDP2's unsharded compute copies; 0 without FSDP),
    ``activations`` (the rest of the predicted peak: saved activations, outputs, transients),
    ``gathered_outputs`` (``outputs="full"``: what gathering the outputs to full length adds on every
    rank), ``kv_buffers`` (the ring's key/value double buffers and, in training, dK/dV accumulators in
    flight; 0 on one device), ``attention_workspace`` (fp32 ring state and block-kernel scratch of one
    layer); ``total`` is their sum, ``fits`` compares it with ``hardware.memory``. Parameters, gradients
    and optimizer states follow the profile's training setup (see "Training state" in ``docs/cost_model.md``).
    ``ring_step``: one step of one attention layer (forward + backward in training), see
    ``docs/cost_model.md``; ``block_tokens`` overrides its block (default ``ceil(seq_len / world_size)``, the
    local shard). Plain JSON-able values (bytes, seconds)."""
    seq_len, world_size = int(seq_len), int(world_size)
    if world_size < 1 or seq_len < 1:
        raise ValueError(f"need seq_len >= 1 and world_size >= 1, got {seq_len}, {world_size}")
    block = int(block_tokens) if block_tokens else _shard_tokens(seq_len, world_size)
    sent, compute, transfer, hidden = _step(profile, block, hardware, ring=world_size > 1)
    return {
        "seq_len": seq_len,
        "world_size": world_size,
        "hardware": asdict(hardware),
        "per_device": _memory(profile, seq_len, world_size, hardware),
        "ring_step": {"block_tokens": block, "bytes_sent": sent, "compute_seconds": compute,
                      "transfer_seconds": transfer, "min_block_tokens": min_block_tokens(profile, hardware),
                      "transfer_hidden": hidden},
        "steps_per_layer": world_size,
    }


def max_context(profile: ModelProfile, world_size: int, hardware: Hardware) -> int:
    """The largest global sequence whose per-device total fits in ``hardware.memory`` (0: not even W tokens)."""
    world_size = int(world_size)
    return _largest(lambda s: _memory(profile, s, world_size, hardware)["total"] <= hardware.memory, world_size)


def _largest(fits, lo: int) -> int:
    """The largest ``s >= lo`` with ``fits(s)`` (0 if not even ``lo``), for memory that grows with ``s``."""
    if not fits(lo):
        return 0
    hi = 2 * lo
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 60:
            return lo
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------------ generation


def cache_slots(prompt: int, new_tokens: int, world_size: int) -> int:
    """Key/value slots per rank that ``rm.generate`` allocates (:func:`ringify.runtime.kv_cache.slots_per_rank`)."""
    from ..runtime.kv_cache import slots_per_rank

    return slots_per_rank(prompt, new_tokens, world_size)


def _kv_bytes_per_slot(profile: ModelProfile) -> int:
    """Bytes of one cache slot on a rank: the keys and values of every attention layer, in their dtype."""
    width = profile.head_dim + _v_dim(profile)
    return profile.layers * profile.batch * profile.kv_heads * width * profile.dtype_bytes


def _generation_memory(profile: ModelProfile, prompt: int, new_tokens: int, world_size: int,
                       hardware: Hardware) -> dict:
    """Per-rank bytes of ``rm.generate`` at its peak, the prefill (see "How generation is modelled")."""
    local = _shard_tokens(prompt, world_size)
    scale = profile.batch / max(1, profile.sim_batch)
    ring = _ring_terms(profile, local, world_size, hardware)
    kv, workspace = ring["kv_forward"], ring["workspace_forward"]
    at_attention = _lines(profile.prefill_attention_lines or profile.attention_forward_lines, local, scale)
    peak = max(_lines(profile.prefill_peak_lines, local, scale), at_attention + kv + workspace)
    parts = {"parameters": profile.parameter_bytes + profile.buffer_bytes,
             "kv_cache": _kv_bytes_per_slot(profile) * cache_slots(prompt, new_tokens, world_size),
             "prefill_activations": max(0, peak - kv - workspace), "kv_buffers": kv, "attention_workspace": workspace}
    out = {k: int(v) for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["fits"] = bool(out["total"] <= hardware.memory)
    return out


def _block_parameters(profile: ModelProfile) -> int:
    """Parameters of the model's layer blocks (its largest ``nn.ModuleList``): what the prefill multiplies every
    token by (it never runs the head; an embedding is a lookup). All of them for a model without such a list."""
    blocks = profile.parameters - profile.root_parameters
    return blocks if blocks > 0 else profile.parameters


def _prefill_time(profile: ModelProfile, prompt: int, world_size: int, hardware: Hardware) -> dict:
    """Seconds of the prefill on the rank with the largest shard: its token-local FLOPs, then per layer W ring
    steps that each take the longer of their attention compute and their key/value transfer."""
    local = _shard_tokens(prompt, world_size)
    forward = replace(profile, training=False)
    sent, compute, transfer, hidden = _step(forward, local, hardware, ring=world_size > 1)
    linear = 2.0 * profile.batch * local * _block_parameters(profile)
    steps = profile.layers * world_size
    return {"seconds": linear / hardware.flops + steps * max(compute, transfer),
            "flops_per_device": linear + steps * compute * hardware.flops,
            "ring_step": {"block_tokens": local, "bytes_sent": sent, "compute_seconds": compute,
                          "transfer_seconds": transfer, "min_block_tokens": min_block_tokens(forward, hardware),
                          "transfer_hidden": hidden}}


def _decode_time(profile: ModelProfile, prompt: int, new_tokens: int, world_size: int, hardware: Hardware) -> dict:
    """Seconds per decoded token half-way through the decode: reading the weights and this rank's cache (or
    their FLOPs, whichever takes longer), then one small all-gather per layer."""
    per_parameter = profile.parameter_bytes / profile.parameters if profile.parameters else profile.dtype_bytes
    weights = max(0, profile.parameter_bytes - profile.lookup_bytes)
    held = _shard_tokens(prompt + new_tokens // 2, world_size)
    cache = _kv_bytes_per_slot(profile) * held
    flops = 2.0 * profile.batch * weights / per_parameter + (
        2.0 * profile.batch * profile.heads * held * (profile.head_dim + _v_dim(profile)) * profile.layers)
    memory_s, compute_s = (weights + cache) / hardware.memory_bandwidth, flops / hardware.flops
    message = profile.batch * profile.heads * (_v_dim(profile) + 1) * FP32_BYTES  # fp32 partial output and lse
    gather_s = profile.layers * (world_size - 1) * (hardware.latency + message / hardware.bandwidth)
    seconds = max(memory_s, compute_s) + gather_s
    return {"seconds_per_token": seconds, "tokens_per_second": 1.0 / seconds if seconds else 0.0,
            "weight_bytes": int(weights), "cache_bytes_read": int(cache), "memory_seconds": memory_s,
            "compute_seconds": compute_s, "all_gather_seconds": gather_s,
            "bound": "memory" if memory_s >= compute_s else "compute"}


def generation_estimate(profile: ModelProfile, prompt: int, new_tokens: int, world_size: int,
                        hardware: Hardware) -> dict:
    """``rm.generate`` of ``new_tokens`` after a ``prompt`` on ``world_size`` devices, per device.

    ``per_device`` (bytes, at the prefill's peak): ``parameters`` (whole, and buffers), ``kv_cache`` (this
    rank's shard, allocated for the prompt and the new tokens: :func:`cache_slots`), ``prefill_activations``,
    ``kv_buffers`` and ``attention_workspace`` (the ring's, in forward); ``total`` and ``fits``. ``prefill``:
    seconds, FLOPs per device, and one ring step with its overlap condition; ``decode``: seconds per token and
    their parts. See "How generation is modelled" in ``docs/cost_model.md``."""
    prompt, new_tokens, world_size = int(prompt), int(new_tokens), int(world_size)
    if world_size < 1 or prompt < max(world_size, 2) or new_tokens < 1:
        raise ValueError(f"need prompt >= max(world_size, 2) and new_tokens >= 1, got {prompt}, {new_tokens} on "
                         f"{world_size}")
    return {"prompt": prompt, "new_tokens": new_tokens, "world_size": world_size, "hardware": asdict(hardware),
            "per_device": _generation_memory(profile, prompt, new_tokens, world_size, hardware),
            "prefill": _prefill_time(profile, prompt, world_size, hardware),
            "decode": _decode_time(profile, prompt, new_tokens, world_size, hardware)}


def max_prompt(profile: ModelProfile, world_size: int, hardware: Hardware, new_tokens: int = 1) -> int:
    """The longest prompt whose generation of ``new_tokens`` fits in ``hardware.memory`` per device (0: none)."""
    world_size = int(world_size)
    return _largest(lambda s: _generation_memory(profile, s, new_tokens, world_size, hardware)["total"]
                    <= hardware.memory, max(world_size, 2))


def generation_summary(profile: ModelProfile, prompt: int, new_tokens: int, world_size: int, hardware: Hardware,
                       world_sizes=(1, 2, 4, 8, 16, 32)) -> dict:
    """:func:`generation_estimate` at (prompt, world size) and the longest prompt per world size."""
    return {"new_tokens": int(new_tokens),
            "estimate": generation_estimate(profile, max(prompt, world_size, 2), new_tokens, world_size, hardware),
            "max_prompt": {str(w): max_prompt(profile, w, hardware, new_tokens) for w in world_sizes}}


def _log_grid(lo: int, hi: int, points: int) -> list[int]:
    lo, hi = max(1, int(lo)), max(int(lo) + 1, int(hi))
    ratio = (hi / lo) ** (1 / max(1, points - 1))
    return sorted({int(round(lo * ratio**i)) for i in range(points)} | {hi})


def cost_summary(profile: ModelProfile, seq_len: int, world_size: int, hardware: Hardware,
                 world_sizes=(1, 2, 4, 8, 16, 32), new_tokens: int = 128) -> dict:
    """:func:`estimate` at (seq_len, world_size), the largest context per world size, the memory per
    device against the context (log grid up to about twice the largest context), the ring step against
    the block size (log grid), and the profile.

    ``max_context`` is for the profile's ``outputs`` (``outputs``: the one in force);
    ``max_context_by_outputs`` has it for both ``"full"`` (outputs gathered to full length on every rank,
    ringify's default: O(S x vocab) per rank for logits) and ``"local"`` (each rank keeps its tokens).
    An inference profile adds ``generation`` (:func:`generation_summary`: ``rm.generate`` of ``new_tokens``
    after a ``seq_len`` prompt)."""
    by_outputs = {o: {str(w): max_context(replace(profile, outputs=o), w, hardware) for w in world_sizes}
                  for o in ("full", "local")}
    limits = by_outputs[profile.outputs]
    curves = {}
    for w in world_sizes:
        top = 2 * limits[str(w)] if limits[str(w)] else 1024 * w
        grid = _log_grid(max(w, 256), max(top, 512), 24)
        curves[str(w)] = [[s, _memory(profile, s, w, hardware)["total"]] for s in grid]
    need = min_block_tokens(profile, hardware)
    blocks = [2**i for i in range(4, max(18, math.ceil(math.log2(max(need, 1) * 4)) + 1))]
    step_curve = [[c, *_step(profile, c, hardware)[1:3]] for c in blocks]
    summary = {"estimate": estimate(profile, seq_len, world_size, hardware), "max_context": limits,
               "outputs": profile.outputs, "max_context_by_outputs": by_outputs,
               "memory_curve": curves, "step_curve": step_curve, "profile": asdict(profile)}
    if not profile.training:
        summary["generation"] = generation_summary(profile, seq_len, new_tokens, world_size, hardware, world_sizes)
    return summary
