"""What every benchmark script does the same way: medians of timed repeats after a warm-up, and the JSON result."""

from __future__ import annotations

import json
import pathlib
import statistics
import time


def median_seconds(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def save_result(out, result: dict) -> pathlib.Path:
    """``result`` as indented JSON at ``out`` (folders made as needed)."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
