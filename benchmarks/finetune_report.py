"""The markdown report of benchmarks/finetune.py (results/finetune.md). A helper module, not a script."""

from __future__ import annotations

import re
from pathlib import Path

READING_MARKER = "<!-- reading: kept by benchmarks/finetune.py on rewrite -->"
SOURCE_LABEL = {"data": "data only", "distill": "distill only (teacher trajectories)", "both": "data + distill"}


def _source(run: dict) -> str:
    """A run's source; distill-only runs with student rollouts (recipe keys ending "_sr<share>") say so."""
    share = re.search(r"_sr([0-9.]+)", run.get("recipe", ""))
    label = SOURCE_LABEL[run["source"]]
    return label.replace("teacher trajectories", f"{float(share[1]):.0%} student rollouts") if share else label


def _q(q: dict | None) -> str:
    return "not measured" if not q else f"{q['psnr']:.1f} / {q['ssim']:.3f} / {q['fd']:.0f}"


def _samples(run: dict, step: int) -> int:
    """Samples a run has seen at `step`: its batch is in its recipe key ("_b<batch>_"), so that runs at
    other batch sizes are held to the same budget of samples."""
    return step * int(re.search(r"_b(\d+)_", run["recipe"]).group(1))


def _best(runs: list[dict], ratio: float, budget_samples: int) -> tuple[float, str] | None:
    found = [(p[kind]["ssim"], f"{_source(r)}, {kind.upper() if kind == 'ema' else kind} weights, "
              f"step {p['step']} ({r['recipe']})")
             for r in runs if r["ratio"] == ratio for p in r["curve"][1:] if _samples(r, p["step"]) <= budget_samples
             for kind in ("ema", "raw") if p[kind]]
    return max(found) if found else None


CUT_FLAGS = {"w": "whole groups", "u": "uniform"}  # benchmarks/finetune.py keys such cuts "<ratio><flags>"


def _cut_style(ratio) -> tuple[str, list[str]]:
    """A cut key's ratio and what its flags name (0.33wu: 0.33, whole groups, uniform)."""
    value = str(ratio).rstrip("".join(CUT_FLAGS))
    return value, [CUT_FLAGS[f] for f in str(ratio)[len(value):]]


def _macs(run: dict, digits: int = 1) -> str:
    """A run's kept MACs, and its cut's style where it is not the plain global thinning, since runs of one
    recipe can differ in the cut alone."""
    style = _cut_style(run["ratio"])[1]
    return f"{run['kept_macs']:.{digits}%}" + (f" ({', '.join(style)})" if style else "")


def _trajectory_table(report: dict, cuts: dict) -> list[str]:
    rows = [(_macs(c), "pruned, before fine-tuning", 0, c["trajectory_error"])
            for c in cuts.values() if c.get("trajectory_error")]
    rows += [(_macs(r), _source(r), r["trajectory_error"]["step"],
              r["trajectory_error"]["raw"]) for r in report["runs"] + report.get("probes", [])
             if r.get("trajectory_error")]
    if not rows:
        return []
    bands = list(rows[0][3])
    teacher = rows[0][3]
    lines = ["## Where the students depart from the teacher", "",
             "Along the unpruned model's own DDIM trajectories from the first 16 evaluation noises, per timestep band "
             "(mean over the band's steps): the student's eps MSE against the teacher's prediction / the mean "
             "absolute error of the per-image mean of its eps (raw weights at the last point measured). For scale, "
             "the teacher's own per-image eps mean: "
             + ", ".join(f"t {b}: {teacher[b]['teacher_mean']:.4f}" for b in bands)
             + ". A DDIM step at high t turns a small eps error into a large error of the image it aims at.", "",
             "| MACs | model | step | " + " | ".join(f"t {b}" for b in bands) + " |",
             "|---|---|---|" + "---|" * len(bands)]
    for macs, label, step, err in rows:
        lines.append(f"| {macs} | {label} | {step} | "
                     + " | ".join(f"{err[b]['eps_mse']:.4f} / {err[b]['mean_err']:.4f}" for b in bands) + " |")
    return lines + [""]


