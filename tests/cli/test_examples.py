"""The examples run as a user would run them, and check what they claim."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~30-60 s: four spawned ranks import transformers and capture the model
@pytest.mark.parametrize("checkpoint", ["hf"])  # checkpoint="layers" and the rest: tests/api/test_fsdp.py
def test_train_llama_standalone(checkpoint):
    """The README's training recipe (FSDP2 over dp x ringify over cp, local outputs, checkpointing), 2 x 2 ranks."""
    cmd = [sys.executable, str(ROOT / "examples" / "train_llama.py"), "--dp", "2", "--cp", "2", "--steps", "2",
           "--checkpoint", checkpoint]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"max relative difference \(losses, gradients\): (\S+)", proc.stdout)
    assert found, proc.stdout
    assert float(found.group(1)) < 1e-5, proc.stdout
    assert len(re.findall(r"^\s+\d+\s+\d", proc.stdout, re.M)) == 2, proc.stdout  # one row per step
    assert "2 FSDP2 modules, 2 recomputed regions" in proc.stdout, proc.stdout
