"""Plans without weights (ringify.plan): ``ringify report`` of a directory holding only a HuggingFace
``config.json``, or of a factory that builds on the meta device, captured and costed on fake tensors.
Parameter, gradient and optimizer bytes per device are checked against a hand count of the architecture."""

from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from ringify.cli import app
from ringify.plan import config_dtype, from_config_directory, is_meta, weightless_directory

SUPPORT = pathlib.Path(__file__).parents[1] / "support"  # cli_models: the MODEL factories named below
runner = CliRunner()

# Llama-3.1-8B's architecture (meta-llama/Llama-3.1-8B config.json), as its config writes it
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
}


def llama_parameters(cfg: dict) -> tuple[int, int, int]:
    """(all, one decoder layer, outside the layers) parameters of a HF Llama, by formula: q and o are hidden x
    heads * head_dim, k and v hidden x kv_heads * head_dim, three MLP matrices hidden x intermediate, two RMSNorm
    weights per layer; the embedding, the final norm and the untied LM head outside."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    layer = 2 * h * heads * d + 2 * h * kv * d + 3 * h * cfg["intermediate_size"] + 2 * h
    root = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2) + h
    return cfg["num_hidden_layers"] * layer + root, layer, root


def config_dir(tmp_path: pathlib.Path, cfg: dict) -> pathlib.Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def small_llama(rng: random.Random, min_layers: int = 1) -> dict:
    """A random small Llama config (GQA, untied or tied) in bfloat16, written the transformers-5 way (``dtype``),
    of ``min_layers`` to 3 layers."""
    heads = rng.choice([2, 4])
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16 * heads * rng.randint(1, 2),
            "intermediate_size": rng.choice([48, 96]), "num_hidden_layers": rng.randint(min_layers, 3),
            "num_attention_heads": heads, "num_key_value_heads": heads // 2, "vocab_size": rng.randrange(97, 400),
            "max_position_embeddings": 4096, "tie_word_embeddings": rng.random() < 0.5, "dtype": "bfloat16"}


def report_json(*args) -> dict:
    result = runner.invoke(app, ["report", *map(str, args), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_training_bytes(device: dict, profile: dict, cfg: dict, *, compute: int, mixed: bool, dp: int,
                         optimizer_states: int) -> None:
    """Per-device parameters, gradients, optimizer states and FSDP2's gathered copies against the hand count."""
    n, layer, root = llama_parameters(cfg)
    assert profile["parameters"] == n and profile["layer_parameters"] == layer and profile["root_parameters"] == root
    stored = 4 if mixed else compute
    assert device["parameters"] - profile["buffer_bytes"] == pytest.approx(n * stored / dp, abs=1)
    assert profile["buffer_bytes"] < 64 * 2**10  # rotary frequencies only
    assert device["gradients"] == pytest.approx(n * stored / dp, abs=1)
    assert device["optimizer_states"] == pytest.approx(optimizer_states * n * stored / dp, abs=1)
    gathered = (2 * root + 2 * layer) * compute if (mixed or dp > 1) else 0
    assert device["gathered_parameters"] == pytest.approx(gathered, abs=1)


# ------------------------------------------------------------------------------------------ quick


def test_config_only_directory_is_built_on_meta(tmp_path, seed):
    cfg = small_llama(random.Random(seed))
    path = config_dir(tmp_path, cfg)
    assert weightless_directory(str(path)) and config_dtype(cfg) == torch.bfloat16
    source = from_config_directory(path, 64, seed, False)
    assert is_meta(source.model) and all(t.is_meta for t in source.model.state_dict().values())
    assert next(source.model.parameters()).dtype == torch.bfloat16
    assert all(t.is_meta for t in source.kwargs.values() if isinstance(t, torch.Tensor))
    assert sum(p.numel() for p in source.model.parameters()) == llama_parameters(cfg)[0]
    assert from_config_directory(path, 64, seed, False, torch.float32).model.dtype == torch.float32


@pytest.mark.parametrize("optimizer, states, mixed, dp", [("adam", 2, True, 4), ("sgd", 1, False, 1),
                                                          ("none", 0, False, 3)])
