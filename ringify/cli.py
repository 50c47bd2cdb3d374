"""The ``ringify`` command line: demo, convert, report, run, generate.

Every command prints one clear error line and a hint on failure and exits non-zero; ``--debug``
(before the command) shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import sys

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

app = typer.Typer(
    help="ringify: rewrite any PyTorch model into exact ring-parallel form, so one long sequence is spread "
         "over many devices. Start with `ringify demo`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
def _console(**options) -> Console:
    """Rich's own width on a terminal; piped (CI logs, files) at least 120 columns, so tables keep whole headers."""
    probe = Console(**options)
    return probe if probe.is_terminal else Console(width=max(probe.width, 120), **options)


console = _console()
errors = _console(stderr=True)
_state = {"debug": False}

MODEL_HELP = ("A saved torch.export program (.pt2), a HuggingFace-style model directory (config.json + *.safetensors), "
              "or package.module:factory (a function returning a module, or (module, args[, kwargs])).")


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """Spread long sequences over many devices, exactly: ring attention for models ringify has never seen."""
    _state["debug"] = debug


def _hint(err: BaseException) -> str:
    from .errors import UnsupportedModelError
    from .saved import UnsafeArchiveError

    if isinstance(err, UnsupportedModelError):  # its message carries its own hint, maybe past the first line
        lines = str(err).strip().splitlines()
        if lines and "hint" in lines[0].lower():
            return ""
        return next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("hint:")), "")
    if isinstance(err, UnsafeArchiveError):
        return ""
    if isinstance(err, FileNotFoundError):
        return "check the path"
    if isinstance(err, ValueError) and "at least one prompt token" in str(err):
        return "use a longer --prompt-len (or --prompt-file lines) or a smaller --world-size"
    if isinstance(err, ValueError) and "ranks" in str(err) and "tokens" in str(err):
        return "use a longer --seq-len or a smaller --world-size"
    return "run with --debug for the traceback"


def _print_markdown(text: str) -> None:
    """Rendered on a terminal; as plain Markdown when piped (Rich would cut module paths and source lines
    to 80 columns there), ready for a file, a CI log or a pull request."""
    if console.is_terminal:
        console.print(Markdown(text))
    else:
        print(text, flush=True)


@contextlib.contextmanager
def _friendly_errors():
    """One line and a hint, exit code 1; the traceback only with ``--debug``."""
    try:
        yield
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except Exception as err:  # noqa: BLE001 - the CLI's single place that turns errors into one line
        if _state["debug"]:
            raise
        from .launch import RankFailure

        if isinstance(err, RankFailure):  # the first failing rank's own first line, not the banner
            rank, text = min(err.failures.items())
            first = f"rank {rank}: " + (text.strip().splitlines() or ["failed"])[0]
        else:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        errors.print(f"[red]error:[/] {first}", highlight=False, soft_wrap=True)
        hint = _hint(err)
        if hint:
            errors.print(f"[dim]hint: {hint}[/]", highlight=False)
        raise typer.Exit(1) from None


def _check_world(seq_len: int, world_size: int) -> None:
    if seq_len < world_size:
        raise typer.BadParameter(f"--seq-len {seq_len} is shorter than --world-size {world_size}; every rank needs "
                                 "at least one token")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


# ------------------------------------------------------------------------------------------------ demo


