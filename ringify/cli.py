"""The ``ringify`` command line."""

from __future__ import annotations

import random

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="ringify: exact ring attention and ring-parallel models over torch.distributed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def main() -> None:
    """Spread long sequences over many devices, exactly."""


@app.command()
def demo(
    world_size: int = typer.Option(4, "--world-size", "-w", min=1, help="CPU processes in the ring."),
    seq_len: int = typer.Option(1001, "--seq-len", "-s", min=1, help="Global sequence length (any, >= world size)."),
    heads: int = typer.Option(8, help="Query heads."),
    kv_heads: int = typer.Option(2, help="Key/value heads (GQA when fewer than query heads)."),
    head_dim: int = typer.Option(32, help="Head dimension."),
    causal: bool = typer.Option(True, help="Causal attention."),
) -> None:
    """Run ring attention on WORLD_SIZE CPU processes (gloo) and check it against one process."""
    from .verify import check_ring_attention
    from .launch import LocalRanks
    from .runtime import LAYOUTS

    if seq_len < world_size:
        raise typer.BadParameter(f"--seq-len {seq_len} is shorter than --world-size {world_size}; every rank needs a token")
    if heads % kv_heads:
        raise typer.BadParameter(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
    seed = random.randrange(2**31)
    table = Table(title=f"ring attention, {world_size} ranks, {seq_len} tokens, {'causal' if causal else 'full'}, "
                        f"{heads} heads / {kv_heads} kv heads, fp32, seed {seed}")
    for column in ("layout", "tokens per rank", "max rel. error (out, dq, dk, dv)", "fwd+bwd seconds", "check"):
        table.add_column(column)
    ok = True
    with console.status(f"starting {world_size} CPU processes"), LocalRanks(world_size) as ranks:
        for layout in LAYOUTS:
            result = ranks.run(check_ring_attention, seed, seq_len, heads, kv_heads, head_dim, causal, layout)[0]
            passed = result["max_relative_error"] < 1e-5
            ok &= passed
            table.add_row(layout, str(result["shard_lengths"]), f"{result['max_relative_error']:.2e}",
                          f"{result['seconds']:.3f}", "[green]ok[/]" if passed else "[red]FAIL[/]")
    console.print(table)
    if not ok:
        console.print("[red]ring attention differs from single-process attention by more than 1e-5[/]")
        raise typer.Exit(1)
    console.print("[green]exact:[/] every layout matches single-process attention within 1e-5 relative error.")
