"""`compile --config`'s report: report.json / report.md, the sample grid and the schedule heatmap.

Every number describes the model actually compiled: params and MACs are counted on its graph, and
the pruning and fine-tuning settings come from the `stage.json` stamps of the folders it was built
in (`dgo_compile.driver.stages`), not from the config. The measured speedup is timed against the original
model's `full` artifact, compiled alike (same sampler, steps and precision; kept in the work folder and
reused by a rerun while the model and those settings are unchanged, `stages.original_full`) and opened with
the same session options and thread count, in interleaved rounds (`measure`, the pipeline's bench stage): seconds
per run as median (min-max), the realised speedup beside the theoretical (MACs) one, the threads used,
and a warning heading report.md when a spread is over SPREAD_WARN (max / min) or the realised speedup
exceeds the MACs ratio.

The schedule heatmap (`save_heatmap`) is drawn here too, for report.md and by `dgo-compile schedule`:
which elements each denoiser call computes, optionally under a pruner's P(reuse).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from dgo_compile.core.files import write_atomic
from dgo_compile.schedules.schedule import Schedule

ROUNDS = 5  # timed sampling runs of each artifact


SPREAD_WARN = 1.5  # max / min of one artifact's round times (or of the per-round speedups) called wide


def write_report(folder: Path, report: dict[str, Any], schedule, trained, loaded) -> None:
    """report.json, report.md, samples.png and schedule.png into `folder`; `report["measured"]` comes
    from `measure`."""
    from dgo_compile.backend.sampling import save_grid

    images, reference = report.pop("images"), report.pop("reference_images")
    # the artifact's images (top half) above the unpruned model's from the same noise (bottom half)
    save_grid(torch.cat([images[:, :3], reference[:, :3]]), folder / "samples.png")
    save_heatmap(trained.reuse_scores() if trained is not None else None, schedule, folder / "schedule.png",
                 schedule.name)
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (folder / "report.md").write_text("\n".join(_markdown(report, schedule, loaded, trained)) + "\n")


def measure(folder: Path, full: Path, on_run: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time the artifact in `folder` against `full`, the original model's `full` artifact compiled alike
    (same sampler, steps, precision: `stages.original_full`), both opened with the same session options and
    threads, in ROUNDS interleaved rounds after a warm-up. `on_run()` after each of the 2 x (ROUNDS + 1)
    sampling runs."""
    from dgo_compile.backend.bench import bench_artifacts
    from dgo_compile.backend.ort_runner import OrtArtifact

    threads = torch.get_num_threads()  # PyTorch's default: the physical cores; onnxruntime gets the same
    artifacts = {"full": OrtArtifact.open(full, threads=threads), "compiled": OrtArtifact.open(folder, threads=threads)}
    provider = artifacts["compiled"].sessions[0].get_providers()[0]
    result = bench_artifacts(artifacts, 1, ROUNDS, on_run=on_run)
    low, high = result.spread("compiled", "full")
    times = {label: {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "runs": list(ts)}
             for label, ts in result.times.items()}
    return {"seconds_full": result.seconds["full"], "seconds_compiled": result.seconds["compiled"], "times": times,
            "speedup": result.speedup("compiled", "full"), "speedup_min": low, "speedup_max": high,
            "theoretical": result.theoretical("compiled", "full"),
            "realised_share": result.speedup("compiled", "full") / result.theoretical("compiled", "full"),
            "rounds": ROUNDS, "batch": 1, "provider": provider, "ort_intra_op_threads": threads,
            "torch_threads": torch.get_num_threads(), "text": result.describe("compiled", "full"),
            "noise": result.noise_note("compiled", "full"), "warnings": _warnings(result)}


def _warnings(result) -> list[str]:
    """What makes the measured speedup untrustworthy: wide spreads, a speedup above the MACs ratio."""
    warnings = []
    for label, ts in result.times.items():
        if max(ts) / min(ts) > SPREAD_WARN:
            warnings.append(f"the `{label}` artifact's run times spread {min(ts):.2f}-{max(ts):.2f} s "
                            f"({max(ts) / min(ts):.1f}x): the machine was busy")
    low, high = result.spread("compiled", "full")
    if high / low > SPREAD_WARN:
        warnings.append(f"the per-round speedups spread {low:.2f}-{high:.2f}x ({high / low:.1f}x)")
    note = result.noise_note("compiled", "full")
    if note:
        warnings.append(f"the measured speedup is {note}")
    if warnings:
        warnings.append("rerun `dgo-compile bench` on an idle machine before trusting the measured speedup")
    return warnings


def _built_text(built: dict[str, Any]) -> str:
    prune, tune = built.get("prune"), built.get("finetune")
    if prune is None and "prune" not in built:
        return ""
    text = ", channel pruning " + (f"{prune['channel_ratio']} of the channels removed ({prune['importance']} "
                                   f"importance, {prune['scope']})"
                                   if prune else "(settings unknown: no stage.json)")
    if "finetune" in built:
        text += ", fine-tuned " + (f"{tune['train_steps']} steps at batch {tune['batch']}" if tune
                                   else "(settings unknown)")
    return text


