"""The ``ringify`` command line: help, report, convert -> load round trip, run, bad inputs, safe loading.

Through typer's test runner (fast, in process) and as real subprocesses (exit codes, stderr, no
traceback). Ring runs are real gloo processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from typer.testing import CliRunner

from ringify.cli import app
from ringify.verify import relative_error

SUPPORT = pathlib.Path(__file__).parents[1] / "support"  # cli_models: the MODEL factories named below
RINGIFY = pathlib.Path(sys.executable).parent / "ringify"
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def subprocess_cli(*args: str, timeout: float = 300, prefix: tuple = (), columns: int = 200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SUPPORT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": str(columns)}
    command = [*prefix, *([str(RINGIFY)] if not prefix else []), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=SUPPORT)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> pathlib.Path:
    """A HuggingFace-style checkpoint directory (config.json + model.safetensors) of a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         architectures=["LlamaForCausalLM"])
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ help


@pytest.mark.parametrize("command", [[], ["demo"], ["convert"], ["report"], ["run"], ["generate"]])
def test_every_command_explains_itself(command):
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.splitlines()) > 5


def test_help_as_a_real_subprocess():
    done = subprocess_cli("--help", timeout=120)
    assert done.returncode == 0 and all(c in done.stdout for c in ("demo", "convert", "report", "run", "generate"))


# ----------------------------------------------------------------------------------------- report


def test_report_json_names_every_layer_and_its_costs(tmp_path):
    html = tmp_path / "report.html"
    result = cli("report", "cli_models:tiny_gpt", "--world-size", 4, "--seq-len", 64, "--hardware", "a100-nvlink",
                 "--json", "--html", html)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["world_size"] == 4 and report["seq_len"] == 64
    assert set(report["layers"]) == {"h.0", "h.1"}
    for layer in report["layers"].values():
        assert layer["attention"][0]["module_path"].endswith("attn")
        assert "models.py" in layer["attention"][0]["source"]
        assert layer["ffn"]
    assert report["cost"]["estimate"]["hardware"]["name"] == "a100-nvlink"
    assert html.stat().st_size > 10_000 and "data:image/png;base64" in html.read_text()
    cost = report["cost"]
    assert cost["outputs"] == "full" and set(cost["max_context_by_outputs"]) == {"full", "local"}
    assert cost["max_context"] == cost["max_context_by_outputs"]["full"]
    assert cost["profile"]["optimizer"] == "adam" and cost["estimate"]["per_device"]["optimizer_states"] > 0
    page = html.read_text()
    assert 'outputs=&quot;full&quot; (in force)' in page and 'outputs=&quot;local&quot;' in page


def test_report_plans_local_outputs_and_shows_both_largest_contexts():
    """--outputs local: the rewrite keeps the logits local, the cost model says it is in force, and the Markdown
    gives the largest context for both settings, the one in force first."""
    result = cli("report", "cli_models:tiny_gpt", "--world-size", 4, "--seq-len", 64, "--outputs", "local",
                 "--optimizer", "none")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("- largest context")]
    assert len(lines) == 2 and 'outputs="local"' in lines[0] and "in force" in lines[0], lines
    assert 'outputs="full"' in lines[1] and "in force" not in lines[1], lines
    assert "(local)" in result.stdout and "(gathered)" not in result.stdout  # the outputs line of the rewrite
    assert "optimizer: none counted" in result.stdout
    bad = cli("report", "cli_models:tiny_gpt", "--outputs", "sideways")
    assert bad.exit_code == 2 and "full or local" in bad.output


def test_piped_report_is_plain_markdown_with_whole_paths():
    """Piped (not a terminal) the report is its Markdown: no column cut to 80 characters with an ellipsis."""
    done = subprocess_cli("report", "cli_models:tiny_gpt", "--world-size", 2, "--seq-len", 64, columns=80)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| layer | attention | mask | GQA | feed-forward | source |" in done.stdout, done.stdout
    assert "\u2026" not in done.stdout and "ringify/models.py:" in done.stdout, done.stdout


