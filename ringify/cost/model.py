"""Cost model of a ringified model, per device: memory, the ring step, and the largest context that fits.

Three questions, answered from one :class:`ModelProfile` (what the model costs, independent of the
sequence length S and the world size W) and a :class:`Hardware` profile:

1. **Memory per device** at S tokens on W devices (:func:`estimate`): parameters, gradients, activations,
   the ring's key/value buffers and the attention workspace; and the largest S that fits
   (:func:`max_context`).
2. **The ring step**: what one device sends per step, and whether the transfer hides behind the
   block's compute (the overlap condition of Liu, Zaharia, Abbeel, "Ring Attention with Blockwise
   Transformers for Near-Infinite Context", 2023).
3. Curves of both for reports (:func:`cost_summary`).

How memory is predicted
-----------------------
:func:`profile_model` *runs* the captured, unsharded graph under ``FakeTensorMode`` (fake tensors
have shapes and dtypes but no storage, so the run costs no memory and little time), forward and
backward, with a meter like :class:`ringify.memory.PeakMemory` watching every tensor the ops create.
Two edits make that run behave like the ringified model on one device:

- attention (the canonical ``attention`` node, or SDPA) runs as a stub with the memory behaviour of
  ``ring_attention`` at W = 1: it saves q, k, v, the output and the fp32 log-sum-exp, and never
  builds the [S, S] scores; the subgraphs that only feed attention masks are skipped (the ring
  evaluates them per block pair instead);
- feed-forward blocks are chunked as ringify chunks them (``passes/ffn.py``: ``ffn_chunk_tokens``,
  recomputed in backward), if the graph does not already contain the chunked calls.

Activation checkpointing (the model's own regions, or every layer with ``checkpoint="layers"``) runs as
ringify runs it: each region outlined and simulated under ``torch.utils.checkpoint`` (non-reentrant), so
forward saves only its inputs, and backward recomputes it and frees each recomputed tensor once used. Its
attention forwards run again in backward; those moments are kept apart (``attention_recompute_lines``).

The run is repeated at 1024, 2048 and (when quick) 4096 tokens, or shorter if the model cannot take
them, and fitted as lines ``fixed + per_token * L``: the bytes alive when each attention forward and
each attention backward starts (one line per call: the same moment at every length; the first
attention backward is the step's peak on most models, with every activation still saved and the
ring at work), the peak of the whole step (one chord per pair of lengths: the moment of that peak
moves from the end of backward, where gradients dominate, to its start as the sequence grows; and a
line through the moment the activations peak, where long sequences put it even when the fitted
lengths did not), and the bytes of the outputs. The backward moments and the peak are fitted with
and without the parameter gradients made so far (the meter knows them from post-accumulate hooks):
FSDP2 frees each layer's gradients after its reduce-scatter (see "Training state"). Per device then ``L = ceil(S / W)`` tokens, and the ring's own memory is
added analytically, following what ``runtime/ring_attention.py`` and ``runtime/block_attention.py``
allocate:

- ``kv_buffers`` (W > 1): two flat key/value buffers of one block each (double buffering; one on two
  ranks), a contiguous copy of this rank's block where k or v is not contiguous (``kv_copied``), and in
  backward also two fp32 dK/dV accumulator buffers and the block gradient in flight;
- ``attention_workspace``: the fp32 ring state (the running output or dQ, delta, the block's dK/dV; in
  fp32 the running output is the result itself, there from the op's start) and the block kernel's
  scratch: with the plain-torch kernels (CPU, and every masked attention on any device) the fp32
  score tiles of ``T = min(block_attention.TILE, L)`` query rows by ``T`` keys (some rank's shard is
  one contiguous run, so its tiles are that large), or, if larger, evaluating the model's block mask
  on one T x T piece (a mask read from a table first takes whole rows of it: nanoGPT's ``bias``
  costs T x max_len). How many tiles and row blocks the kernels keep alive at once is measured by
  running them on small tensors, and the mask piece on fake tensors, so the model follows the code
  when it changes. The Triton kernels (CUDA, no mask) keep their tiles on chip.

The ring's extras are added at the moments they exist (the attention forward or backward, and a forward
recomputed in backward, which finds the fused kernels' tile plan made at the first forward, as backward does);
the predicted peak is the largest of those and of the fitted peak of the step; gathered outputs
(``outputs="full"`` gathers e.g. the logits to [B, S, vocab] on every rank) add ``(S - L) *
output_bytes_per_token``, and their all-gather at the end of forward is one more moment: what forward leaves
alive, the shard padded, one piece per rank and the full output at once (``runtime/sequence.py``).

Approximations (stated, not hidden):

- the unsharded graph stands in for the rewritten one: the few O(S) values every rank computes in
  full (positions, mask inputs, label shifts), full-length inputs before they are cut into shards,
  and the all-reduce copies of gradients are not counted;
- the lines are exact where the graph's memory is affine in the length (it is, once the sequence
  is longer than a feed-forward chunk); below one chunk the fixed part over-counts a chunk's
  intermediate;
- the step's peak and the ring's moments are combined by ``max`` of their sums, not by replaying
  the rewritten graph; the largest shard (``ceil(S / W)`` tokens) decides;
- memory that allocators, CUDA/NCCL contexts and communication libraries keep outside torch
  tensors is not modelled (the GPU ``memory`` figures leave room for it);
- if the fake run fails, an analytic fallback (Korthikanti et al. 2022: about ``34 * hidden``
  16-bit bytes per token and layer, no S^2 term) is used, and the profile says ``method="analytic"``.

Checked against :class:`ringify.memory.PeakMemory` on CPU gloo ranks (``tests/test_cost.py``, the
bound there is 25%): predicted total minus parameters and buffers against the measured peak of a loss
forward + backward. Small Llama (GQA, HF causal mask) and nanoGPT-style TinyGPT, 256 to 2000 tokens on
1 to 4 ranks, batch 1 and 2, training and inference: within 12%, most within 6%.

Training state
--------------
What a training step keeps besides activations follows the profile's setup (``optimizer``,
``mixed_precision``, ``dp``; ``ringify report --optimizer --mixed-precision --dp``). ``P`` parameters
(``T`` of them trainable), ``c`` bytes each in the dtype the graph computes in:

- without FSDP (``dp`` 1, no mixed precision): parameters ``P c`` and gradients ``T c`` on every device
  (DDP replicates both), optimizer states ``k T c`` (``k`` = 0 for ``none``, 1 for ``sgd`` (momentum),
  2 for ``adam``/AdamW; torch's optimizers keep their states in the parameters' dtype). Every gradient
  stays where backward made it, so the fake run's peak (which has the gradients made so far) is used.
- with FSDP2 (``dp`` > 1, or mixed precision, which is FSDP2's ``MixedPrecisionPolicy(param_dtype=
  bfloat16, reduce_dtype=float32)``): the stored parameters, gradients and states are sharded,
  ``P m / dp``, ``T m / dp`` and ``k T m / dp`` per device, with ``m`` = 4 (float32 masters) under
  mixed precision and ``c`` otherwise. Each layer's gradients leave with its reduce-scatter, so the fake
  run's peak *without* parameter gradients is used, and FSDP2's unsharded compute-dtype copies are added
  as ``gathered_parameters``: the root unit (everything outside the model's largest ``nn.ModuleList`` of
  blocks: embeddings, final norm, LM head; FSDP2 keeps it unsharded through forward and backward) with its
  gradients, and two blocks (the one computing and the one prefetched, or in backward one block's
  parameters and its gradients before the reduce-scatter): ``(2 root + 2 block) c`` in training.

Buffers are never sharded. Planning on the ``meta`` device (``ringify.plan``) changes nothing here:
parameter counts and dtypes are all the model needs, and the fake runs never read values.

How the ring step is modelled
-----------------------------
Per ring step, each device computes attention of its ``c = ceil(S / W)`` local queries against one
block of ``c`` keys and sends one key/value block to its neighbour:

- forward FLOPs ``F = 4 * B * H * c^2 * D * f`` (QK^T and PV); ``f = 1/2`` for causal attention
  (the zigzag layout gives every step half of its block pairs; a mask built by comparing positions,
  or read from a lower-triangular table, counts as causal), 1 otherwise;
- backward FLOPs ``2.5 F`` (QK^T recomputed, dV, dP, dQ, dK);
- forward bytes ``2 * B * H_kv * c * D * b`` (K and V in the model's dtype, ``b`` bytes each);
- backward bytes ``2 * B * H_kv * c * D * (b + 4)`` (K, V again, and the fp32 dK/dV accumulators).

Transfer hides behind compute when ``F / flops >= bytes / bandwidth`` in each phase, that is when

    forward:   c >= (H_kv / H) * b * flops / (2 f * bandwidth)
    backward:  c >= (H_kv / H) * (b + 4) * flops / (5 f * bandwidth)

``min_block_tokens`` is the larger of the two (training) or the forward one (inference). For full
multi-head attention in 16-bit (``H_kv = H``, ``b = 2``, ``f = 1``) the forward condition is the
paper's ``c >= flops / bandwidth``. In training, ``ring_step`` reports one forward step plus one
backward step of one attention layer (``bytes_sent``, ``compute_seconds``, ``transfer_seconds`` are
their sums); ``transfer_hidden`` needs both phases hidden.

How generation is modelled
--------------------------
``rm.generate`` (``ringify/generate.py``) runs the prompt's ring forward as the *prefill*, which stores each
attention layer's local keys and values into a cache sharded over the ranks and computes nothing after them
(no final norm, no head, no logits), then decodes each new token at one position on every rank, each layer
attending to its cache shard and merging the partial results with one all-gather. Per rank
(:func:`generation_estimate`; :func:`max_prompt` is the longest prompt that fits):

- ``parameters``: all of them and the buffers, on every rank (generation runs on whole parameters);
- ``kv_cache``: ``layers * 2 * B * H_kv * D * b`` bytes per slot, for ``ceil(S/W) + ceil((N-1)/W) + 1``
  slots (:func:`cache_slots`: the largest prompt shard, a share of the N new tokens, each joining the rank
  that holds the fewest, and the slot of the token being decoded; what ``kv_cache.ShardedKVCache`` allocates,
  for every layer at once, when the prefill stores it). Layers, H_kv, D and b are those of the captured
  attention nodes, so hand-written models are costed like HF ones;
- ``prefill_activations``: the peak of a fake-tensor run of the graph cut after the keys of the last
  attention, as the prefill graph is (``passes/inference.py``; it returns those keys, so they count), at
  ``ceil(S/W)`` tokens, no gradients; with the ring's forward ``kv_buffers`` and ``attention_workspace``
  added at the attention moments, as for a forward. The cache is counted whole on top (an upper bound: the
  last layer's buffers are allocated at its own store).

Time: the prefill's FLOPs are ``2 B S P_blocks`` (the parameters of the model's layer blocks: no head)
plus ``F`` per ring step of every layer (see above; causal halves it), divided over the W ranks; each of
the W steps of a layer takes the longer of its compute and its transfer (the overlap condition decides).
One decoded token reads every weight once (embedding tables, of which it reads one row, excepted) and this
rank's cache from ``memory_bandwidth`` (or is compute-bound at ``2 B P`` FLOPs, whichever is longer:
a roofline), and waits for one all-gather of the fp32 partial output and log-sum-exp (``B H (D + 1) 4``
bytes) per layer: ``W - 1`` ring steps of ``latency`` plus the bytes over the link. Kernel launch and
Python overheads are not modelled (they dominate small models on CPUs).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import fx

from .passes.fx import fetch_attr, value

__all__ = ["HARDWARE", "Hardware", "ModelProfile", "cache_slots", "cost_summary", "estimate", "generation_estimate",
           "generation_summary", "max_context", "max_prompt", "min_block_tokens", "profile_model"]

GB = 1e9
GIB = 2**30
_FP32 = 4
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
    fake-tensor runs of the graph at ``fit_lengths`` (see the module docstring). Everything is plain
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
    # the training setup (see "Training state" in the module docstring)
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


def profile_model(model: torch.nn.Module, graph_module: fx.GraphModule, symbols: set, attention: list[dict], *,
                  batch: int, training: bool = True, outputs: str = "full", ffn_chunk_tokens: int | None = None,
                  layout: str = "zigzag", lengths: tuple[int, int] | None = None, optimizer: str = "none",
                  mixed_precision: bool = False, dp: int = 1, checkpoint: str | None = None,
                  module_prefix: str = "") -> ModelProfile:
    """The :class:`ModelProfile` of ``model`` from its captured, unsharded graph.

    ``graph_module``: ``ringify.capture.capture(...).graph_module`` (before or after the attention and
    feed-forward passes; it is not modified); ``symbols``: the sympy symbols of its sequence length;
    ``attention``: attention summaries (``AttentionMatch.summary()`` or report entries). ``outputs``,
    ``ffn_chunk_tokens`` and ``layout``: the ringify options the prediction is for (feed-forward blocks
    are chunked here if the graph is not yet). ``lengths``: the two sequence lengths of the fake runs.
    ``optimizer``, ``mixed_precision``, ``dp``: the training setup (:func:`check_training_setup`). The model
    may live on the ``meta`` device: nothing here reads parameter values. Activation checkpointing is costed
    as ringify runs it: the regions the model marks (captured in the graph), or every layer with
    ``checkpoint="layers"``, recomputed in backward (``module_prefix``: capture's ``Captured.module_prefix``).
    """
    check_training_setup(optimizer, dp)
    params = list(model.parameters())
    layer, root = _fsdp_units(model)
    profile = ModelProfile(
        model=type(model).__name__, batch=int(batch), training=bool(training), layout=layout, outputs=outputs,
        parameters=sum(p.numel() for p in params),
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()), lookup_bytes=_lookup_bytes(model),
        gradient_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad) if training else 0,
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        layer_parameters=layer, root_parameters=root, compute_dtype=_main_dtype(params),
        meta_device=bool(params) and all(p.is_meta for p in params),
        optimizer=optimizer, mixed_precision=bool(mixed_precision), dp=int(dp),
    )
    try:
        from .runtime import block_attention

        profile.tile_tokens = int(getattr(block_attention, "TILE", 256))
    except ImportError:  # pragma: no cover
        pass
    gm = _prepared_copy(graph_module, symbols, ffn_chunk_tokens, profile)
    _attention_shapes(gm, attention, profile)
    run_gm = _recompute_regions(gm, model, checkpoint, module_prefix, profile) if training else gm
    dtype = torch.bfloat16 if profile.dtype_bytes == 2 else torch.float32
    try:
        profile.kernel_workspace = _kernel_workspace(profile.tile_tokens, str(dtype).removeprefix("torch."),
                                                     profile.masked)
    except Exception as err:  # noqa: BLE001 - a kernel that cannot run here: assume what it was when written
        profile.kernel_workspace = {"forward": {"one_piece": [1.5, 3.0], "pieces": [2.5, 3.0]},
                                    "backward": {"one_piece": [2.1, 2.0], "pieces": [3.3, 2.0]}}
        profile.notes.append(f"block kernel workspace not measured ({type(err).__name__}: {err}); assumed")
    try:
        profile.fused_workspace = _fused_workspace(str(dtype).removeprefix("torch."))
    except Exception as err:  # noqa: BLE001
        profile.fused_workspace = {"forward": [65536, 2.0], "backward": [65536, 4.0]}
        profile.notes.append(f"fused kernel workspace not measured ({type(err).__name__}); assumed")
    try:
        _fit_profile(run_gm, symbols, profile, lengths)
    except Exception as err:  # noqa: BLE001 - any model: fall back to the analytic estimate, say so
        _analytic_profile(profile)
        profile.notes.append(f"fake-tensor run failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                             "analytic activation estimate")
    else:
        try:
            piece = _mask_piece_bytes(gm, symbols, profile.fit_lengths[0], profile.tile_tokens)
            profile.mask_piece_bytes = float(piece)
            from .runtime import fused_attention

            chunk = fused_attention._MASK_CHUNK  # the fused kernels evaluate a mask for this many key tiles at once
            profile.mask_chunk_tiles = int(chunk)
            profile.mask_chunk_bytes = float(_mask_piece_bytes(gm, symbols, profile.fit_lengths[0],
                                                               profile.tile_tokens, chunk))
            profile.mask_static = _masks_static(gm, symbols)
        except Exception as err:  # noqa: BLE001
            profile.notes.append(f"block mask evaluation not measured ({type(err).__name__})")
        if not profile.training:
            try:
                _fit_prefill(gm, symbols, profile)
            except Exception as err:  # noqa: BLE001 - the forward's attention moments stand in
                profile.notes.append(f"prefill not simulated ({type(err).__name__}); forward moments used")
    return profile


def _lookup_bytes(model: torch.nn.Module) -> int:
    """Bytes of embedding tables that only a lookup reads (decoding reads one row of them, not the table); a
    table tied to another module (an LM head) is read whole and is not counted here."""
    users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, torch.nn.Embedding) and users.get(id(m.weight)) == 1)


OPTIMIZER_STATES = {"none": 0, "sgd": 1, "adam": 2}  # states per parameter: SGD's momentum; Adam's two moments


def check_training_setup(optimizer: str, dp: int) -> None:
    """Refuse a training setup the cost model does not know, naming what it knows."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)} (AdamW costs as adam), "
                         f"got {optimizer!r}")
    if int(dp) < 1:
        raise ValueError(f"dp (FSDP2 data-parallel ranks) must be >= 1, got {dp}")


