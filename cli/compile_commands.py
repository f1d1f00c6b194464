"""`compile`, `sample` and `bench`: an artifact written, sampled and timed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from dgo_compile.core.options import check
from dgo_compile.driver.pipeline import CompileConfig

from .common import MAIN_PROCESS, Height, ModelArg, Seed, Width, err, macs_text, out
from .progress import ConsoleStages


def compile(
    model: ModelArg = None,
    schedule: Annotated[Optional[str], typer.Option(
        help="full, deepcache:N[:branch], steps:K, a schedule JSON file, or (with --config) learned. "
             f"(default: {CompileConfig.schedule})", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Sampler steps. (default: {CompileConfig.steps})",
                                                 show_default=False)] = None,
    scheduler: Annotated[Optional[str], typer.Option(
        help="Sampler the schedule is folded for: ddim, ddpm, pndm, heun, euler, dpm. Default: the model's.")] = None,
    granularity: Annotated[Optional[str], typer.Option(
        help=f"Gate blocks, or the units (resnets, attentions, samplers) inside them. "
             f"(default: {CompileConfig.granularity})",
        show_default=False)] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(
        help="Classifier-free guidance scale recorded for sampling a conditional model.")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Artifact folder to write. "
                                                   "(default: artifact)", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing artifact folder (never anything else).")] = False,
    dump_dir: Annotated[Optional[Path], typer.Option(help="Write the graph after every pass into this folder.")] = None,
    precision: Annotated[Optional[str], typer.Option(
        help="fp32 or fp16: fp16 halves weights, caches and timestep constants; norms and softmax stay fp32. "
             "Default fp32.")] = None,
    height: Height = None,
    width: Width = None,
    config: Annotated[Optional[Path], typer.Option(
        help="TOML config running the whole pipeline ([prune], [finetune], [optimize], then compile, verify and "
             "report.md); options given here win over the file.")] = None,
) -> None:
    """Fold a block schedule into static graphs and export them as an ONNX artifact."""
    from dgo_compile.driver.pipeline import compile_schedule, read_config, run_pipeline

    resolved = read_config(config, dict(
        model=str(model) if model else None, schedule=schedule, steps=steps, scheduler=scheduler,
        granularity=granularity, guidance_scale=guidance_scale, output=str(output) if output else None,
        overwrite=overwrite or None, precision=precision, height=height, width=width))
    if config is not None:
        with ConsoleStages(err, enabled=MAIN_PROCESS) as stages:
            outcome = run_pipeline(resolved, stages)
        r = outcome.report
        out.print(f"wrote {outcome.artifact}: {r['macs']['kept']:.1%} of the original MACs per run, predicted "
                  f"{r['predicted_speedup']:.2f}x, measured {r['measured']['text']}, SSIM vs original "
                  f"{r['quality']['ssim_vs_original']:.3f}; see {outcome.artifact / 'report.md'}", highlight=False)
        return
    with ConsoleStages(err) as stages:
        done = compile_schedule(resolved, dump_dir, on_compile=stages.named("compile"))
    macs = done.manifest.macs
    out.print(f"wrote {done.artifact}: {len(done.manifest.variants)} graphs for {done.manifest.scheduler.name} "
              f"{done.steps} steps at {done.resolution}, {done.precision}, {macs.total / macs.full_total:.1%} of the "
              "full model's MACs per run")


def sample(
    source: Annotated[Optional[Path], typer.Argument(
        help="An artifact folder from `compile`, or a model (default: the shipped MNIST model).",
        show_default=False)] = None,
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 16,
    seed: Seed = 0,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (an artifact fixes them).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(
        help="ddim, ddpm, pndm, heun, euler or dpm (an artifact fixes it). Default: the model's.")] = None,
    class_label: Annotated[Optional[list[int]], typer.Option(
        help="Class of each image for class-conditional models (repeat the option; cycled over -n).")] = None,
    prompt_embeds: Annotated[Optional[Path], typer.Option(
        help="safetensors of condition inputs by name (e.g. encoder_hidden_states), and uncond.<name> "
             "for guidance.")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(
        help="Classifier-free guidance scale. Default: the artifact's, else none.")] = None,
    height: Annotated[int | None, typer.Option(
        help="Sample height of a model (an artifact fixes it): pixels with a vae/, else latent.")] = None,
    width: Annotated[int | None, typer.Option(
        help="Sample width of a model (an artifact fixes it): pixels with a vae/, else latent.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG grid to write.")] = Path("grid.png"),
) -> None:
    """Sample a grid of images, from an artifact on onnxruntime or a model's traced graph."""
    from dgo_compile.core.configs import DEFAULT_MODEL
    from dgo_compile.core.outputs import check_output

    check("sample", {"n": n, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                    "class_label": class_label, "height": height, "width": width})
    check_output(output, None, protected=[source or DEFAULT_MODEL, prompt_embeds])
    from dgo_compile.backend.sampling import (
        conditions_for,
        initial_noise,
        sample,
        sampling_target,
        save_grid,
    )
    from dgo_compile.core.finite import check_finite

    target = sampling_target(source, steps, scheduler, height, width)
    guidance_scale = guidance_scale if guidance_scale is not None else target.guidance_scale
    conditions, guidance = conditions_for(target.input_names, n, class_label, prompt_embeds, guidance_scale,
                                          target.null_class_label)
    noise = initial_noise(n, target.shape, seed)
    calls = target.calls
    with ConsoleStages(err) as stages, stages.stage("sample", f"{n} images x {calls} denoiser calls",
                                                    total=n * calls) as step:
        images = sample(target.denoiser, target.scheduler_config, noise, target.steps, scheduler=target.scheduler,
                        conditions=conditions, guidance=guidance, seed=seed, progress=step.advance)
        check_finite(images, f"the image batch sampled from {source or DEFAULT_MODEL}",  # a failed stage: no line
                     f"the model or artifact is broken; nothing was written to {output}")
    name = target.scheduler or target.scheduler_config.get("_class_name", "ddim")
    out.print(f"wrote {save_grid(images[:, :3], output)} ({n} images, {name} {target.steps} steps, seed {seed})")