def test_report_lists_hardware_profiles():
    result = cli("report", "--list-hardware", "x")
    assert result.exit_code == 0 and "h100-nvlink" in result.output and "a100-ib" in result.output


# ------------------------------------------------------------------------------- convert and load


def _compare_loaded(path: str, factory: str, seq_len: int, seed: int) -> dict:
    """On every rank: ringify.load(path) against the original model (rebuilt the same way), fresh inputs."""
    import copy

    import ringify
    from ringify.saved import load_program
    from ringify.sources import draw_inputs, resolve

    original = resolve(factory, seq_len=seq_len).model
    reference = copy.deepcopy(original)
    rm = ringify.load(path)
    meta = load_program(path)[1]
    args, kwargs = draw_inputs(meta["inputs"], seq_len, meta["seq_dim"], seed)
    out, expected = rm(*args, **kwargs), reference(*args, **kwargs)
    logits = lambda o: o.logits if hasattr(o, "logits") else o[0]  # noqa: E731
    out.loss.backward()
    expected.loss.backward()
    # the graph reads a tied weight (TinyGPT's wte/lm_head) through one name; the other stays unused
    expected_params = dict(reference.named_parameters(remove_duplicate=False))
    used = [(n, p) for n, p in rm.model.named_parameters() if p.grad is not None]
    grads = [relative_error(p.grad, expected_params[n].grad) for n, p in used]
    assert len(used) == len(list(reference.parameters()))
    return {"logits": relative_error(logits(out).detach(), logits(expected).detach()),
            "loss": relative_error(out.loss.detach(), expected.loss.detach()),
            "grads": max(grads), "n_grads": len(grads), "tokens": int(args[0].shape[1] if args else
                                                                         next(iter(kwargs.values())).shape[1])}


@pytest.mark.parametrize("world_size", [2, 3])
def test_convert_then_load_on_ranks_equals_the_original_factory_model(tmp_path, ranks, seed, world_size):
    out = tmp_path / "tiny.pt2"
    result = cli("convert", "cli_models:tiny_gpt", "-o", out, "--seq-len", 41)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "wrote" in result.output
    seq_len = 23 + 2 * world_size  # not the converted length, odd
    for r in ranks(world_size).run(_compare_loaded, str(out), "cli_models:tiny_gpt", seq_len, seed):
        assert r["tokens"] == seq_len and r["n_grads"] > 10
        assert max(r["logits"], r["loss"], r["grads"]) < 1e-5, r


def test_convert_a_huggingface_directory_then_load_on_two_ranks(tmp_path, ranks, seed, llama_dir):
    out = tmp_path / "llama.pt2"
    result = cli("convert", llama_dir, "-o", out, "--seq-len", 32)
    assert result.exit_code == 0, result.output
    for r in ranks(2).run(_compare_loaded, str(out), str(llama_dir), 29, seed):
        assert max(r["logits"], r["loss"], r["grads"]) < 1e-5, r


def test_run_a_converted_program_on_spawned_ranks(tmp_path, llama_dir):
    out = tmp_path / "llama.pt2"
    assert cli("convert", llama_dir, "-o", out, "--seq-len", 32).exit_code == 0
    done = subprocess_cli("run", out, "--world-size", 2, "--seq-len", 37, "--train", "--steps", 2)
    assert done.returncode == 0, done.stderr
    assert "train on 2 ranks, 37 tokens" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("│ ")]
    assert len(rows) == 2  # one per rank, each compared with the untouched model


@pytest.mark.slow
def test_run_under_torchrun(tmp_path):
    out = tmp_path / "tiny.pt2"
    assert cli("convert", "cli_models:tiny_gpt", "-o", out, "--seq-len", 41).exit_code == 0
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    done = subprocess_cli("--nproc-per-node", 2, "-m", "ringify.cli", "run", out, "--seq-len", 33,
                          prefix=(str(torchrun),))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "forward on 2 ranks, 33 tokens" in done.stdout