def _markdown(report: dict[str, Any], schedule, loaded, trained) -> list[str]:
    m, q, measured = report["macs"], report["quality"], report["measured"]
    resolution, times = report["resolution"], measured["times"]
    rounds = f"median (min-max) of {measured['rounds']} interleaved rounds"

    def seconds(label: str) -> str:
        t = times[label]
        return f"{t['median']:.3f} s ({t['min']:.3f}-{t['max']:.3f})"

    lines = [f"# dgo-compile report: {loaded.source}", "",
             f"Schedule `{schedule.name}`, {report['config']['steps']} sampler steps at height "
             f"{resolution['height']}, width {resolution['width']} {resolution['unit']}"
             + _built_text(report.get("built", {})), ""]
    if measured["warnings"]:
        lines += ["> **Warning: the measured timings below are not reliable.**"]
        lines += [f"> - {w}" for w in measured["warnings"]] + [""]
    lines += ["| | original | compiled |", "|---|---|---|",
              f"| params | {report['params']['original'] / 1e6:.2f} M | {report['params']['compiled'] / 1e6:.2f} M |",
              f"| MACs per call (all blocks) | {m['original_per_call'] / 1e6:.1f} M | "
              f"{m['compiled_per_call_full'] / 1e6:.1f} M |",
              f"| MACs per run | {m['original_per_run'] / 1e9:.2f} G | {m['per_run'] / 1e9:.2f} G ({m['kept']:.1%}) |",
              f"| theoretical speedup (MACs ratio) | 1.00x | {report['predicted_speedup']:.2f}x |",
              f"| seconds per sampling run (onnxruntime, batch 1, {rounds}) | {seconds('full')} | "
              f"{seconds('compiled')} |",
              f"| realised speedup ({rounds}) | 1.00x | {measured['speedup']:.2f}x ({measured['speedup_min']:.2f}-"
              f"{measured['speedup_max']:.2f}x) |",
              f"| realised / theoretical | | {measured['realised_share']:.2f} |",
              f"| PSNR / SSIM vs original ({q['samples']} samples, same noise) | 100 / 1.000 | "
              f"{q['psnr_vs_original']:.1f} / {q['ssim_vs_original']:.3f} |",
              f"| artifact vs its PyTorch graphs (relative L2) | | {report['parity_rel_l2']:.1e} |", "",
              f"Timed on {measured['provider']} with {measured['ort_intra_op_threads']} intra-op threads per "
              f"session (both artifacts alike, no spinning); PyTorch sampled the verification images with "
              f"{measured['torch_threads']} threads. The original's `full` artifact is compiled like this one "
              "(same sampler, steps, precision) and the two run back to back, the order reversed every other "
              "round; the realised speedup is the median of the per-round ratios.", "",
              "MACs per denoiser call: " + ", ".join(f"{x / 1e6:.0f}M" for x in m["per_call"]), "",
              "Stage wall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["timings_s"].items()), "",
              "Samples: the artifact's images (top half) above the original model's from the same noise "
              "(bottom half).", "", "![samples](samples.png)", "",
              "Schedule: which blocks each denoiser call computes (dark) or takes from the cache (light)"
              + (", under the pruner's P(reuse)" if trained is not None else "") + ".", "",
              "![schedule](schedule.png)"]
    return lines


def save_heatmap(scores: torch.Tensor | None, schedule: Schedule, path: str | Path, title: str) -> Path:
    """One PNG (elements x denoiser calls): the pruner's P(reuse) above the chosen schedule, or the
    schedule alone without `scores`. Call ticks are whole calls (0-based)."""
    from matplotlib import pyplot as plt

    fig = heatmap_figure(scores, schedule, title)
    try:
        return write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110))
    finally:
        plt.close(fig)


def heatmap_figure(scores: torch.Tensor | None, schedule: Schedule, title: str):
    """`save_heatmap`'s matplotlib figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    compute = torch.tensor([[float(c) for c in row] for row in schedule.compute])
    calls, columns = compute.shape
    panels = [(compute.T.numpy(), "schedule: dark = compute, light = reuse cached output", "Greys")]
    if scores is not None:
        panels.insert(0, (scores.T.numpy(), "P(reuse) from the pruner", "viridis"))
    height = 1.2 + 0.22 * columns
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.16 * calls + 3), len(panels) * height + 0.6),
                             constrained_layout=True, squeeze=False)
    for ax, (data, label, cmap) in zip(axes[:, 0], panels):
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(columns), schedule.elements, fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("denoiser call")
        ax.set_title(label, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02)
    fig.suptitle(title, fontsize=10)
    return fig
