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
def compile(
    model: ModelArg = None,
    schedule: Annotated[str, typer.Option(help="full, deepcache:N[:branch], steps:K, or a schedule JSON file.")] = "full",
    steps: Steps = 50,
    scheduler: Annotated[str, typer.Option(help="Sampler the schedule is folded for.")] = "ddim",
    output: Annotated[Path, typer.Option("-o", "--output", help="Artifact folder to write.")] = Path("artifact"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing artifact folder.")] = False,
) -> None:
    """Fold a block schedule into static graphs and export them as an ONNX artifact."""
    from dgo_compile import load, trace
    from dgo_compile.artifact import compile_artifact
    from dgo_compile.schedule import Schedule, builtin

    if scheduler != "ddim":
        raise DgoError(f"scheduler '{scheduler}' is not supported yet; use ddim")
    loaded = load(model)
    if loaded.scheduler_config is None:
        raise DgoError(f"{loaded.source} has no scheduler/ config; pass a pipeline folder")
    traced = trace(loaded)
    names = tuple(b.name for b in traced.blocks)
    plan = Schedule.load(schedule) if schedule.endswith(".json") else builtin(schedule, steps, names)
    with err.status(f"compiling {plan.name} ({plan.steps} steps)"):
        path = compile_artifact(traced, plan, loaded.scheduler_config, output, overwrite=overwrite,
                                model_source=str(loaded.source.resolve()))
    from dgo_compile.artifact import read_manifest

    macs = read_manifest(path)["macs"]
    out.print(f"wrote {path}: {len(read_manifest(path)['variants'])} graphs, "
              f"{macs['total'] / macs['full_total']:.1%} of the full model's MACs per run")


@app.command()
def sample(
    source: Annotated[Optional[Path], typer.Argument(
        help="An artifact folder from `compile`, or a model (default: the shipped MNIST model).",
        show_default=False)] = None,
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 16,
    seed: Seed = 0,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (an artifact fixes them).")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG grid to write.")] = Path("grid.png"),
) -> None:
    """Sample a grid of images with DDIM, from an artifact on onnxruntime or a model's traced graph."""
    from rich.progress import Progress

    from dgo_compile.sampling import initial_noise, sample_ddim, save_grid

    if n < 1:
        raise DgoError(f"-n must be at least 1, got {n}")
    denoiser, scheduler_config, shape, steps = _denoiser(source, steps)
    noise = initial_noise(n, shape, seed)
    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("sampling", total=n * steps)
        images = sample_ddim(denoiser, scheduler_config, noise, steps,
                             progress=lambda k: progress.advance(task, k))
    out.print(f"wrote {save_grid(images, output)} ({n} images, DDIM {steps} steps, seed {seed})")


@app.command()
def bench(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder from `compile`.")],
    against: Annotated[Optional[Path], typer.Option(
        help="Unpruned artifact to compare with. Default: compile `full` from the artifact's model.")] = None,
    batch: Annotated[int, typer.Option(help="Images per sampling run.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed runs of each artifact (the median is reported).")] = 5,
) -> None:
    """Median wall time of a whole sampling run against the unpruned model on the same provider and batch."""
    import tempfile

    from dgo_compile.artifact import OrtArtifact, read_manifest
    from dgo_compile.bench import bench_artifacts

    manifest = read_manifest(artifact)
    with tempfile.TemporaryDirectory() as tmp:
        if against is None:
            source = manifest["model"].get("source")
            if not source:
                raise DgoError(f"{artifact} does not record its model; pass --against FULL_ARTIFACT")
            from dgo_compile import load, trace
            from dgo_compile.artifact import compile_artifact
            from dgo_compile.schedule import builtin

            loaded = load(source)
            traced = trace(loaded)
            with err.status("compiling the unpruned baseline"):
                against = compile_artifact(traced, builtin("full", manifest["scheduler"]["steps"],
                                                           tuple(b.name for b in traced.blocks)),
                                           manifest["scheduler"]["config"], Path(tmp) / "full", model_source=source)
        artifacts = {"compiled": OrtArtifact.open(artifact), "full": OrtArtifact.open(against)}
        if artifacts["full"].steps != artifacts["compiled"].steps:
            raise DgoError(f"{against} runs {artifacts['full'].steps} steps and {artifact} {artifacts['compiled'].steps}; "
                           "compare artifacts compiled for the same step count")
        with err.status(f"timing {repeats} runs of each at batch {batch}"):
            result = bench_artifacts(artifacts, batch, repeats)
    provider = artifacts["compiled"].sessions[0].get_providers()[0]
    table = Table(title=f"{artifact}: {manifest['schedule']['name']}, {manifest['scheduler']['steps']} steps, "
                        f"batch {batch}, {provider}")
    for col in ("artifact", "median s/run", "MACs/run", "speedup", "theoretical", "realised/theoretical"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for label in ("full", "compiled"):
        speedup, theory = result.speedup(label, "full"), result.theoretical(label, "full")
        table.add_row(label, f"{result.seconds[label]:.3f}", _gb(result.macs[label]), f"{speedup:.2f}x",
                      f"{theory:.2f}x", f"{speedup / theory:.2f}")
    out.print(table)


def _denoiser(source: Path | None, steps: int | None):
    """(denoiser, scheduler config, sample shape, steps) for an artifact folder or a model."""
    from dgo_compile import load, trace

    if source is not None and (source / "manifest.json").is_file():
        from dgo_compile.artifact import OrtArtifact

        artifact = OrtArtifact.open(source)
        if steps is not None and steps != artifact.steps:
            raise DgoError(f"{source} was compiled for {artifact.steps} steps, not {steps}; "
                           f"drop --steps or recompile with --steps {steps}")
        sample_spec = next(i for i in artifact.manifest["inputs"] if i["name"] == "sample")
        return artifact, artifact.manifest["scheduler"]["config"], tuple(sample_spec["shape"][1:]), artifact.steps
    loaded = load(source)
    traced = trace(loaded)
    if traced.input_names != ("sample", "timestep"):
        raise DgoError(f"sample needs an unconditional model; {loaded.class_name} also takes "
                       f"{', '.join(traced.input_names[2:])}")
    if loaded.scheduler_config is None:
        raise DgoError(f"{loaded.source} has no scheduler/ config; pass a pipeline folder")
    return traced, loaded.scheduler_config, tuple(traced.example_inputs(1)["sample"].shape[1:]), steps or 50


def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 1."""
    try:
        app()
    except DgoError as exc:
        if os.environ.get("DGO_DEBUG"):
            raise
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        sys.exit(1)