# ------------------------------------------------------------------------------------- generate


def _table_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("\u2502 ")]


def test_generate_tokens_match_the_untouched_model():
    result = cli("generate", "cli_models:tiny_gpt", "-p", 9, "-n", 4, "-w", 2)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "TinyGPT: 1 x 9-token prompt, 4 new tokens (greedy), 2 ranks" in out, out
    rows = _table_rows(out)
    assert len(rows) == 2 and all("match" in row and "KiB" in row for row in rows), out
    new = [line for line in out.splitlines() if line.startswith("row 0 new tokens:")]
    assert len(new) == 1 and len(new[0].split(":")[1].split()) == 4, out
    assert "match: the tokens of all 2 ranks equal the untouched model's (greedy loop" in out


@pytest.mark.parametrize("options,verdict", [
    (["--no-check"], "not checked against the untouched model (--no-check)"),
    (["--do-sample", "--temperature", "0.8", "--top-k", "10", "--top-p", "0.9", "--batch", "2", "--seed", "5"],
     "sampled: the 2 ranks returned the same tokens"),
])
def test_generate_unchecked_and_sampled(options, verdict):
    result = cli("generate", "cli_models:tiny_gpt", "-p", 8, "-n", 3, "-w", 2, *options)
    assert result.exit_code == 0, result.output
    assert verdict in result.stdout and "match" not in result.stdout, result.stdout
    rows = _table_rows(result.stdout)
    assert len(rows) == 2 and all("= rank 0" in row for row in rows), result.stdout
    batch = 2 if "--batch" in options else 1
    assert sum(line.startswith("row ") for line in result.stdout.splitlines()) == batch


