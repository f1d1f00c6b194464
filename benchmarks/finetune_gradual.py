"""Gradual pruning for benchmarks/finetune.py (--stages): prune, fine-tune, prune the fine-tuned model again.
A helper module, not a script.

One-shot Taylor pruning to ~50% of the shipped model's MACs breaks it (eps MSE against the unpruned model
0.44 along its own trajectories, as if it predicted nothing); the same cut taken from a model pruned to 69%
and fine-tuned is far milder. Each stage of `--stages MACS:STEPS ...` prunes the previous stage's fine-tuned
(EMA) model with the global Taylor ratio that lands nearest under MACS x the unpruned model's MACs, then
fine-tunes it STEPS steps (its own warmup and cosine decay). The stages' steps add up to the budget; the
curve's steps count from the first stage's start.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

from common import cost_of, log, read_json, write_json


def parse_stages(values: list[str]) -> list[tuple[float, int]]:
    stages = []
    for value in values:
        macs, _, steps = value.partition(":")
        stages.append((float(macs), int(steps)))
    if any(not 0 < m < 1 or s < 1 for m, s in stages) or [m for m, _ in stages] != sorted(
            {m for m, _ in stages}, reverse=True):
        raise SystemExit(f"--stages: MACS:STEPS with MACS in (0, 1) falling stage after stage, got {values}")
    return stages


def stages_tag(stages: list[tuple[float, int]]) -> str:
    return "gradual" + "-".join(f"{m:g}x{s}" for m, s in stages)


def ratio_for_macs(loaded, images, target_macs: float, args) -> float:
    """The smallest global channel ratio whose cut keeps at most `target_macs` (bisection on one set of
    Taylor scores; `prune` recomputes the same scores from the same seed). Below the floor (every share cut
    as far as --min-group-channels lets it: 50.1% of the shipped model's MACs at 2), the floor's ratio."""
    from dgo_compile.channels.channel_pruning import PruneConfig, apply_pruning, importance, plan_channels, select

    config = PruneConfig(channel_ratio=0.5, scope="global", importance="taylor", batch=args.taylor_batch,
                         min_group_channels=args.min_group_channels, groupnorm_cut=args.groupnorm_cut)
    traced, plan = plan_channels(loaded)
    scores, _ = importance(traced, plan, config, images, loaded.scheduler_config)
    example = tuple(traced.example_inputs(1).values())
    lo, hi = 0.0, 0.95
    for _ in range(10):
        mid = (lo + hi) / 2
        keep = select(plan, scores, dataclasses.replace(config, channel_ratio=mid))
        model, _ = apply_pruning(traced.model, plan, keep, lambda m: traced.family.adapter(m)(*example))
        lo, hi = (mid, hi) if cost_of(model).macs > target_macs else (lo, mid)
    if hi == 0.95:
        floor = ("whole GroupNorm groups removed, each group of channels keeping one" if args.groupnorm_cut == "groups"
                 else f"GroupNorm groups of >= {args.min_group_channels} channels")
        log(f"{target_macs / 1e6:.1f} M MACs is below what global cuts reach with {floor}: cutting to that floor")
    return round(hi, 4)


def gradual_chain(args, source: str, work: Path, base, ctx: dict, run_finetune, trajectory_error) -> dict:
    """Every stage of one source's chain (pruned and fine-tuned, reused from `work` when there); the last
    stage's model folder and where its steps start."""
    from dgo_compile import DEFAULT_MODEL, load
    from dgo_compile.channels.channel_pruning import PruneConfig, calibration_images, prune
    from dgo_compile.frontend.loading import save_denoiser

    stages = parse_stages(args.stages)
    previous, offset, done = Path(DEFAULT_MODEL), 0, []
    for i, (target, steps) in enumerate(stages):
        stage_dir = work / f"{stages_tag(stages)}_{source}" / f"stage{i}"
        pruned = stage_dir / "pruned"
        if not (pruned / "bench_meta.json").is_file():
            loaded = load(previous)
            images = calibration_images(loaded)
            started = time.perf_counter()
            ratio = ratio_for_macs(loaded, images, target * base.macs, args)
            config = PruneConfig(channel_ratio=ratio, scope="global", importance="taylor", batch=args.taylor_batch,
                                 min_group_channels=args.min_group_channels, groupnorm_cut=args.groupnorm_cut)
            log(f"{source} stage {i}: prune {previous} to {target:.0%} of the MACs: {config}")
            result = prune(loaded, config, images)
            save_denoiser(loaded, result.model, pruned, result.pruning)
            cost = cost_of(result.model)
            write_json(pruned / "bench_meta.json", {
                "seconds": time.perf_counter() - started, "ratio": ratio, "params": cost.params, "macs": cost.macs,
                "timesteps": len(result.taylor_losses),
                "trajectory_error": trajectory_error(result.model, ctx)})
        meta = read_json(pruned / "bench_meta.json")
        last = i == len(stages) - 1
        stage_args = copy.copy(args)
        stage_args.points = sorted({p - offset for p in args.points if offset < p < offset + steps} | {steps})
        stage_args.stop_at_step = args.stop_at_step - offset if last and args.stop_at_step else None
        record = run_finetune(stage_args, source, pruned, stage_dir / "run")
        done.append({"target": target, "steps": steps, "start": offset, "ratio": meta["ratio"],
                     "kept_macs": meta["macs"] / base.macs, "kept_params": meta["params"] / base.params,
                     "prune_seconds": meta["seconds"], "trajectory_error": meta["trajectory_error"],
                     "folder": str(pruned), "run": str(stage_dir / "run"), "record": record,
                     "points": stage_args.points})
        if record is None or record.get("unfinished"):
            break
        previous, offset = stage_dir / "run" / "model", offset + steps
    return {"tag": stages_tag(stages), "stages": done}


def gradual_runs(args, work: Path, base, ctx: dict, run_finetune, trajectory_error, evaluate):
    """(cut, run) of each source's chain for finetune.py's report: the cut is the last stage's, the curve
    its points (steps counted from the first stage's start); earlier stages are listed in the cut."""
    import torch

    from dgo_compile import load

    for source in args.sources:
        chain = gradual_chain(args, source, work, base, ctx, run_finetune, trajectory_error)
        last = chain["stages"][-1]
        model = load(last["folder"]).model
        name = f"{chain['tag']}_{source}"
        cut = {"ratio": name, "folder": last["folder"], "prune_seconds": last["prune_seconds"],
               "kept_macs": last["kept_macs"], "kept_params": last["kept_params"],
               "start": evaluate(model, f"{name}_start", args.n, ctx), "trajectory_error": last["trajectory_error"],
               "stages": [{k: v for k, v in s.items() if k != "record"} for s in chain["stages"]]}
        curve = [{"step": last["start"], "ema": cut["start"], "raw": cut["start"]}]
        seconds_before = sum(s["record"]["train_seconds"] for s in chain["stages"][:-1])
        record = last["record"] or {}
        for step in last["points"]:
            point = {"step": last["start"] + step, "seconds": None}
            at = (record.get("seconds_at") or {}).get(str(step))
            point["seconds"] = None if at is None else seconds_before + at
            if not (Path(last["run"]) / "points" / f"raw_{step}.pt").is_file():
                curve.append({**point, "ema": None, "raw": None})
                continue
            n = args.n if step == last["points"][-1] else args.curve_n
            for kind in ("ema", "raw"):
                model.load_state_dict(torch.load(Path(last["run"]) / "points" / f"{kind}_{step}.pt", weights_only=True))
                point[kind] = evaluate(model, f"{name}_{kind}{last['start'] + step}", n, ctx)
            curve.append(point)
            log(f"{name} step {point['step']}: EMA {point['ema']}, raw {point['raw']}")
        done = [p["step"] for p in curve[1:] if p["raw"]]
        yield cut, {"ratio": name, "kept_macs": last["kept_macs"], "source": source, "curve": curve,
                    "trajectory_error": {"step": max(done, default=0), "raw": trajectory_error(model, ctx)},
                    "train_seconds": seconds_before + record.get("train_seconds", 0.0),
                    "peak_rss_mb": max((s["record"] or {}).get("peak_rss_mb") or 0 for s in chain["stages"]) or None,
                    "final_loss": record.get("final_loss"), "unfinished": record.get("unfinished")}