def _main_dtype(params: list) -> str:
    """The floating dtype that holds most parameters ("" without any)."""
    sizes: dict = {}
    for p in params:
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return str(max(sizes, key=sizes.get)).removeprefix("torch.") if sizes else ""


def _fsdp_units(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters of the largest block, parameters outside all blocks): the units FSDP2 unshards one at a time
    when each block of the model's largest ``nn.ModuleList`` is ``fully_shard``-ed and then the model itself
    (the README's recipe); the root unit stays unsharded through forward and backward."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    total = sum(p.numel() for p in model.parameters())
    if not lists:
        return 0, total
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    blocks = max(lists, key=count)
    return max(count(b) for b in blocks), total - count(blocks)


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
    tile, rows = b * h * t * t * _FP32, b * h * t * d * _FP32
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
            return fixed + per_row * b * h * local * max(d, dv) * _FP32 + evaluated  # heads padded to one width
        return max(tiles * tile + row_blocks * rows, mask + carried * tile) if torch_kernels else 0.0

    kernel_fwd, kernel_bwd = kernel("forward"), kernel("backward")
    # the fp32 running output (forward) and dQ (backward), allocated as the op starts: beside q's dtype, or in fp32
    # the result itself (which the fake run makes only when its stub returns)
    state_fwd = b * h * local * dv * _FP32
    state_bwd = b * h * local * (d + 1) * _FP32 + kv_block * _FP32  # dQ, delta, the block's dK/dV
    ring = world_size > 1
    received = 1 if world_size == 2 else 2  # key/value receive buffers (runtime/ring_attention.py: _Ring.kv_buffers)
    received += profile.kv_copied  # and this rank's own block, copied to be sent when k or v is not contiguous
    return {
        "kv_forward": received * kv_block * dt if ring else 0,
        # the receive buffers, and two more fp32 dK/dV pairs: the share in flight and the accumulator arriving
        "kv_backward": (received * kv_block * dt + 2 * kv_block * _FP32) if ring else 0,
        "workspace_forward": kernel_fwd + state_fwd,
        "workspace_backward": kernel_bwd + state_bwd,
        "workspace_recompute": kernel("forward", recomputed=True) + state_fwd,
    }


def _training_state(profile: ModelProfile) -> dict:
    """Per-device bytes of what a step keeps besides activations: parameters (and buffers), gradients,
    optimizer states, and the compute-dtype copies FSDP2 all-gathers (see "Training state" in the module
    docstring). Without FSDP (dp 1, no mixed precision) the gradients are the fake run's, in the model's dtype."""
    count, dp = profile.parameters, max(1, int(profile.dp))
    compute = profile.parameter_bytes / count if count else float(profile.dtype_bytes)
    trainable = profile.trainable_parameters or (profile.gradient_bytes / compute if compute else 0)
    master = _FP32 if profile.mixed_precision else compute  # bytes per stored parameter, gradient, state
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
        phases.append((_BWD_FLOPS * fwd_flops, b * hkv * block * width * (dt + _FP32)))
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
    ``c >= (H_kv/H) * (b + 4) * flops / (5 f bandwidth)`` (see the module docstring).
    """
    if not profile.heads or not profile.head_dim:
        return 0
    ratio = profile.kv_heads / profile.heads * hardware.flops / hardware.bandwidth / _fraction(profile)
    need = [ratio * profile.dtype_bytes / 2]
    if profile.training:
        need.append(ratio * (profile.dtype_bytes + _FP32) / (2 * _BWD_FLOPS))
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
    and optimizer states follow the profile's training setup (see "Training state" in the module docstring).
    ``ring_step``: one step of one attention layer (forward + backward in training), see the module
    docstring; ``block_tokens`` overrides its block (default ``ceil(seq_len / world_size)``, the local
    shard). Plain JSON-able values (bytes, seconds)."""
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
    from .runtime.kv_cache import slots_per_rank

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
    message = profile.batch * profile.heads * (_v_dim(profile) + 1) * _FP32  # fp32 partial output and lse
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
    their parts. See "How generation is modelled" in the module docstring."""
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


# ---------------------------------------------------------------------------- profile: the fake-tensor run


def _canonical_attention():
    from .passes.attention import attention

    return attention


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _attention_nodes(graph: fx.Graph) -> list[fx.Node]:
    canonical = _canonical_attention()
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (canonical, _SDPA)]


def _prepared_copy(gm: fx.GraphModule, symbols: set, ffn_chunk_tokens: int | None,
                   profile: ModelProfile) -> fx.GraphModule:
    """A copy of the graph (parameters shared) with attention canonical and feed-forward chunked."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    copy = fx.GraphModule(gm, graph)
    try:
        from .passes.attention import canonicalize_attention

        canonicalize_attention(copy, strict=False)
    except Exception as err:  # noqa: BLE001 - attention stays as it is; SDPA is still stubbed
        profile.notes.append(f"attention not canonicalised for the cost model ({type(err).__name__})")
    from .passes.ffn import chunk_feed_forward, chunked_ffn, symbolic_token_dim

    chunked = [n for n in copy.graph.nodes if n.op == "call_function" and n.target is chunked_ffn]
    if chunked:
        profile.ffn_chunk_tokens = int(chunked[0].kwargs.get("chunk_tokens", 0)) or None
    elif ffn_chunk_tokens:
        try:
            if chunk_feed_forward(copy, lambda n: symbolic_token_dim(n, symbols), chunk_tokens=ffn_chunk_tokens):
                profile.ffn_chunk_tokens = int(ffn_chunk_tokens)
        except Exception as err:  # noqa: BLE001
            profile.notes.append(f"feed-forward not chunked for the cost model ({type(err).__name__})")
    for node in copy.graph.nodes:
        if node.op == "call_function" and node.target is chunked_ffn and not profile.hidden:
            profile.hidden = int((node.meta.get("ringify_ffn") or {}).get("hidden") or 0)
    return copy


def _recompute_regions(gm: fx.GraphModule, model: torch.nn.Module, checkpoint: str | None, prefix: str,
                       profile: ModelProfile) -> fx.GraphModule:
    """A copy of ``gm`` with the regions ringify recomputes in backward outlined (``ringify.passes.regions``),
    so that the fake run recomputes them too (:meth:`_Simulator.call_module`); ``gm`` itself if none."""
    from .passes.regions import checkpoint_owners, mark_checkpoints, module_owners, outline_nested, repeated_layers

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    original, gm = gm, fx.GraphModule(gm, graph)
    for node in gm.graph.nodes:  # the copy's own meta (mark_checkpoints writes into it)
        node.meta = dict(node.meta)
    regions = {i: {} for i in set(checkpoint_owners(gm).values())}
    kind = "model" if regions else ""
    if checkpoint == "layers":
        canonical = set(_attention_nodes(gm.graph))
        layers = repeated_layers(model, gm, lambda n: n in canonical, prefix)
        if layers:
            ids = mark_checkpoints(module_owners(gm, layers, prefix), first_id=max(regions, default=-1) + 1)
            regions.update({i: {} for i in ids.values()})
            kind = "layers"
        else:
            profile.notes.append("checkpoint='layers': no nn.ModuleList of layers found; nothing recomputed")
    if not regions:
        return original
    try:
        done = outline_nested(gm, checkpoints=regions, modules={}, prefix=prefix)
    except Exception as err:  # noqa: BLE001 - cost without recomputation, and say so
        profile.notes.append(f"checkpointed regions not outlined for the cost model ({type(err).__name__}: {err})")
        return original
    profile.checkpoint, profile.recomputed_regions = kind, len(done)
    return gm


def _int(x) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _attention_shapes(gm: fx.GraphModule, attention: list[dict], profile: ModelProfile) -> None:
    """Heads, kv heads, head dim, dtype, causal and masks from the summaries, else from the graph."""
    nodes = _attention_nodes(gm.graph)
    profile.layers = max(len(attention or []), len(nodes))
    shapes = []
    v_dims = []
    for node in nodes:
        q, k, v = (value(a) for a in (*node.args[:3], None)[:3])
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4:
            shapes.append((_int(q.shape[0]), _int(q.shape[1]), _int(k.shape[1]), _int(q.shape[3]), q.dtype))
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            v_dims.append(_int(v.shape[3]))
    heads = [_int(a.get("num_heads")) for a in attention or []]
    kv_heads = [_int(a.get("num_kv_heads")) or _int(a.get("num_heads")) for a in attention or []]
    dims = [_int(a.get("head_dim")) for a in attention or []]
    profile.heads = max([h for h in heads if h] + [s[1] for s in shapes if s[1]] + [0])
    profile.kv_heads = max([h for h in kv_heads if h] + [s[2] for s in shapes if s[2]] + [0]) or profile.heads
    profile.head_dim = max([d for d in dims if d] + [s[3] for s in shapes if s[3]] + [0])
    v_dim = max([d for d in v_dims if d] + [0])
    profile.v_head_dim = v_dim if v_dim != profile.head_dim else 0
    dtypes = [s[4] for s in shapes]
    if not dtypes:
        dtypes = [p.dtype for p in gm.parameters() if p.is_floating_point()][:1] or [torch.float32]
    profile.dtype_bytes = max(torch.empty((), dtype=t).element_size() for t in dtypes)
    if not profile.hidden:
        profile.hidden = profile.heads * profile.head_dim
    if attention:
        profile.causal = all(_causal_like(a) for a in attention)
        profile.masked = any(bool(a.get("mask") or a.get("mask_kind")) for a in attention)
    if nodes and not profile.causal:
        unread: list = []
        profile.causal = all([_graph_causal(gm, n, unread=unread) for n in nodes])
        if unread and not profile.causal:
            profile.notes.append(f"the attention mask reads {unread[0]} on the meta device, whose values are unknown: "
                                 "counted as not causal (a causal mask would halve the ring step's compute)")
    flags = [bool(a.get("causal")) for a in attention or []] or [
        bool(n.kwargs.get("causal") or n.kwargs.get("is_causal")) for n in nodes]
    profile.causal_flag = bool(flags) and all(flags)
    if nodes and not attention:
        profile.masked = any(_mask_arg(n) is not None for n in nodes)


_POSITION_COMPARISONS = {"le", "lt", "ge", "gt", "tril", "triu"}


def _causal_like(summary: dict) -> bool:
    """Causal, or masked by a comparison of positions (HF's causal masks): half of the block pairs work."""
    ops = {str(op).strip("_") for op in summary.get("mask_ops") or []}
    return bool(summary.get("causal")) or bool(ops & _POSITION_COMPARISONS)


def _graph_causal(gm: fx.GraphModule, node: fx.Node, limit: int = 256, unread: list | None = None) -> bool:
    """Whether an attention node of the graph is causal or its mask is causal-like: built by comparing
    positions (``le``, ``tril``...) or read from a lower-triangular table (nanoGPT's ``bias`` buffer).
    Tables on the ``meta`` device have no values to check: their names go to ``unread``."""
    if node.kwargs.get("causal") or node.kwargs.get("is_causal"):
        return True
    mask = _mask_arg(node)
    todo, seen = [mask] if isinstance(mask, fx.Node) else [], set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target)).split(".")[0].strip("_")
            if name in _POSITION_COMPARISONS:
                return True
            todo.extend(n.all_input_nodes)
        elif n.op == "get_attr":
            try:
                table = fetch_attr(gm, n.target)
            except AttributeError:
                continue
            if isinstance(table, torch.Tensor) and table.is_meta:  # no values to read (a plan without weights)
                if unread is not None:
                    unread.append(n.target)
                continue
            if isinstance(table, torch.Tensor) and table.dim() >= 2 and table.shape[-1] == table.shape[-2] > 1:
                square = table.reshape(-1, *table.shape[-2:])[0] != 0
                if torch.equal(square, square.tril()) and bool(square.diagonal().all()):
                    return True
    return False


