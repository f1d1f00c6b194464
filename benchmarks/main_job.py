"""Which closed-form schedule the main job (examples/dgo.toml) compiles: SSIM / PSNR against the
original model with report.md's own metric and noise, for candidate `steps:K` / `deepcache:N[:b]` / schedule JSON files.

    python benchmarks/main_job.py -n 64 steps:23 steps:22 steps:21 steps:20   # ~2 min per schedule on 2 cores

The noise, class labels (0-9 cycled) and seed are `compile --config`'s verify stage's (VERIFY_SEED), so the
first 16 images are exactly report.md's; the folded PyTorch graphs stand in for the artifact (parity
~1e-6). Prints one JSON line per schedule: kept MACs, mean SSIM / PSNR on the first 16, the first 32 and all n.
"""

from __future__ import annotations

import argparse
import json

import torch

from dgo_compile import load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import conditions_for, denoiser_timesteps, initial_noise, sample
from dgo_compile.core.metrics import psnr, ssim
from dgo_compile.driver.pipeline import VERIFY_SEED
from dgo_compile.schedules.schedule import Schedule, builtin_for
from dgo_compile.schedules.schedule_cost import ScheduleCost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schedules", nargs="+")
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load()
    traced = trace(loaded)
    timesteps = denoiser_timesteps(loaded.scheduler_config, args.steps, None)
    noise = initial_noise(args.n, tuple(traced.example_inputs(1)["sample"].shape[1:]), VERIFY_SEED)
    labels = list(range(10)) if "class_labels" in traced.input_names else None
    conditions, guidance = conditions_for(traced.input_names, args.n, labels, None, None,
                                          traced.family.null_class_label(loaded.model))
    run = dict(conditions=conditions, guidance=guidance, seed=VERIFY_SEED)
    reference = sample(traced, loaded.scheduler_config, noise, args.steps, **run)
    cost = ScheduleCost(traced, "unit")  # prices block and unit (deepcache) schedules
    for spec in args.schedules:
        plan = Schedule.load(spec) if spec.endswith(".json") else builtin_for(spec, len(timesteps), traced)
        images = sample(fold(traced, plan, timesteps), loaded.scheduler_config, noise, args.steps, **run)
        s, p = ssim(images, reference), psnr(images, reference).clamp(max=100)
        row = {"schedule": spec, "kept_macs": round(cost.kept_ratio(cost.close(plan)), 4)}
        for first in sorted({k for k in (16, 32, args.n) if k <= args.n}):  # report.md's 16 or 32, and all
            row |= {f"ssim_{first}": round(float(s[:first].mean()), 4),
                    f"psnr_{first}": round(float(p[:first].mean()), 2)}
        print(json.dumps({**row, f"ssim_min_{args.n}": round(float(s.min()), 3)}), flush=True)


if __name__ == "__main__":
    main()