@app.command()
def demo(
    world_size: int = typer.Option(4, "--world-size", "-w", min=1, help="CPU processes (gloo) in the ring."),
    seq_len: int = typer.Option(1001, "--seq-len", "-s", min=1, help="Global sequence length (any, >= world size)."),
    layout: str = typer.Option("zigzag", help="How tokens are dealt to ranks: zigzag, contiguous or striped."),
    seed: int = typer.Option(None, help="Random seed (default: a fresh one, printed)."),
) -> None:
    """Ringify a built-in small GPT on WORLD_SIZE CPU processes and check it against the single-device model.

    Compares logits, loss and every parameter gradient (1e-5 relative error), prints what was rewritten
    and the measured peak memory of each rank next to the cost model's prediction.
    """
    _check_world(seq_len, world_size)
    seed = random.randrange(2**31) if seed is None else seed
    with _friendly_errors():
        from .launch import LocalRanks
        from .verify import check_tiny_gpt

        with console.status(f"starting {world_size} CPU processes, ringifying TinyGPT ({seq_len} tokens)"):
            with LocalRanks(world_size) as ranks:
                results = ranks.run(check_tiny_gpt, seed, seq_len, 2, layout, timeout=600)
        report = results[0]["report"]
        _print_markdown(report.to_markdown())
        predicted = report.cost.get("estimate", {}).get("per_device", {}) if getattr(report, "cost", None) else {}
        table = Table(title=f"TinyGPT, {world_size} ranks, {seq_len} tokens, layout {layout}, seed {seed}: "
                            "ringified vs single device (fp32)")
        for column in ("rank", "logits err", "loss err", "max grad err", "peak memory (fwd+bwd)", "predicted",
                       "seconds", "check"):
            table.add_column(column)
        ok = True
        for r in results:
            passed = max(r["logits"], r["loss"], r["grads"]) < 1e-5
            ok &= passed
            guess = predicted.get("total", 0) - predicted.get("parameters", 0)
            table.add_row(str(r["rank"]), f"{r['logits']:.1e}", f"{r['loss']:.1e}", f"{r['grads']:.1e}",
                          _mib(r["peak_bytes"]), _mib(guess) if guess > 0 else "-", f"{r['seconds']:.2f}",
                          "[green]ok[/]" if passed else "[red]FAIL[/]")
        console.print(table)
        if not ok:
            errors.print("[red]error:[/] the ringified model differs from the single-device model by more than 1e-5")
            raise typer.Exit(1)
        console.print("[green]exact:[/] logits, loss and every gradient match the single-device model within 1e-5.")


# --------------------------------------------------------------------------------------------- convert


@app.command()
def convert(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: pathlib.Path = typer.Option(..., "--out", "-o", help="Where to write the converted program (.pt2)."),
    seq_len: int = typer.Option(128, "--seq-len", "-s", min=2, help="Sequence length of the example inputs used to "
                                "capture (the saved program works for any length)."),
    world_size: int = typer.Option(2, "--world-size", "-w", min=1, help="Ring size the conversion is checked for "
                                   "(the file loads on any)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow pickles that may run code "
                                           "(.pt2) and custom model code (auto_map)."),
) -> None:
    """Capture MODEL, check that ringify can rewrite it, and save it for `ringify.load(path, mesh)` / `ringify run`."""
    _check_world(seq_len, world_size)
    with _friendly_errors():
        from .saved import convert as convert_source
        from .sources import resolve

        with console.status(f"loading {model}"):
            source = resolve(model, seq_len=seq_len, trust_remote_code=trust_remote_code)
        with console.status(f"capturing {source.name} and checking the ring rewrite on {world_size} ranks"):
            meta = convert_source(source, out, world_size=world_size)
        layers = meta["report"]["layers"]
        attention = sum(len(layer.get("attention", [])) for layer in layers.values())
        ffn = sum(len(layer.get("ffn", [])) for layer in layers.values())
        console.print(f"[green]wrote[/] {out} ({_mib(out.stat().st_size)}): {source.name}, {attention} attention -> ring, "
                      f"{ffn} feed-forward -> chunked. Load with ringify.load({str(out)!r}, mesh) or run "
                      f"`torchrun --nproc-per-node N -m ringify.cli run {out}`.")


# ---------------------------------------------------------------------------------------------- report


