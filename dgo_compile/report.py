"""`compile --config`'s report: report.json / report.md, the sample grid and the schedule heatmap.

Every number describes the model actually compiled: params and MACs are counted on its graph, and
the pruning and fine-tuning settings come from the `stage.json` stamps of the folders it was built
in (`dgo_compile.stages`), not from the config. The measured speedup is timed against the original
model's `full` artifact, compiled alike (same sampler, steps and precision) and opened with the same
session options, in interleaved rounds; it is given with its spread, and called noise where it
exceeds the MACs ratio.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

ROUNDS = 5  # timed sampling runs of each artifact


def write_report(folder: Path, report: dict[str, Any], schedule, trained, loaded, original_traced,
                 original_scheduler_config: dict) -> None:
    from .sampling import save_grid

    images, reference = report.pop("images"), report.pop("reference_images")
    # the artifact's images (top half) above the unpruned model's from the same noise (bottom half)
    save_grid(torch.cat([images[:, :3], reference[:, :3]]), folder / "samples.png")
    if trained is not None:
        from .pruner import save_heatmap

        save_heatmap(trained.reuse_scores(), schedule, folder / "schedule.png", schedule.name)
    report["measured"] = _measure(folder, report["config"], schedule.steps, original_traced, original_scheduler_config)
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (folder / "report.md").write_text("\n".join(_markdown(report, schedule, loaded, trained)) + "\n")


def _measure(folder: Path, config: dict[str, Any], calls: int, original_traced, scheduler_config: dict) -> dict:
    from .artifact import compile_artifact
    from .bench import bench_artifacts
    from .ort_runner import OrtArtifact
    from .supernet import gateable_elements
    from .schedule import builtin

    full = folder.parent / f".{folder.name}.full"
    try:  # the original model's `full` artifact, compiled like this one, on the same provider and options
        compile_artifact(original_traced, builtin("full", calls, gateable_elements(original_traced)),
                         scheduler_config, full, overwrite=True, scheduler=config["scheduler"],
                         sampler_steps=config["steps"], precision=config["precision"])
        result = bench_artifacts({"full": OrtArtifact.open(full), "compiled": OrtArtifact.open(folder)}, 1, ROUNDS)
    finally:
        shutil.rmtree(full, ignore_errors=True)
    low, high = result.spread("compiled", "full")
    return {"seconds_full": result.seconds["full"], "seconds_compiled": result.seconds["compiled"],
            "speedup": result.speedup("compiled", "full"), "speedup_min": low, "speedup_max": high,
            "rounds": ROUNDS, "text": result.describe("compiled", "full"),
            "noise": result.noise_note("compiled", "full")}


def _built_text(built: dict[str, Any]) -> str:
    prune, tune = built.get("prune"), built.get("finetune")
    if prune is None and "prune" not in built:
        return ""
    text = ", channel pruning " + (f"ratio {prune['ratio']} ({prune['importance']} importance, {prune['scope']})"
                                   if prune else "(settings unknown: no stage.json)")
    if "finetune" in built:
        text += ", fine-tuned " + (f"{tune['steps']} steps at batch {tune['batch']}" if tune else "(settings unknown)")
    return text


def _markdown(report: dict[str, Any], schedule, loaded, trained) -> list[str]:
    m, q, measured = report["macs"], report["quality"], report["measured"]
    resolution = report["resolution"]
    lines = [f"# dgo-compile report: {loaded.source}", "",
             f"Schedule `{schedule.name}`, {report['config']['steps']} sampler steps at height "
             f"{resolution['height']}, width {resolution['width']} {resolution['unit']}"
             + _built_text(report.get("built", {})),
             "", "| | original | compiled |", "|---|---|---|",
             f"| params | {report['params']['original'] / 1e6:.2f} M | {report['params']['compiled'] / 1e6:.2f} M |",
             f"| MACs per call (all blocks) | {m['original_per_call'] / 1e6:.1f} M | "
             f"{m['compiled_per_call_full'] / 1e6:.1f} M |",
             f"| MACs per run | {m['original_per_run'] / 1e9:.2f} G | {m['per_run'] / 1e9:.2f} G ({m['kept']:.1%}) |",
             f"| predicted speedup (MACs) | 1.00x | {report['predicted_speedup']:.2f}x |",
             f"| measured speedup (onnxruntime, batch 1, median and min-max of {measured['rounds']} interleaved "
             f"rounds) | 1.00x | {measured['speedup']:.2f}x ({measured['speedup_min']:.2f}-"
             f"{measured['speedup_max']:.2f}x) |",
             f"| PSNR / SSIM vs original ({q['samples']} samples, same noise) | 100 / 1.000 | "
             f"{q['psnr_vs_original']:.1f} / {q['ssim_vs_original']:.3f} |",
             f"| artifact vs its PyTorch graphs (relative L2) | | {report['parity_rel_l2']:.1e} |", ""]
    if measured["noise"]:
        lines += [f"The measured speedup is {measured['noise']}.", ""]
    lines += ["MACs per denoiser call: " + ", ".join(f"{x / 1e6:.0f}M" for x in m["per_call"]), "",
              "Stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items()), "",
              "Samples: the artifact's images (top half) above the original model's from the same noise "
              "(bottom half).", "", "![samples](samples.png)"]
    if trained is not None:
        lines += ["", "![schedule](schedule.png)"]
    return lines
