"""Learned (DiP-GO) block schedules against every honest baseline on the shipped model.

    python benchmarks/pruner.py          # ~45 min on 2 CPU cores

Trains two pruners through whole DDIM-50 trajectories (calibration noise from seed 0): one with a
gate per (call, block), and one restricted to whole-network reuse (a learned non-uniform K-step
schedule). At kept MACs 50%, 25% and 20% it compares the learned block schedule with: DeepCache
at the nearest MACs it reaches, uniform `steps:K`, the learned K-step schedule, and a random
schedule (random scores, the same extraction). Quality: PSNR / SSIM against the full model from
the same noise and the Frechet distance against real digits, on N samples from noise seed 20000
(never used in optimization), run through the folded PyTorch graphs. Also records each
optimization's wall time and peak memory. Writes results/pruner.{json,md} and the heatmaps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS

from dgo_compile import __version__, load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import denoiser_timesteps, initial_noise, sample_ddim
from dgo_compile.channels.data import real_digit_sample
from dgo_compile.core.metrics import classifier_features, frechet_distance, load_digit_classifier, psnr, ssim
from dgo_compile.driver.report import save_heatmap
from dgo_compile.schedules.schedule import builtin, builtin_for
from dgo_compile.schedules.schedule_cost import ScheduleCost, extract_schedule
from dgo_compile.search.pruner import OptimizeConfig, optimize

BUDGETS = (0.5, 0.25, 0.2)
# (label, folder, OptimizeConfig settings beyond the shared ones). DiP-GO's lr, a gentler one (the
# paper's lr saturates the gates within ~60 of our 150 iterations), the same optimizer restricted to
# whole-network reuse, and the knobs the method leaves open: the training budget, unit granularity
# and the timestep input. `keep_macs=None` trains towards --keep-macs.
PRUNERS = (
    ("learned blocks (lr 0.1)", "pruner_block_lr0.1", dict(granularity="block", lr=0.1)),
    ("learned blocks (lr 0.03)", "pruner_block_lr0.03", dict(granularity="block", lr=0.03)),
    ("learned steps (lr 0.1)", "pruner_step_lr0.1", dict(granularity="step", lr=0.1)),
    ("learned blocks (lr 0.03, trained to 50%)", "pruner_block_lr0.03_r0.5", dict(granularity="block", lr=0.03,
                                                                                  keep_macs=0.5)),
    ("learned units (lr 0.03)", "pruner_unit_lr0.03", dict(granularity="unit", lr=0.03)),
    ("learned blocks (lr 0.03, no timestep input)", "pruner_block_lr0.03_notime",
     dict(granularity="block", lr=0.03, timestep_conditioning=False)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--keep-macs", dest="ratio", type=float, default=0.2,
                        help="kept-MACs target the pruners train towards")
    parser.add_argument("-n", type=int, default=200, help="evaluation samples per schedule")
    parser.add_argument("--seed", type=int, default=20_000, help="evaluation noise seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pruners", type=Path, default=None,
                        help="keep the trained pruners here (default: temp); finished ones found there are reused")
    parser.add_argument("--train-only", type=int, default=None, help="train only PRUNERS[i] (run them side by side)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load()
    traced = trace(loaded)
    config = loaded.scheduler_config
    names = tuple(b.name for b in traced.blocks)
    cost = ScheduleCost(traced)
    costs = {"block": cost}
    stems = {label: stem for label, stem, _ in PRUNERS}
    RESULTS.mkdir(exist_ok=True)

    trained = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.pruners or Path(tmp)
        for index, (label, stem, overrides) in enumerate(PRUNERS):
            if args.train_only is not None and index != args.train_only:
                continue
            settings = OptimizeConfig(**{"keep_macs": args.ratio, "steps": args.steps, "iters": args.iters,
                                         "batch": args.batch, **overrides})
            folder = root / stem
            started = time.perf_counter()
            trained[label] = optimize(traced, config, settings, folder, model_source=None, resume=folder.exists(),
                                      on_iteration=lambda r, g=stem: print(g, json.dumps(r), flush=True))
            print(f"{label}: {time.perf_counter() - started:.0f} s", flush=True)
        if args.train_only is not None:
            return

    schedules = {("full", 1.0): builtin("full", args.steps, names)}
    for budget in BUDGETS:
        for label, pruner in trained.items():
            granularity = pruner.state.schedule_granularity
            if granularity not in costs:
                costs[granularity] = ScheduleCost(traced, granularity)
            pruner_cost = costs[granularity]
            plan, _ = extract_schedule(pruner.reuse_margins(), pruner_cost, budget, f"{label} {budget}",
                                       pruner.whole_calls)
            schedules[(label, budget)] = plan
            if not pruner.whole_calls:
                stem = f"{stems[label]}_{int(budget * 100)}"
                save_heatmap(pruner.reuse_scores(), plan, RESULTS / f"{stem}.png",
                             f"{label} at {budget:.0%} kept MACs (DDIM {args.steps})")
                plan.save(RESULTS / f"{stem}.json")
        random_scores = torch.rand(args.steps, len(names), generator=torch.Generator().manual_seed(7))
        schedules[("random", budget)] = extract_schedule(random_scores, cost, budget, f"random {budget}")[0]
        k = min(range(1, args.steps + 1), key=lambda k: abs(cost.kept_ratio(builtin(f"steps:{k}", args.steps,
                                                                                    names)) - budget))
        schedules[(f"steps:{k}", budget)] = builtin(f"steps:{k}", args.steps, names)
        unit_cost = costs.setdefault("unit", ScheduleCost(traced, "unit"))
        branches = 3 * sum(n.startswith("down_blocks.") for n in names)
        specs = [f"deepcache:{n}:{b}" for n in range(2, args.steps + 1) for b in range(branches)]
        best = min(specs, key=lambda s: abs(unit_cost.kept_ratio(builtin_for(s, args.steps, traced)) - budget))
        schedules[(best, budget)] = builtin_for(best, args.steps, traced)

    classifier = load_digit_classifier()
    real_features = classifier_features(real_digit_sample(args.n, args.seed), classifier)
    noise = initial_noise(args.n, (1, 32, 32), args.seed)
    timesteps = denoiser_timesteps(config, args.steps)
    samples = {}
    for key, plan in schedules.items():
        samples[key] = sample_ddim(fold(traced, plan, timesteps), config, noise, args.steps, 50)
        print("sampled", key, flush=True)
    full = samples[("full", 1.0)]

    rows = []
    for (label, budget), plan in schedules.items():
        images = samples[(label, budget)]
        rows.append({"budget": budget, "schedule": label,
                     "kept_macs": costs.get(plan.granularity, cost).kept_ratio(plan),
                     "calls_fully_reused": sum(not any(r) for r in plan.compute),
                     "psnr_vs_full": float(psnr(images, full).clamp(max=100).mean()),
                     "ssim_vs_full": float(ssim(images, full).mean()),
                     "fd_vs_real": frechet_distance(classifier_features(images, classifier), real_features)})
    optimization = {label: {"granularity": p.state.config.granularity, "iterations": p.state.iterations_done,
                            "seconds": p.state.seconds, "peak_memory_mb": p.state.peak_memory_mb,
                            "lr": p.state.config.lr, "final_kept": p.state.history[-1]["kept"],
                            "history": p.state.history}
                    for label, p in trained.items()}
    (RESULTS / "pruner.json").write_text(json.dumps({
        "dgo_compile": __version__, "torch": torch.__version__, "steps": args.steps, "n": args.n,
        "eval_seed": args.seed, "train_ratio": args.ratio, "iters": args.iters, "batch": args.batch,
        "threads": args.threads, "optimization": optimization, "rows": rows}, indent=1))

    lines = [f"# Learned block schedules vs baselines on the shipped model (DDIM {args.steps})", "",
             f"Reproduce: `python benchmarks/pruner.py` (torch {torch.__version__}, {args.threads} threads). "
             f"Pruners: {args.iters} iterations at batch {args.batch}, trained towards {args.ratio:.0%} kept MACs; "
             f"evaluation: {args.n} samples from noise seed {args.seed}, never seen in optimization.", "",
             "| budget | schedule | kept MACs | calls fully reused | PSNR vs full | SSIM vs full | FD |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']:.0%} | {r['schedule']} | {r['kept_macs']:.1%} | {r['calls_fully_reused']} | "
                     f"{r['psnr_vs_full']:.1f} | {r['ssim_vs_full']:.3f} | {r['fd_vs_real']:.1f} |")
    lines += ["", "| pruner | iterations | wall time | peak RSS | final kept MACs |", "|---|---|---|---|---|"]
    for label, o in optimization.items():
        lines.append(f"| {label} | {o['iterations']} | {o['seconds'] / 60:.1f} min | {o['peak_memory_mb']:.0f} MB | "
                     f"{o['final_kept']:.1%} |")
    lines += ["", f"FD: {args.n} samples against {args.n} real digits on the shipped classifier's features "
              "(noisy at this n; the floor is in results/shipped_model.md). PSNR capped at 100 dB."]
    (RESULTS / "pruner.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