@app.command()
def report(
    model: str = typer.Argument(..., help=MODEL_HELP + " A directory with only config.json is planned without "
                                "weights, on the meta device (so is a factory that builds on meta)."),
    world_size: int = typer.Option(4, "--world-size", "-w", min=1, help="Ring size to plan for."),
    seq_len: int = typer.Option(1024, "--seq-len", "-s", min=2, help="Global sequence length to plan for."),
    hardware: str = typer.Option("h100-nvlink", help="Hardware profile for the cost model (see --list-hardware)."),
    html: pathlib.Path = typer.Option(None, "--html", help="Also write a self-contained HTML report here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    training: bool = typer.Option(True, "--training/--inference", help="Cost a training step (forward + backward) "
                                  "or inference: a forward, and rm.generate (the prefill, the key/value cache sharded "
                                  "over the devices, decode time per token, the longest prompt per world size)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="With --inference: the new tokens "
                                       "rm.generate decodes after a --seq-len prompt (the cache holds them too)."),
    outputs: str = typer.Option("full", help="ringify's outputs option to plan for: full (gathered to full length on "
                                "every rank, the default) or local (each rank keeps its tokens). The report gives "
                                "the largest context for both."),
    dtype: str = typer.Option(None, help="Compute dtype: bfloat16, float16 or float32 (default: the one the config "
                              "names, else the model's own; bfloat16 with --mixed-precision on a float32 model)."),
    optimizer: str = typer.Option("adam", help="Optimizer states to count in training: adam (AdamW too: 2 states "
                                  "per parameter), sgd (with momentum: 1 state) or none."),
    mixed_precision: bool = typer.Option(False, "--mixed-precision/--no-mixed-precision", help="FSDP2 "
                                         "MixedPrecisionPolicy: float32 master parameters, gradients and optimizer "
                                         "states, compute in the 16-bit --dtype."),
    dp: int = typer.Option(1, "--dp", min=1, help="FSDP2 data-parallel ranks (a 2-D mesh dp x world size): "
                           "parameters, gradients and optimizer states are sharded over them (1/dp per device)."),
    checkpoint: str = typer.Option("model", "--checkpoint", help="Activation checkpointing to cost: model (what the "
                                   "model itself checkpoints, kept by ringify) or layers (ringify(..., "
                                   "checkpoint='layers'): every layer recomputed in backward)."),
    list_hardware: bool = typer.Option(False, "--list-hardware", help="List the hardware profiles and exit."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow pickles / custom model code."),
) -> None:
    """What ringify finds and rewrites in MODEL, per layer, and what it will cost on WORLD_SIZE devices.

    Runs in one process: the rewrite for WORLD_SIZE ranks is planned, not executed. Memory counts parameters,
    gradients and optimizer states (per --optimizer, --mixed-precision, --dp), activations and the ring's buffers.
    With --inference: what rm.generate costs per device and the longest prompt that fits per world size.
    """
    from .cost import HARDWARE, OPTIMIZER_STATES

    if list_hardware:
        table = Table(title="hardware profiles")
        for column in ("name", "FLOP/s", "link bytes/s (per direction)", "memory", "what"):
            table.add_column(column)
        for hw in HARDWARE.values():
            table.add_row(hw.name, f"{hw.flops:.3g}", f"{hw.bandwidth:.3g}", f"{hw.memory / 2**30:.0f} GiB", hw.description)
        console.print(table)
        return
    if hardware not in HARDWARE:
        raise typer.BadParameter(f"unknown --hardware {hardware!r}; one of: {', '.join(HARDWARE)}")
    if outputs not in ("full", "local"):
        raise typer.BadParameter(f"--outputs must be full or local, got {outputs!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise typer.BadParameter(f"--optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    if checkpoint not in ("model", "layers"):
        raise typer.BadParameter(f"--checkpoint must be model or layers, got {checkpoint!r}")
    layers = "layers" if checkpoint == "layers" else None
    _check_world(seq_len, world_size)
    with _friendly_errors():
        from .api import complete_report, rewrite

        with console.status(f"loading {model}"):
            source = _plan_source(model, seq_len, dtype, mixed_precision, trust_remote_code)
        with console.status(f"capturing {source.name} and planning the ring for {world_size} ranks"):
            captured = _plan_capture(source)
            new, result = rewrite(source.model, captured, world_size=world_size, outputs=outputs,
                                  checkpoint=layers if training else None)
            complete_report(result, source.model, captured, new, hardware, training=training, outputs=outputs,
                            optimizer=optimizer if training else "none", mixed_precision=mixed_precision, dp=dp,
                            checkpoint=layers, new_tokens=max_new_tokens)
        if as_json:
            print(result.to_json())
        else:
            _print_markdown(result.to_markdown())
        if html:
            result.to_html(str(html))
            (errors if as_json else console).print(f"[green]wrote[/] {html}")


def _plan_source(model: str, seq_len: int, dtype: str | None, mixed_precision: bool, trust_remote_code: bool):
    """The model to plan, in the compute dtype: built on meta from a config alone, or resolved as usual (its
    inputs moved to meta when the model lives there)."""
    import torch
    from torch.utils._pytree import tree_map

    from .plan import from_config_directory, is_meta, parse_dtype, to_meta, weightless_directory
    from .sources import resolve

    wanted = parse_dtype(dtype)
    if mixed_precision and wanted == torch.float32:
        raise typer.BadParameter("--mixed-precision computes in 16 bits: pass --dtype bfloat16 or float16")
    if weightless_directory(model):
        if mixed_precision and wanted is None:  # a float32 config trains in bfloat16 under mixed precision
            from .plan import config_dtype

            raw = json.loads((pathlib.Path(model) / "config.json").read_text())
            wanted = torch.bfloat16 if (config_dtype(raw) or torch.float32) == torch.float32 else None
        return from_config_directory(pathlib.Path(model), seq_len, 0, trust_remote_code, wanted)
    source = resolve(model, seq_len=seq_len, trust_remote_code=trust_remote_code)
    own = next((p.dtype for p in source.model.parameters() if p.is_floating_point()), None)
    if wanted is None and mixed_precision and own == torch.float32:
        wanted = torch.bfloat16
    if wanted is not None and wanted != own:
        if getattr(source.model, "ringify_program", None) is not None:
            raise typer.BadParameter("--dtype and --mixed-precision apply to model directories and factories; a .pt2 "
                                     "program keeps the dtypes it was exported with")
        source.model.to(wanted)
        cast = lambda x: x.to(wanted) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
        source.args, source.kwargs = tree_map(cast, (source.args, source.kwargs))
    if is_meta(source.model):
        source.args, source.kwargs = to_meta((source.args, source.kwargs))
        source.name += " (meta)"
    return source


def _plan_capture(source):
    """``capture`` of the source; on meta, a failure says that planning without weights needs code that reads
    no tensor values."""
    from .capture import capture
    from .plan import explain_meta_failure, is_meta

    try:
        return capture(source.model, source.args, source.kwargs, source.seq_dim)
    except Exception as err:  # noqa: BLE001 - reworded only on meta
        explained = explain_meta_failure(type(source.model).__name__, err, "capturing it") if is_meta(
            source.model) else None
        if explained is None:
            raise
        raise explained from err


# ------------------------------------------------------------------------------------------------- run


def _run_rank(path: str, seq_len: int | None, steps: int, train: bool, check: bool, seed: int) -> dict:
    """One rank of `ringify run`: load, draw the same inputs everywhere, forward (and backward + SGD)."""
    import time

    import torch
    import torch.distributed as dist

    from .memory import PeakMemory
    from .saved import load, load_program
    from .sources import draw_inputs
    from .verify import relative_error

    rm = load(path)
    program, meta = load_program(path)
    length = seq_len or meta.get("seq_len", 128)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    rm.to(device)
    args, kwargs = draw_inputs(meta.get("inputs", []), length, meta.get("seq_dim", 1), seed)
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    args, kwargs = tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3) if train else None
    with torch.set_grad_enabled(train):
        rm(*args, **kwargs)  # capture and rewrite (tracing with fake tensors) outside the meter
    losses, seconds, peak = [], [], 0
    for _ in range(steps):
        start = time.perf_counter()
        with PeakMemory() as meter, torch.set_grad_enabled(train):
            out = rm(*args, **kwargs)
            loss = _loss_of(out)
            if train:
                loss.backward()
        if train:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        peak = max(peak, meter.peak_bytes)
    result = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "seq_len": length, "losses": losses,
              "seconds": seconds, "peak_bytes": peak}
    if check:  # the first step ran on the saved weights: the untouched model on the full sequence must agree
        with torch.no_grad():
            expected = _loss_of(program.module().to(device)(*args, **kwargs))
        result["error"] = relative_error(torch.tensor(losses[0], dtype=torch.float64), expected.detach().cpu())
    return result


