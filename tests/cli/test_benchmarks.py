"""The benchmark scripts run (``--smoke``: tiny shapes, once) so they cannot rot before they are needed:
the GPU script before a GPU is lent, the speed and generation scripts between measurements."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["gpu_kernels.py", "step_speed.py", "inference.py"])
def test_benchmark_smoke(tmp_path, script):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    if script == "gpu_kernels.py":
        errors = [r for r in result["kernels"] if "error" in r]
        assert not errors, errors
        assert all(r["max_rel_error_vs_sdpa"] < 1e-5 for r in result["kernels"] if "max_rel_error_vs_sdpa" in r)
        assert set(result["context"]) >= {"untouched sdpa", "ringify world 1"}
    elif script == "inference.py":
        assert [r["world"] for r in result["rows"]] == [1, 2] and result["tokens_equal"], result["rows"]
        assert all(max(r["cache_mib_per_rank"]) == r["predicted_cache_mib"] for r in result["rows"])
    else:
        assert len(result["kernel"]) == 4 and len(result["model"]) == 3
