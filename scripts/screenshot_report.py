"""Write the HTML report of a small ringified model and screenshot it with headless Chromium.

    .venv/bin/python scripts/screenshot_report.py [--model llama|gemma2|...] [--world-size 4] [--out DIR] [--sample-cost]

The model is a zoo model (``tests/support/zoo.py``; default a 2-layer HuggingFace Llama: GQA, RoPE, SwiGLU,
loss on labels; ``gemma2`` adds soft-capping and sliding windows) from a small config, random weights, no download. It is captured and rewritten for ``--world-size`` ranks in this one process (the
rewrite needs no process group), and the report gets the picture of the rewritten graph and the cost
model (``ringify.cost``; ``--sample-cost`` puts in the synthetic numbers of ``tests/support/report_samples.py``
instead, e.g. to look at the plots while the cost model is not installed). Prints the paths of the page
and of the screenshot (``--no-screenshot``, or no ``chromium`` on the PATH: the page only).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))


def build_report(model: str, world_size: int, seq_len: int, hardware: str | None, sample_cost: bool):
    import zoo
    from ringify import api
    from ringify.capture import capture
    from ringify.report import graph_summary

    built = getattr(zoo, model)()
    args, kwargs = built.make_inputs(0, seq_len)
    captured = capture(built.model, args, kwargs, 1)
    gm, report = api.rewrite(built.model, captured, world_size=world_size)
    if hasattr(api, "complete_report"):
        try:
            api.complete_report(report, built.model, captured, gm, hardware)
        except Exception as err:  # the cost model is optional for this script
            print(f"complete_report failed ({type(err).__name__}: {err}); page without the cost model", file=sys.stderr)
    if not report.graph:
        report.graph = graph_summary(gm)
    if sample_cost or not report.cost:
        if not sample_cost:
            print("no cost model in the report (ringify.cost missing?); pass --sample-cost for synthetic plots",
                  file=sys.stderr)
        else:
            from report_samples import sample_cost as synthetic

            report.cost = synthetic()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama", help="a zoo model builder: llama, gemma2, mistral, ...")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=37)
    parser.add_argument("--hardware", default=None, help="a ringify.cost.HARDWARE name (default: cpu-gloo)")
    parser.add_argument("--sample-cost", action="store_true", help="synthetic cost numbers (tests/support/report_samples.py)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ringify_report"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=4400)
    parser.add_argument("--layout", default="layered", help="how the graph is drawn: layered or multipartite")
    parser.add_argument("--no-screenshot", action="store_true")
    opts = parser.parse_args()

    os.makedirs(opts.out, exist_ok=True)
    start = time.perf_counter()
    report = build_report(opts.model, opts.world_size, opts.seq_len, opts.hardware, opts.sample_cost)
    name = opts.model + ("" if opts.layout == "layered" else f"_{opts.layout}")
    html_path = os.path.join(opts.out, f"{name}_report.html")
    page = report.to_html(html_path, layout=opts.layout)
    with open(os.path.join(opts.out, f"{name}_report.md"), "w") as f:
        f.write(report.to_markdown())
    print(f"page: {html_path} ({len(page) / 1024:.0f} KiB, {time.perf_counter() - start:.1f} s)")
    from chromium import CHROMIUM, screenshot

    if opts.no_screenshot or CHROMIUM is None:
        if CHROMIUM is None:
            print("no chromium on the PATH: no screenshot", file=sys.stderr)
        return
    png_path = os.path.join(opts.out, f"{name}_report.png")
    screenshot(html_path, png_path, opts.width, opts.height, timeout=300)
    print(f"screenshot: {png_path}")


if __name__ == "__main__":
    main()
