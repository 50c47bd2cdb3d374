"""The examples run as a user would run them, and check what they claim."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~20-30 s: two spawned ranks import transformers and capture the model
def test_train_llama_standalone():
    cmd = [sys.executable, str(ROOT / "examples" / "train_llama.py"), "--world-size", "2", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"max relative difference: (\S+)", proc.stdout)
    assert found, proc.stdout
    assert float(found.group(1)) < 1e-5, proc.stdout
    assert len(re.findall(r"^\s+\d+\s+\d", proc.stdout, re.M)) == 2, proc.stdout  # one row per step