def test_report_of_a_config_plans_on_fake_tensors(tmp_path, seed, optimizer, states, mixed, dp):
    """`ringify report DIR` with only config.json: no refusal, the fake-tensor profile (not the analytic
    fallback), the config's dtype, and training bytes per device as counted by hand."""
    cfg = small_llama(random.Random(seed))
    path = config_dir(tmp_path, cfg)
    options = ["--optimizer", optimizer, "--dp", dp] + (["--mixed-precision"] if mixed else [])
    report = report_json(path, "--world-size", 2, "--seq-len", 257, *options)
    profile, device = report["cost"]["profile"], report["cost"]["estimate"]["per_device"]
    assert profile["meta_device"] and len(report["layers"]) == cfg["num_hidden_layers"]
    assert profile["method"] == "fake-trace" and not profile["notes"], profile["notes"]
    assert profile["compute_dtype"] == "bfloat16" and profile["dtype_bytes"] == 2
    assert (profile["optimizer"], profile["mixed_precision"], profile["dp"]) == (optimizer, mixed, dp)
    assert profile["activation_bytes_per_token"] > 0 and device["activations"] > 0
    check_training_bytes(device, profile, cfg, compute=2, mixed=mixed, dp=dp, optimizer_states=states)


def test_dtype_flag_overrides_the_config(tmp_path, seed):
    cfg = small_llama(random.Random(seed))
    path = config_dir(tmp_path, cfg)
    report = report_json(path, "--world-size", 2, "--seq-len", 64, "--dtype", "float32", "--optimizer", "none")
    profile = report["cost"]["profile"]
    assert profile["compute_dtype"] == "float32" and profile["dtype_bytes"] == 4
    check_training_bytes(report["cost"]["estimate"]["per_device"], profile, cfg, compute=4, mixed=False, dp=1,
                         optimizer_states=0)
    bad = runner.invoke(app, ["report", str(path), "--dtype", "float32", "--mixed-precision"])
    assert bad.exit_code == 2 and "16 bits" in bad.output