def _loss_of(out):
    """The loss of a model output (``out.loss``, or the first scalar) or else the mean of the first tensor."""
    import torch
    from torch.utils._pytree import tree_leaves

    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    leaves = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
    scalars = [x for x in leaves if x.dim() == 0]
    return scalars[0] if scalars else leaves[0].float().mean()


@app.command()
def run(
    program: pathlib.Path = typer.Argument(..., help="A program written by `ringify convert`."),
    seq_len: int = typer.Option(None, "--seq-len", "-s", min=1, help="Global sequence length (default: the one it "
                                "was converted with)."),
    steps: int = typer.Option(2, min=1, help="Forward (and, with --train, backward + SGD) steps."),
    train: bool = typer.Option(False, "--train/--forward", help="Train steps (backward + SGD) or forward only."),
    world_size: int = typer.Option(2, "--world-size", "-w", min=1, help="CPU processes to spawn when not started "
                                   "by torchrun (under torchrun its ranks are used)."),
    check: bool = typer.Option(True, help="Compare the first loss with the untouched model on the full sequence."),
    seed: int = typer.Option(0, help="Seed of the random inputs (the same on every rank)."),
) -> None:
    """Smoke-run a converted program on a ring: under `torchrun` (gloo on CPU, nccl on GPUs) or on spawned CPU ranks."""
    with _friendly_errors():
        from .saved import load_program

        if not program.is_file():
            raise FileNotFoundError(f"no such file: {program}")
        load_program(program)  # fail here, in one process, on a bad file
        if seq_len is not None:
            _check_world(seq_len, int(os.environ.get("WORLD_SIZE", world_size)))
        job = (str(program), seq_len, steps, train, check, seed)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            results = _run_under_torchrun(job)
            if results is None:
                return
        else:
            from .launch import LocalRanks

            with console.status(f"running {program} on {world_size} CPU processes"), LocalRanks(world_size) as ranks:
                results = ranks.run(_run_rank, *job, timeout=600)
        _print_run(results, train)


