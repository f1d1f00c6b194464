"""Diff-Pruning as a compiler pass against Torch-Pruning's Taylor pruning (issue 5).

    .venv/bin/pip install -e '.[bench]'     # torch-pruning, for the comparison only
    python benchmarks/channel_pruning.py --threads 2    # ~45 min on 2 cores

1. Side by side at the same channel ratio (--channel-ratio, 0.3), on (a) the google/ddpm-cifar10-32
   architecture with random weights and random images (structure only), and (b) the shipped model:
   our `prune` (Taylor, uniform) against Torch-Pruning's `MagnitudePruner` with `TaylorImportance`
   driven exactly as Diff-Pruning's `ddpm_prune.py` drives it (gradients accumulated over
   timesteps t = 0, 1, ... on the same batch and noise, the same 0.05 stop, conv_out ignored),
   with and without `round_to` = the GroupNorm group count. Params and MACs (our cost model on a
   re-trace), wall time, GroupNorm validity, whether the caller's model is left untouched, save ->
   load, and ONNX export -> onnxruntime against eager.
2. Quality on the shipped model near 70% and 50% kept MACs: ours (Taylor, uniform) against
   Torch-Pruning (Taylor) pruned to the nearest MACs it can reach, both fine-tuned with the same
   `dgo_compile.channels.finetune` budget; ORT CPU latency of one call at batch 8 beside the unpruned model,
   and PSNR / SSIM against the unpruned model's images from the same noise and the Frechet distance
   against real digits, before and after fine-tuning (DDIM 50, N samples from noise seed 20000).
3. Width + time: the ~50% pruned and fine-tuned model with DeepCache (`deepcache:2`) against the
   unpruned model with `steps:K` / `deepcache:N` at the same total MACs.

Finished pieces (pruned and fine-tuned models, gradients, samples) are kept in --work and reused
by a rerun with the same settings. Writes results/channel_pruning.{json,md}; text after the
READING_MARKER line of an existing .md (the human reading of the numbers) is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from channel_pruning_report import write_markdown
from channel_pruning_steps import (
    SAME_LEVEL,
    TP_LOCAL_SLACK,
    loss_by_band,
    minimum_suffix,
    ort_latency,
    ours_piece,
    search_ours,
    search_ours_global,
    search_tp,
    side_by_side,
    tp_variants,
)
from common import RESULTS, STARTED, cost_of, log, model_configs, quality, run_finetune, sample_images, write_json

from dgo_compile import __version__, load, trace
from dgo_compile.backend.sampling import initial_noise
from dgo_compile.channels.channel_pruning import (
    PruneConfig,
    calibration_images,
)
from dgo_compile.channels.data import real_digit_sample
from dgo_compile.channels.finetune import FinetuneConfig
from dgo_compile.core.metrics import classifier_features, load_digit_classifier
from dgo_compile.schedules.schedule import builtin_for
from dgo_compile.schedules.schedule_cost import ScheduleCost


def nearest(options: dict, target: float):
    return min((k for k, v in options.items() if v is not None), key=lambda k: abs(options[k] - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep intermediate models here (default: temp)")
    parser.add_argument("--channel-ratio", dest="ratio", type=float, default=0.3,
                        help="section 1: share of channels removed")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5], help="section 2: kept-MACs targets")
    parser.add_argument("--taylor-batch", type=int, default=8)
    parser.add_argument("--max-timesteps", type=int, default=1000)
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--cifar-batch", type=int, default=2, help="Taylor batch on the random-weight CIFAR model")
    parser.add_argument("--cifar-timesteps", type=int, default=4,
                        help="timesteps on the random-weight CIFAR model (its loss never falls: no stop)")
    parser.add_argument("--finetune-steps", type=int, default=600,
                        help="~11%% of the shipped model's training samples at batch 32 (Diff-Pruning: 10-20%%)")
    parser.add_argument("--finetune-batch", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes for each fine-tune")
    parser.add_argument("--min-group-channels", type=int, nargs="+", default=[2, 1],
                        help="section 2: our cuts with each GroupNorm minimum (2: the default; 1: the ablation)")
    parser.add_argument("--ablation-targets", type=float, nargs="+", default=[0.7],
                        help="targets where the later --min-group-channels run (global scope)")
    parser.add_argument("--scopes", nargs="+", default=["global", "uniform"], choices=["uniform", "global"],
                        help="section 2: our cuts, in order (global: ratios searched with our Taylor scores); a "
                             "later one landing within 5 points of an earlier one's kept MACs is skipped")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps for the quality samples")
    parser.add_argument("-n", type=int, default=100, help="evaluation samples")
    parser.add_argument("--seed", type=int, default=20_000, help="evaluation noise seed")
    parser.add_argument("--band-batch", type=int, default=256, help="images in the loss-by-timestep breakdown")
    parser.add_argument("--latency-batch", type=int, default=8)
    parser.add_argument("--latency-rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-width-time", action="store_true", help="skip section 3")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .json/.md go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from importlib.metadata import PackageNotFoundError, version

    try:
        tp_version = version("torch-pruning")
    except PackageNotFoundError:
        sys.exit("this benchmark compares with Torch-Pruning: pip install -e '.[bench]'")
    temp = None
    if args.work is None:
        temp = tempfile.TemporaryDirectory(prefix="channel_pruning_")
        args.work = Path(temp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - since
        return time.perf_counter()

    # ---- section 1a: the CIFAR-10 DDPM architecture, random weights
    clock = time.perf_counter()
    DDPM_CIFAR10_UNET = model_configs().DDPM_CIFAR10_UNET

    cifar_dir = args.work / "cifar"
    cifar_dir.mkdir(exist_ok=True)
    (cifar_dir / "config.json").write_text(json.dumps(DDPM_CIFAR10_UNET, indent=1))
    torch.manual_seed(0)
    cifar = load(cifar_dir / "config.json")
    cifar_images = torch.rand((args.cifar_batch, 3, 32, 32), generator=torch.Generator().manual_seed(1)) * 2 - 1
    cifar_config = PruneConfig(channel_ratio=args.ratio, importance="taylor", threshold=args.threshold,
                               batch=args.cifar_batch,
                               max_timesteps=args.cifar_timesteps)
    cifar_tag = f"cifar_r{args.ratio}_b{args.cifar_batch}_t{args.cifar_timesteps}"
    section1, _ = side_by_side("ddpm-cifar10-32 (random weights)", cifar_tag, cifar, cifar_images, cifar_config,
                               args.work, args.work / f"ours_{cifar_tag}")
    del cifar
    clock = lap("section 1a (CIFAR-10 architecture)", clock)

    # ---- section 1b: the shipped model
    loaded = load()
    images = calibration_images(loaded)
    taylor = dict(importance="taylor", threshold=args.threshold, batch=args.taylor_batch,
                  max_timesteps=args.max_timesteps)
    tag = f"b{args.taylor_batch}_t{args.max_timesteps}_thr{args.threshold}"
    ours_dirs: dict[tuple, Path] = {}
    default_minimum = PruneConfig().min_group_channels

    def ours_dir(ratio: float, scope: str = "uniform", minimum: int = default_minimum) -> Path:
        prefix = "ours_shipped" if scope == "uniform" else f"ours_shipped_{scope}"
        return ours_dirs.setdefault((ratio, scope, minimum),
                                    args.work / f"{prefix}_r{ratio}_{tag}{minimum_suffix(minimum)}")

    rows, tp_grads = side_by_side("shipped MNIST model", f"shipped_r{args.ratio}_{tag}", loaded, images,
                                  PruneConfig(channel_ratio=args.ratio, **taylor), args.work, ours_dir(args.ratio))
    section1 += rows
    clock = lap("section 1b (shipped model)", clock)

    # ---- section 2: quality near the kept-MACs targets
    base = cost_of(loaded.model)
    tp_levels = search_tp(loaded, tp_grads["grads"], args.work, base.macs)
    levels = {}
    for minimum in args.min_group_channels:
        levels[("uniform", minimum)] = search_ours(loaded, args.work, base.macs, minimum)
        if "global" in args.scopes:
            levels[("global", minimum)] = search_ours_global(loaded, images, taylor, args.work, base.macs, minimum)
    clock = lap("section 2: MACs search (magnitude for our uniform cut, Taylor for our global cut and Torch-Pruning)",
                clock)
    variants = []  # (target, label, folder, meta)
    for target in args.targets:
        tp_done: set[str] = set()
        for minimum in args.min_group_channels:
            ablation = minimum != args.min_group_channels[0]
            if ablation and target not in args.ablation_targets:
                continue
            reached: list[float] = []
            for scope in (["global"] if ablation else args.scopes):
                ratio = nearest(levels[(scope, minimum)], target)
                if any(abs(levels[(scope, minimum)][ratio] - r) < SAME_LEVEL for r in reached):
                    continue  # an earlier scope already lands about here
                reached.append(levels[(scope, minimum)][ratio])
                folder = ours_dir(ratio, scope, minimum)
                meta = ours_piece(loaded, images, PruneConfig(channel_ratio=ratio, scope=scope,
                                                              min_group_channels=minimum, **taylor),
                                  args.work, folder, base)
                variants.append({"target": target, "method": "ours", "minimum": minimum,
                                 "setting": f"Taylor, {scope}, ratio {ratio}, GroupNorm groups keep >= {minimum}",
                                 "folder": str(folder), "prune_seconds": meta["seconds"],
                                 "timesteps": meta["timesteps"]})
                achieved = meta["macs"] / base.macs
                keys = [nearest(tp_levels, achieved)]
                local = nearest({k: v for k, v in tp_levels.items() if k.startswith("local:")}, achieved)
                if local != keys[0] and abs(tp_levels[local] - achieved) <= TP_LOCAL_SLACK:
                    keys.append(local)  # Diff-Pruning's own mode too, when it comes near
                keys = [k for k in keys if k not in tp_done]
                tp_done.update(keys)
                variants += tp_variants(keys, target, loaded, tp_grads, tp_version, tag, args.work)
    clock = lap("section 2: pruning", clock)

    classifier = load_digit_classifier()
    real_features = classifier_features(real_digit_sample(args.n, args.seed), classifier)
    noise = initial_noise(args.n, (1, 32, 32), args.seed)
    samples = args.work / f"samples_n{args.n}_s{args.seed}_ddim{args.steps}"
    samples.mkdir(exist_ok=True)
    config = loaded.scheduler_config
    full_images = sample_images(loaded.model, config, noise, args.steps, samples / "full.pt")
    full_quality = quality(full_images, full_images, classifier, real_features)
    full_quality["loss_by_band"] = loss_by_band(loaded.model, config, images, args.seed, args.band_batch)
    log(f"full model: FD {full_quality['fd']:.1f}")
    clock = lap("section 2: sampling", clock)

    budget = FinetuneConfig(train_steps=args.finetune_steps, batch=args.finetune_batch)
    latency_models = {"unpruned": loaded.model}
    for v in variants:
        name = Path(v["folder"]).name
        model = load(v["folder"]).model
        cost = cost_of(model)
        v.update(params=cost.params, macs=cost.macs)
        v["before"] = quality(sample_images(model, config, noise, args.steps, samples / f"{name}.pt"), full_images,
                              classifier, real_features)
        clock = lap("section 2: sampling", clock)
        tuned = args.work / f"ft_{name}_s{budget.train_steps}_b{budget.batch}"
        log(f"fine-tune {v['method']} {v['setting']} ({budget.train_steps} steps, batch {budget.batch}, "
            f"{args.processes} processes)")
        record = run_finetune(v["folder"], budget, tuned, args.processes)
        v["finetune_seconds"] = record.seconds
        v["finetune_final_loss"] = record.final_loss
        clock = lap("section 2: fine-tuning", clock)
        tuned_model = load(tuned).model
        v["loss_by_band"] = loss_by_band(tuned_model, config, images, args.seed, args.band_batch)
        v["after"] = quality(sample_images(tuned_model, config, noise, args.steps,
                                           samples / f"ft_{name}_s{budget.train_steps}_"
                                           f"b{budget.batch}.pt"), full_images, classifier, real_features)
        v["tuned_folder"] = str(tuned)
        latency_models[name] = tuned_model
        clock = lap("section 2: sampling", clock)
        log(f"{v['method']} {v['setting']}: MACs {cost.macs / base.macs:.1%}, before {v['before']}, after {v['after']}")
    log("ORT latency")
    latency = ort_latency(latency_models, args.work, args.latency_batch, args.latency_rounds)
    for v in variants:
        v["latency_s"] = latency[Path(v["folder"]).name]
    clock = lap("section 2: ORT latency", clock)

    # ---- section 3: width + time
    section3 = []
    if not args.no_width_time:
        half = min((v for v in variants if v["method"] == "ours" and v["minimum"] == args.min_group_channels[0]),
                   key=lambda v: abs(v["macs"] / base.macs - 0.5))
        pruned_model = load(half["tuned_folder"]).model
        full_traced = trace(loaded.model)
        full_cost = ScheduleCost(full_traced, "unit")  # prices block and unit (deepcache) schedules
        pruned_cost = ScheduleCost(trace(pruned_model), "unit")
        dc2 = builtin_for("deepcache:2", args.steps, full_traced)
        kept = pruned_cost.kept_ratio(dc2) * pruned_cost.full_macs / full_cost.full_macs
        k = min(range(1, args.steps + 1),
                key=lambda k: abs(full_cost.kept_ratio(builtin_for(f"steps:{k}", args.steps, full_traced)) - kept))
        branches = 3 * sum(b.name.startswith("down_blocks.") for b in full_traced.blocks)
        specs = [f"deepcache:{n}:{b}" for n in range(2, args.steps + 1) for b in range(branches)]
        dc = min(specs, key=lambda s: abs(full_cost.kept_ratio(builtin_for(s, args.steps, full_traced)) - kept))
        name = Path(half["tuned_folder"]).name
        entries = [(f"ours {half['target']:.0%} pruned + fine-tuned, deepcache:2", pruned_model, "deepcache:2", kept,
                    samples / f"{name}_deepcache2.pt")]
        for spec in (f"steps:{k}", dc):
            entries.append((f"unpruned, {spec}", loaded.model, spec,
                            full_cost.kept_ratio(builtin_for(spec, args.steps, full_traced)),
                            samples / f"full_{spec.replace(':', '')}.pt"))
        entries.append((f"ours {half['target']:.0%} pruned + fine-tuned, full", pruned_model, "full",
                        pruned_cost.full_macs / full_cost.full_macs, None))
        for label, model, spec, ratio, file in entries:
            images_ = sample_images(model, config, noise, args.steps, file, spec) if file else None
            q = half["after"] if file is None else quality(images_, full_images, classifier, real_features)
            section3.append({"label": label, "schedule": spec, "kept_macs": ratio, **q})
            log(f"width+time: {label}: {ratio:.1%} {q}")
        clock = lap("section 3 (width + time)", clock)

    total = time.perf_counter() - STARTED
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("work",
                                                                                                      "results")}
    report = {"dgo_compile": __version__, "torch": torch.__version__, "torch_pruning": tp_version,
              "settings": settings, "section1": section1,
              "section2": {"unpruned": {"params": base.params, "macs": base.macs, "latency_s": latency["unpruned"],
                                        **full_quality},
                           "ours_macs_by_ratio": levels[("uniform", args.min_group_channels[0])],
                           "ours_global_macs_by_ratio": levels.get(("global", args.min_group_channels[0]), {}),
                           "tp_macs_by_setting": tp_levels,
                           "finetune": {"steps": budget.train_steps, "batch": budget.batch, "lr": budget.lr,
                                        "ema_decay": budget.ema_decay},
                           "variants": variants},
              "section3": section3, "timings_s": timings, "total_s": total}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "channel_pruning.json", report)
    write_markdown(report, args.results / "channel_pruning.md")
    log(f"done in {total / 60:.1f} min")
    if temp is not None:
        temp.cleanup()


if __name__ == "__main__":
    main()
