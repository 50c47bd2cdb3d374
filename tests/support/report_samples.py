"""A cost section with plausible numbers, to develop and test the report's pages against without a GPU."""

from __future__ import annotations

GiB = 2**30


def sample_cost(seq_len: int = 131_072, world_size: int = 8, worlds=(1, 2, 4, 8, 16, 32)) -> dict:
    """A cost section in ringify.cost's schema with plausible numbers (a 7B Llama-like model, bf16, on an
    80 GiB accelerator with a 200 GB/s link), to develop and test the page against."""
    params, layers, hidden, kv_width = 6.7e9, 32, 4096, 1024
    flops, bandwidth, memory = 400e12, 200e9, 80 * GiB

    def breakdown(s: int, w: int) -> dict:
        local = -(-s // w)
        parts = {"parameters": int(2 * params), "gradients": int(2 * params),
                 "activations": int(local * layers * hidden * 2 * 4),
                 "kv_buffers": int(2 * 2 * local * kv_width * 2),
                 "attention_workspace": int(local * 32 * 4 * 2 + 64 * 2**20)}
        total = sum(parts.values())
        return {**parts, "total": total, "fits": total <= memory}

    def step(block: int) -> tuple[float, float]:
        return 4 * block * block * hidden / flops, 2 * block * kv_width * 2 / bandwidth

    lengths = [2**k for k in range(10, 25)]
    curves = {str(w): [[s, breakdown(s, w)["total"]] for s in lengths] for w in worlds}
    free = memory - 4 * params
    per_token = layers * hidden * 2 * 4 + 2 * 2 * kv_width * 2 + 32 * 4 * 2
    max_context = {str(w): max(0, int((free - 64 * 2**20) / per_token) * w) for w in worlds}
    block = -(-seq_len // world_size)
    compute, transfer = step(block)
    min_block = int(kv_width * flops / (bandwidth * hidden))
    blocks = [2**k for k in range(6, 21)]
    return {
        "estimate": {
            "seq_len": seq_len, "world_size": world_size,
            "hardware": {"name": "sample-80g", "description": "synthetic accelerator for tests", "flops": flops,
                         "bandwidth": bandwidth, "memory": memory},
            "per_device": breakdown(seq_len, world_size),
            "ring_step": {"block_tokens": block, "bytes_sent": 2 * block * kv_width * 2, "compute_seconds": compute,
                          "transfer_seconds": transfer, "min_block_tokens": min_block,
                          "transfer_hidden": compute >= transfer},
            "steps_per_layer": world_size,
        },
        "max_context": max_context,
        "memory_curve": curves,
        "step_curve": [[b, *step(b)] for b in blocks],
        "profile": {"parameters": params, "layers": layers, "hidden": hidden, "kv_width": kv_width},
    }