def _mask_arg(node: fx.Node):
    if node.target is _SDPA:
        return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("mask")


def _mask_only(graph: fx.Graph, root: torch.nn.Module | None = None) -> set[fx.Node]:
    """Nodes whose values only feed attention masks (the ring evaluates those per block pair instead),
    also through the recomputed regions' calls (``root``'s :class:`~ringify.runtime.regions.Recompute`
    submodules) to the attention inside."""
    from .runtime.regions import Recompute

    masks: set[fx.Node] = set()
    attn = set(_attention_nodes(graph))
    mask_inputs: dict[fx.Node, set[int]] = {}  # a region call -> the positions of its mask-only inputs
    for node in graph.nodes:
        module = root.get_submodule(node.target) if root is not None and node.op == "call_module" else None
        if isinstance(module, Recompute):
            inner = _mask_only(module.body.graph, module.body)
            places = [n for n in module.body.graph.nodes if n.op == "placeholder"]
            mask_inputs[node] = {i for i, p in enumerate(places)
                                 if p.users and all(u in inner or (u in set(_attention_nodes(module.body.graph))
                                                                   and _mask_arg(u) is p and p not in u.args[:3])
                                                    for u in p.users)}
    for node in reversed(graph.nodes):
        if node.op not in ("call_function", "call_method") or not node.users:
            continue
        ok = True
        for user in node.users:
            if user in masks:
                continue
            if user in attn and _mask_arg(user) is node and node not in user.args[:3]:
                continue
            if user in mask_inputs and all(i in mask_inputs[user] for i, a in enumerate(user.args) if a is node):
                continue
            ok = False
            break
        if ok:
            masks.add(node)
    return masks


