"""`dgo-compile`: each command parses options, calls one library function, renders the result."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from dgo_compile.errors import DgoError

app = typer.Typer(help="Compile diffusers denoisers into cheaper static ONNX artifacts.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
# Piped output gets a table wide enough to read rather than rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True)

ModelArg = Annotated[Optional[Path], typer.Argument(
    help="Local diffusers model or pipeline folder, or a config.json. Default: the shipped MNIST model.",
    show_default=False)]
Seed = Annotated[int, typer.Option(help="Seed of the initial noise.")]
Steps = Annotated[int, typer.Option(help="Sampler steps.")]


def _gb(macs: int) -> str:
    return f"{macs / 1e9:.3f} G" if macs >= 1e9 else f"{macs / 1e6:.1f} M"


@app.command()
def inspect(
    model: ModelArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    units: Annotated[bool, typer.Option(help="Also list the units inside each block.")] = False,
    batch: Annotated[int, typer.Option(help="Batch size the MACs are counted at.")] = 1,
) -> None:
    """Blocks of a denoiser with their shapes, parameters and MACs per call."""
    from dgo_compile import load, trace
    from dgo_compile.cost import cost_report

    loaded = load(model)
    report = cost_report(trace(loaded), batch=batch)
    if as_json:
        print(json.dumps({"source": str(loaded.source), "random_weights": loaded.random_weights, **report.to_json()},
                         indent=2))
        return
    total = report.total
    table = Table(title=f"{report.model} from {loaded.source}" + (" (random weights)" if loaded.random_weights else ""),
                  caption=f"inputs: " + ", ".join(f"{k} {list(v)}" for k, v in report.input_shapes.items()))
    for col, justify in [("block", "left"), ("kind", "left"), ("in", "left"), ("out", "left"), ("params", "right"),
                         ("weight MACs", "right"), ("attn MACs", "right"), ("share", "right")]:
        table.add_column(col, justify=justify)
    for row in report.rows:
        if row.cost.params == 0 and row.cost.macs == 0:
            continue
        style = None if row.gateable else "dim"
        table.add_row(row.name, row.kind, "x".join(map(str, row.input_shapes[0])) if row.input_shapes else "",
                      "x".join(map(str, row.output_shapes[-1])) if row.output_shapes else "",
                      f"{row.cost.params:,}", _gb(row.cost.weight_macs), _gb(row.cost.attention_macs),
                      f"{report.share(row):.1%}", style=style)
        if units:
            for name, cost in row.units.items():
                table.add_row("  " + name, "", "", "", f"{cost.params:,}", _gb(cost.weight_macs),
                              _gb(cost.attention_macs), f"{cost.macs / max(total.macs, 1):.1%}", style="italic")
    table.add_section()
    table.add_row("total", "", "", "", f"{total.params:,}", _gb(total.weight_macs), _gb(total.attention_macs), "100%")
    out.print(table)


@app.command()
def sample(
    model: ModelArg = None,
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 16,
    seed: Seed = 0,
    steps: Steps = 50,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG grid to write.")] = Path("grid.png"),
) -> None:
    """Sample a grid of images with DDIM through the traced graph of an unconditional model."""
    from rich.progress import Progress

    from dgo_compile import load, trace
    from dgo_compile.sampling import initial_noise, sample_ddim, save_grid

    if n < 1:
        raise DgoError(f"-n must be at least 1, got {n}")
    loaded = load(model)
    traced = trace(loaded)
    if traced.input_names != ("sample", "timestep"):
        raise DgoError(f"sample needs an unconditional model; {loaded.class_name} also takes "
                       f"{', '.join(traced.input_names[2:])}")
    if loaded.scheduler_config is None:
        raise DgoError(f"{loaded.source} has no scheduler/ config; pass a pipeline folder")
    noise = initial_noise(n, tuple(traced.example_inputs(1)["sample"].shape[1:]), seed)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("sampling", total=n * steps)
        images = sample_ddim(traced, loaded.scheduler_config, noise, steps,
                             progress=lambda k: progress.advance(task, k))
    out.print(f"wrote {save_grid(images, output)} ({n} images, DDIM {steps} steps, seed {seed})")


def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 1."""
    try:
        app()
    except DgoError as exc:
        if os.environ.get("DGO_DEBUG"):
            raise
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        sys.exit(1)
