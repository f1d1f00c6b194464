"""`optimize` and `schedule`: DiP-GO's pruner trained, and a schedule extracted from it at a MACs budget."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from dgo_compile.core.configs import OptimizeConfig
from dgo_compile.core.options import check

from .common import MAIN_PROCESS, ModelArg, err, out
from .progress import ConsoleStages

# The calibration conditions `optimize` and `search-steps` both take.
CalibrationClasses = Annotated[Optional[list[int]], typer.Option(
    help="Calibration classes for class-conditional models (default: random classes).")]
PromptEmbeds = Annotated[Optional[Path], typer.Option(
    help="safetensors of condition inputs by name (and uncond.<name> for guidance) for text models.")]
CalibrationPrompts = Annotated[Optional[Path], typer.Option(
    help="Text file, one calibration prompt per line, encoded by the pipeline's own text encoder.")]
GuidanceScale = Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale.")]


def optimize(
    model: ModelArg = None,
    keep_macs: Annotated[Optional[float], typer.Option(
        help="Kept-MACs target in (0, 1]: the sparsity loss is off once the schedule keeps no more. (default: 0.25)",
        show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Sampler steps. (default: {OptimizeConfig.steps})",
                                                 show_default=False)] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Sampler: ddim, ddpm, pndm, heun, euler, dpm. "
                                                          "Default: the model's.")] = None,
    iters: Annotated[Optional[int], typer.Option(help=f"Optimizer iterations. (default: {OptimizeConfig.iters})",
                                                 show_default=False)] = None,
    batch: Annotated[Optional[int], typer.Option(help="Trajectories per iteration. (default: 2)",
                                                 show_default=False)] = None,
    calibration: Annotated[Optional[int], typer.Option(
        help="Calibration noises (and conditions) the iterations cycle through. (default: 32)",
        show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="SGD learning rate (cosine decay). (default: 0.03)",
                                                show_default=False)] = None,
    granularity: Annotated[Optional[str], typer.Option(
        help="Gate blocks, units, or whole steps (a learned non-uniform step schedule). "
             f"(default: {OptimizeConfig.granularity})",
        show_default=False)] = None,
    init: Annotated[Optional[str], typer.Option(
        help="Gates at iteration 0: full (DiP-GO: every block computes), steps (steps:K, the largest K within "
             "--keep-macs) or steps-searched (the searched K-step schedule at that K, see search-steps). "
             f"(default: {OptimizeConfig.init})", show_default=False)] = None,
    timestep_conditioning: Annotated[Optional[bool], typer.Option(
        "--timestep-conditioning/--no-timestep-conditioning",
        help="Feed each call's timestep embedding to the pruner. (default: on)", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the pruner and the calibration noise. (default: 0)",
                                                show_default=False)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Iterations between checkpoints. (default: 10)",
                                                            show_default=False)] = None,
    class_label: CalibrationClasses = None,
    prompt_embeds: PromptEmbeds = None,
    prompts: CalibrationPrompts = None,
    guidance_scale: GuidanceScale = None,
    device: Annotated[str, typer.Option(help="Where the SuperNet and the pruner run: cpu, cuda, cuda:1.")] = "cpu",
    precision: Annotated[Optional[str], typer.Option(
        help="SuperNet autocast precision: fp32, or bf16 on a GPU. (default: fp32)", show_default=False)] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Pruner folder to write.")] = Path("pruner"),
    resume: Annotated[bool, typer.Option(help="Continue the pruner in -o from its last checkpoint.")] = False,
) -> None:
    """Learn a block schedule (DiP-GO): gradient descent through whole sampling trajectories."""

    from dgo_compile.driver.learned import prepare_optimize

    given = dict(
        keep_macs=keep_macs, steps=steps, scheduler=scheduler, iters=iters, batch=batch, calibration=calibration,
        lr=lr, init=init, granularity=granularity, timestep_conditioning=timestep_conditioning, seed=seed,
        checkpoint_every=checkpoint_every, class_labels=tuple(class_label) if class_label else None,
        prompt_embeds=str(prompt_embeds) if prompt_embeds else None,
        prompts=str(prompts.resolve()) if prompts else None, guidance_scale=guidance_scale, precision=precision)
    run = prepare_optimize(model, given, output, resume)
    with ConsoleStages(err, enabled=MAIN_PROCESS) as stages, stages.stage(
            "optimize", f"DiP-GO pruner towards {run.config.keep_macs:g} of the MACs", total=run.config.iters) as step:
        trained = run.run(device, on_iteration=lambda r: step.update(
            r["iteration"], note=f"consistency {r['consistency']:.4f}  sparsity {r['sparsity']:.3f}  "
                                 f"kept MACs {r['kept']:.1%}"))
    last = trained.state.history[-1] if trained.state.history else {}
    out.print(f"wrote {output}: {trained.state.iterations_done} iterations in {trained.state.seconds:.0f} s "
              f"(after {trained.state.setup_seconds:.0f} s finding the start and the full model's targets), "
              f"last kept MACs {last.get('kept', 1.0):.1%}; make a schedule with "
              f"`dgo-compile schedule {output} --keep-macs R`")


def schedule(
    pruner: Annotated[Path, typer.Argument(help="Pruner folder from `optimize`.")],
    keep_macs: Annotated[float, typer.Option(help="Kept share of the full model's MACs per run, in (0, 1].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Schedule JSON to write.")] = Path("schedule.json"),
    heatmap: Annotated[Optional[Path], typer.Option(
        help="PNG of the scores and the schedule. Default: the JSON's path with .png.")] = None,
    model: Annotated[Optional[Path],
                     typer.Option(help="The pruner's model, when it has moved since `optimize`.")] = None,
    calibration_samples: Annotated[int, typer.Option(
        help="Samples (noise seed 30000) on which the learned schedule is scored (mean PSNR against the full "
             "schedule) against steps:K, the searched steps-searched:K and deepcache:N:B at the same MACs; the best "
             "is written. 0: the learned schedule, unscored.")] = 32,
) -> None:
    """Extract a schedule at a MACs budget from a trained pruner, never worse on calibration noise than
    the closed-form schedules at that budget, with a heatmap to read it by."""
    from dgo_compile.core.outputs import check_output

    check("schedule", {"keep_macs": keep_macs})  # before torch is imported
    heatmap = heatmap or output.with_suffix(".png")
    for path, field in ((output, "output"), (heatmap, "heatmap")):
        check_output(path, None, field=field, protected=[pruner, model])
    from dgo_compile.driver.learned import schedule_from_pruner

    done = schedule_from_pruner(pruner, keep_macs, output, heatmap, model, calibration_samples)
    plan, kept, state = done.schedule, done.kept, done.state
    if done.selection.samples:
        out.print(done.selection.summary())
    reused_calls = sum(not any(row) for row in plan.compute)
    sampler = state.scheduler["name"]
    out.print(f"wrote {output} and {heatmap}: {plan.name}, {kept:.1%} of the MACs kept, {reused_calls} of "
              f"{plan.calls} calls "
              f"reuse every block; compile it with `dgo-compile compile --schedule {output} "
              f"--steps {state.scheduler['steps']}" + (f" --scheduler {sampler}" if sampler else "") + "`")


def search_steps(
    model: ModelArg = None,
    k: Annotated[int, typer.Option("--k", help="Calls that run in full (call 0 among them); every other call "
                                               "reuses every block.")] = 10,
    steps: Annotated[Optional[int], typer.Option(help=f"Sampler steps. (default: {OptimizeConfig.steps})",
                                                 show_default=False)] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Sampler: ddim, ddpm, pndm, heun, euler, dpm. "
                                                          "Default: the model's.")] = None,
    calibration_samples: Annotated[int, typer.Option(help="Samples (noise seed 30000) each candidate is scored "
                                                          "on.")] = 8,
    class_label: CalibrationClasses = None,
    prompt_embeds: PromptEmbeds = None,
    prompts: CalibrationPrompts = None,
    guidance_scale: GuidanceScale = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Schedule JSON to write.")] = Path("steps.json"),
) -> None:
    """Search which K of the sampler's calls run in full (steps-searched:K): the non-uniform K-step baseline,
    never worse than steps:K on its calibration noise; writes a schedule JSON to compile."""
    from dgo_compile.core.outputs import check_output

    check_output(output, None, protected=[model])
    from dgo_compile.search.step_search import search_for_model

    found = search_for_model(model, k, output, steps=steps, scheduler=scheduler, samples=calibration_samples,
                             class_labels=tuple(class_label) if class_label else None,
                             prompt_embeds=str(prompt_embeds) if prompt_embeds else None,
                             prompts=str(prompts.resolve()) if prompts else None, guidance_scale=guidance_scale)
    gain = 10 * math.log10(found.uniform_score / found.score) if found.score > 0 else math.inf
    out.print(f"wrote {output}: {found.schedule.name} runs calls {' '.join(map(str, found.chosen))} in full; "
              f"{gain:+.2f} dB over steps:{len(found.chosen)} on {calibration_samples} calibration samples "
              f"(noise seed 30000, {found.evaluations} trajectories scored); compile it with "
              f"`dgo-compile compile --schedule {output} --steps {steps or OptimizeConfig.steps}"
              + (f" --scheduler {scheduler}" if scheduler else "") + "`")