class _Recorder:
    def __init__(self):
        self.meter = None
        self.forward_live: list[int] = []
        self.backward_live: list[int] = []
        self.backward_activations: list[int] = []  # live bytes less the parameter gradients made so far
        self.recompute_live: list[int] = []  # attention forwards run again in backward (checkpointed regions)
        self.recompute_activations: list[int] = []
        self.kv_copied = 0.0  # the most of K+V that an attention gets not contiguous (W > 1 sends a copy)


def _meter():
    """A :class:`ringify.memory.PeakMemory` that also knows which of its live bytes are parameter gradients
    (told by :meth:`gradient`, from the parameters' post-accumulate hooks), so the peak without them is
    known too: what a step holds when FSDP2 reduce-scatters each layer's gradients and frees them."""
    from .memory import PeakMemory

    class GradientMeter(PeakMemory):
        def __init__(self):
            super().__init__()
            self.gradient_bytes, self.activation_peak, self._seen = 0, 0, set()
            self.live_at_activation_peak = 0  # gradients made by then included

        def gradient(self, param: torch.Tensor) -> None:
            if id(param) not in self._seen and param.grad is not None:
                self._seen.add(id(param))
                self.gradient_bytes += param.grad.untyped_storage().nbytes()

        @property
        def activation_bytes(self) -> int:
            return self.live_bytes - self.gradient_bytes

        def _track(self, storage) -> None:
            super()._track(storage)
            if self.activation_bytes > self.activation_peak:
                self.activation_peak, self.live_at_activation_peak = self.activation_bytes, self.live_bytes

    return GradientMeter()


