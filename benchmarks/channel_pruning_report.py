"""The markdown report of benchmarks/channel_pruning.py (results/channel_pruning.md). A helper module, not a
script."""

from __future__ import annotations

from pathlib import Path

from channel_pruning_steps import READING_MARKER, TP_LOCAL_SLACK


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
             f"{s['taylor_batch']} of the shipped digits, at most {s['max_timesteps']} timesteps. "
             "CIFAR-10 architecture: "
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
        macs = (f"{_g(r['macs'])} ({r['macs'] / b['macs']:.1%})" if "macs" in r
                else f"not traceable: {_short(r['trace_error'])}")
        onnx = r["onnx"]
        onnx_text = f"{onnx['max_abs_diff']:.1e}" if onnx["ok"] else f"fails: {_short(onnx['error'])}"
        lines.append(f"| {r['model']} | {r['method']} | {params} | {macs} | {r['seconds']:.0f} s | "
                     f"{r.get('timesteps', '')} | {r['groupnorm']} | "
                     f"{'yes' if r['unmodified'] else 'no (pruned in place)'}"
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
              f"{ft['batch']}, lr {ft['lr']}, EMA {ft['ema_decay']} "
              "(Torch-Pruning's model goes through our loader via a "
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
            f"| {v['target']:.0%} | {v['method']} | {v['setting']} | "
            f"{_m(v['params'])} ({v['params'] / u['params']:.1%}) "
            f"| {_g(v['macs'])} ({v['macs'] / u['macs']:.1%}) | {v['latency_s'] * 1e3:.1f} ms "
            f"({v['latency_s'] / u['latency_s']:.2f}x) | {b['psnr']:.1f} / {b['ssim']:.3f} / {b['fd']:.1f} | "
            f"{a['psnr']:.1f} / {a['ssim']:.3f} / {a['fd']:.1f} | {v['prune_seconds'] / 60:.1f} min "
            f"({v['timesteps']} timesteps) | {v['finetune_seconds'] / 60:.1f} min |")
    if "loss_by_band" in u:
        bands = list(u["loss_by_band"])
        lines += ["", f"Denoising loss (epsilon MSE) after fine-tuning, by timestep band, on one batch of "
                  f"{s.get('band_batch', '')} shipped digits with fixed noise and timesteps "
                  "(the same for every model):",
                  "", "| method | setting | MACs/call | " + " | ".join(f"t {b}" for b in bands)
                  + " | final training loss |",
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

