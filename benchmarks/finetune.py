"""Recovery after channel pruning: quality of the shipped model against fine-tune steps (issue 18).

    python benchmarks/finetune.py            # the curves: 2 cuts x 3 sources x 600 steps, ~60 min on 1 thread
    python benchmarks/finetune.py --ratios 0.6 --sources both --points 1220 2440 3660   # the whole 20% budget
        # (a probe, 40-50 min; also --ratios 0.3), then `python benchmarks/finetune.py --no-train` to report all
    python benchmarks/finetune.py --stages 0.69:1220 0.5:2440 --sources both --points 2440 3050 3660
        # gradual pruning (benchmarks/finetune_gradual.py): prune to 69%, fine-tune, prune that to 50%, fine-tune
    python benchmarks/finetune.py --quick    # smoke run of every piece, ~4 min

The shipped MNIST DDPM is pruned once per --ratios (Taylor importance, global scope or --scope uniform, GroupNorm groups
keep >= --min-group-channels; 0.3 and 0.5 keep ~71% and ~54% of the MACs; with --groupnorm-cut groups
whole groups go instead, and 0.3 keeps 49.8%) and each cut is
fine-tuned by `dgo_compile.channels.finetune` with one recipe, three ways:

- data: the denoising loss on the shipped digits;
- distill: `distill_only`, no data: the unpruned model's own DDIM trajectories (--trajectory-steps,
  the evaluation's step count), its predictions as targets;
- both: the digits with `distill` x the MSE towards the unpruned model's prediction.

Each run is checkpointed at --points and both its EMA and its raw weights are sampled there (DDIM
--steps from noise seed 20000, never used in training): PSNR / SSIM against the unpruned model's
images from the same noise, FD against real digits on the shipped classifier's features. Intermediate
points use the first --curve-n noises, the last point -n. Runs train in a child process (its peak RSS
is the run's), one at a time. Finished runs and samples stay in --work and are reused; runs of other
recipes already in results/finetune.json are kept there and listed as probes, and so are their rows of
the paired table when their samples are not in --work. --report-recipe keeps the report built around its
main recipe while a probe is added; --compare-with pairs this run with other recipes' runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import RESULTS, ROOT, cost_of, log, quality, read_json, sample_images, write_json
from finetune_diagnostics import band_ssim, paired_ssim, point_name, samples_file, trajectory_error

BUDGET_SHARE = 0.2  # Diff-Pruning's claim: recovery within 10-20% of the original training
SOURCES = ("data", "distill", "both")
SSIM_GOAL = 0.9


def cut_tag(args) -> str:
    """How GroupNorms are cut: "w" when whole groups go, else the channels each group keeps at least."""
    return "w" if args.groupnorm_cut == "groups" else str(args.min_group_channels)


def recipe_key(args) -> str:
    """What tells two recipes apart in results/finetune.json."""
    return (f"lr{args.lr:g}_w{args.warmup}_ema{args.ema_decay:g}_d{args.distill:g}_traj{args.trajectory_steps}"
            f"_g{cut_tag(args)}_b{args.batch}_s{max(args.points)}"
            + (f"_snr{args.snr_gamma:g}" if args.snr_gamma else "")
            + (f"_ln{args.logit_mean:g},{args.logit_std:g}" if args.timestep_sampling == "logit_normal" else "")
            + (f"_sr{args.student_rollouts:g}" if args.student_rollouts else "")
            + (f"_fd{args.feature_distill:g}" if args.feature_distill else "")
            + ("" if not args.stages else "_" + "-".join(args.stages)))


def finetune_config(args, source: str, steps: int):
    from dgo_compile.channels.finetune import FinetuneConfig

    every = min(args.points) if len(args.points) == 1 else _gcd(args.points)
    return FinetuneConfig(train_steps=steps, batch=args.batch, lr=args.lr, ema_decay=args.ema_decay, warmup=args.warmup,
                          checkpoint_every=every, distill=args.distill if source == "both" else 0.0,
                          distill_only=source == "distill", trajectory_steps=args.trajectory_steps,
                          snr_gamma=args.snr_gamma,
                          student_rollouts=args.student_rollouts if source == "distill" else 0.0,
                          feature_distill=args.feature_distill if source != "data" else 0.0,
                          **({"timestep_sampling": args.timestep_sampling, "logit_mean": args.logit_mean,
                              "logit_std": args.logit_std} if source != "distill" else {}))


def training_budget(batch: int) -> dict:
    """BUDGET_SHARE of the samples the shipped model was trained on (every stage of its recipe.json), as
    steps at `batch`: the fine-tune budget the recovery claim allows."""
    from dgo_compile import DEFAULT_MODEL

    stages = read_json(Path(DEFAULT_MODEL) / "recipe.json")["stages"]
    trained = sum(int(s["steps_done"]) * int(s["args"]["batch_size"]) for s in stages)
    return {"trained_samples": trained, "budget_steps": int(BUDGET_SHARE * trained) // batch}


def _gcd(values) -> int:
    import math

    out = 0
    for v in values:
        out = math.gcd(out, v)
    return out


# --------------------------------------------------------------------------- the child: one fine-tune

class StopRun(Exception):
    """--stop-at-step reached."""


def train_child(spec_file: Path) -> None:
    """One fine-tune (a child process, so that its peak RSS is its own); the EMA and raw weights at each
    curve point are copied out as the run passes it."""
    from dgo_compile.channels.finetune import RECORD_FILE, STATE_FILE, FinetuneConfig, finetune, read_finetune
    from dgo_compile.core.configs import DEFAULT_MODEL
    from dgo_compile.frontend.loading import load

    spec = json.loads(spec_file.read_text())
    torch.set_num_threads(spec["threads"])
    config = FinetuneConfig(**spec["config"])
    output, points = Path(spec["output"]), Path(spec["points_dir"])
    points.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    at = read_json(points / "seconds.json") or {}  # seconds of the training loop at each point passed

    def on_step(entry: dict) -> None:
        step = entry["step"]
        if step in spec["points"]:
            torch.save(load(output).model.state_dict(), points / f"ema_{step}.pt")
            torch.save(torch.load(output / STATE_FILE, weights_only=True)["model"], points / f"raw_{step}.pt")
            at[str(step)] = read_finetune(output).seconds
            write_json(points / "seconds.json", at)
        if step == spec["stop_at"]:
            raise StopRun  # the checkpoint of this step is on disk: a later invocation continues from it

    resume = (output / RECORD_FILE).is_file()  # an interrupted run continues from its last checkpoint
    try:
        result = finetune(spec["model"], config, output, teacher=DEFAULT_MODEL if spec["teacher"] else None,
                          on_step=on_step, resume=resume)
    except StopRun:
        return
    write_json(Path(spec["result"]), {
        "train_seconds": result.record.seconds, "wall_seconds": time.perf_counter() - started, "resumed": resume,
        "seconds_at": at, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": result.record.final_loss,
        "history": [{k: h[k] for k in ("step", "loss", "distill", "features") if k in h}
                    for h in result.record.history]})


def run_finetune(args, source: str, pruned: Path, run_dir: Path) -> dict | None:
    """The run's record (reused when finished in --work, continued when interrupted). With --no-train, what
    an unfinished run has reached (None if nothing)."""
    result = run_dir / "result.json"
    if result.is_file():
        return read_json(result)
    if not args.no_train:
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = {"model": str(pruned), "config": asdict(finetune_config(args, source, max(args.points))),
                "teacher": source != "data", "output": str(run_dir / "model"), "points": list(args.points),
                "points_dir": str(run_dir / "points"), "result": str(result), "threads": args.threads,
                "stop_at": args.stop_at_step}
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        log(f"fine-tune {run_dir.name}: {spec['config']}")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, __file__, "--child", str(run_dir / "spec.json")], check=True, env=env)
    if result.is_file():
        return read_json(result)
    from dgo_compile.channels.finetune import read_finetune

    if not (run_dir / "model" / "finetune.json").is_file():
        return None
    record = read_finetune(run_dir / "model")  # stopped early (--stop-at-step, or interrupted)
    return {"train_seconds": record.seconds, "peak_rss_mb": None, "final_loss": record.final_loss,
            "seconds_at": read_json(run_dir / "points" / "seconds.json") or {}, "unfinished": record.steps_done}


# --------------------------------------------------------------------------- the parent

def prune_cuts(args, loaded, work: Path, base) -> dict[float, dict]:
    """Our Taylor global cut per ratio, saved in --work (reused when there)."""
    from dgo_compile.channels.channel_pruning import PruneConfig, calibration_images, prune
    from dgo_compile.frontend.loading import load, save_denoiser

    cuts, images = {}, None
    for ratio in args.ratios:
        uniform = "_uniform" if args.scope == "uniform" else ""
        folder = work / f"pruned_r{ratio}_g{cut_tag(args)}{uniform}_b{args.taylor_batch}"
        if not (folder / "bench_meta.json").is_file():
            images = calibration_images(loaded) if images is None else images
            config = PruneConfig(channel_ratio=ratio, scope=args.scope, importance="taylor", batch=args.taylor_batch,
                                 min_group_channels=args.min_group_channels, groupnorm_cut=args.groupnorm_cut)
            log(f"prune: {config}")
            started = time.perf_counter()
            pruned = prune(loaded, config, images)
            seconds = time.perf_counter() - started
            save_denoiser(loaded, pruned.model, folder, pruned.pruning)
            cost = cost_of(pruned.model)
            write_json(folder / "bench_meta.json", {"seconds": seconds, "params": cost.params, "macs": cost.macs,
                                                    "timesteps": len(pruned.taylor_losses)})
        meta = read_json(folder / "bench_meta.json")
        if "time_mlp_channels" not in meta:  # what the cut left of the time MLP (kept whole since 985bbb8)
            meta["time_mlp_channels"] = load(folder).model.time_embedding.linear_1.out_features
            write_json(folder / "bench_meta.json", meta)
        # results key cuts by ratio: "w" marks whole GroupNorm groups, "u" the uniform scope
        flags = ("w" if args.groupnorm_cut == "groups" else "") + ("u" if args.scope == "uniform" else "")
        key = f"{ratio}{flags}" if flags else ratio
        cuts[key] = {"ratio": key, "folder": str(folder), "prune_seconds": meta["seconds"],
                       "time_mlp_channels": meta["time_mlp_channels"],
                       "params": meta["params"], "macs": meta["macs"], "kept_macs": meta["macs"] / base.macs,
                       "kept_params": meta["params"] / base.params}
    return cuts


def evaluate(model, name: str, n: int, ctx: dict) -> dict:
    images = sample_images(model, ctx["config"], ctx["noise"][:n], ctx["steps"], samples_file(ctx, name, n))
    return {"n": n, **quality(images, ctx["full"][:n], ctx["classifier"], ctx["real"][n])}


def cached_band_ssim(model, run_dir: Path, step: int, ctx: dict) -> dict:
    """`band_ssim` of the EMA weights at `step` (loaded into `model`), kept beside the run's points."""
    file = run_dir / "points" / f"band_ssim_ema_{step}_{ctx['steps']}.json"
    if not file.is_file():
        model.load_state_dict(torch.load(run_dir / "points" / f"ema_{step}.pt", weights_only=True))
        write_json(file, {"step": step, "weights": "ema", **band_ssim(model, ctx)})
    return read_json(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="stop each run at this step (a checkpoint); a later invocation continues it")
    parser.add_argument("--no-train", action="store_true",
                        help="start no fine-tune: report the points that runs in --work have reached")
    parser.add_argument("--quick", action="store_true", help="smoke run: ratio 0.6, 20 steps at batch 8, 8 samples")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "finetune_bench",
                        help="pruned models, runs and samples (reused by a rerun)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.6],
                        help="global channel ratios (with --min-group-channels 2: 71.0%% and 50.1%% of the MACs)")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--min-group-channels", type=int, default=2)
    parser.add_argument("--scope", choices=("global", "uniform"), default="global",
                        help="uniform: every share loses the ratio, as Diff-Pruning's scripts (cuts keyed '<ratio>u')")
    parser.add_argument("--groupnorm-cut", choices=("channels", "groups"), default="channels",
                        help="groups: remove whole GroupNorm groups (cuts keyed '<ratio>w'; 0.3 keeps 49.8%% of "
                             "the MACs)")
    parser.add_argument("--taylor-batch", type=int, default=8, help="as benchmarks/channel_pruning.py")
    parser.add_argument("--stages", nargs="+", metavar="MACS:STEPS",
                        help="gradual pruning instead of --ratios: each stage prunes the last one's fine-tuned model "
                             "to MACS of the unpruned model's MACs, then fine-tunes it STEPS steps")
    parser.add_argument("--points", type=int, nargs="+", default=[150, 300, 600], help="curve points (steps)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--distill", type=float, default=1.0, help="the distillation weight of 'both'")
    parser.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR-gamma loss weights (default: off)")
    parser.add_argument("--timestep-sampling", choices=("uniform", "logit_normal"), default="uniform",
                        help="data batches' timesteps (distill-only trains on every trajectory state)")
    parser.add_argument("--logit-mean", type=float, default=0.0)
    parser.add_argument("--logit-std", type=float, default=1.0)
    parser.add_argument("--trajectory-steps", type=int, default=50, help="'distill': the teacher's DDIM steps")
    parser.add_argument("--student-rollouts", type=float, default=0.0,
                        help="'distill': the share of trajectories the student runs itself (on-policy)")
    parser.add_argument("--feature-distill", type=float, default=0.0,
                        help="'distill' and 'both': the weight of the block-output term on the kept channels")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the evaluation")
    parser.add_argument("-n", type=int, default=100, help="evaluation samples at the last point")
    parser.add_argument("--curve-n", type=int, default=50, help="evaluation samples at the other points")
    parser.add_argument("--seed", type=int, default=20_000, help="evaluation noise seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report-recipe", default=None,
                        help="build the report around this recipe key (the committed report's main one) and list "
                             "this run as a probe; default: this run's recipe")
    parser.add_argument("--compare-with", nargs="+", default=[], metavar="RECIPE",
                        help="also the paired SSIM difference of this run from these recipes' runs (same cut, source)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        return train_child(args.child)
    if args.quick:
        args.ratios, args.points, args.batch, args.n, args.curve_n = [0.6], [10, 20], 8, 8, 8
        args.results = args.work / "quick_results"
    from dgo_compile import __version__, load
    from dgo_compile.backend.sampling import initial_noise
    from dgo_compile.channels.data import real_digit_sample
    from dgo_compile.core.metrics import classifier_features, load_digit_classifier

    args.points = sorted(set(args.points))
    work = args.work / recipe_key(args)
    (args.work / "samples").mkdir(parents=True, exist_ok=True)
    loaded = load()
    base = cost_of(loaded.model)
    cuts = prune_cuts(args, loaded, args.work, base) if not args.stages else {}
    classifier = load_digit_classifier()
    counts = sorted({args.n, args.curve_n})
    noise = initial_noise(max(counts), (1, 32, 32), args.seed)
    ctx = {"config": loaded.scheduler_config, "noise": noise, "steps": args.steps, "samples": args.work / "samples",
           "classifier": classifier,
           "real": {n: classifier_features(real_digit_sample(n, args.seed), classifier) for n in counts}}
    ctx["teacher"] = loaded.model
    ctx["full"] = sample_images(loaded.model, ctx["config"], noise, args.steps,
                                ctx["samples"] / f"full_s{args.seed}_n{max(counts)}.pt")
    unpruned = {"params": base.params, "macs": base.macs,
                "fd": {str(n): quality(ctx["full"][:n], ctx["full"][:n], classifier, ctx["real"][n])["fd"]
                       for n in counts}}
    runs = []
    for ratio, cut in cuts.items():
        pruned = load(cut["folder"]).model
        cut["start"] = evaluate(pruned, f"pruned_r{ratio}_g{cut_tag(args)}_s{args.seed}", args.n, ctx)
        cut["trajectory_error"] = trajectory_error(pruned, ctx)
        log(f"cut {ratio}: {cut['kept_macs']:.1%} of the MACs, before fine-tuning {cut['start']}")
        for source in args.sources:
            run_dir = work / f"r{ratio}_{source}"
            record = run_finetune(args, source, Path(cut["folder"]), run_dir)
            if record is None:
                log(f"{ratio} {source}: not run")
                continue
            curve = [{"step": 0, "ema": cut["start"], "raw": cut["start"]}]
            for step in args.points:
                n = args.n if step == args.points[-1] else args.curve_n
                point = {"step": step, "seconds": record["seconds_at"].get(str(step))}
                if not (run_dir / "points" / f"raw_{step}.pt").is_file():
                    curve.append({**point, "ema": None, "raw": None})  # an unfinished run stopped before it
                    continue
                for kind in ("ema", "raw"):
                    pruned.load_state_dict(torch.load(run_dir / "points" / f"{kind}_{step}.pt", weights_only=True))
                    point[kind] = evaluate(pruned, point_name(recipe_key(args), ratio, source, kind, step), n, ctx)
                curve.append(point)
                log(f"{ratio} {source} step {step}: EMA {point['ema']}, raw {point['raw']}")
            last = max((p["step"] for p in curve if p["raw"]), default=0)
            errors = {"step": last, "raw": trajectory_error(pruned, ctx)}
            runs.append({"recipe": recipe_key(args), "ratio": ratio, "kept_macs": cut["kept_macs"],
                         "source": source, "curve": curve, "trajectory_error": errors,
                         "band_ssim": cached_band_ssim(pruned, run_dir, last, ctx) if last else None,
                         **{k: record.get(k) for k in ("train_seconds", "peak_rss_mb", "final_loss", "unfinished")}})
            pruned = load(cut["folder"]).model
    if args.stages:
        from finetune_gradual import gradual_runs

        for cut, run in gradual_runs(args, work, base, ctx, run_finetune, trajectory_error, evaluate):
            cuts[cut["ratio"]] = cut
            runs.append({"recipe": recipe_key(args), **run})
    from importlib.metadata import version

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("work", "results", "child")}
    old = read_json(args.results / "finetune.json") or {}
    mine = {(r["ratio"], r["source"]) for r in runs}
    every = runs + [r for r in old.get("runs", []) + old.get("probes", [])
                    if r["recipe"] != recipe_key(args) or (r["ratio"], r["source"]) not in mine]
    main_recipe = args.report_recipe or recipe_key(args)
    if main_recipe != recipe_key(args) and old.get("recipe") != main_recipe:
        raise SystemExit(f"--report-recipe {main_recipe} is not the main recipe of {args.results / 'finetune.json'}")
    # the report's own settings, budget and thread count are its main recipe's: an earlier report's when kept
    about = ({"threads": args.threads, "settings": settings, **training_budget(args.batch)}
             if main_recipe == recipe_key(args) else {k: old[k] for k in ("threads", "settings", "trained_samples",
                                                                           "budget_steps")})
    report = {"dgo_compile": __version__, "torch": torch.__version__, "diffusers": version("diffusers"),
              **about, "recipe": main_recipe, "unpruned": unpruned,
              "runs": [r for r in every if r["recipe"] == main_recipe],
              "cuts": list(cuts.values()) + [c for c in old.get("cuts", []) if c["ratio"] not in cuts],
              "probes": [r for r in every if r["recipe"] != main_recipe]}
    report["paired"] = paired_ssim(report["runs"] + report["probes"], main_recipe, ctx, args.n, old.get("paired", []),
                                   (recipe_key(args), args.compare_with) if args.compare_with else None)
    write_json(args.results / "finetune.json", report)
    from finetune_report import write_markdown

    write_markdown(report, args.results / "finetune.md")
    log("done")


if __name__ == "__main__":
    main()
