"""Diff-Pruning as a compiler pass against Torch-Pruning's Taylor pruning (issue 5).

    .venv/bin/pip install -e '.[bench]'     # torch-pruning, for the comparison only
    python benchmarks/channel_pruning.py --threads 2    # ~45 min on 2 cores

1. Side by side at the same channel ratio (--ratio, 0.3), on (a) the google/ddpm-cifar10-32
   architecture with random weights and random images (structure only), and (b) the shipped model:
   our `prune` (Taylor, uniform) against Torch-Pruning's `MagnitudePruner` with `TaylorImportance`
   driven exactly as Diff-Pruning's `ddpm_prune.py` drives it (gradients accumulated over
   timesteps t = 0, 1, ... on the same batch and noise, the same 0.05 stop, conv_out ignored),
   with and without `round_to` = the GroupNorm group count. Params and MACs (our cost model on a
   re-trace), wall time, GroupNorm validity, whether the caller's model is left untouched, save ->
   load, and ONNX export -> onnxruntime against eager.
2. Quality on the shipped model near 70% and 50% kept MACs: ours (Taylor, uniform) against
   Torch-Pruning (Taylor) pruned to the nearest MACs it can reach, both fine-tuned with the same
   `dgo_compile.finetune` budget; ORT CPU latency of one call at batch 8 beside the unpruned model,
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
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import (RESULTS, STARTED, first_line, log, model_configs, quality, read_json, run_finetune,
                    write_json)
from tp_adapter import accumulate_gradients, pruning_record, tp_cut, tp_from_gradients, tp_pruner

from dgo_compile import __version__, load, trace
from dgo_compile.channel_pruning import (PruneConfig, apply_pruning, calibration_images, importance, plan_channels,
                                         prune, select)
from dgo_compile.cost import cost_report
from dgo_compile.data import real_digit_sample
from dgo_compile.export import export_onnx
from dgo_compile.finetune import FinetuneConfig
from dgo_compile.loading import save_denoiser
from dgo_compile.metrics import classifier_features, load_digit_classifier
from dgo_compile.folding import fold
from dgo_compile.sampling import denoiser_timesteps, initial_noise, sample_ddim
from dgo_compile.schedule import builtin_for
from dgo_compile.schedule_cost import ScheduleCost

READING_MARKER = "<!-- reading: kept by benchmarks/channel_pruning.py on rewrite -->"
SEARCH_RATIOS = (0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)  # our uniform ratios tried with magnitude (MACs only)
GLOBAL_RATIOS = (0.15, 0.2, 0.22, 0.25, 0.28, 0.3, 0.32, 0.33, 0.34, 0.36, 0.4, 0.45, 0.5)  # our global ratios, with our Taylor scores
SAME_LEVEL = 0.05  # a later --scopes entry is skipped when it lands this near an earlier one's kept MACs
LOSS_BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))  # timestep bands of the denoising-loss breakdown
TP_LOCAL_RATIOS = (0.02, 0.1, 0.25, 0.3)  # Torch-Pruning local (per layer) ratios tried for the MACs match
TP_GLOBAL_RATIOS = (0.3, 0.35, 0.375, 0.4, 0.4125, 0.425, 0.4375, 0.45, 0.4625, 0.475, 0.4875, 0.5, 0.5125, 0.525,
                    0.55)  # and global ones (Taylor scores ranked model-wide)
TP_LOCAL_SLACK = 0.1  # also run Torch-Pruning's local mode (Diff-Pruning's) when it lands this near our MACs


# --------------------------------------------------------------------------- checks shared by both sides

def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def groupnorms_divisible(model: nn.Module) -> bool:
    return all(m.num_channels % m.num_groups == 0 for m in model.modules() if isinstance(m, nn.GroupNorm))


def groups_kept_equal(loaded, keep: dict[int, torch.Tensor]) -> bool:
    """Ours: every original GroupNorm group kept the same number of channels (from the plan's slices)."""
    _, plan = plan_channels(loaded)
    norms = {name: m for name, m in loaded.model.named_modules() if isinstance(m, nn.GroupNorm)}
    masks = {name: torch.zeros(m.num_channels, dtype=torch.bool) for name, m in norms.items()}
    covered = {name: torch.zeros(m.num_channels, dtype=torch.bool) for name, m in norms.items()}
    for group in plan.groups:
        for s in group.slices:
            owner, leaf = s.param.rsplit(".", 1)
            if owner in norms and leaf == "weight" and s.axis == 0:
                kept = keep.get(group.id, torch.arange(group.size))
                covered[owner][s.start:s.start + group.size] = True
                masks[owner][kept + s.start] = True
    for name, m in norms.items():
        mask = torch.where(covered[name], masks[name], torch.ones_like(masks[name]))
        counts = mask.view(m.num_groups, -1).sum(1)
        if not bool((counts == counts[0]).all()):
            return False
    return True


def cost_of(model: nn.Module):
    return cost_report(trace(model, verify=False)).total


def onnx_parity(model: nn.Module, folder: Path) -> dict:
    """Export the traced graph, run it on onnxruntime (CPU, 1 thread) and compare with eager."""
    import onnxruntime as ort

    try:
        traced = trace(model, verify=False)
        inputs = traced.example_inputs(2, seed=3)
        path = folder / "model.onnx"
        export_onnx(traced.graph_module, inputs, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        with torch.no_grad():
            want = traced.family.adapter(model)(*inputs.values())
        return {"ok": True, "max_abs_diff": float(np.abs(got - want.numpy()).max()),
                "max_abs_output": float(want.abs().max())}
    except Exception as exc:  # a result, not a crash of the benchmark
        return {"ok": False, "error": first_line(exc)}


def ours_piece(loaded, images: torch.Tensor | None, config: PruneConfig, work: Path, folder: Path, before) -> dict:
    """Our `prune`, timed, with its checks; the pruned model saved in `folder` (reused when there)."""
    meta_file = folder / "bench_meta.json"
    if not meta_file.is_file():
        log(f"ours: prune ratio {config.ratio} ({config.importance}, batch {config.batch}, "
            f"at most {config.max_timesteps} timesteps)")
        user = snapshot(loaded.model)
        started = time.perf_counter()
        try:
            pruned = prune(loaded, config, images)
        except Exception as exc:  # a result: recorded, not worked around
            return {"seconds": time.perf_counter() - started, "error": first_line(exc),
                    "unmodified": same_state(user, snapshot(loaded.model))}
        seconds = time.perf_counter() - started
        unmodified = same_state(user, snapshot(loaded.model))
        after = cost_of(pruned.model)
        pruned.pruning["params"] = {"before": before.params, "after": after.params}
        pruned.pruning["macs"] = {"before": before.macs, "after": after.macs}
        tmp = folder.with_name(folder.name + ".saving")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_denoiser(loaded, pruned.model, tmp, pruned.pruning)
        round_trip = same_state(snapshot(pruned.model), snapshot(load(tmp).model))
        try:
            with torch.no_grad():
                traced = trace(pruned.model)  # re-trace, checked against eager
                traced(*traced.example_inputs(2).values())
            runs = True
        except Exception:
            runs = False
        meta = {"seconds": seconds, "timesteps": len(pruned.taylor_losses), "taylor_losses": list(pruned.taylor_losses),
                "params": after.params, "macs": after.macs, "unmodified": unmodified, "round_trip": round_trip,
                "runs": runs, "groupnorm_divisible": groupnorms_divisible(pruned.model),
                "groups_equal": groups_kept_equal(loaded, pruned.keep),
                "onnx": onnx_parity(pruned.model, work / f"onnx_{folder.name}")}
        write_json(tmp / "bench_meta.json", meta)
        os.replace(tmp, folder)
    return read_json(meta_file)


# --------------------------------------------------------------------------- section 1

def side_by_side(label: str, key: str, loaded, images: torch.Tensor, config: PruneConfig, work: Path,
                 ours_folder: Path) -> tuple[list[dict], dict]:
    """Rows for one model; returns (rows, Torch-Pruning gradients and their cost for reuse)."""
    rows = []
    before = cost_of(loaded.model)
    rows.append({"model": label, "method": "unpruned", "params": before.params, "macs": before.macs})
    groups = loaded.model.config.norm_num_groups

    method = f"ours (Taylor, uniform, ratio {config.ratio})"
    meta = ours_piece(loaded, images, config, work, ours_folder, before)
    if "error" in meta:
        rows.append({"model": label, "method": method, **meta})
        log(f"{label}: ours fails: {meta['error']}")
    else:
        rows.append({"model": label, "method": method, **meta,
                     "save_load": "exact" if meta["round_trip"] else "differs",
                     "groupnorm": ("valid, equal per group" if meta["groups_equal"] else "valid, unequal groups")
                     if meta["groupnorm_divisible"] else "invalid"})
        log(f"{label}: ours {meta['seconds']:.0f} s, {meta['timesteps']} timesteps, MACs kept "
            f"{meta['macs'] / before.macs:.1%}")

    # Torch-Pruning, in place on the caller's model, as ddpm_prune.py does
    tp_meta_file = work / f"tp_{key}_meta.json"
    grads_file = work / f"tp_{key}_grads.pt"
    if not tp_meta_file.is_file() or not grads_file.is_file():
        log(f"{label}: Torch-Pruning, ratio {config.ratio}, local, no round_to (Diff-Pruning's script)")
        user_model = copy.deepcopy(loaded.model).requires_grad_(True)  # as from_pretrained hands it over
        user = snapshot(user_model)
        started = time.perf_counter()
        pruner = tp_pruner(user_model, config.ratio, None, False)
        user_model.zero_grad()
        losses = accumulate_gradients(user_model, images, config, loaded.scheduler_config)
        gradient_seconds = time.perf_counter() - started
        grads = {n: p.grad.detach().clone() for n, p in user_model.named_parameters() if p.grad is not None}
        error = None
        try:
            tp_cut(pruner, user_model)
        except Exception as exc:
            error = first_line(exc)
        seconds = time.perf_counter() - started
        unmodified = same_state(user, snapshot(user_model))
        tp_meta = {"gradient_seconds": gradient_seconds, "timesteps": len(losses), "taylor_losses": losses,
                   "main": tp_checks(loaded, user_model if error is None else None, seconds, error, unmodified,
                                     work / f"tp_{key}_main")}
        round_to_model, extra, error = tp_from_gradients(loaded.model, grads, config.ratio, round_to=groups)
        tp_meta["round_to"] = tp_checks(loaded, round_to_model, gradient_seconds + extra, error, False,
                                        work / f"tp_{key}_round_to")
        torch.save(grads, grads_file)
        write_json(tp_meta_file, tp_meta)
    tp_meta = read_json(tp_meta_file)
    for key, name in (("main", f"Torch-Pruning (Taylor, local, ratio {config.ratio}, no round_to)"),
                      ("round_to", f"Torch-Pruning (Taylor, local, ratio {config.ratio}, round_to={groups})")):
        rows.append({"model": label, "method": name, "timesteps": tp_meta["timesteps"], **tp_meta[key]})
        log(f"{label}: {name}: {tp_meta[key].get('error') or 'ok'}, MACs {tp_meta[key].get('macs')}")
    return rows, {"grads": torch.load(grads_file), "seconds": tp_meta["gradient_seconds"],
                  "timesteps": tp_meta["timesteps"]}


def tp_checks(loaded, model: nn.Module | None, seconds: float, error: str | None, unmodified: bool,
              folder: Path) -> dict:
    row = {"seconds": seconds, "unmodified": unmodified, "error": error}
    if model is None:
        return row
    from diffusers import UNet2DModel

    try:
        with torch.no_grad():
            model(torch.randn(2, model.config.in_channels, model.config.sample_size, model.config.sample_size),
                  torch.full((2,), 10)).sample
        row["runs"] = True
    except Exception as exc:
        row["runs"] = False
        row["run_error"] = first_line(exc)
    row["groupnorm_divisible"] = groupnorms_divisible(model)
    # diffusers' AttnProcessor2_0 calls SDPA without a scale: 1/sqrt(the current head size)
    row["attention_head_dims"] = {
        name: [loaded.model.get_submodule(name).to_q.out_features // m.heads, m.to_q.out_features // m.heads]
        for name, m in model.named_modules() if type(m).__name__ == "Attention"
        and m.to_q.out_features != loaded.model.get_submodule(name).to_q.out_features}
    row["groupnorm"] = ("valid" if row["groupnorm_divisible"] else "invalid") + (
        ", runs" if row["runs"] else ", does not run")
    try:
        after = cost_of(model)
        row["params"], row["macs"] = after.params, after.macs
    except Exception as exc:
        row["trace_error"] = first_line(exc)
        row["params"] = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            model.save_pretrained(tmp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                again = UNet2DModel.from_pretrained(tmp)
            row["save_load"] = "exact" if same_state(snapshot(model), snapshot(again)) else \
                "loads, but weights differ"
    except Exception as exc:
        row["save_load"] = f"from_pretrained fails: {first_line(exc)}"
    row["onnx"] = onnx_parity(model, folder) if row["runs"] else {"ok": False, "error": "model does not run"}
    return row


# --------------------------------------------------------------------------- section 2 helpers

def minimum_suffix(minimum: int) -> str:
    """Work-folder suffix of our cuts by GroupNorm minimum (none for 1: the cut before that option)."""
    return "" if minimum == 1 else f"_g{minimum}"


def search_ours(loaded, work: Path, base_macs: int, minimum: int) -> dict[str, float]:
    """Kept MACs of our uniform cut per ratio: independent of the importance, so magnitude finds it fast."""
    file = work / f"ours_ratio_search{minimum_suffix(minimum)}.json"
    found = read_json(file) or {}
    for ratio in SEARCH_RATIOS:
        if str(ratio) not in found:
            pruned = prune(loaded, PruneConfig(ratio=ratio, importance="magnitude", min_group_channels=minimum))
            found[str(ratio)] = cost_of(pruned.model).macs / base_macs
            write_json(file, found)
            log(f"search: ours ratio {ratio} keeps {found[str(ratio)]:.1%} of the MACs")
    return {float(k): v for k, v in found.items()}


def search_tp(loaded, grads: dict, work: Path, base_macs: int) -> dict[str, float]:
    """Kept MACs of Torch-Pruning per (mode, ratio) with the shared Taylor gradients."""
    file = work / "tp_ratio_search.json"
    found = read_json(file) or {}
    for mode, ratios in (("local", TP_LOCAL_RATIOS), ("global", TP_GLOBAL_RATIOS)):
        for ratio in ratios:
            key = f"{mode}:{ratio}"
            if key not in found:
                model, _, error = tp_from_gradients(loaded.model, grads, ratio, global_pruning=mode == "global")
                found[key] = None if error else cost_of(model).macs / base_macs
                write_json(file, found)
                log(f"search: Torch-Pruning {key} keeps {found[key]} of the MACs")
    return found


def search_ours_global(loaded, images: torch.Tensor, taylor: dict, work: Path, base_macs: int,
                       minimum: int) -> dict[float, float]:
    """Kept MACs of our global cut per ratio: it depends on the importance, so our Taylor scores are computed
    once (as `prune` computes them) and every ratio is selected and cut from them."""
    file = work / f"ours_global_search{minimum_suffix(minimum)}.json"
    found = read_json(file) or {}
    missing = [r for r in GLOBAL_RATIOS if str(r) not in found]
    if missing:
        log("search: our Taylor scores for the global cut")
        traced, plan = plan_channels(loaded)
        scores, _ = importance(traced, plan, PruneConfig(**taylor), images, loaded.scheduler_config)
        example = tuple(traced.example_inputs(1).values())
        for ratio in missing:
            keep = select(plan, scores, PruneConfig(ratio=ratio, scope="global", min_group_channels=minimum, **taylor))
            model, _ = apply_pruning(traced.model, plan, keep, lambda m: traced.family.adapter(m)(*example))
            found[str(ratio)] = cost_of(model).macs / base_macs
            write_json(file, found)
            log(f"search: ours global ratio {ratio} keeps {found[str(ratio)]:.1%} of the MACs")
    return {float(k): v for k, v in found.items()}


def loss_by_band(model: nn.Module, scheduler_config: dict, images: torch.Tensor, seed: int, batch: int) -> dict:
    """The denoising (epsilon) MSE per timestep band on one fixed batch, noise and timesteps: where a model with
    a fair average loss still fails. Errors at high t are amplified ~sqrt(1 - a)/sqrt(a) in the x0 estimate."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    generator = torch.Generator().manual_seed(seed)
    clean = images[torch.randperm(len(images), generator=generator)[:batch]]
    out = {}
    with torch.no_grad():
        for lo, hi in LOSS_BANDS:
            t = torch.randint(lo, hi, (len(clean),), generator=generator)
            noise = torch.randn(clean.shape, generator=generator)
            prediction = model(scheduler.add_noise(clean, noise, t), t).sample
            out[f"{lo}-{hi}"] = float(nn.functional.mse_loss(prediction, noise))
    return out


def tp_variants(keys: list[str], target: float, loaded, tp_grads: dict, tp_version: str, tag: str,
                work: Path) -> list[dict]:
    """Torch-Pruning cut at each (mode:ratio) key from the shared Taylor gradients, saved through our loader."""
    variants = []
    for key in keys:
        mode, tp_ratio = key.split(":")
        tp_folder = work / f"tp_shipped_{mode}{tp_ratio}_{tag}"
        if not tp_folder.is_dir():
            model, seconds, error = tp_from_gradients(loaded.model, tp_grads["grads"], float(tp_ratio),
                                                      global_pruning=mode == "global")
            if error is not None:
                raise RuntimeError(f"Torch-Pruning {key} worked in the search but now fails: {error}")
            record = pruning_record(loaded.model, model, f"torch-pruning {tp_version} {key}")
            tmp = tp_folder.with_name(tp_folder.name + ".saving")
            save_denoiser(loaded, model, tmp, record)
            exact = same_state(snapshot(model), snapshot(load(tmp).model))
            write_json(tmp / "bench_meta.json", {"seconds": tp_grads["seconds"] + seconds, "exact_reload": exact})
            os.replace(tmp, tp_folder)
        tp_meta = read_json(tp_folder / "bench_meta.json")
        variants.append({"target": target, "method": "Torch-Pruning",
                         "setting": f"Taylor, {mode}{' (as ddpm_prune.py)' if mode == 'local' else ''}, ratio {tp_ratio}",
                         "folder": str(tp_folder),
                         "prune_seconds": tp_meta["seconds"], "timesteps": tp_grads["timesteps"],
                         "persisted_exactly": tp_meta["exact_reload"]})
    return variants


def sample_images(model: nn.Module, scheduler_config: dict, noise: torch.Tensor, steps: int, file: Path,
                  schedule: str = "full") -> torch.Tensor:
    if file.is_file():
        return torch.load(file)
    traced = trace(model)
    plan = builtin_for(schedule, steps, traced)
    images = sample_ddim(fold(traced, plan, denoiser_timesteps(scheduler_config, steps)), scheduler_config,
                         noise, steps, 50)
    torch.save(images, file)
    return images


def ort_latency(models: dict[str, nn.Module], work: Path, batch: int, rounds: int) -> dict[str, float]:
    """Median seconds of one denoiser call at `batch` on onnxruntime CPU (1 thread), interleaved."""
    import onnxruntime as ort

    sessions, feeds = {}, {}
    for label, model in models.items():
        traced = trace(model, verify=False)
        path = work / "latency" / f"{label.replace(' ', '_').replace('%', '')}.onnx"
        if not path.is_file():
            export_onnx(traced.graph_module, traced.example_inputs(2), path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        sessions[label] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds[label] = {k: v.numpy() for k, v in traced.example_inputs(batch, seed=5).items()}
    times: dict[str, list[float]] = {label: [] for label in models}
    for label, session in sessions.items():  # warm-up
        session.run(None, feeds[label])
    for _ in range(rounds):
        for label, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feeds[label])
            times[label].append(time.perf_counter() - started)
    return {label: statistics.median(ts) for label, ts in times.items()}


def nearest(options: dict, target: float):
    return min((k for k, v in options.items() if v is not None), key=lambda k: abs(options[k] - target))


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep intermediate models here (default: temp)")
    parser.add_argument("--ratio", type=float, default=0.3, help="section 1: share of channels removed")
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
    cifar_config = PruneConfig(ratio=args.ratio, importance="taylor", threshold=args.threshold, batch=args.cifar_batch,
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
                                  PruneConfig(ratio=args.ratio, **taylor), args.work, ours_dir(args.ratio))
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
                meta = ours_piece(loaded, images, PruneConfig(ratio=ratio, scope=scope, min_group_channels=minimum, **taylor),
                                  args.work, folder, base)
                variants.append({"target": target, "method": "ours", "minimum": minimum,
                                 "setting": f"Taylor, {scope}, ratio {ratio}, GroupNorm groups keep >= {minimum}",
                                 "folder": str(folder), "prune_seconds": meta["seconds"], "timesteps": meta["timesteps"]})
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

    budget = FinetuneConfig(steps=args.finetune_steps, batch=args.finetune_batch)
    latency_models = {"unpruned": loaded.model}
    for v in variants:
        name = Path(v["folder"]).name
        model = load(v["folder"]).model
        cost = cost_of(model)
        v.update(params=cost.params, macs=cost.macs)
        v["before"] = quality(sample_images(model, config, noise, args.steps, samples / f"{name}.pt"), full_images,
                              classifier, real_features)
        clock = lap("section 2: sampling", clock)
        tuned = args.work / f"ft_{name}_s{budget.steps}_b{budget.batch}"
        log(f"fine-tune {v['method']} {v['setting']} ({budget.steps} steps, batch {budget.batch}, "
            f"{args.processes} processes)")
        record = run_finetune(v["folder"], budget, tuned, args.processes)
        v["finetune_seconds"] = record.seconds
        v["finetune_final_loss"] = record.final_loss
        clock = lap("section 2: fine-tuning", clock)
        tuned_model = load(tuned).model
        v["loss_by_band"] = loss_by_band(tuned_model, config, images, args.seed, args.band_batch)
        v["after"] = quality(sample_images(tuned_model, config, noise, args.steps, samples / f"ft_{name}_s{budget.steps}_"
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
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("work", "results")}
    report = {"dgo_compile": __version__, "torch": torch.__version__, "torch_pruning": tp_version,
              "settings": settings, "section1": section1,
              "section2": {"unpruned": {"params": base.params, "macs": base.macs, "latency_s": latency["unpruned"],
                                        **full_quality},
                           "ours_macs_by_ratio": levels[("uniform", args.min_group_channels[0])],
                           "ours_global_macs_by_ratio": levels.get(("global", args.min_group_channels[0]), {}),
                           "tp_macs_by_setting": tp_levels,
                           "finetune": {"steps": budget.steps, "batch": budget.batch, "lr": budget.lr,
                                        "ema_decay": budget.ema_decay},
                           "variants": variants},
              "section3": section3, "timings_s": timings, "total_s": total}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "channel_pruning.json", report)
    write_markdown(report, args.results / "channel_pruning.md")
    log(f"done in {total / 60:.1f} min")
    if temp is not None:
        temp.cleanup()


# --------------------------------------------------------------------------- report

def _m(x: float) -> str:
    return f"{x / 1e6:.2f} M"


def _g(x: float) -> str:
    return f"{x / 1e9:.3f} G" if x < 1e10 else f"{x / 1e9:.1f} G"


def _short(text: str, limit: int = 130) -> str:
    text = text.replace("Error(s) in loading state_dict for UNet2DModel: ", "").replace("|", "/")
    text = text.replace("pass 'channel_groups' failed: ", "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    lines = ["# Channel pruning: Diff-Pruning as a pass vs Torch-Pruning", "",
             f"Reproduce: `python benchmarks/channel_pruning.py` (dgo-compile {report['dgo_compile']}, torch "
             f"{report['torch']}, torch-pruning {report['torch_pruning']}, {s['threads']} thread(s), fine-tunes under "
             f"torchrun with {s.get('processes', 1)} process(es); "
             f"{report['total_s'] / 60:.0f} min in all).", "",
             f"## 1. Side by side at ratio {s['ratio']}", "",
             f"Both sides take Diff-Pruning's Taylor importance from gradients accumulated over t = 0, 1, ... on the "
             f"same batch and noise with the same stop (loss < {s['threshold']} x running max). Shipped model: batch "
             f"{s['taylor_batch']} of the shipped digits, at most {s['max_timesteps']} timesteps. CIFAR-10 architecture: "
             f"random weights, {s['cifar_batch']} random images, {s['cifar_timesteps']} timesteps (the loss of random "
             "weights never falls, so the stop never fires; structure only). Torch-Pruning runs as Diff-Pruning's "
             "`ddpm_prune.py` runs it (`MagnitudePruner`, `TaylorImportance()`, local ratio, conv_out ignored, in "
             "place on the caller's model), plus the Upsample/Downsample channel fix the script applies; the "
             "round_to row reuses the same accumulated gradients. MACs: our cost model on a re-trace, per call at "
             "batch 1. Wall time: importance (gradient accumulation) + cut (+ for ours the re-trace check).", "",
             "| model | method | params | MACs/call | wall time | timesteps | GroupNorm | caller's model untouched | "
             "save -> load | ONNX -> ORT max abs diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in report["section1"]:
        if r["method"] == "unpruned":
            base[r["model"]] = r
            lines.append(f"| {r['model']} | unpruned | {_m(r['params'])} | {_g(r['macs'])} | | | | | | |")
            continue
        b = base[r["model"]]
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | fails: {_short(r['error'])} | | {r['seconds']:.0f} s | | | "
                         f"{'yes' if r['unmodified'] else 'no'} | | |")
            continue
        params = f"{_m(r['params'])} ({r['params'] / b['params']:.1%})"
        macs = f"{_g(r['macs'])} ({r['macs'] / b['macs']:.1%})" if "macs" in r else f"not traceable: {_short(r['trace_error'])}"
        onnx = r["onnx"]
        onnx_text = f"{onnx['max_abs_diff']:.1e}" if onnx["ok"] else f"fails: {_short(onnx['error'])}"
        lines.append(f"| {r['model']} | {r['method']} | {params} | {macs} | {r['seconds']:.0f} s | "
                     f"{r.get('timesteps', '')} | {r['groupnorm']} | {'yes' if r['unmodified'] else 'no (pruned in place)'}"
                     f" | {_short(r['save_load'])} | {onnx_text} |")
    notes = []
    changed = {}
    for r in report["section1"]:  # the first (Diff-Pruning's settings) Torch-Pruning row of each model
        if r.get("attention_head_dims") and r["model"] not in changed:
            changed[r["model"]] = r["attention_head_dims"]
    for model, dims in changed.items():
        first = next(iter(dims.values()))
        notes.append(f"Torch-Pruning shrinks attention heads without rescaling the queries ({model}: head size "
                     f"{first[0]} -> {first[1]} in {len(dims)} attention(s)); diffusers calls SDPA without an explicit "
                     "scale, so the logits change from 1/sqrt(original) to 1/sqrt(new head size). Ours keeps the "
                     "original scale (it rescales the queries).")
    if report.get("section1_rerun"):
        notes.append(f"Note: {report['section1_rerun']}.")
    for note in notes:
        lines += ["", note]
    q = report["section2"]
    ft = q["finetune"]
    u = q["unpruned"]
    lines += ["", "## 2. Quality on the shipped model near 70% and 50% kept MACs", "",
              "Each side pruned to the kept MACs nearest the target that it can reach (ours: uniform ratio searched "
              "with magnitude, kept MACs per ratio "
              + ", ".join(f"{k}: {v:.1%}" for k, v in sorted(q["ours_macs_by_ratio"].items()))
              + ("; ours global (one ranking over all groups, our Taylor scores), kept MACs per ratio "
                 + ", ".join(f"{k}: {v:.1%}" for k, v in sorted(q["ours_global_macs_by_ratio"].items()))
                 if q.get("ours_global_macs_by_ratio") else "")
              + "; Torch-Pruning: local and global ratios with the shared Taylor gradients, the one nearest our kept "
              "MACs, plus its local mode (Diff-Pruning's) when that lands within "
              f"{TP_LOCAL_SLACK * 100:.0f} points of them: "
              + ", ".join(f"{k}: {v:.1%}" if v is not None else f"{k}: failed"
                          for k, v in sorted(q["tp_macs_by_setting"].items(),
                                             key=lambda kv: (kv[0].split(":")[0], float(kv[0].split(":")[1]))))
              + "). "
              f"Both fine-tuned by `dgo-compile finetune` (under torchrun with {s.get('processes', 1)} process(es)) "
              f"with the same budget: {ft['steps']} steps at batch "
              f"{ft['batch']}, lr {ft['lr']}, EMA {ft['ema_decay']} (Torch-Pruning's model goes through our loader via a "
              "`dgo_pruning.json` written from its module shapes, reloaded bit-exactly). Quality: DDIM "
              f"{s['steps']}, {s['n']} samples from noise seed {s['seed']}; PSNR / SSIM against the unpruned model's "
              f"images from the same noise, FD against {s['n']} real digits. Latency: onnxruntime CPU, 1 thread, one "
              f"denoiser call at batch {s['latency_batch']}, median of {s['latency_rounds']} interleaved runs.", "",
              "| target | method | setting | params | MACs/call | ORT latency (vs unpruned) | PSNR / SSIM / FD before "
              "fine-tune | PSNR / SSIM / FD after | prune time | fine-tune time |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| 100% | unpruned | | {_m(u['params'])} | {_g(u['macs'])} | {u['latency_s'] * 1e3:.1f} ms (1.00x) | "
              f"- / - / {u['fd']:.1f} | | | |"]
    for v in q["variants"]:
        b, a = v["before"], v["after"]
        lines.append(
            f"| {v['target']:.0%} | {v['method']} | {v['setting']} | {_m(v['params'])} ({v['params'] / u['params']:.1%}) "
            f"| {_g(v['macs'])} ({v['macs'] / u['macs']:.1%}) | {v['latency_s'] * 1e3:.1f} ms "
            f"({v['latency_s'] / u['latency_s']:.2f}x) | {b['psnr']:.1f} / {b['ssim']:.3f} / {b['fd']:.1f} | "
            f"{a['psnr']:.1f} / {a['ssim']:.3f} / {a['fd']:.1f} | {v['prune_seconds'] / 60:.1f} min "
            f"({v['timesteps']} timesteps) | {v['finetune_seconds'] / 60:.1f} min |")
    if "loss_by_band" in u:
        bands = list(u["loss_by_band"])
        lines += ["", f"Denoising loss (epsilon MSE) after fine-tuning, by timestep band, on one batch of "
                  f"{s.get('band_batch', '')} shipped digits with fixed noise and timesteps (the same for every model):",
                  "", "| method | setting | MACs/call | " + " | ".join(f"t {b}" for b in bands) + " | final training loss |",
                  "|---|---|---|" + "---|" * len(bands) + "---|",
                  "| unpruned | | 100% | " + " | ".join(f"{u['loss_by_band'][b]:.4f}" for b in bands) + " | |"]
        for v in q["variants"]:
            lines.append(f"| {v['method']} | {v['setting']} | {v['macs'] / u['macs']:.1%} | "
                         + " | ".join(f"{v['loss_by_band'][b]:.4f}" for b in bands)
                         + f" | {v['finetune_final_loss']:.4f} |")
    if report["section3"]:
        lines += ["", "## 3. Width + time (the time half is DeepCache, not a learned schedule)", "",
                  "Total MACs of a DDIM-" + str(s["steps"]) + " run relative to the unpruned model's full run "
                  "(timestep-only work excluded, as the folded artifact runs it). Same noise and metrics as section 2.",
                  "", "| model, schedule | kept MACs per run | PSNR | SSIM | FD |", "|---|---|---|---|---|"]
        for r in report["section3"]:
            lines.append(f"| {r['label']} | {r['kept_macs']:.1%} | {r['psnr']:.1f} | {r['ssim']:.3f} | {r['fd']:.1f} |")
    lines += ["", "Timings (wall, this run; pieces reused from --work count 0): "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report["timings_s"].items()) + "."]
    kept = ""
    if path.is_file() and READING_MARKER in path.read_text():
        kept = path.read_text().split(READING_MARKER, 1)[1]
    path.write_text("\n".join(lines) + "\n\n" + READING_MARKER + kept.rstrip() + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