def test_markdown_names_the_training_setup(tmp_path, seed):
    path = config_dir(tmp_path, small_llama(random.Random(seed)))
    result = runner.invoke(app, ["report", str(path), "-w", "2", "-s", "64", "--mixed-precision", "--dp", "8"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Adam, 2 states per parameter in float32" in result.stdout
    assert "mixed precision" in result.stdout and "FSDP2 over dp=8" in result.stdout
    assert "planned without weights" in result.stdout
    assert 'largest context with outputs="full"' in result.stdout and 'outputs="local"' in result.stdout


def test_checkpointing_is_costed_as_recomputation(tmp_path, seed):
    """--checkpoint layers: every layer recomputed in backward; the activations kept through the step shrink
    to the layers' inputs, so the planned activations fall well below the plan without it, and no attention
    backward holds more than without it (there the layer recomputed holds what it kept without checkpointing,
    the layers before it only their inputs, those after it nothing).

    Two layers at least: with one, the step's peak with checkpointing is that layer's ring-attention backward,
    where the recomputed layer holds what the plan without checkpointing holds there (nothing else is saved
    but the layer's input), so only a larger peak elsewhere (the logits' loss backward) can shrink, and by
    less than 30% (measured on gloo too: one layer, hidden 32, vocab 138, 2048 tokens on 2 ranks, bf16:
    3.72 MiB without, 2.76 with; hidden 64, vocab 97: 4.56 and 4.68)."""
    cfg = small_llama(random.Random(seed), min_layers=2)
    path = config_dir(tmp_path, cfg)
    plain = report_json(path, "--world-size", 2, "--seq-len", 2048, "--optimizer", "none")
    layers = report_json(path, "--world-size", 2, "--seq-len", 2048, "--optimizer", "none", "--checkpoint", "layers")
    profile = layers["cost"]["profile"]
    assert profile["checkpoint"] == "layers" and profile["recomputed_regions"] == cfg["num_hidden_layers"]
    assert plain["cost"]["profile"]["recomputed_regions"] == 0
    assert [r["kind"] for r in layers["regions"]] == ["checkpoint"] * cfg["num_hidden_layers"]
    acts = {name: r["cost"]["estimate"]["per_device"]["activations"] for name, r in [("plain", plain), ("layers", layers)]}
    assert acts["layers"] < 0.7 * acts["plain"], acts
    local = 2048 // 2
    at_backward = {name: [fixed + per_token * local
                          for fixed, per_token in r["cost"]["profile"]["attention_backward_lines"]]
                   for name, r in [("plain", plain), ("layers", layers)]}
    assert len(at_backward["layers"]) == len(at_backward["plain"]) == cfg["num_hidden_layers"], at_backward
    assert all(ck <= 1.001 * kept for ck, kept in zip(at_backward["layers"], at_backward["plain"])), at_backward


def test_factory_that_builds_on_meta(monkeypatch):
    monkeypatch.syspath_prepend(str(SUPPORT))
    report = report_json("cli_models:tiny_gpt_meta", "--world-size", 2, "--seq-len", 64)
    profile = report["cost"]["profile"]
    assert report["model"] == "TinyGPT" and profile["method"] == "fake-trace" and profile["meta_device"]
    assert set(report["layers"]) == {"h.0", "h.1"}
    # nanoGPT's mask is a table: on meta it has no values to show it is causal, and the report says so
    assert any("meta device" in note for note in profile["notes"]), profile["notes"]


def test_model_that_reads_values_on_meta_says_so():
    done = subprocess.run([str(pathlib.Path(sys.executable).parent / "ringify"), "report",
                           "cli_models:reads_its_buffer_meta", "--seq-len", "16"], capture_output=True, text=True,
                          cwd=SUPPORT, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "without weights (on the meta device)" in error[0] and ".item()" in error[0], error


def test_a_directory_with_weights_still_loads_them(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert not weightless_directory(str(tmp_path))
    report = report_json(tmp_path, "--world-size", 2, "--seq-len", 32)
    profile = report["cost"]["profile"]
    assert report["model"] == "LlamaForCausalLM" and profile["compute_dtype"] == "float32" and not profile["meta_device"]


# ------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_llama_3_1_8b_config_plans_8_ranks_131072_tokens_in_a_minute(tmp_path):
    """The issue's plan: Llama-3.1-8B from its config alone, 8 ranks, 131072 tokens, Adam, mixed precision,
    FSDP2 over dp=2: under a minute on 2 cores, no weight materialised (16 GB in bf16; the process stays far
    below), and the training bytes per device as counted by hand."""
    path = config_dir(tmp_path, LLAMA_8B)
    script = ("import json, resource, sys, time\n"
              "from typer.testing import CliRunner\n"
              "from ringify.cli import app\n"
              "start = time.perf_counter()\n"
              "r = CliRunner().invoke(app, sys.argv[1:], catch_exceptions=False)\n"
              "seconds = time.perf_counter() - start\n"
              "assert r.exit_code == 0, r.output\n"
              "print(json.dumps({'seconds': seconds, 'rss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
              " 'report': json.loads(r.stdout)}))\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, "report", str(path), "--world-size", "8", "--seq-len",
                           "131072", "--hardware", "h100-nvlink", "--mixed-precision", "--dp", "2", "--json"],
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert wall < 60, f"planning took {wall:.1f} s ({result['seconds']:.1f} s in the command)"
    assert result["rss_kib"] < 6 * 2**20, f"max RSS {result['rss_kib'] / 2**20:.1f} GiB: weights materialised?"
    cost = result["report"]["cost"]
    profile, device = cost["profile"], cost["estimate"]["per_device"]
    assert llama_parameters(LLAMA_8B)[0] == 8_030_261_248  # the published count
    assert profile["method"] == "fake-trace" and profile["compute_dtype"] == "bfloat16" and profile["layers"] == 32
    check_training_bytes(device, profile, LLAMA_8B, compute=2, mixed=True, dp=2, optimizer_states=2)
    assert device["total"] == sum(v for k, v in device.items() if k not in ("total", "fits"))
    local = cost["max_context_by_outputs"]["local"]
    assert all(local[str(w)] >= 0.9 * w * local["1"] for w in (2, 4, 8, 16, 32)), local