def _band_ssim_table(report: dict) -> list[str]:
    runs = [r for r in report["runs"] + report.get("probes", []) if r.get("band_ssim")]
    if not runs:
        return []
    bands = [k for k in runs[0]["band_ssim"] if k not in ("step", "weights", "all", "n")]
    lines = ["## Which timesteps cost image quality", "",
             f"SSIM against the unpruned model's samples (first {runs[0]['band_ssim']['n']} evaluation noises, DDIM "
             f"{report['settings']['steps']}) when the student (EMA weights at its last point) denoises every step, "
             "or only the steps of one band with the unpruned model doing the rest. 1.0 = the band costs nothing.",
             "", "| recipe | MACs | source | step | every step | " + " | ".join(f"only t {b}" for b in bands) + " |",
             "|---|---|---|---|---|" + "---|" * len(bands)]
    for r in runs:
        b = r["band_ssim"]
        lines.append(f"| `{r['recipe']}` | {_macs(r)} | {_source(r)} | {b['step']} | "
                     f"{b['all']:.3f} | " + " | ".join(f"{b[k]:.3f}" for k in bands) + " |")
    return lines + [""]


def _paired_table(report: dict) -> list[str]:
    rows = report.get("paired") or []
    if not rows:
        return []
    lines = ["## How sure the final SSIMs are", "",
             f"Per image SSIM at each run's last point (EMA weights, the same {rows[0]['n']} evaluation noises): mean "
             "+- its standard error, and the paired difference from the main recipe's data + distill run at the same "
             "cut, or at a cut within 1% of the MACs where it did not run that one (mean +- standard error of the "
             "per-image differences). A difference within about two standard "
             "errors of 0 is not a measured difference.", "",
             "| recipe | MACs | source | step | SSIM +- se | minus main data + distill |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["kept_macs"], r["recipe"] != report["recipe"], r["recipe"], r["source"])):
        diff = (f"{r['diff']:+.3f} +- {r['diff_se']:.3f}" if "diff" in r else "(the reference)" if r.get("reference")
                else r.get("unpaired", "no main-recipe run at this cut"))
        if "against" in r:
            diff += f" (against cut {r['against']}, {r['against_macs']:.1%} of the MACs)"
        for other in r.get("versus", []):
            diff += f"; minus `{other['recipe']}`: {other['diff']:+.3f} +- {other['diff_se']:.3f}"
        lines.append(f"| `{r['recipe']}` | {_macs(r)} | {_source(r)} | {r['step']} | "
                     f"{r['ssim']:.3f} +- {r['se']:.3f} | {diff} |")
    return lines + [""]


def _time_mlp(cut: dict) -> str:
    return (f"time MLP {cut['time_mlp_channels']} of 128 channels" if cut.get("time_mlp_channels")
            else "cut before `985bbb8`, when the time MLP was prunable")


def _stage_lines(cut: dict) -> list[str]:
    """A gradual cut's stages: each prunes the last one's fine-tuned model, then fine-tunes it."""
    if not cut.get("stages"):
        return []
    lines = ["Each stage prunes the previous stage's fine-tuned (EMA) model (global Taylor, the ratio found to land "
             "under the target, or the floor where every group is cut as far as its GroupNorm minimum allows), "
             "then fine-tunes it with its own warmup and cosine decay; steps count from the "
             "first stage. Eps MSE: against the unpruned model along its DDIM trajectories (16 noises, mean of "
             "the bands), right after the cut.", "",
             "| stage | steps | target | ratio | kept MACs | kept params | eps MSE after the cut | prune time |",
             "|---|---|---|---|---|---|---|---|"]
    for i, stage in enumerate(cut["stages"]):
        err = stage["trajectory_error"]
        mse = sum(b["eps_mse"] for b in err.values()) / len(err)
        lines.append(f"| {i + 1} | {stage['start']:,}-{stage['start'] + stage['steps']:,} | {stage['target']:.0%} | "
                     f"{stage['ratio']:g} | {stage['kept_macs']:.1%} | {stage['kept_params']:.1%} | {mse:.4f} | "
                     f"{stage['prune_seconds'] / 60:.1f} min |")
    return lines + [""]


def write_markdown(report: dict, path: Path) -> None:
    s, budget = report["settings"], report["budget_steps"]
    cuts = {c["ratio"]: c for c in report["cuts"]}
    lines = ["# Recovery after channel pruning: quality against fine-tune steps", "",
             f"Reproduce: `python benchmarks/finetune.py` (dgo-compile {report['dgo_compile']}, torch "
             f"{report['torch']}, diffusers {report['diffusers']}, {report['threads']} thread(s), runs one at a time; "
             "`--quick` for a smoke run).", "",
             f"Protocol: the shipped MNIST DDPM ({report['unpruned']['params'] / 1e6:.2f} M params, "
             f"{report['unpruned']['macs'] / 1e9:.3f} G MACs/call) pruned by `prune` (Taylor importance on batch "
             f"{s['taylor_batch']} of the shipped digits, global scope, GroupNorm groups keep >= "
             f"{s['min_group_channels']} channels, or with cuts marked w whole groups go and the rest keep all "
             "theirs), then fine-tuned by `dgo_compile.channels.finetune` at batch "
             f"{s['batch']}, AdamW lr "
             f"{s['lr']:g}, {s['warmup']} warmup steps then cosine decay to 2%, EMA {s['ema_decay']:g} (diffusers' "
             f"EMAModel with warmup), gradient clipping 1"
             + (f", Min-SNR-{s['snr_gamma']:g} loss weights" if s.get("snr_gamma") else ", every timestep weighted 1")
             + (f", data timesteps drawn logit-normal (sigmoid of N({s['logit_mean']:g}, {s['logit_std']:g}), as "
                "SD3's scripts)" if s.get("timestep_sampling") == "logit_normal" else "")
             + ". Sources: **data only** (the shipped digits), "
             "**distill only**"
             f" (no data: the unpruned model's DDIM-{s['trajectory_steps']} trajectories from random noise, its "
             f"predictions as targets), **data + distill** (digits, plus {s['distill']:g} x the MSE towards the "
             f"unpruned model's prediction). Budget cap (Diff-Pruning: 10-20% of the original training): {budget:,} "
             f"steps at batch {s['batch']} ({budget * s['batch']:,} samples), 20% of the "
             f"{report['trained_samples']:,} samples the shipped model was trained on (every stage of its "
             "recipe.json). Quality at each point: DDIM "
             f"{s['steps']} from noise seed {s['seed']} (never used in training); PSNR / SSIM against the unpruned "
             "model's images from the same noise, FD against as many real digits on the shipped classifier's "
             f"features (unpruned: FD {report['unpruned']['fd'][str(s['n'])]:.1f} at n = {s['n']}). Intermediate "
             f"points use {s['curve_n']} samples, the last {s['n']}; FD grows as n shrinks, compare it within a "
             "column of equal n. Both the EMA weights (what `finetune` saves) and the raw weights are measured. "
             "Fine-tune time: wall seconds of the training loop (checkpoints included); peak RSS: the whole "
             "training process.", ""]
    for ratio, cut in cuts.items():
        if not any(r["ratio"] == ratio for r in report["runs"]):
            continue  # measured by another recipe: its stages are listed here, its points under the probes
        title = f"Cut {ratio}" if not cut.get("stages") else f"Gradual pruning, {SOURCE_LABEL[ratio.rsplit('_', 1)[1]]}"
        if isinstance(ratio, str) and not cut.get("stages"):  # "0.33wu": whole groups (w), uniform scope (u)
            value, style = _cut_style(ratio)
            title = f"Cut {value}, " + ", ".join(style)
        if ratio == 0:  # nothing cut: what the recipe alone does to the unpruned model's samples
            title = "Control, cut 0 (the unpruned model fine-tuned by the same recipe)"
        lines += [f"## {title}: {cut['kept_macs']:.1%} of the MACs, {cut['kept_params']:.1%} of the params "
                  f"({_time_mlp(cut)})",
                  "",
                  *_stage_lines(cut),
                  f"Before fine-tuning: PSNR / SSIM / FD {_q(cut.get('start'))}. Recipe `{report['recipe']}`.", "",
                  "| source | step | samples seen | n | EMA: PSNR / SSIM / FD | raw: PSNR / SSIM / FD | "
                  "time to this step |",
                  "|---|---|---|---|---|---|---|"]
        summary = []
        for run in (r for r in report["runs"] if r["ratio"] == ratio):
            for p in run["curve"][1:]:
                seconds = p.get("seconds")
                lines.append(f"| {_source(run)} | {p['step']} | {p['step'] * s['batch']:,} | "
                             f"{(p['ema'] or {}).get('n', '')} | {_q(p['ema'])} | {_q(p['raw'])} | "
                             f"{'' if seconds is None else f'{seconds / 60:.1f} min'} |")
            unfinished = f" (stopped at step {run['unfinished']})" if run.get("unfinished") else ""
            rss = "not measured" if run.get("peak_rss_mb") is None else f"{run['peak_rss_mb']:.0f} MB"
            # a run still going (rendered by --no-train beside it) may have no time or loss yet
            wall = "not measured" if run.get("train_seconds") is None else f"{run['train_seconds'] / 60:.1f} min"
            loss = "not measured" if run.get("final_loss") is None else f"{run['final_loss']:.4f}"
            summary.append(f"| {_source(run)} | {wall}{unfinished} | {rss} | {loss} |")
        lines += ["", "| source | fine-tune wall time | peak RSS | final training loss (mean of last 50 steps) |",
                  "|---|---|---|---|", *summary, ""]
    for ratio, cut in cuts.items():
        if cut.get("stages") and not any(r["ratio"] == ratio for r in report["runs"]):
            lines += [f"## Gradual pruning, {SOURCE_LABEL[ratio.rsplit('_', 1)[1]]} (a probe): "
                      f"{cut['kept_macs']:.1%} of the MACs ({_time_mlp(cut)})", "", *_stage_lines(cut)]
    if report.get("probes"):
        lines += ["## Recipe probes (other recipes measured by earlier invocations)", "",
                  "| recipe | cut | source | step | EMA: PSNR / SSIM / FD | raw: PSNR / SSIM / FD | n | "
                  "time to this step |",
                  "|---|---|---|---|---|---|---|---|"]
        for run in report["probes"]:  # every point measured: a probe's curve, not only its end
            for point in (p for p in run["curve"][1:] if p["ema"]):
                seconds = point.get("seconds")
                lines.append(f"| `{run['recipe']}` | {_macs(run, 0)} | {_source(run)} | "
                             f"{point['step']} | {_q(point['ema'])} | {_q(point['raw'])} | {point['ema']['n']} | "
                             f"{'' if seconds is None else f'{seconds / 60:.1f} min'} |")
        lines.append("")
    lines += _trajectory_table(report, cuts)
    lines += _band_ssim_table(report)
    lines += _paired_table(report)
    lines += ["## Verdict", ""]
    everything = report["runs"] + report.get("probes", [])
    budget_samples = budget * s["batch"]
    for ratio, cut in cuts.items():
        best = _best(everything, ratio, budget_samples)
        if best is not None and ratio == 0:
            lines.append(f"- Control, nothing cut: the recipe alone leaves the unpruned model at SSIM {best[0]:.3f} "
                         f"against its own samples at best ({best[1]}): what the recipe's drift costs with no "
                         "channel removed.")
        elif best is not None:
            reached = "reaches" if best[0] >= 0.9 else "does not reach"
            longest = max(seen for r in everything if r["ratio"] == ratio for p in r["curve"] if p["ema"]
                          if (seen := _samples(r, p["step"])) <= budget_samples)
            lines.append(f"- {cut['kept_macs']:.1%} of the MACs: best SSIM {best[0]:.3f} ({best[1]}); {reached} "
                         f"SSIM >= 0.9 in the fine-tunes measured (up to {longest:,} samples of the "
                         f"{budget_samples:,}-sample budget).")
    kept = ""
    if path.is_file() and READING_MARKER in path.read_text():
        kept = path.read_text().split(READING_MARKER, 1)[1]
    path.write_text("\n".join(lines) + "\n\n" + READING_MARKER + kept.rstrip() + "\n")
    print("\n".join(lines), flush=True)