@pytest.mark.slow
def test_generate_a_left_padded_prompt_file_with_hf_llama_on_three_ranks(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5 6 7 8 9 10 11\n1, 2, 3,4\n\n12 13 14 15 16 17 18 19 20\n")
    done = subprocess_cli("generate", "cli_models:tiny_llama", "--prompt-file", prompts, "-n", 5, "-w", 3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 x 9-token prompt, left-padded with 2" in done.stdout, done.stdout  # the config's eos: no pad id
    assert len(_table_rows(done.stdout)) == 3
    assert "equal the untouched model's (HF generate)" in done.stdout


@pytest.mark.slow
def test_generate_under_torchrun():
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    done = subprocess_cli("--nproc-per-node", 2, "-m", "ringify.cli", "generate", "cli_models:tiny_llama", "-p", 11,
                          "-n", 4, prefix=(str(torchrun),))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 x 11-token prompt, 4 new tokens (greedy), 2 ranks" in done.stdout
    assert done.stdout.count("match") >= 3  # both rows and the verdict line


def test_generate_prompt_shorter_than_the_ring_is_one_clear_line(tmp_path):
    done = subprocess_cli("generate", "cli_models:tiny_gpt", "-p", 1, "-w", 2, timeout=60)
    assert done.returncode == 1
    _one_clear_line(done, "--prompt-len 1", "2 ranks", "at least one prompt token")
    assert "hint: use a longer --prompt-len" in done.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n4 five 6\n")
    result = cli("generate", "cli_models:tiny_gpt", "--prompt-file", bad)
    assert result.exit_code == 1 and "line 2: 'five' is not a token id" in result.output, result.output


def test_generate_reports_tokens_that_differ(capsys):
    """The verdict itself: a rank whose tokens differ from the untouched model's fails with the first difference."""
    import typer

    from ringify.cli import _print_generate

    ref = torch.tensor([[1, 2, 3, 4, 5]])
    row = {"world_size": 2, "model": "M", "batch": 1, "prompt_len": 3, "padded": False, "pad": 0, "layout": "zigzag",
           "seed": 0, "steps": 2, "capture_s": 1.0, "prefill_s": 0.1, "decode_s": 0.1, "total_s": 0.2,
           "cache_bytes": 4096, "device": "cpu", "reference_kind": "HF generate"}
    results = [{**row, "rank": 0, "tokens": torch.tensor([[1, 2, 3, 4, 6]]), "reference": ref},
               {**row, "rank": 1, "tokens": torch.tensor([[1, 2, 3, 4, 6]]), "reference": None}]
    with pytest.raises(typer.Exit) as exit_:
        _print_generate(results, sampled=False)
    assert exit_.value.exit_code == 1
    captured = capsys.readouterr()
    assert "DIFFER" in captured.out
    assert "row 0, new token 1: 6 instead of 5" in captured.err
    results[1]["tokens"] = torch.tensor([[1, 2, 3, 7, 7]])
    results[0]["reference"] = None
    with pytest.raises(typer.Exit):
        _print_generate(results, sampled=True)
    assert "rank(s) 1 returned other tokens than rank 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ bad inputs


def _one_clear_line(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, done.stderr
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


def test_missing_file_is_one_clear_line():
    _one_clear_line(subprocess_cli("report", "no/such/model.pt2"), "no such file", "model.pt2")


def test_corrupt_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "corrupt.pt2"
    bad.write_bytes(os.urandom(4096))
    _one_clear_line(subprocess_cli("convert", bad, "-o", tmp_path / "out.pt2"), "corrupt.pt2", "not a .pt2")


def test_unsupported_model_names_the_op():
    _one_clear_line(subprocess_cli("report", "cli_models:running_sum", "--seq-len", 16), "cumsum")


def test_sequence_longer_than_the_model_takes_names_both():
    done = subprocess_cli("report", "cli_models:tiny_gpt", "--seq-len", 4096)
    _one_clear_line(done, "itself raises", "4096", "max_len=256")
    assert "hint: check the inputs" in done.stderr, done.stderr


def test_factory_that_returns_no_module():
    _one_clear_line(subprocess_cli("report", "cli_models:not_a_module"), "not a torch.nn.Module")


def test_world_larger_than_sequence_is_refused():
    result = cli("report", "cli_models:tiny_gpt", "--world-size", 8, "--seq-len", 4)
    assert result.exit_code == 2 and "shorter than --world-size 8" in result.output


def test_debug_shows_the_traceback():
    done = subprocess_cli("--debug", "report", "cli_models:running_sum", "--seq-len", 16)
    assert done.returncode != 0 and "Traceback" in done.stderr


# ------------------------------------------------------------------------------------ safe loading


class _Marker:
    """Unpickling this would create a file: the proof that a pickle ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _with_evil_sample_inputs(good: pathlib.Path, bad: pathlib.Path, marker: pathlib.Path) -> None:
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if "/data/sample_inputs/" in item.filename:
                data = pickle.dumps((_Marker(str(marker)),), protocol=2)
            dst.writestr(item, data)


def test_loading_refuses_pickles_that_run_code_unless_trusted(tmp_path):
    from ringify.saved import UnsafeArchiveError, load_program

    good, bad, marker = tmp_path / "good.pt2", tmp_path / "bad.pt2", tmp_path / "pwned"
    assert cli("convert", "cli_models:tiny_gpt", "-o", good, "--seq-len", 41).exit_code == 0
    load_program(good)  # our own files pass the check
    _with_evil_sample_inputs(good, bad, marker)
    with pytest.raises(UnsafeArchiveError, match="trust-remote-code"):
        load_program(bad)
    assert not marker.exists()
    done = subprocess_cli("run", bad, "--world-size", 1)
    _one_clear_line(done, "trust-remote-code")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ demo


def test_demo_checks_tinygpt_on_three_ranks():
    done = subprocess_cli("demo", "--world-size", 3, "--seq-len", 67)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exact:" in done.stdout and "FAIL" not in done.stdout
    assert done.stdout.count(" ok ") >= 3 or done.stdout.count("ok") >= 3
    assert "h.0" in done.stdout and "h.1" in done.stdout  # the report's per-layer rows
