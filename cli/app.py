"""`dgo-compile`: each command parses options, calls one library function, renders the result.

Only light modules are imported here: every command checks its options and outputs before it imports
torch, diffusers or onnxruntime (inside its body), so `--help` and a bad argument answer at once. Help
text is plain (no rich markup), so `[prune]` and the like print as written."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .progress import ConsoleStages
from dgo_compile.errors import DgoError
from dgo_compile.options import check

app = typer.Typer(help="Compile diffusers denoisers into cheaper static ONNX artifacts.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
# Piped output gets a table wide enough to read rather than rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True)
# Under torchrun only process 0 reports progress and results; every process still reports its errors.
MAIN_PROCESS = os.environ.get("RANK", "0") == "0"
out.quiet = not MAIN_PROCESS

ModelArg = Annotated[Optional[Path], typer.Argument(
    help="Local diffusers model or pipeline folder, or a config.json. Default: the shipped MNIST model.",
    show_default=False)]
Seed = Annotated[int, typer.Option(help="Seed of the initial noise.")]
Steps = Annotated[int, typer.Option(help="Sampler steps.")]
Height = Annotated[int | None, typer.Option(
    help="Image height: pixels for a pipeline with a vae/, else the sample (latent) size. Default: the config's.",
    show_default=False)]
Width = Annotated[int | None, typer.Option(
    help="Image width: pixels for a pipeline with a vae/, else the sample (latent) size. Default: the config's.",
    show_default=False)]


def _resolution(loaded, height: int | None, width: int | None):
    """The checked resolution of --height/--width for `loaded` (errors name the options)."""
    from dgo_compile.resolution import resolve

    return resolve(loaded.model, loaded.source, height, width, names=("--height", "--width"))


def _gb(macs: int) -> str:
    return f"{macs / 1e9:.3f} G" if macs >= 1e9 else f"{macs / 1e6:.1f} M"


@app.command()
def inspect(
    model: ModelArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    units: Annotated[bool, typer.Option(help="Also list the units inside each block.")] = False,
    batch: Annotated[int, typer.Option(help="Batch size the MACs are counted at.")] = 1,
    height: Height = None,
    width: Width = None,
) -> None:
    """Blocks of a denoiser with their shapes, parameters and MACs per call."""
    check("inspect", {"batch": batch, "height": height, "width": width})
    from dgo_compile import load, trace
    from dgo_compile.cost import cost_report

    loaded = load(model)
    report = cost_report(trace(loaded, size=_resolution(loaded, height, width).latent), batch=batch)
    if as_json:
        print(json.dumps({"source": str(loaded.source), "random_weights": loaded.random_weights, **report.to_json()},
                         indent=2))
        return
    total = report.total
    table = Table(title=f"{report.model} from {loaded.source}" + (" (random weights)" if loaded.random_weights else ""),
                  caption="inputs: " + ", ".join(f"{k} {list(v)}" for k, v in report.input_shapes.items()))
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
    schedule: Annotated[Optional[str], typer.Option(
        help="full, deepcache:N[:branch], steps:K, a schedule JSON file, or (with --config) learned. "
             "(default: full)", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps. (default: 50)", show_default=False)] = None,
    scheduler: Annotated[Optional[str], typer.Option(
        help="Sampler the schedule is folded for: ddim, ddpm, pndm, heun, euler, dpm. Default: the model's.")] = None,
    granularity: Annotated[Optional[str], typer.Option(
        help="Gate blocks, or the units (resnets, attentions, samplers) inside them. (default: block)",
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
    if config is not None:
        from dgo_compile.pipeline import read_config, run_pipeline

        resolved = read_config(config, dict(
            model=str(model) if model else None, schedule=schedule, steps=steps, scheduler=scheduler,
            granularity=granularity, guidance_scale=guidance_scale, output=str(output) if output else None,
            overwrite=overwrite or None, precision=precision, height=height, width=width))
        with ConsoleStages(err, enabled=MAIN_PROCESS) as stages:
            outcome = run_pipeline(resolved, stages)
        r = outcome.report
        out.print(f"wrote {outcome.artifact}: {r['macs']['kept']:.1%} of the original MACs per run, predicted "
                  f"{r['predicted_speedup']:.2f}x, measured {r['measured']['text']}, SSIM vs original "
                  f"{r['quality']['ssim_vs_original']:.3f}; see {outcome.artifact / 'report.md'}", highlight=False)
        return
    from dgo_compile.pipeline import compile_schedule

    with ConsoleStages(err) as stages:
        done = compile_schedule(model, schedule, steps, scheduler, granularity, guidance_scale, output, overwrite,
                                dump_dir, precision, height, width, on_compile=stages.named("compile"))
    macs = done.manifest.macs
    out.print(f"wrote {done.artifact}: {len(done.manifest.variants)} graphs for {done.manifest.scheduler.name} "
              f"{done.steps} steps at {done.resolution}, {done.precision}, {macs.total / macs.full_total:.1%} of the "
              "full model's MACs per run")


@app.command()
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
    from dgo_compile.configs import DEFAULT_MODEL
    from dgo_compile.outputs import check_output

    check("sample", {"n": n, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                    "class_label": class_label, "height": height, "width": width})
    check_output(output, None, protected=[source or DEFAULT_MODEL, prompt_embeds])
    from dgo_compile.finite import check_finite
    from dgo_compile.sampling import conditions_for, denoiser_timesteps, initial_noise, sample, save_grid

    target = _sampling_target(source, steps, scheduler, height, width)
    guidance_scale = guidance_scale if guidance_scale is not None else target.guidance_scale
    conditions, guidance = conditions_for(target.input_names, n, class_label, prompt_embeds, guidance_scale,
                                          target.null_class_label)
    noise = initial_noise(n, target.shape, seed)
    calls = len(denoiser_timesteps(target.scheduler_config, target.steps, target.scheduler))
    with ConsoleStages(err) as stages, stages.stage("sample", f"{n} images x {calls} denoiser calls",
                                                    total=n * calls) as step:
        images = sample(target.denoiser, target.scheduler_config, noise, target.steps, scheduler=target.scheduler,
                        conditions=conditions, guidance=guidance, seed=seed, progress=step.advance)
        check_finite(images, f"the image batch sampled from {source or DEFAULT_MODEL}",  # a failed stage: no line
                     f"the model or artifact is broken; nothing was written to {output}")
    name = target.scheduler or target.scheduler_config.get("_class_name", "ddim")
    out.print(f"wrote {save_grid(images[:, :3], output)} ({n} images, {name} {target.steps} steps, seed {seed})")


@app.command()
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
    from dgo_compile.bench import bench_against

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
        table.add_row(label, f"{result.seconds[label]:.3f}", _gb(result.macs[label]),
                      f"{speedup:.2f}x ({low:.2f}-{high:.2f}x)", f"{theory:.2f}x", f"{speedup / theory:.2f}")
    out.print(table)
    note = result.noise_note("compiled", "full")
    out.print(f"speedup {result.describe('compiled', 'full').split(';')[0]}" + (f": {note}" if note else ""),
              highlight=False)


@app.command()
def optimize(
    model: ModelArg = None,
    ratio: Annotated[Optional[float], typer.Option(
        help="Kept-MACs target in (0, 1]: the sparsity loss is off once the schedule keeps no more. (default: 0.25)",
        show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps. (default: 50)", show_default=False)] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Sampler: ddim, ddpm, pndm, heun, euler, dpm. "
                                                          "Default: the model's.")] = None,
    iters: Annotated[Optional[int], typer.Option(help="Optimizer iterations. (default: 150)", show_default=False)] = None,
    batch: Annotated[Optional[int], typer.Option(help="Trajectories per iteration. (default: 2)", show_default=False)] = None,
    calibration: Annotated[Optional[int], typer.Option(
        help="Calibration noises (and conditions) the iterations cycle through. (default: 32)", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="SGD learning rate (cosine decay). (default: 0.03)",
                                                show_default=False)] = None,
    granularity: Annotated[Optional[str], typer.Option(
        help="Gate blocks, units, or whole steps (a learned non-uniform step schedule). (default: block)",
        show_default=False)] = None,
    timestep_conditioning: Annotated[Optional[bool], typer.Option(
        "--timestep-conditioning/--no-timestep-conditioning",
        help="Feed each call's timestep embedding to the pruner. (default: on)", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the pruner and the calibration noise. (default: 0)",
                                                show_default=False)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Iterations between checkpoints. (default: 10)",
                                                            show_default=False)] = None,
    class_label: Annotated[Optional[list[int]], typer.Option(
        help="Calibration classes for class-conditional models (default: random classes).")] = None,
    prompt_embeds: Annotated[Optional[Path], typer.Option(
        help="safetensors of condition inputs by name (and uncond.<name> for guidance) for text models.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(
        help="Text file, one calibration prompt per line, encoded by the pipeline's own text encoder.")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale.")] = None,
    device: Annotated[str, typer.Option(help="Where the SuperNet and the pruner run: cpu, cuda, cuda:1.")] = "cpu",
    precision: Annotated[Optional[str], typer.Option(
        help="SuperNet autocast precision: fp32, or bf16 on a GPU. (default: fp32)", show_default=False)] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Pruner folder to write.")] = Path("pruner"),
    resume: Annotated[bool, typer.Option(help="Continue the pruner in -o from its last checkpoint.")] = False,
) -> None:
    """Learn a block schedule (DiP-GO): gradient descent through whole sampling trajectories."""
    from dataclasses import replace

    from dgo_compile.configs import DEFAULT_MODEL, OptimizeConfig, PrunerError
    from dgo_compile.outputs import check_output

    given = {k: v for k, v in dict(
        ratio=ratio, steps=steps, scheduler=scheduler, iters=iters, batch=batch, calibration=calibration, lr=lr,
        granularity=granularity, timestep_conditioning=timestep_conditioning, seed=seed,
        checkpoint_every=checkpoint_every, class_labels=tuple(class_label) if class_label else None,
        prompt_embeds=str(prompt_embeds) if prompt_embeds else None, prompts=str(prompts.resolve()) if prompts else None,
        guidance_scale=guidance_scale, precision=precision).items()
        if v is not None}
    if not resume:  # settings and a plain new -o are checked before torch is imported
        OptimizeConfig(**given)
        if not output.exists():
            check_output(output, "pruner", protected=[model or DEFAULT_MODEL], error=PrunerError)
    from dgo_compile import load, trace
    from dgo_compile.pruner import load_pruner, restartable, vae_decoder
    from dgo_compile.pruner import optimize as run_optimize

    if resume and not restartable(output):
        stored = load_pruner(output, allow_unfinished=True).state
        config = replace(stored.config, **given)
        model = model or stored.model_path
    else:
        config = OptimizeConfig(**given)
    if not restartable(output):
        check_output(output, "pruner", resume=resume, protected=[model or DEFAULT_MODEL], error=PrunerError,
                     exists_hint="pass --resume to continue it or choose another -o")
    loaded = load(model)
    if loaded.scheduler_config is None:
        raise DgoError(f"{loaded.source} has no scheduler/ config; pass a pipeline folder")
    traced = trace(loaded)
    with ConsoleStages(err, enabled=MAIN_PROCESS) as stages, stages.stage(
            "optimize", f"DiP-GO pruner towards {config.ratio:g} of the MACs", total=config.iters) as step:
        trained = run_optimize(traced, loaded.scheduler_config, config, output, model_source=str(loaded.source.resolve()),
                               null_class_label=traced.family.null_class_label(loaded.model), resume=resume,
                               decode=vae_decoder(loaded.source) if loaded.source.is_dir() else None,
                               on_iteration=lambda r: step.update(
                                   r["iteration"], note=f"consistency {r['consistency']:.4f}  sparsity "
                                                        f"{r['sparsity']:.3f}  kept MACs {r['kept']:.1%}"),
                               device=device)
    last = trained.state.history[-1] if trained.state.history else {}
    out.print(f"wrote {output}: {trained.state.iterations_done} iterations in {trained.state.seconds:.0f} s, "
              f"last kept MACs {last.get('kept', 1.0):.1%}; make a schedule with "
              f"`dgo-compile schedule {output} --ratio R`")


@app.command()
def schedule(
    pruner: Annotated[Path, typer.Argument(help="Pruner folder from `optimize`.")],
    ratio: Annotated[float, typer.Option(help="Kept share of the full model's MACs per run, in (0, 1].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Schedule JSON to write.")] = Path("schedule.json"),
    heatmap: Annotated[Optional[Path], typer.Option(
        help="PNG of the scores and the schedule. Default: the JSON's path with .png.")] = None,
    model: Annotated[Optional[Path], typer.Option(help="The pruner's model, when it has moved since `optimize`.")] = None,
    calibration_samples: Annotated[int, typer.Option(
        help="Samples (noise seed 30000) on which the learned schedule is scored against steps:K and deepcache:N:B "
             "at the same MACs; the best is written. 0: the learned schedule, unscored.")] = 4,
) -> None:
    """Extract a schedule at a MACs budget from a trained pruner, never worse on calibration noise than the
    closed-form schedules at that budget, with a heatmap to read it by."""
    from dgo_compile.outputs import check_output

    check("schedule", {"ratio": ratio})
    if calibration_samples < 0:
        raise DgoError(f"--calibration-samples must be 0 or more, got {calibration_samples}")
    heatmap = heatmap or output.with_suffix(".png")
    for path, option in ((output, "-o"), (heatmap, "--heatmap")):
        check_output(path, None, option=option, protected=[pruner, model])
    from dgo_compile import load, trace
    from dgo_compile.heatmap import save_heatmap
    from dgo_compile.pruner import load_pruner, vae_decoder
    from dgo_compile.schedule_cost import ScheduleCost
    from dgo_compile.selection import schedule_at

    trained = load_pruner(pruner)
    state = trained.state
    loaded = load(model or state.model_path)
    traced = trace(loaded)
    cost = ScheduleCost(traced, state.schedule_granularity)
    if cost.elements != state.elements:
        raise DgoError(f"{pruner} was trained on elements {list(state.elements)[:3]}..., this model has "
                       f"{list(cost.elements)[:3]}...; pass the pruner's model with --model")
    decode = vae_decoder(loaded.source) if state.decoded_with_vae and loaded.source.is_dir() else None
    selection = schedule_at(traced, trained, ratio, samples=calibration_samples, decode=decode,
                            null_class_label=traced.family.null_class_label(loaded.model))
    plan, kept = selection.best.schedule, selection.best.kept
    scores = trained.reuse_scores() if plan.blocks == state.elements else None
    save_heatmap(scores, plan, heatmap, f"{pruner.name}: {plan.name}, {kept:.1%} of the MACs kept "
                                        f"({state.scheduler['class']} {state.scheduler['steps']} steps)")
    plan.save(output)
    if selection.samples:
        out.print(selection.summary())
    reused_calls = sum(not any(row) for row in plan.compute)
    sampler = state.scheduler["name"]
    out.print(f"wrote {output} and {heatmap}: {plan.name}, {kept:.1%} of the MACs kept, {reused_calls} of "
              f"{plan.steps} calls reuse every block; compile it with `dgo-compile compile --schedule {output} "
              f"--steps {state.scheduler['steps']}" + (f" --scheduler {sampler}" if sampler else "") + "`")


@app.command()
def finetune(
    model: ModelArg = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps. (default: 500)", show_default=False)] = None,
    batch: Annotated[Optional[int], typer.Option(help="Images per step. (default: 32)", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="AdamW learning rate (cosine decay to 2%). (default: 0.0002)", show_default=False)] = None,
    ema_decay: Annotated[Optional[float], typer.Option(
        help="EMA decay of the saved weights; 0 saves the raw weights. (default: 0.999)", show_default=False)] = None,
    distill: Annotated[Optional[float], typer.Option(
        help="Weight of the distillation term towards --teacher's predictions. (default: 0)",
        show_default=False)] = None,
    teacher: Annotated[Optional[Path], typer.Option(help="The unpruned model to distill from.")] = None,
    distill_only: Annotated[Optional[bool], typer.Option(
        "--distill-only", help="No data: train on --teacher's DDIM trajectories towards its predictions.",
        show_default=False)] = None,
    trajectory_steps: Annotated[Optional[int], typer.Option(
        help="DDIM steps of the teacher's trajectories with --distill-only. (default: 20)", show_default=False)] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Linear learning-rate warmup steps. (default: 0)",
                                                  show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the batches and the noise. (default: 0)",
                                                show_default=False)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints. (default: 100)",
                                                            show_default=False)] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Model folder to write.")] = Path("finetuned"),
    resume: Annotated[bool, typer.Option(help="Continue the run in -o from its last checkpoint.")] = False,
) -> None:
    """Fine-tune a (channel-pruned) model with the denoising loss on the shipped MNIST digits, or with
    --distill-only on its teacher's own sampling trajectories."""
    from dataclasses import replace

    from dgo_compile.configs import DEFAULT_MODEL, FinetuneConfig, FinetuneError
    from dgo_compile.outputs import check_output

    given = {k: v for k, v in dict(steps=steps, batch=batch, lr=lr, ema_decay=ema_decay, distill=distill,
                                   warmup=warmup, seed=seed, checkpoint_every=checkpoint_every,
                                   distill_only=distill_only, trajectory_steps=trajectory_steps).items()
             if v is not None}
    if not resume:  # settings and -o are checked before torch is imported (finetune checks them again)
        FinetuneConfig(**given)
        check_output(output, "finetune", protected=[model or DEFAULT_MODEL, teacher], error=FinetuneError,
                     exists_hint="pass --resume to continue it or choose another -o")
    from dgo_compile.finetune import FINAL_LOSS_WINDOW, read_finetune
    from dgo_compile.finetune import finetune as run_finetune

    if resume:
        stored = read_finetune(output)
        config = replace(stored.config, **given)
        model = model or stored.model_path
        teacher = teacher or stored.teacher_path
    else:
        config = FinetuneConfig(**given)
    def note(entry: dict) -> str:
        return (f"loss {entry['loss']:.4f}" + (f"  distill {entry['distill']:.4f}" if "distill" in entry else "")
                + f"  EMA decay {entry['ema_decay']:.3f}")

    with ConsoleStages(err, enabled=MAIN_PROCESS) as stages, stages.stage(
            "finetune", f"batch {config.batch}", total=config.steps) as step:
        result = run_finetune(model, config, output, teacher=teacher, resume=resume,
                              on_step=lambda entry: step.update(entry["step"], note=note(entry)))
    record = result.record
    window = min(len(record.history), FINAL_LOSS_WINDOW)
    out.print(f"wrote {output}: {record.steps_done} steps in {record.seconds:.0f} s, final loss "
              f"{record.final_loss:.4f} (mean of the last {window} steps); sample it with "
              f"`dgo-compile sample {output}`")


