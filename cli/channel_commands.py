"""`prune` and `finetune`: Diff-Pruning's channel pruning, and the fine-tuning that recovers quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import MAIN_PROCESS, ModelArg, err, macs_text, out
from .progress import ConsoleStages


def prune(
    model: ModelArg = None,
    channel_ratio: Annotated[float, typer.Option(
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
    groupnorm_cut: Annotated[str, typer.Option(
        help="channels (every GroupNorm group thinned alike) or groups (whole groups removed, the rest kept whole).")]
    = "channels",
    dry_run: Annotated[bool, typer.Option(help="List the dependency groups and the planned cut; write nothing.")]
    = False,
    output: Annotated[Path, typer.Option("-o", "--output", help="Pruned model folder to write.")] = Path("pruned"),
) -> None:
    """Channel pruning (Diff-Pruning): dependency groups, Taylor importance, real channel removal."""
    from dgo_compile.core.configs import DEFAULT_MODEL, PruneConfig
    from dgo_compile.core.outputs import check_output

    config = PruneConfig(channel_ratio=channel_ratio, importance=importance, scope=scope, threshold=threshold,
                         batch=batch, max_timesteps=max_timesteps, seed=seed, min_group_channels=min_group_channels,
                         groupnorm_cut=groupnorm_cut)
    if not dry_run:
        check_output(output, "model", protected=[model or DEFAULT_MODEL, images],
                     exists_hint="choose another `output` or remove it")
    from dgo_compile import load
    from dgo_compile.channels.channel_pruning import calibration_images, plan_channels, planned_cut
    from dgo_compile.channels.channel_pruning import prune as run_prune
    from dgo_compile.frontend.loading import save_denoiser

    loaded = load(model)
    if dry_run:
        _, plan = plan_channels(loaded)
        table = Table(title=f"{loaded.source}: {len(plan.groups)} channel groups, {len(plan.prunable())} prunable")
        for col in ("group", "share", "channels", "cut step", "kept at ratio", "constraints", "modules",
                    "fixed because"):
            table.add_column(col, justify="right" if col in ("group", "share", "channels", "cut step") else "left")
        cut = planned_cut(plan, config)
        units = plan.units() if groupnorm_cut == "groups" else {}
        for g in plan.groups:
            sizes = sorted({sum(size for _, _, size in unit) for unit in units.get(g.share, ())})
            step = g.size // g.steps if not sizes else f"units of {', '.join(map(str, sizes))} ch"
            kept = "-" if g.id not in cut else "by importance" if cut[g.id] is None else str(cut[g.id])
            mods = ", ".join(g.modules[:3]) + (f" +{len(g.modules) - 3}" if len(g.modules) > 3 else "")
            table.add_row(str(g.id), str(g.share), str(g.size), str(step), kept, "; ".join(g.constraints[:2]) +
                          (" ..." if len(g.constraints) > 2 else ""), mods, g.fixed or "")
        out.print(table)
        return
    calibration = calibration_images(loaded, images) if importance == "taylor" else None
    with ConsoleStages(err) as stages, stages.stage("prune", f"{importance} importance, {scope}, "
                                                             f"channel ratio {channel_ratio}"):
        pruned = run_prune(loaded, config, calibration)
        save_denoiser(loaded, pruned.model, output, pruned.pruning)
    params, macs = pruned.pruning["params"], pruned.pruning["macs"]
    table = Table(title=f"{output}: {importance} importance, {scope} channel ratio {channel_ratio}")
    for col in ("", "params", "MACs/call"):
        table.add_column(col, justify="right")
    table.add_row("before", f"{params['before'] / 1e6:.2f} M", macs_text(macs["before"]))
    table.add_row("after", f"{params['after'] / 1e6:.2f} M", macs_text(macs["after"]))
    table.add_row("kept", f"{params['after'] / params['before']:.1%}", f"{macs['after'] / macs['before']:.1%}")
    if pruned.pruning.get("earlier"):  # pruned again (gradual pruning): what is left of the original model
        first = pruned.pruning["earlier"][0]
        table.add_row("of the original", f"{params['after'] / first['params']['before']:.1%}",
                      f"{macs['after'] / first['macs']['before']:.1%}")
    out.print(table)
    used = f"; Taylor gradients over {len(pruned.taylor_losses)} timesteps" if importance == "taylor" else ""
    out.print(f"wrote {output}{used}; fine-tune it with `dgo-compile finetune {output}`")


def finetune(
    model: ModelArg = None,
    train_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps. (default: 500)",
                                                       show_default=False)] = None,
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
    student_rollouts: Annotated[Optional[float], typer.Option(
        help="With --distill-only: the share of trajectories the student runs itself, the teacher predicting at "
             "the states it reaches (on-policy distillation). (default: 0)", show_default=False)] = None,
    feature_distill: Annotated[Optional[float], typer.Option(
        help="With --distill or --distill-only: weight of a term matching every block's output to --teacher's at "
             "the channels pruning kept (0.05 recovers fastest on the shipped model). (default: 0)",
        show_default=False)] = None,
    snr_gamma: Annotated[Optional[float], typer.Option(
        help="Min-SNR-gamma loss weighting (diffusers' --snr_gamma; the paper uses 5): timesteps whose SNR is "
             "above it count less. (default: off)", show_default=False)] = None,
    timestep_sampling: Annotated[Optional[str], typer.Option(
        help="How data batches draw timesteps: uniform, or logit_normal (SD3's scripts: sigmoid of a normal, "
             "more rows mid-schedule). (default: uniform)", show_default=False)] = None,
    logit_mean: Annotated[Optional[float], typer.Option(
        help="Mean of logit_normal timestep sampling. (default: 0)", show_default=False)] = None,
    logit_std: Annotated[Optional[float], typer.Option(
        help="Standard deviation of logit_normal timestep sampling. (default: 1)", show_default=False)] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Linear learning-rate warmup steps. (default: 0)",
                                                  show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the batches and the noise. (default: 0)",
                                                show_default=False)] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Steps between checkpoints. (default: 100)",
                                                            show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Your training data: a folder of images (class sub-folders, metadata.jsonl captions) or of "
             ".safetensors latents. (default: the shipped MNIST digits)", show_default=False)] = None,
    prompts: Annotated[Optional[Path], typer.Option(
        help="--distill-only on a text-to-image model: text file, one prompt per line.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Model folder to write.")] = Path("finetuned"),
    resume: Annotated[bool, typer.Option(help="Continue the run in -o from its last checkpoint.")] = False,
) -> None:
    """Fine-tune a (channel-pruned) model with the denoising loss on --data (default: the shipped MNIST
    digits), or with --distill-only on its teacher's own sampling trajectories."""
    from dgo_compile.core.configs import DEFAULT_MODEL, FinetuneConfig, FinetuneError, with_overrides
    from dgo_compile.core.outputs import check_output

    given = dict(train_steps=train_steps, batch=batch, lr=lr, ema_decay=ema_decay, distill=distill, warmup=warmup,
                 seed=seed, checkpoint_every=checkpoint_every, distill_only=distill_only,
                 trajectory_steps=trajectory_steps, student_rollouts=student_rollouts,
                 data=str(data) if data is not None else None,
                 prompts=str(prompts) if prompts is not None else None, snr_gamma=snr_gamma,
                 timestep_sampling=timestep_sampling, logit_mean=logit_mean, logit_std=logit_std,
                 feature_distill=feature_distill)
    if not resume:  # settings and -o are checked before torch is imported (finetune checks them again)
        with_overrides(FinetuneConfig, given)
        check_output(output, "finetune", protected=[model or DEFAULT_MODEL, teacher, data, prompts],
                     error=FinetuneError,
                     exists_hint="pass `resume` to continue it or choose another `output`")
    from dgo_compile.channels.finetune import FINAL_LOSS_WINDOW, read_finetune
    from dgo_compile.channels.finetune import finetune as run_finetune

    stored = read_finetune(output) if resume else None
    config = with_overrides(FinetuneConfig, given, stored.config if stored else None)
    if stored:
        model, teacher = model or stored.model_path, teacher or stored.teacher_path

    def note(entry: dict) -> str:
        return (f"loss {entry['loss']:.4f}" + (f"  distill {entry['distill']:.4f}" if "distill" in entry else "")
                + (f"  features {entry['features']:.4f}" if "features" in entry else "")
                + f"  EMA decay {entry['ema_decay']:.3f}")

    with ConsoleStages(err, enabled=MAIN_PROCESS) as stages, stages.stage(
            "finetune", f"batch {config.batch}", total=config.train_steps) as step:
        result = run_finetune(model, config, output, teacher=teacher, resume=resume,
                              on_step=lambda entry: step.update(entry["step"], note=note(entry)))
    record = result.record
    window = min(len(record.history), FINAL_LOSS_WINDOW)
    out.print(f"wrote {output}: {record.steps_done} steps in {record.seconds:.0f} s, final loss "
              f"{record.final_loss:.4f} (mean of the last {window} steps); sample it with "
              f"`dgo-compile sample {output}`")
