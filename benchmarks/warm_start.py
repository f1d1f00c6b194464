"""Where the pruner starts: DiP-GO's every-gate-keeps against `steps:K` and the searched K-step schedule.

    python benchmarks/warm_start.py            # every run below (~15 min each on one CPU thread)
    python benchmarks/warm_start.py --render   # only rewrite results/warm_start.md

Each run trains a block pruner on the shipped model towards one kept-MACs budget (DDIM 50, batch 2,
lr 0.03, `--iters` iterations, `OptimizeConfig.init` as given), extracts its schedule at that budget, and
samples it, `steps:K`, the committed `steps-searched:K` (results/steps_searched_K.json, searched on noise
seed 30000) and the committed DiP-GO schedule (results/pruner_block_lr0.03_B.json: DiP-GO's own start, every
gate kept, 150 iterations towards 20%, trained by `python benchmarks/pruner.py --train-only 1 --pruners
runs/pruners` and extracted by `dgo-compile schedule runs/pruners/pruner_block_lr0.03 --keep-macs B
--calibration-samples 0`) from the same N noises of seed 20000 (never used by any optimizer or search);
PSNR / SSIM against the full 50-step model. The warm start's own K-step search runs on the optimizer's
calibration noise (seed 0). Rows are appended to results/warm_start.json as they finish.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, log, read_json, write_json

from dgo_compile import __version__, load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import denoiser_timesteps, initial_noise, sample
from dgo_compile.core.metrics import psnr, ssim
from dgo_compile.schedules.schedule import Schedule, builtin_for
from dgo_compile.schedules.schedule_cost import ScheduleCost, extract_schedule
from dgo_compile.search.pruner import OptimizeConfig, optimize

RUNS = ((0.25, "steps", 50), (0.5, "steps", 50), (0.25, "steps-searched", 50), (0.5, "steps-searched", 50),
        (0.2, "steps-searched", 50))
K_AT = {0.5: 25, 0.25: 12, 0.2: 10}  # steps:K at each budget (the committed searched schedules' K)
JSON, MD = RESULTS / "warm_start.json", RESULTS / "warm_start.md"


class Shipped:
    """The shipped model, traced once, and its full 50-step images from the evaluation noise (every run's
    reference)."""

    def __init__(self, n: int, seed: int):
        loaded = load(None)
        self.traced, self.config = trace(loaded), loaded.scheduler_config
        self.timesteps, self.noise = denoiser_timesteps(self.config, 50), initial_noise(n, (1, 32, 32), seed)
        self.full = self.draw(builtin_for("full", 50, self.traced))

    def draw(self, plan: Schedule) -> torch.Tensor:
        return sample(fold(self.traced, plan, self.timesteps), self.config, self.noise, 50, scheduler="ddim",
                      batch_size=50)


def measure(model: Shipped, budget: float, init: str, iters: int, n: int, seed: int) -> dict:
    traced, config = model.traced, model.config
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        trained = optimize(traced, config, OptimizeConfig(keep_macs=budget, iters=iters, init=init), Path(tmp) / "p")
        seconds = time.perf_counter() - started
    cost = ScheduleCost(traced, "block")
    learned, _ = extract_schedule(trained.reuse_margins(), cost, budget, f"learned ({init})")
    k = K_AT[budget]
    candidates = {"learned": learned, "steps": builtin_for(f"steps:{k}", 50, traced),
                  "steps_searched": Schedule.load(RESULTS / f"steps_searched_{k}.json"),
                  "dipgo_committed": Schedule.load(RESULTS / f"pruner_block_lr0.03_{int(round(budget * 100))}.json")}
    row = {"budget": budget, "init": init, "iters": iters, "n": n, "seed": seed, "k": k,
           "optimize_s": round(seconds), "learned_compute": [list(map(int, r)) for r in learned.compute]}
    for name, plan in candidates.items():
        images = model.draw(plan)
        row[name] = {"kept": cost.kept_ratio(plan), "psnr": psnr(images, model.full).mean().item(),
                     "ssim": ssim(images, model.full).mean().item()}
    return row


def render(data: dict) -> None:
    lines = ["# Warm-started pruner: where the gates start", "",
             f"Reproduce: `python benchmarks/warm_start.py` (dgo-compile {data['version']}, torch {data['torch']}, "
             "1 thread). Shipped model, DDIM 50, block gates, lr 0.03, batch 2. PSNR / SSIM against the full "
             "50-step model on the same N noises of seed 20000; kept MACs per run. `steps-searched:K`: the committed "
             "schedules of results/pruner.md. DiP-GO: its own start (every gate kept), 150 iterations towards 20% "
             "by `benchmarks/pruner.py --train-only 1`, its learned schedule at each budget as `dgo-compile schedule "
             "--calibration-samples 0` extracts it (results/pruner_block_lr0.03_B.json).", "",
             "| budget | init | iterations | optimize time | learned | steps:K | steps-searched:K | DiP-GO (150 it.) |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(m: dict) -> str:
        return f"{m['psnr']:.2f} / {m['ssim']:.3f} ({m['kept']:.1%})"

    for r in data["rows"]:
        lines.append(f"| {r['budget']:.0%} | {r['init']} | {r['iters']} | {r['optimize_s'] / 60:.1f} min | "
                     f"{cell(r['learned'])} | {cell(r['steps'])} (K {r['k']}) | {cell(r['steps_searched'])} | "
                     f"{cell(r['dipgo_committed'])} |")
    lines += ["", f"N = {data['rows'][0]['n'] if data['rows'] else '-'}. " + data.get("reading", "")]
    MD.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=20_000)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    data = read_json(JSON) if JSON.is_file() else {"rows": []}
    data.update(version=__version__, torch=torch.__version__)
    if not args.render:
        torch.set_num_threads(1)
        done = {(r["budget"], r["init"], r["iters"]) for r in data["rows"]}
        todo = [run for run in RUNS if run not in done]
        model = Shipped(args.n, args.seed) if todo else None
        for budget, init, iters in todo:
            log(f"{init} towards {budget:.0%}, {iters} iterations")
            data["rows"].append(measure(model, budget, init, iters, args.n, args.seed))
            write_json(JSON, data)
            render(data)
    render(data)


if __name__ == "__main__":
    main()