@dataclass
class _SamplingTarget:
    denoiser: object
    scheduler_config: dict
    scheduler: str | None
    steps: int
    shape: tuple[int, ...]
    input_names: tuple[str, ...]
    guidance_scale: float | None = None
    null_class_label: int | None = None


@app.command()
def prune(
    model: ModelArg = None,
    ratio: Annotated[float, typer.Option(
        help="Share of channels removed: of every group (uniform) or of all prunable channels (global).")] = 0.3,
    importance: Annotated[str, typer.Option(help="taylor (Diff-Pruning), magnitude or random.")] = "taylor",
    scope: Annotated[str, typer.Option(help="uniform (every group alike) or global (cheapest channels anywhere).")]
    = "uniform",
    threshold: Annotated[float, typer.Option(
        help="Taylor: stop accumulating timesteps once the loss falls below this share of its running max.")] = 0.05,
    batch: Annotated[int, typer.Option(help="Taylor: images in the fixed calibration batch.")] = 32,
    max_timesteps: Annotated[int, typer.Option(help="Taylor: most timesteps to accumulate gradients over.")] = 1000,
    images: Annotated[Optional[Path], typer.Option(
        help="safetensors with 'images' [N,C,H,W] in [-1,1] (default: the shipped digits for 1x32x32 models).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the calibration batch, noise and random importance.")] = 0,
    min_group_channels: Annotated[int, typer.Option(
        help="Channels every GroupNorm group keeps at least (1 turns it into an instance norm).")] = 2,
    dry_run: Annotated[bool, typer.Option(help="List the dependency groups and the planned cut; write nothing.")]
    = False,
    output: Annotated[Path, typer.Option("-o", "--output", help="Pruned model folder to write.")] = Path("pruned"),
) -> None:
    """Channel pruning (Diff-Pruning): dependency groups, Taylor importance, real channel removal."""
    from dgo_compile.configs import DEFAULT_MODEL, PruneConfig
    from dgo_compile.outputs import check_output

    config = PruneConfig(ratio=ratio, importance=importance, scope=scope, threshold=threshold, batch=batch,
                         max_timesteps=max_timesteps, seed=seed, min_group_channels=min_group_channels)
    if not dry_run:
        check_output(output, "model", protected=[model or DEFAULT_MODEL, images],
                     exists_hint="choose another -o or remove it")
    from dgo_compile import load
    from dgo_compile.channel_pruning import calibration_images, plan_channels, uniform_step
    from dgo_compile.channel_pruning import prune as run_prune
    from dgo_compile.loading import save_denoiser

    loaded = load(model)
    if dry_run:
        _, plan = plan_channels(loaded)
        table = Table(title=f"{loaded.source}: {len(plan.groups)} channel groups, {len(plan.prunable())} prunable")
        for col in ("group", "share", "channels", "cut step", "kept at ratio", "constraints", "modules", "fixed because"):
            table.add_column(col, justify="right" if col in ("group", "share", "channels", "cut step") else "left")
        shares = plan.shares()
        for g in plan.groups:
            step = g.size // g.steps
            kept = "-" if not g.prunable else (
                str(g.size - step * uniform_step(shares[g.share], config)) if scope == "uniform" else "by importance")
            mods = ", ".join(g.modules[:3]) + (f" +{len(g.modules) - 3}" if len(g.modules) > 3 else "")
            table.add_row(str(g.id), str(g.share), str(g.size), str(step), kept, "; ".join(g.constraints[:2]) +
                          (" ..." if len(g.constraints) > 2 else ""), mods, g.fixed or "")
        out.print(table)
        return
    calibration = calibration_images(loaded, images) if importance == "taylor" else None
    with ConsoleStages(err) as stages, stages.stage("prune", f"{importance} importance, {scope}, ratio {ratio}"):
        pruned = run_prune(loaded, config, calibration)
        save_denoiser(loaded, pruned.model, output, pruned.pruning)
    params, macs = pruned.pruning["params"], pruned.pruning["macs"]
    table = Table(title=f"{output}: {importance} importance, {scope} ratio {ratio}")
    for col in ("", "params", "MACs/call"):
        table.add_column(col, justify="right")
    table.add_row("before", f"{params['before'] / 1e6:.2f} M", _gb(macs["before"]))
    table.add_row("after", f"{params['after'] / 1e6:.2f} M", _gb(macs["after"]))
    table.add_row("kept", f"{params['after'] / params['before']:.1%}", f"{macs['after'] / macs['before']:.1%}")
    out.print(table)
    used = f"; Taylor gradients over {len(pruned.taylor_losses)} timesteps" if importance == "taylor" else ""
    out.print(f"wrote {output}{used}; fine-tune it with `dgo-compile finetune {output}`")