def _run_under_torchrun(job: tuple, fn=_run_rank):
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        result = fn(*job)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
    finally:
        dist.destroy_process_group()
    return gathered if int(os.environ["RANK"]) == 0 else None


def _print_run(results: list[dict], train: bool) -> None:
    first = results[0]
    table = Table(title=f"{'train' if train else 'forward'} on {first['world_size']} ranks, {first['seq_len']} tokens")
    for column in ("rank", "losses", "seconds per step", "peak memory", "vs untouched"):
        table.add_column(column)
    failed = False
    for r in results:
        error = r.get("error")
        failed |= error is not None and error > 1e-5
        table.add_row(str(r["rank"]), ", ".join(f"{x:.5f}" for x in r["losses"]),
                      ", ".join(f"{s:.3f}" for s in r["seconds"]), _mib(r["peak_bytes"]),
                      "-" if error is None else f"{error:.1e}")
    console.print(table)
    if failed:
        errors.print("[red]error:[/] the ring's loss differs from the untouched model's by more than 1e-5")
        raise typer.Exit(1)


# -------------------------------------------------------------------------------------------- generate


def _generate_rank(model: str, prompts: list[list[int]] | None, prompt_len: int, batch: int, new_tokens: int,
                   sampling: tuple, check: bool, seed: int, layout: str, trust_remote_code: bool) -> dict:
    """One rank of `ringify generate`: build MODEL (seeded: the same weights everywhere), the same prompt
    everywhere, ``rm.generate`` once to capture, once timed; rank 0 also runs the untouched model."""
    import copy
    import time

    import torch
    import torch.distributed as dist

    from .api import ringify

    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with _rank_progress(rank == 0) as progress:
        progress.phase(f"loading {model}")
        net, name, ids, mask, pad = _generation_inputs(model, prompts, prompt_len, batch, seed, trust_remote_code,
                                                       device)
        reference = copy.deepcopy(net) if check and rank == 0 else None  # the untouched model, before ringify
        rm = ringify(net, None, layout=layout)
        do_sample, temperature, top_k, top_p = sampling
        options = dict(attention_mask=mask, pad_token_id=pad, do_sample=do_sample, temperature=temperature,
                       top_k=top_k, top_p=top_p)
        progress.phase("capturing the model and warming up")
        start = time.perf_counter()
        rm.generate(ids, 1, generator=torch.Generator(device=device).manual_seed(seed), **options)
        sync()
        capture_s = time.perf_counter() - start
        progress.reset(new_tokens)
        stamps: list[float] = []

        def on_token(done: int, total: int) -> None:
            sync()
            stamps.append(time.perf_counter())
            progress.advance(done, total)

        start = time.perf_counter()
        tokens = rm.generate(ids, new_tokens, generator=torch.Generator(device=device).manual_seed(seed),
                             on_token=on_token, **options)
        sync()
        total_s = time.perf_counter() - start
        result = {"rank": rank, "world_size": dist.get_world_size(), "model": name, "tokens": tokens.cpu(),
                  "batch": ids.shape[0], "prompt_len": ids.shape[1], "padded": not bool(mask.all()), "pad": pad,
                  "layout": layout, "seed": seed, "steps": len(stamps), "capture_s": capture_s,
                  "prefill_s": stamps[0] - start if stamps else total_s,
                  "decode_s": stamps[-1] - stamps[0] if stamps else 0.0, "total_s": total_s,
                  "cache_bytes": rm.cache_bytes, "device": str(device), "reference": None}
        if reference is not None:
            from .verify import reference_generate

            progress.phase("the untouched model, for the check")
            expected, how = reference_generate(reference, ids, new_tokens, mask, pad)
            result["reference"], result["reference_kind"] = expected.cpu(), how
    return result