class _RingStub(torch.autograd.Function):
    """Attention with ``ring_attention``'s memory at one rank (no [S, S] scores): saves q, k, v, out, lse."""

    @staticmethod
    def forward(ctx, q, k, v, recorder):
        if recorder.meter is not None and torch._C._current_graph_task_id() != -1:  # recomputed, in backward
            recorder.recompute_live.append(recorder.meter.live_bytes)
            recorder.recompute_activations.append(recorder.meter.activation_bytes)
        elif recorder.meter is not None:
            recorder.forward_live.append(recorder.meter.live_bytes)
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.recorder = recorder
        recorder.kv_copied = max(recorder.kv_copied, (int(not k.is_contiguous()) + int(not v.is_contiguous())) / 2)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        grad = grad.contiguous()  # as ring_attention's backward passes it on (a copy when it arrives transposed)
        recorder = ctx.recorder
        if recorder.meter is not None:
            recorder.backward_live.append(recorder.meter.live_bytes)
            recorder.backward_activations.append(recorder.meter.activation_bytes)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


class _Simulator(fx.Interpreter):
    """Runs the graph on fake tensors: parameters faked once, guards and mask-only nodes skipped,
    attention stubbed."""

    def __init__(self, gm: fx.GraphModule, fake_mode, recorder: _Recorder, keep: set | None = None,
                 fakes: dict | None = None):
        super().__init__(gm, garbage_collect_values=keep is None)
        self.fake_mode, self.recorder = fake_mode, recorder
        self.fakes: dict[int, torch.Tensor] = {} if fakes is None else fakes  # shared with the regions' bodies
        self.skip = _mask_only(gm.graph, gm)
        if keep:  # these nodes (and what they need) are computed even if they only feed masks
            todo = list(keep)
            while todo:
                node = todo.pop()
                if node in self.skip:
                    self.skip.discard(node)
                    todo.extend(node.all_input_nodes)
        self.attention = set(_attention_nodes(gm.graph))

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            if id(value) not in self.fakes:
                self.fakes[id(value)] = self.fake_mode.from_tensor(value)
            return self.fakes[id(value)]
        return value

    def run_node(self, node: fx.Node):
        if node in self.skip:
            return None
        if node in self.attention:
            q, k, v = (self.env[a] if isinstance(a, fx.Node) else a for a in node.args[:3])
            return _RingStub.apply(q, k, v, self.recorder)
        return super().run_node(node)

    def call_module(self, target, args, kwargs):
        if str(target).startswith("_guards"):  # export's input guards: the lengths here are hypothetical
            return None
        from .runtime.regions import Recompute

        module = self.fetch_attr(target)
        if isinstance(module, Recompute):  # its body simulated the same way, under torch.utils.checkpoint
            body = _Simulator(module.body, self.fake_mode, self.recorder, fakes=self.fakes)

            def run(*a):
                # The interpreter keeps its values in ``env``, not in a Python frame: left there, they would outlive
                # the call as the region's compiled code never lets them. Its outputs would stay alive until the
                # region is recomputed; and the recomputation, which checkpoint stops by raising once the last
                # saved tensor is made (``early_stop``), would leave the values it had then, and with their
                # ``grad_fn`` the recomputed graph and all its saved tensors, alive through the region's whole
                # backward (in a real run they die with the frame, and each recomputed tensor once backward has
                # used it).
                try:
                    return body.run(*a, enable_io_processing=False)
                finally:
                    body.env = {}

            if not torch.is_grad_enabled():
                return run(*args)
            from torch.utils.checkpoint import checkpoint

            return checkpoint(run, *args, use_reentrant=False)
        return super().call_module(target, args, kwargs)


