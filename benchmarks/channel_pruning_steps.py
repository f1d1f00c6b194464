"""The pieces of benchmarks/channel_pruning.py: checks shared by both sides, the side-by-side and search
steps, sampling and latency. A helper module, not a script."""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import cost_of, first_line, log, read_json, write_json
from torch import nn
from tp_adapter import accumulate_gradients, pruning_record, tp_cut, tp_from_gradients, tp_pruner

from dgo_compile import load, trace
from dgo_compile.backend.export import export_onnx
from dgo_compile.channels.channel_pruning import (
    PruneConfig,
    apply_pruning,
    importance,
    plan_channels,
    prune,
    select,
)
from dgo_compile.frontend.loading import save_denoiser

READING_MARKER = "<!-- reading: kept by benchmarks/channel_pruning.py on rewrite -->"
SEARCH_RATIOS = (0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)  # our uniform ratios tried with magnitude (MACs only)
GLOBAL_RATIOS = (0.15, 0.2, 0.22, 0.25, 0.28, 0.3, 0.32, 0.33, 0.34, 0.36, 0.4, 0.45,
                 0.5)  # our global ratios, with our Taylor scores
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
        log(f"ours: prune ratio {config.channel_ratio} ({config.importance}, batch {config.batch}, "
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
                traced = pruned.traced  # prune's re-trace, checked against eager
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

    method = f"ours (Taylor, uniform, ratio {config.channel_ratio})"
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
        log(f"{label}: Torch-Pruning, ratio {config.channel_ratio}, local, no round_to (Diff-Pruning's script)")
        user_model = copy.deepcopy(loaded.model).requires_grad_(True)  # as from_pretrained hands it over
        user = snapshot(user_model)
        started = time.perf_counter()
        pruner = tp_pruner(user_model, config.channel_ratio, None, False)
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
        round_to_model, extra, error = tp_from_gradients(loaded.model, grads, config.channel_ratio, round_to=groups)
        tp_meta["round_to"] = tp_checks(loaded, round_to_model, gradient_seconds + extra, error, False,
                                        work / f"tp_{key}_round_to")
        torch.save(grads, grads_file)
        write_json(tp_meta_file, tp_meta)
    tp_meta = read_json(tp_meta_file)
    for key, name in (("main", f"Torch-Pruning (Taylor, local, ratio {config.channel_ratio}, no round_to)"),
                      ("round_to", f"Torch-Pruning (Taylor, local, ratio {config.channel_ratio}, round_to={groups})")):
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
            pruned = prune(loaded, PruneConfig(channel_ratio=ratio, importance="magnitude", min_group_channels=minimum))
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
            keep = select(plan, scores, PruneConfig(channel_ratio=ratio, scope="global", min_group_channels=minimum,
                                                    **taylor))
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
                         "setting": f"Taylor, {mode}{' (as ddpm_prune.py)' if mode == 'local' else ''}, "
                                    f"ratio {tp_ratio}",
                         "folder": str(tp_folder),
                         "prune_seconds": tp_meta["seconds"], "timesteps": tp_grads["timesteps"],
                         "persisted_exactly": tp_meta["exact_reload"]})
    return variants


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