def _generation_inputs(model: str, prompts, prompt_len: int, batch: int, seed: int, trust_remote_code: bool, device):
    """The model (seeded, eval, on ``device``), its name, the prompt ``[B, S]``, its mask and the pad id."""
    import torch

    from .sources import resolve

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bar per rank (read at import)
    torch.manual_seed(seed)  # a factory that draws its weights unseeded still draws the same ones on every rank
    source = resolve(model, seq_len=max(prompt_len, 2), seed=seed, trust_remote_code=trust_remote_code)
    net = source.model
    with contextlib.suppress(Exception):  # exported programs refuse .eval(); everything else generates in eval mode
        net.eval()
    net.to(device)
    vocab = getattr(getattr(net, "config", None), "vocab_size", None) or getattr(net, "vocab", None)
    if vocab is None:  # a .pt2 program or a factory's example inputs: the range of their token ids
        vocab = next((e["high"] for e in source.inputs if e.get("sequence") and "high" in e), None)
    pad = _pad_token(net)
    if prompts:
        length = max(map(len, prompts))
        ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
        if vocab is not None and int(ids.max()) >= vocab:
            raise ValueError(f"--prompt-file holds token id {int(ids.max())}, outside {source.name}'s vocabulary of "
                             f"{vocab}")
    else:
        if vocab is None:
            raise ValueError(f"{source.name} has neither config.vocab_size nor .vocab nor example token ids, so no "
                             "random prompt can be drawn; pass --prompt-file with token ids")
        ids = torch.randint(0, int(vocab), (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
    return net, source.name, ids.to(device), mask.to(device), pad


def _pad_token(model) -> int:
    """The id that left-pads --prompt-file lines: generation_config's pad_token_id, else its (first) eos, else 0."""
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return 0 if pad is None else int(pad)


class _NoProgress:
    def phase(self, text: str) -> None:
        pass

    def reset(self, total: int) -> None:
        pass

    def advance(self, done: int, total: int) -> None:
        pass


class _TokenProgress(_NoProgress):
    """A transient rich bar on this process's terminal: capturing (a pulse), then one step per new token."""

    def __init__(self, bar):
        self.bar = bar
        self.task = bar.add_task("starting", total=None)

    def phase(self, text: str) -> None:
        self.bar.reset(self.task, total=None, description=text)

    def reset(self, total: int) -> None:
        self.bar.reset(self.task, total=total, description="prefill, then decoding")

    def advance(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total, description="decoding")


@contextlib.contextmanager
def _rank_progress(show: bool):
    """Rank 0's progress on the terminal the ranks share; nothing when stdout is not a terminal (CI logs, pipes)."""
    out = Console() if show else None
    if out is None or not out.is_terminal:
        yield _NoProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=out, transient=True) as bar:
        yield _TokenProgress(bar)


def _read_prompts(path: pathlib.Path) -> list[list[int]]:
    """One prompt per non-empty line: integer token ids separated by whitespace or commas."""
    import re

    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = [w for w in re.split(r"[\s,]+", line.strip()) if w]
        if not words:
            continue
        bad = next((w for w in words if not w.isdigit()), None)
        if bad is not None:
            raise ValueError(f"{path} line {number}: {bad!r} is not a token id (non-negative integers separated by "
                             "spaces or commas, one prompt per line)")
        prompts.append([int(w) for w in words])
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one line of token ids per prompt)")
    return prompts