@app.command("encode-prompts")
def encode_prompts_command(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline folder with text_encoder/ and tokenizer/.")],
    prompts: Annotated[Path, typer.Option(help="Text file, one prompt per line.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="safetensors file to write.")] = Path(
        "prompt_embeds.safetensors"),
) -> None:
    """Encode prompts with a pipeline's own text encoder into a --prompt-embeds file (with the empty
    prompt as uncond.encoder_hidden_states, for guidance)."""
    from dgo_compile.outputs import check_output

    check_output(output, None, protected=[pipeline, prompts])
    from safetensors.torch import save_file

    from dgo_compile.files import write_atomic
    from dgo_compile.prompts import encode_prompts, read_prompts

    tensors = encode_prompts(pipeline, read_prompts(prompts))
    write_atomic(output, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    shape = tuple(tensors["encoder_hidden_states"].shape)
    out.print(f"wrote {output}: encoder_hidden_states {shape} and uncond.encoder_hidden_states; "
              f"use it with --prompt-embeds")


def _sampling_target(source: Path | None, steps: int | None, scheduler: str | None, height: int | None = None,
                     width: int | None = None) -> _SamplingTarget:
    """What `sample` runs: an artifact on onnxruntime (sampler fixed by it) or a model's traced graph."""
    from dgo_compile import load, trace

    if source is not None and (source / "manifest.json").is_file():
        from dgo_compile.ort_runner import OrtArtifact

        artifact = OrtArtifact.open(source)
        manifest = artifact.manifest
        if steps is not None and steps != artifact.steps:
            raise DgoError(f"{source} was compiled for {artifact.steps} steps, not {steps}; "
                           f"drop --steps or recompile with --steps {steps}")
        if scheduler is not None and scheduler != manifest.scheduler.name:
            raise DgoError(f"{source} was compiled for the {manifest.scheduler.name} sampler, not {scheduler}; "
                           f"drop --scheduler or recompile with --scheduler {scheduler}")
        compiled = manifest.resolution
        if any(given is not None and given != getattr(compiled, key, None)
               for key, given in (("height", height), ("width", width))):
            raise DgoError(f"{source} was compiled for height {getattr(compiled, 'height', None)}, width "
                           f"{getattr(compiled, 'width', None)} ({getattr(compiled, 'unit', 'latent')}); "
                           "drop --height/--width or recompile with them")
        spec = manifest.input
        return _SamplingTarget(artifact, manifest.scheduler.config, manifest.scheduler.name, artifact.steps,
                               tuple(spec["sample"].shape[1:]), tuple(spec), manifest.guidance_scale,
                               manifest.model.null_class_label)
    loaded = load(source)
    traced = trace(loaded, size=_resolution(loaded, height, width).latent)
    if loaded.scheduler_config is None:
        raise DgoError(f"{loaded.source} has no scheduler/ config; pass a pipeline folder")
    return _SamplingTarget(traced, loaded.scheduler_config, scheduler, steps or 50,
                           tuple(traced.example_inputs(1)["sample"].shape[1:]), traced.input_names,
                           null_class_label=traced.family.null_class_label(loaded.model))


class _Notices(logging.Handler):
    """The library's notices (e.g. a leftover of a killed run cleaned up): one `note:` line each."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]note:[/yellow] {escape(record.getMessage())}", soft_wrap=True, highlight=False)


def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 1. So do errors of the
    system (a disk that fills up, a folder that vanishes) that no library check turned into one."""
    library = logging.getLogger("dgo_compile")
    if not any(isinstance(h, _Notices) for h in library.handlers):
        library.addHandler(_Notices())
        library.propagate = False
    try:  # typer vendors click as typer._click from 0.2x on
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    try:
        code = app(standalone_mode=False)  # click's usage errors come here too, to be rendered in one line
        if isinstance(code, int) and code:
            sys.exit(code)
    except click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(2)
    except click_errors.ClickException as exc:  # a bad option value, an unknown option, a missing argument
        command = f"dgo-compile {exc.ctx.info_name} --help" if getattr(exc, "ctx", None) else "dgo-compile --help"
        err.print(f"[red]error:[/red] {escape(' '.join(exc.format_message().split()))} (see `{command}`)",
                  soft_wrap=True, highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("[red]error:[/red] aborted", highlight=False)
        sys.exit(1)
    except (DgoError, OSError) as exc:
        if os.environ.get("DGO_DEBUG"):
            raise
        message = str(exc) if isinstance(exc, DgoError) else \
            f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        where = "" if MAIN_PROCESS else f"(process {os.environ['RANK']}) "
        err.print(f"[red]error:[/red] {where}{escape(' '.join(message.split()))}", soft_wrap=True, highlight=False)
        sys.exit(1)
