"""Width + time on the shipped model: Diff-Pruning with a real fine-tune budget, then DiP-GO on the pruned model.

Reproduce: `python benchmarks/width_time.py` (about 35 min on 2 cores; fine-tuning and the pruner run under
torchrun with 2 processes, through the CLI a user runs).

1. `dgo-compile prune --channel-ratio 0.25` (Taylor, uniform: ~76% of the MACs per call).
2. `dgo-compile finetune` for 600 steps at batch 32: 3.3% of the 585,600 samples the shipped model was
   trained on (its recipe.json), under Diff-Pruning's 10-20% (results/finetune.md measures longer budgets).
3. `dgo-compile optimize` on the fine-tuned pruned model with its defaults, one pruner per total budget (as a
   user runs it), then its schedule there, counted against the *unpruned* model's full run.
4. Quality (DDIM 50, n samples from one noise seed; PSNR / SSIM against the unpruned model's images from
   the same noise, FD against real digits) of: width alone, width + learned schedule, the unpruned
   model's learned schedules committed by `benchmarks/pruner.py` (`optimize`'s defaults, one pruner per
   budget: the best learned row there), and fewer DDIM steps on either model, all at the same total MACs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, cli, quality

from dgo_compile import __version__, load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import denoiser_timesteps, initial_noise, sample_ddim
from dgo_compile.channels.data import real_digit_sample
from dgo_compile.channels.finetune import read_finetune
from dgo_compile.core.metrics import classifier_features, load_digit_classifier
from dgo_compile.schedules.schedule import Schedule, builtin
from dgo_compile.schedules.schedule_cost import ScheduleCost, extract_schedule
from dgo_compile.schedules.supernet import gateable_elements
from dgo_compile.search.pruner import load_pruner

UNPRUNED_SCHEDULES = {0.25: "pruner_default_25.json", 0.2: "pruner_default_20.json"}
READING_MARKER = "<!-- reading: kept by benchmarks/width_time.py on rewrite -->"
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.0f} s] {message}", flush=True)


def run_images(traced, schedule: Schedule, scheduler_config: dict, noise: torch.Tensor, steps: int) -> torch.Tensor:
    graphs = fold(traced, schedule, denoiser_timesteps(scheduler_config, steps))
    return sample_ddim(graphs, scheduler_config, noise, steps, 50)


def nearest_steps(cost: ScheduleCost, target: float, steps: int, names) -> tuple[str, float]:
    """The uniform `steps:K` whose kept share (of this model's full run) is nearest `target`."""
    k = min(range(1, steps + 1), key=lambda k: abs(cost.kept_ratio(builtin(f"steps:{k}", steps, names)) - target))
    return f"steps:{k}", cost.kept_ratio(builtin(f"steps:{k}", steps, names))


def torch_pruning(loaded, ratio: float, folder: Path) -> float:
    """Torch-Pruning's global Taylor cut from Diff-Pruning's accumulated gradients (the same batch, noise and
    stop as ours), saved through our loader so both sides share `finetune`; its wall seconds."""
    import copy

    from tp_adapter import accumulate_gradients, pruning_record, tp_from_gradients

    from dgo_compile.channels.channel_pruning import PruneConfig, calibration_images
    from dgo_compile.frontend.loading import save_denoiser

    log(f"Torch-Pruning: Taylor gradients, global ratio {ratio}")
    started = time.perf_counter()
    model = copy.deepcopy(loaded.model).requires_grad_(True)
    model.zero_grad()
    accumulate_gradients(model, calibration_images(loaded), PruneConfig(batch=8, max_timesteps=1000),
                         loaded.scheduler_config)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    pruned, _, error = tp_from_gradients(loaded.model, grads, ratio, global_pruning=True)
    if error is not None:
        raise RuntimeError(f"Torch-Pruning global {ratio} failed: {error}")
    save_denoiser(loaded, pruned, folder, pruning_record(loaded.model, pruned, f"torch-pruning global {ratio}"))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep intermediate models here (default: temp)")
    parser.add_argument("--channel-ratio", dest="ratio", type=float, default=0.25,
                        help="channel pruning ratio (uniform, Taylor)")
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--finetune-batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=None, help="pruner iterations (default: optimize's)")
    parser.add_argument("--totals", type=float, nargs="+", default=[0.25, 0.2],
                        help="total kept MACs per run, relative to the unpruned model's full run")
    parser.add_argument("--tp-ratio", type=float, default=0.375,
                        help="Torch-Pruning global ratio (its Taylor importance): 73.6%% of the MACs on the shipped "
                             "model (channel_pruning.md's search), the nearest it lands to ours; 0 skips it")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes for finetune and optimize")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("-n", type=int, default=100, help="evaluation samples")
    parser.add_argument("--seed", type=int, default=20_000, help="evaluation noise seed")
    args = parser.parse_args()
    torch.set_num_threads(args.processes)
    temp = None
    if args.work is None:
        temp = tempfile.TemporaryDirectory(prefix="width_time_")
        args.work = Path(temp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    pruned, tuned = args.work / "pruned", args.work / "finetuned"
    seconds = {}
    if not pruned.is_dir():
        seconds["prune"] = cli(["prune", "--channel-ratio", args.ratio, "--batch", 8, "--max-timesteps", 1000, "-o",
                                pruned])
    if not (tuned.is_dir() and read_finetune(tuned).complete):
        seconds["finetune"] = cli(["finetune", pruned, "--train-steps", args.finetune_steps, "--batch",
                                   args.finetune_batch,
                                   "-o", tuned, *(["--resume"] if tuned.is_dir() else [])], args.processes)

    loaded = load()
    tp_pruned, tp_tuned = args.work / "tp_pruned", args.work / "tp_finetuned"
    if args.tp_ratio and not tp_pruned.is_dir():
        seconds["tp_prune"] = torch_pruning(loaded, args.tp_ratio, tp_pruned)
    if args.tp_ratio and not (tp_tuned.is_dir() and read_finetune(tp_tuned).complete):
        seconds["tp_finetune"] = cli(["finetune", tp_pruned, "--train-steps", args.finetune_steps, "--batch",
                                      args.finetune_batch, "-o", tp_tuned,
                                      *(["--resume"] if tp_tuned.is_dir() else [])],
                                     args.processes)
    tuned_model = load(tuned)
    full_traced, tuned_traced = trace(loaded, verify=False), trace(tuned_model, verify=False)
    full_cost, tuned_cost = ScheduleCost(full_traced), ScheduleCost(tuned_traced)
    width = tuned_cost.full_macs / full_cost.full_macs  # the pruned model's full run, as a share of the unpruned one
    trained = {}
    for total in args.totals:  # one pruner per total, as `dgo-compile optimize` is meant to be run
        pruner = args.work / f"pruner_{total:g}"
        if not (pruner.is_dir() and load_pruner(pruner, allow_unfinished=True).state.complete):
            # the pruner's --keep-macs is the pruned model's own share: the total divided by the width share
            iters = ["--iters", args.iters] if args.iters else []
            seconds[f"optimize_{total:g}"] = cli(["optimize", tuned, "--keep-macs", f"{total / width:.4f}", *iters,
                                                  "--steps", args.steps, "-o", pruner,
                                                  *(["--resume"] if pruner.is_dir() else [])], args.processes)
        trained[total] = load_pruner(pruner)
    names = gateable_elements(full_traced)
    scheduler_config = loaded.scheduler_config

    classifier = load_digit_classifier()
    real = classifier_features(real_digit_sample(args.n, args.seed), classifier)
    noise = initial_noise(args.n, (1, 32, 32), args.seed)
    log("unpruned reference")
    reference = run_images(full_traced, builtin("full", args.steps, names), scheduler_config, noise, args.steps)
    rows = [{"total": 1.0, "model": "unpruned", "schedule": "full", "kept_macs": 1.0,
             **quality(reference, reference, classifier, real)}]

    def measure(total: float, model: str, traced, schedule: Schedule, kept: float) -> None:
        images = run_images(traced, schedule, scheduler_config, noise, args.steps)
        rows.append({"total": total, "model": model, "schedule": schedule.name, "kept_macs": kept,
                     **quality(images, reference, classifier, real)})
        log(f"{model}, {schedule.name}: {kept:.1%} -> {rows[-1]}")

    pruned_label = f"pruned {args.ratio} + fine-tuned"
    measure(width, pruned_label, tuned_traced, builtin("full", args.steps, names), width)
    if args.tp_ratio:
        tp_traced = trace(load(tp_tuned), verify=False)
        tp_width = ScheduleCost(tp_traced).full_macs / full_cost.full_macs
        measure(tp_width, f"Torch-Pruning global {args.tp_ratio} + fine-tuned", tp_traced,
                builtin("full", args.steps, names), tp_width)
    for total in args.totals:
        schedule, kept = extract_schedule(trained[total].reuse_margins(), tuned_cost, total / width,
                                          f"learned:{total}")
        measure(total, pruned_label, tuned_traced, schedule, kept * width)
        schedule.save(args.work / f"pruned_schedule_{total}.json")
        spec, kept = nearest_steps(tuned_cost, total / width, args.steps, names)
        measure(total, pruned_label, tuned_traced, builtin(spec, args.steps, names), kept * width)
        if total in UNPRUNED_SCHEDULES:
            learned = Schedule.load(RESULTS / UNPRUNED_SCHEDULES[total])
            measure(total, "unpruned", full_traced, learned, full_cost.kept_ratio(learned))
        spec, kept = nearest_steps(full_cost, total, args.steps, names)
        measure(total, "unpruned", full_traced, builtin(spec, args.steps, names), kept)

    finetune_record = read_finetune(tuned)
    report = {"dgo_compile": __version__, "torch": torch.__version__,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "work"},
              "width_share": width, "finetune_final_loss": finetune_record.final_loss,
              "finetune_seconds": finetune_record.seconds,
              "pruner": {f"{t:g}": {"seconds": p.state.seconds, "iters": p.state.config.iters,
                                    "init": p.state.config.init} for t, p in trained.items()},
              **({"tp_finetune_final_loss": read_finetune(tp_tuned).final_loss,
                  "tp_finetune_seconds": read_finetune(tp_tuned).seconds} if args.tp_ratio else {}),
              "wall_seconds": seconds, "rows": rows, "total_s": time.perf_counter() - STARTED}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "width_time.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, RESULTS / "width_time.md")
    log(f"wrote {RESULTS / 'width_time.md'}")


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    processes = "" if s["processes"] == 2 else f" --processes {s['processes']}"
    pruners = "; ".join(f"{float(t):.0%}: {p['iters']} iterations from {p['init']}, {p['seconds'] / 60:.1f} min"
                        for t, p in report["pruner"].items())
    lines = [
        "# Width + time on the shipped model",
        "",
        f"Reproduce: `python benchmarks/width_time.py{processes}` (dgo-compile {report['dgo_compile']}, torch "
        f"{report['torch']}; {report['total_s'] / 60:.0f} min on the 2-core machine).",
        "",
        f"Channel pruning: Taylor, uniform ratio {s['ratio']} ({report['width_share']:.1%} of the MACs per call), "
        f"fine-tuned {s['finetune_steps']} steps at batch {s['finetune_batch']} (final loss "
        f"{report['finetune_final_loss']:.4f}, {report['finetune_seconds'] / 60:.1f} min of process time) "
        + (f"under torchrun with {s['processes']} processes" if s["processes"] > 1 else "in one process")
        + ". Learned schedules on the fine-tuned model: `dgo-compile optimize` "
        f"with its defaults, one pruner per total budget ({pruners}). Unpruned learned schedules: `optimize`'s "
        "defaults too, the per-budget pruners `benchmarks/pruner.py` committed (`pruner_default_*.json`, the best "
        "learned row there). Quality: DDIM "
        f"{s['steps']}, {s['n']} samples from noise seed {s['seed']}; PSNR / SSIM against the unpruned model's "
        "images from the same noise, FD against real digits. Kept MACs: per run, relative to the unpruned "
        "model's full run (timestep-only work excluded, as the folded artifact runs it).",
        "",
        *([f"Torch-Pruning: its Taylor importance from the same accumulated gradients, global ratio {s['tp_ratio']}, "
           f"fine-tuned with the same budget (final loss {report['tp_finetune_final_loss']:.4f}). "
           + (f"Note: {report['tp_row_note']}." if "tp_row_note" in report else ""), ""]
          if "tp_finetune_final_loss" in report else []),
        "| budget | model | schedule | kept MACs per run | PSNR | SSIM | FD |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        psnr = "-" if r["schedule"] == "full" and r["model"] == "unpruned" else f"{r['psnr']:.1f}"
        ssim = "-" if psnr == "-" else f"{r['ssim']:.3f}"
        lines.append(f"| {r['total']:.0%} | {r['model']} | {r['schedule']} | {r['kept_macs']:.1%} | {psnr} | {ssim} | "
                     f"{r['fd']:.1f} |")
    kept = path.read_text().split(READING_MARKER, 1)[1] if path.is_file() and READING_MARKER in path.read_text() else ""
    path.write_text("\n".join(lines) + f"\n\n{READING_MARKER}{kept}" if kept else "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