@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt_len: int = typer.Option(64, "--prompt-len", "-p", min=1, help="Tokens of the random prompt (at least the "
                                   "world size: every rank holds a piece of it)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", "-n", min=1, help="Tokens to generate (fewer if every "
                                       "row reaches the model's eos token)."),
    world_size: int = typer.Option(2, "--world-size", "-w", min=1, help="CPU processes to spawn when not started by "
                                   "torchrun (under torchrun its ranks are used)."),
    prompt_file: pathlib.Path = typer.Option(None, "--prompt-file", help="A text file of token ids instead of a random "
                                             "prompt: one prompt per line, integers separated by spaces or commas. "
                                             "Shorter lines are left-padded (with an attention mask) with the model's "
                                             "generation_config.pad_token_id, else its eos_token_id, else 0. "
                                             "--prompt-len and --batch are then ignored."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare the tokens with the untouched model's greedy "
                               "tokens (HF generate where the model has it, else a loop re-running the whole "
                               "sequence), exactly. Not with --do-sample."),
    seed: int = typer.Option(0, help="Seed of the random prompt, the model's weights where a factory draws them, and "
                             "sampling (the same on every rank)."),
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="Rows of random prompts."),
    do_sample: bool = typer.Option(False, "--do-sample/--greedy", help="Sample with HF's temperature, top-k and top-p "
                                   "warpers (rank 0 draws, every rank gets its tokens) instead of greedy decoding. "
                                   "Sampled tokens are not compared with the untouched model (its draws differ); "
                                   "only checked to be the same on every rank."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (> 0; with --do-sample)."),
    top_k: int = typer.Option(None, "--top-k", min=0, help="Keep the k most likely tokens (with --do-sample)."),
    top_p: float = typer.Option(None, "--top-p", help="Keep the smallest set of tokens with this much probability, in "
                                "(0, 1] (with --do-sample)."),
    layout: str = typer.Option("zigzag", help="How the prompt's tokens are dealt to ranks: zigzag, contiguous or "
                               "striped."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow pickles / custom model code."),
) -> None:
    """Generate tokens with MODEL on a ring: the prompt's ring forward fills a KV cache sharded over the ranks,
    then each new token is decoded over every rank's shard.

    Runs on WORLD_SIZE spawned CPU processes (gloo), or under `torchrun` (gloo on CPU, nccl on GPUs). The prompt
    is random (--seed) unless --prompt-file. Prints, per rank, the KV cache memory, the time to the first token
    (prefill) and the decode tokens/s (after one untimed call that captures the model); then the new tokens of
    each row, and whether they equal the untouched model's. Exit code 1 if they differ, from the untouched
    model or between ranks. Example: `ringify generate ./tiny-llama -p 512 -n 32 -w 4`.
    """
    from .runtime import LAYOUTS

    if layout not in LAYOUTS:
        raise typer.BadParameter(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if do_sample and temperature <= 0:
        raise typer.BadParameter(f"--temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise typer.BadParameter(f"--top-p must be in (0, 1], got {top_p}")
    with _friendly_errors():
        prompts = _read_prompts(prompt_file) if prompt_file is not None else None
        torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        world = int(os.environ["WORLD_SIZE"]) if torchrun else world_size
        length = max(map(len, prompts)) if prompts else prompt_len
        if length < max(world, 2):
            what = f"the --prompt-file prompts ({length} tokens) are" if prompts else f"--prompt-len {prompt_len} is"
            raise ValueError(f"{what} shorter than {max(world, 2)} tokens, the least a prompt on {world} "
                             f"rank{'s' if world > 1 else ''} can have: every rank holds at least one prompt token "
                             "(and a prompt has at least 2)")
        job = (model, prompts, prompt_len, batch, max_new_tokens, (do_sample, temperature, top_k, top_p),
               check and not do_sample, seed, layout, trust_remote_code)
        if torchrun:
            results = _run_under_torchrun(job, _generate_rank)
            if results is None:
                return
        else:
            from .launch import LocalRanks

            console.print(f"[dim]generating {max_new_tokens} tokens with {model} on {world_size} CPU processes[/]",
                          highlight=False)
            with LocalRanks(world_size) as ranks:
                results = ranks.run(_generate_rank, *job, timeout=3600)
        _print_generate(results, do_sample)


def _print_generate(results: list[dict], sampled: bool) -> None:
    import torch

    first = results[0]
    world, rows, prompt = first["world_size"], first["batch"], first["prompt_len"]
    tokens, reference = first["tokens"], first["reference"]
    new = tokens.shape[1] - prompt
    ranks = f"{world} rank{'s' if world != 1 else ''}"
    padded = f", left-padded with {first['pad']}" if first["padded"] else ""
    table = Table(title=f"{first['model']}: {rows} x {prompt}-token prompt{padded}, {new} new tokens "
                        f"({'sampled' if sampled else 'greedy'}), {ranks} ({first['device']}), layout "
                        f"{first['layout']}, seed {first['seed']}",
                  caption="capture: an untimed first call; prefill: to the first token; decode: the other tokens; "
                          "tok/s counts every row")
    for column in ("rank", "KV cache", "capture s", "prefill s", "decode tok/s", "tok/s", "tokens"):
        table.add_column(column)
    differ = [r["rank"] for r in results if not torch.equal(r["tokens"], tokens)]
    wrong = reference is not None and not torch.equal(tokens, reference)
    for r in results:
        decode = f"{rows * (r['steps'] - 1) / r['decode_s']:,.1f}" if r["steps"] > 1 and r["decode_s"] > 0 else "-"
        if reference is not None:
            verdict = "[green]match[/]" if torch.equal(r["tokens"], reference) else "[red]DIFFER[/]"
        else:
            verdict = "[red]\u2260 rank 0[/]" if r["rank"] in differ else "= rank 0"
        table.add_row(str(r["rank"]), _kv_size(r["cache_bytes"]), f"{r['capture_s']:.2f}", f"{r['prefill_s']:.3f}",
                      decode, f"{rows * r['steps'] / r['total_s']:,.1f}", verdict)
    console.print(table)
    for row in range(rows):
        console.print(f"row {row} new tokens: " + " ".join(map(str, tokens[row, prompt:].tolist())), highlight=False)
    if differ:
        errors.print(f"[red]error:[/] rank(s) {', '.join(map(str, differ))} returned other tokens than rank 0",
                     highlight=False)
        raise typer.Exit(1)
    if wrong:
        errors.print(f"[red]error:[/] the ring's tokens differ from the untouched model's "
                     f"({first['reference_kind']}): {_first_difference(tokens, reference, prompt)}", highlight=False)
        raise typer.Exit(1)
    if reference is not None:
        console.print(f"[green]match:[/] the tokens of all {ranks} equal the untouched model's "
                      f"({first['reference_kind']}).", highlight=False)
    elif sampled:
        console.print(f"sampled: the {ranks} returned the same tokens (not compared with the untouched model: "
                      "its draws differ).", highlight=False)
    else:
        console.print(f"not checked against the untouched model (--no-check); the {ranks} returned the same "
                      "tokens.", highlight=False)


def _kv_size(n: int) -> str:
    return _mib(n) if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _first_difference(got, expected, prompt: int) -> str:
    if got.shape != expected.shape:
        return f"{got.shape[1] - prompt} new tokens instead of {expected.shape[1] - prompt}"
    row, col = (got != expected).nonzero()[0].tolist()
    return f"row {row}, new token {col - prompt}: {got[row, col].item()} instead of {expected[row, col].item()}"


if __name__ == "__main__":  # python -m ringify.cli (what torchrun runs)
    app()