def _concrete(size, symbols: set, seq_len: int) -> int:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr.subs({s: seq_len for s in expr.free_symbols}))
    return int(size)


def _inputs(gm: fx.GraphModule, sim: _Simulator, symbols: set, seq_len: int, training: bool) -> list:
    """The graph's inputs as fake tensors with ``seq_len`` tokens (parameters faked beforehand)."""
    fake_mode = sim.fake_mode
    args = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            sim.fetch_attr(node.target)
        if node.op != "placeholder":
            continue
        val = value(node)
        if isinstance(val, torch.Tensor):
            shape = [_concrete(s, symbols, seq_len) for s in val.shape]
            with fake_mode:
                x = torch.zeros(shape, dtype=val.dtype, device=val.device)
            args.append(x.requires_grad_() if val.requires_grad and training else x)
        elif isinstance(val, torch.SymInt):
            args.append(_concrete(val, symbols, seq_len))
        else:
            args.append(val)
    return args


def _simulate(gm: fx.GraphModule, symbols: set, seq_len: int, training: bool) -> dict:
    """One fake forward (+ backward) at ``seq_len`` tokens: the meter's peak and the live bytes at its moments."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_leaves

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = _Recorder()
    sim = _Simulator(gm, fake_mode, recorder)
    args = _inputs(gm, sim, symbols, seq_len, training)
    meter = _meter()
    for param in sim.fakes.values():
        if param.requires_grad and param.is_leaf:
            param.register_post_accumulate_grad_hook(meter.gradient)
    with fake_mode, meter, torch.set_grad_enabled(training):
        recorder.meter = meter
        outs = [x for x in tree_leaves(sim.run(*args, enable_io_processing=False)) if isinstance(x, torch.Tensor)]
        after_forward = meter.live_bytes
        output_bytes = sum(o.untyped_storage().nbytes() for o in {id(o): o for o in outs}.values())
        if training:
            grads = [o for o in outs if o.requires_grad and o.is_floating_point()]
            losses = [o for o in grads if o.dim() == 0]
            if losses:
                torch.autograd.backward(losses)
            elif grads:
                torch.autograd.backward(grads, [torch.ones_like(o) for o in grads])
        recorder.meter = None
        del outs
    return {"peak": meter.peak_bytes, "after_forward": after_forward, "outputs": output_bytes,
            "activation_peak": meter.activation_peak, "activation_moment": meter.live_at_activation_peak,
            "gradients": meter.gradient_bytes,
            "attention_forward": recorder.forward_live, "attention_backward": recorder.backward_live,
            "attention_backward_activations": recorder.backward_activations,
            "attention_recompute": recorder.recompute_live,
            "attention_recompute_activations": recorder.recompute_activations, "kv_copied": recorder.kv_copied}


def _mask_piece_bytes(gm: fx.GraphModule, symbols: set, seq_len: int, tile: int, key_tiles: int = 1) -> int:
    """Peak bytes of evaluating each attention's block mask (``passes/masks.py``, as the ring does per piece)
    on one ``tile`` x ``tile`` piece, on fake tensors: a mask read from a table slices rows of the whole
    table first (nanoGPT's ``bias``: [tile, max_len])."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .memory import PeakMemory
    from .passes.masks import block_mask

    masks = {}
    for node in _attention_nodes(gm.graph):
        mask = _mask_arg(node)
        if isinstance(mask, fx.Node) and mask not in masks:
            masks[mask] = block_mask(mask, symbols)
    if not masks:
        return 0
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    sim = _Simulator(gm, fake_mode, _Recorder(), keep={leaf for bm in masks.values() for leaf in bm.leaves})
    args = _inputs(gm, sim, symbols, seq_len, False)
    with fake_mode, torch.no_grad():
        sim.run(*args, enable_io_processing=False)
        pos = torch.arange(min(tile, seq_len), device=_graph_device(gm))
        keys = torch.arange(min(key_tiles * tile, seq_len), device=_graph_device(gm))
        worst = 0
        for bm in masks.values():
            leaves = [sim.env[leaf] if isinstance(leaf, fx.Node) else leaf for leaf in bm.leaves]
            with PeakMemory() as meter:
                bm.fn(pos, keys, *leaves)
            worst = max(worst, meter.peak_bytes)
    return worst


def _masks_static(gm: fx.GraphModule, symbols: set) -> bool:
    """Whether every attention mask reads only buffers and positions (no graph input): the same tensors every
    step, so the fused kernels' cached tile plan is reused and no step evaluates a mask."""
    from .passes.graph import to_digraph
    from .passes.masks import block_mask

    import networkx as nx

    g = to_digraph(gm.graph)
    for node in _attention_nodes(gm.graph):
        mask = _mask_arg(node)
        if not isinstance(mask, fx.Node):
            continue
        for leaf in block_mask(mask, symbols).leaves:
            if isinstance(leaf, fx.Node) and any(a.op == "placeholder" for a in nx.ancestors(g, leaf) | {leaf}):
                return False
    return True


def _graph_device(gm: fx.GraphModule) -> torch.device:
    """Where the graph's inputs live (``meta`` for a plan without weights): positions made here go there too."""
    for node in gm.graph.nodes:
        val = value(node)
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


def _batch_of(gm: fx.GraphModule) -> int:
    for node in gm.graph.nodes:
        val = value(node)
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() >= 2:
            return _int(val.shape[0]) or 1
    return 1


_LENGTHS = ((1024, 2048), (512, 1024), (256, 512), (64, 128), (16, 32))
_EXTEND_SECONDS = 2.0  # a third, longer run when the second took less than this


def _fit_profile(gm: fx.GraphModule, symbols: set, profile: ModelProfile, lengths) -> None:
    """Fake runs at two lengths (the first pair of :data:`_LENGTHS` the model takes), and at twice the
    second when that is quick; lines through them."""
    import time

    if not symbols:
        raise ValueError("the graph has no symbolic sequence length")
    errors, runs = [], {}
    for pair in [tuple(lengths)] if lengths else _LENGTHS:
        try:
            for n in pair:
                start = time.perf_counter()
                runs[n] = _simulate(gm, symbols, n, profile.training)
            break
        except Exception as err:  # noqa: BLE001 - e.g. a table shorter than this length: try shorter
            errors.append(err)
            runs.clear()
    else:
        raise errors[-1]
    if not lengths and time.perf_counter() - start < _EXTEND_SECONDS:
        try:
            runs[2 * pair[1]] = _simulate(gm, symbols, 2 * pair[1], profile.training)
        except Exception:  # noqa: BLE001 - two lengths are enough
            pass
    ns = sorted(runs)
    profile.method, profile.fit_lengths, profile.sim_batch = "fake-trace", ns, _batch_of(gm)
    last = _chord(ns[-2], ns[-1], runs[ns[-2]]["after_forward"], runs[ns[-1]]["after_forward"])
    profile.activation_bytes_fixed, profile.activation_bytes_per_token = max(0.0, last[0]), last[1]
    profile.step_peak_lines = [_chord(a, b, runs[a]["peak"], runs[b]["peak"]) for a, b in zip(ns, ns[1:])]
    profile.activation_peak_lines = [_chord(a, b, runs[a]["activation_peak"], runs[b]["activation_peak"])
                                     for a, b in zip(ns, ns[1:])]
    # the moment of the activations' peak with the gradients made by then: once the sequence is long, the step's
    # peak is there (the start of backward), though at the fitted lengths it may still be at the end of backward
    profile.step_peak_lines += [_chord(a, b, runs[a]["activation_moment"], runs[b]["activation_moment"])
                                for a, b in zip(ns, ns[1:])]
    profile.attention_forward_lines = _events(runs, "attention_forward")
    profile.attention_backward_lines = _events(runs, "attention_backward")
    profile.attention_backward_activation_lines = _events(runs, "attention_backward_activations")
    if any(run["attention_recompute"] for run in runs.values()):
        profile.attention_recompute_lines = _events(runs, "attention_recompute")
        profile.attention_recompute_activation_lines = _events(runs, "attention_recompute_activations")
    profile.output_bytes_per_token = _chord(ns[-2], ns[-1], runs[ns[-2]]["outputs"], runs[ns[-1]]["outputs"])[1]
    profile.kv_copied = max(run["kv_copied"] for run in runs.values())


def _chord(a: int, b: int, ya: float, yb: float) -> list[float]:
    """The line ``[fixed, per_token]`` through (a, ya) and (b, yb), never falling with the length."""
    per_token = max(0.0, (yb - ya) / (b - a))
    return [float(yb - per_token * b), per_token]


def _events(runs: dict, key: str) -> list[list[float]]:
    """One line per attention call (the same call at the two longest lengths of ``runs``), or one through the
    largest when the calls do not pair up."""
    (a, b) = sorted(runs)[-2:]
    ra, rb = runs[a][key], runs[b][key]
    return [_chord(a, b, ya, yb) for ya, yb in zip(ra, rb)] if len(ra) == len(rb) else [
        _chord(a, b, max(ra, default=0), max(rb, default=0))]


def _prefill_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` returning each attention's keys and nothing else, as ``rm.generate``'s prefill graph does
    (``passes/inference.py``): what only the logits need (final norm, head) is dead code."""
    graph = fx.Graph()
    mapping: dict = {}
    graph.graph_copy(gm.graph, mapping)
    stores = []
    for node in _attention_nodes(gm.graph):  # like kv_cache.store_kv: an empty tensor, the keys freed after use
        with graph.inserting_after(mapping[node.args[1]]):
            stores.append(graph.call_function(torch.ops.aten.new_empty.default, (mapping[node.args[1]], [0])))
    graph.output(tuple(stores))
    copy = fx.GraphModule(gm, graph)
    copy.graph.eliminate_dead_code()
    copy.recompile()
    return copy


def _fit_prefill(gm: fx.GraphModule, symbols: set, profile: ModelProfile) -> None:
    """Lines through fake runs of the prefill graph (no gradients) at the profile's two longest lengths."""
    prefill = _prefill_copy(gm)
    runs = {n: _simulate(prefill, symbols, n, False) for n in profile.fit_lengths[-2:]}
    a, b = sorted(runs)
    profile.prefill_peak_lines = [_chord(a, b, runs[a]["peak"], runs[b]["peak"])]
    profile.prefill_attention_lines = _events(runs, "attention_forward")


def _analytic_profile(profile: ModelProfile) -> None:
    """Korthikanti et al. (2022): ~34 * hidden bytes per token and layer in 16-bit, without the S^2 terms."""
    per_token = float(34 * profile.hidden * profile.layers * profile.dtype_bytes / 2)
    profile.method, profile.fit_lengths, profile.sim_batch = "analytic", [], profile.batch
    profile.activation_bytes_fixed, profile.activation_bytes_per_token = 0.0, per_token
    profile.step_peak_lines = [[float(profile.gradient_bytes), per_token]]
    profile.attention_forward_lines = [[0.0, per_token]]
    profile.attention_backward_lines = [[float(profile.gradient_bytes), per_token]]
    profile.activation_peak_lines = profile.attention_backward_activation_lines = [[0.0, per_token]]
    profile.output_bytes_per_token = 0.0


# ------------------------------------------------------------------------------ block kernel workspace


@functools.cache
def _fused_workspace(dtype_name: str) -> dict:
    """What the fused kernels keep alive beside the running state: a piece's output and the merge (forward),
    its dQ, dK, dV (backward), as [fixed bytes, bytes per fp32 element of q's shard], from their peaks on one
    causal block at two lengths (the block mask's own evaluation is added per model: ``mask_piece_bytes``)."""
    from .memory import PeakMemory
    from .runtime import fused_attention

    dtype = getattr(torch, dtype_name)
    b, h, hkv, d = 1, 2, 1, 16
    gen = torch.Generator().manual_seed(0)
    peaks = {}
    for length in (4 * fused_attention.TILE, 8 * fused_attention.TILE):
        q = torch.randn(b, h, length, d, generator=gen).to(dtype)
        k, v = (torch.randn(b, hkv, length, d, generator=gen).to(dtype) for _ in range(2))
        pos = torch.arange(length)
        lse = torch.full((b, h, length), float("-inf"))
        o = torch.zeros(b, h, length, d)
        with torch.no_grad(), PeakMemory() as fwd:
            fused_attention.fused_block_forward(q, k, v, o, lse, pos, pos, scale=d**-0.5, causal=True)
        do, delta = torch.randn(b, h, length, d, generator=gen).to(dtype), torch.randn(b, h, length, generator=gen)
        dq, dk, dv = torch.zeros(b, h, length, d), torch.zeros(b, hkv, length, d), torch.zeros(b, hkv, length, d)
        with torch.no_grad(), PeakMemory() as bwd:
            fused_attention.fused_block_backward(q, k, v, do, lse, delta, dq, dk, dv, pos, pos, scale=d**-0.5,
                                                 causal=True, out=o.to(dtype))
        peaks[length] = (fwd.peak_bytes, bwd.peak_bytes)
    (l1, (f1, b1)), (l2, (f2, b2)) = sorted(peaks.items())
    unit = b * h * d * _FP32
    out = {}
    for phase, p1, p2 in (("forward", f1, f2), ("backward", b1, b2)):
        rows = max(0.0, (p2 - p1) / ((l2 - l1) * unit))
        out[phase] = [round(max(0.0, p1 - rows * l1 * unit)), round(rows, 4)]
    return out


def _kernel_workspace(tile: int, dtype_name: str, masked: bool) -> dict:
    """What the torch block kernels keep alive (see ``ModelProfile.kernel_workspace``): their peak on a
    block of one T x T piece and of 2 x 2 pieces, solved for fp32 [B,H,T,T] tiles and [B,H,T,D] row
    blocks from two head dims. Tiny real tensors, once per process."""
    from .memory import PeakMemory
    from .runtime import block_attention

    dtype = getattr(torch, dtype_name)
    b, h, hkv = 1, 2, 1
    gen = torch.Generator().manual_seed(0)
    unit_tile, unit_row = b * h * tile * tile * _FP32, b * h * tile * _FP32
    result: dict = {"forward": {}, "backward": {}}
    for name, length in (("one_piece", tile), ("pieces", 2 * tile)):
        peaks = []
        for d in (16, 64):
            q = torch.randn(b, h, length, d, generator=gen).to(dtype)
            k, v = (torch.randn(b, hkv, length, d, generator=gen).to(dtype) for _ in range(2))
            pos = torch.arange(length)
            opts = {"scale": d**-0.5, "causal": False}
            if masked:
                opts.update(mask_fn=lambda qp, kp: kp.unsqueeze(0) <= qp.unsqueeze(1), fill=float("-inf"))
                lse = torch.zeros(2, b, h, length)
                lse[0] = float("-inf")
            else:
                lse = torch.full((b, h, length), float("-inf"))
            out = torch.zeros(b, h, length, d)
            with torch.no_grad(), PeakMemory() as fwd:
                block_attention.torch_block_forward(q, k, v, out, lse, pos, pos, **opts)
            do, delta = torch.randn(b, h, length, d, generator=gen).to(dtype), torch.randn(b, h, length, generator=gen)
            dq, dk, dv = torch.zeros(b, h, length, d), torch.zeros(b, hkv, length, d), torch.zeros(b, hkv, length, d)
            with torch.no_grad(), PeakMemory() as bwd:
                block_attention.torch_block_backward(q, k, v, do, lse, delta, dq, dk, dv, pos, pos, **opts)
            peaks.append((d, fwd.peak_bytes, bwd.peak_bytes))
        (d1, f1, b1), (d2, f2, b2) = peaks
        for phase, p1, p2 in (("forward", f1, f2), ("backward", b1, b2)):
            rows = max(0.0, (p2 - p1) / ((d2 - d1) * unit_row))
            result[phase][name] = [round(max(0.0, (p1 - rows * d1 * unit_row) / unit_tile), 4), round(rows, 4)]
    return result