def bench(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder from `compile`.")],
    against: Annotated[Optional[Path], typer.Option(
        help="Unpruned artifact to compare with. Default: compile `full` from the artifact's model.")] = None,
    batch: Annotated[int, typer.Option(help="Images per sampling run.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed runs of each artifact (the median is reported).")] = 5,
) -> None:
    """Wall time of whole sampling runs against the unpruned model on the same provider, options and batch:
    interleaved rounds, the median speedup with its min-max, and the MACs ratio it can be held to."""
    check("bench", {"batch": batch, "repeats": repeats})
    from dgo_compile.backend.bench import bench_against

    with ConsoleStages(err) as stages:
        done = bench_against(artifact, against, batch, repeats, on_status=stages.named("bench"))
    result, manifest = done.result, done.manifest
    table = Table(title=f"{artifact}: {manifest.schedule['name']}, {manifest.scheduler.steps} steps, "
                        f"batch {batch}, {done.provider}, {repeats} interleaved rounds")
    for col in ("artifact", "median s/run", "MACs/run", "speedup (min-max)", "theoretical", "realised/theoretical"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for label in ("full", "compiled"):
        speedup, theory = result.speedup(label, "full"), result.theoretical(label, "full")
        low, high = result.spread(label, "full")
        table.add_row(label, f"{result.seconds[label]:.3f}", macs_text(result.macs[label]),
                      f"{speedup:.2f}x ({low:.2f}-{high:.2f}x)", f"{theory:.2f}x", f"{speedup / theory:.2f}")
    out.print(table)
    note = result.noise_note("compiled", "full")
    out.print(f"speedup {result.describe('compiled', 'full').split(';')[0]}" + (f": {note}" if note else ""),
              highlight=False)
