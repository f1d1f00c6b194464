"""`finetune --feature-distill` on full-size published configs (random weights): what recording the kept
channels and one training step with the feature term cost.

    python benchmarks/full_size_features.py                 # DiT-XL/2, SD-1.5 and SD-2.1-768, ~15 min on 1 thread
    python benchmarks/full_size_features.py --models dit_xl_2

Each model runs in a fresh process: build it from its config.json, `prune` it (magnitude importance, uniform
scope, channel ratio --ratio: the record then holds every block's kept output channels), and time one
`distill_only` training step of the pruned student at batch --batch and the config's sample size, as
`finetune`'s loop makes it: the student's forward and backward on the output term alone, then with the
feature term, which adds the teacher's forward (hooked) and the blocks' losses. Inputs are random (the cost
does not depend on them; SD's prompt embeddings too). SDXL is not run: `distill_only` refuses its added
conditions (with `--data` and `distill` the teacher forward is already there and the term costs the hooks
and the losses only). Each step time is the median of --repeats. Results go to
results/full_size_features.json and .md; thread counts are pinned (--threads).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

from common import RESULTS, full_size_arguments, full_size_rows, model_configs, read_json, write_json

CONFIGS = model_configs()
MODELS = {"dit_xl_2": CONFIGS.DIT_XL_2, "sd15": CONFIGS.SD15_UNET, "sd21_768": CONFIGS.SD21_768_UNET}


def child(config_file: Path, threads: int, batch: int, ratio: float, repeats: int) -> None:
    import copy
    import dataclasses

    import torch

    torch.set_num_threads(threads)
    from dgo_compile import load
    from dgo_compile.channels.channel_pruning import PruneConfig, prune
    from dgo_compile.channels.feature_distill import FeatureDistillation
    from dgo_compile.channels.finetune_data import weighted_mse

    teacher = load(config_file)
    started = time.perf_counter()
    pruned = prune(teacher, PruneConfig(channel_ratio=ratio, importance="magnitude", scope="uniform"))
    row = {"params_m": sum(p.numel() for p in teacher.model.parameters()) / 1e6,
           "prune_seconds": time.perf_counter() - started,
           "kept_params": sum(p.numel() for p in pruned.model.parameters()) / sum(
               p.numel() for p in teacher.model.parameters())}
    record = pruned.pruning["block_channels"]
    row["blocks"] = len(record)
    row["kept_block_channels"] = sum(len(e["keep"]) for e in record.values()) / sum(e["size"] for e in record.values())
    student_loaded = dataclasses.replace(teacher, model=pruned.model, pruning=pruned.pruning)
    features = FeatureDistillation(student_loaded, teacher.model)  # checks the record against both models
    family = teacher.family
    student = copy.deepcopy(pruned.model).train().requires_grad_(True)
    inputs = tuple(family.example_inputs(teacher.model, batch).values())
    with torch.no_grad():
        target = family.call(teacher.model, *inputs)

    def step(with_features: bool) -> float:
        started = time.perf_counter()
        with features.capture(student) as student_blocks:
            prediction = family.call(student, *inputs)
        loss = weighted_mse(prediction, target, None)
        if with_features:
            with torch.no_grad(), features.capture(teacher.model) as teacher_blocks:
                family.call(teacher.model, *inputs)
            term = features.loss(student_blocks, teacher_blocks, None)
            loss = loss + 0.05 * term
            row["feature_term"] = term.item()
        loss.backward()
        student.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step(True)  # warm-up
    for name, flag in (("plain", False), ("features", True)):
        row[f"{name}_step_seconds"] = statistics.median(step(flag) for _ in range(repeats))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(row))


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Feature distillation (`finetune --feature-distill`) on full-size configs (random weights)", "",
             f"Reproduce: `python benchmarks/full_size_features.py` (dgo-compile {report['dgo_compile']}, torch "
             f"{report['torch']}, {report['threads']} thread(s), each model in a fresh process). `prune` at channel "
             f"ratio {report['ratio']} (magnitude, uniform) records every block's kept output channels; one "
             f"`distill_only` training step of the pruned student at batch {report['batch']} and the config's sample "
             f"size, median of {report['repeats']}: the output term alone, then with the feature term (one more "
             "teacher forward, hooked, and the blocks' losses). SDXL is not run (`distill_only` refuses its added "
             "conditions)." + (f" Machine load: {report['beside']}." if report.get("beside") else ""), "",
             "| model | params | prune (records the channels) | kept params | blocks | kept block-output channels "
             "| step, output term | step, + feature term | ratio | feature term at the start | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in report["models"].items():
        lines.append(f"| {name} | {row['params_m']:.0f} M | {row['prune_seconds']:.0f} s | {row['kept_params']:.1%} | "
                     f"{row['blocks']} | {row['kept_block_channels']:.1%} | {row['plain_step_seconds']:.1f} s | "
                     f"{row['features_step_seconds']:.1f} s | "
                     f"{row['features_step_seconds'] / row['plain_step_seconds']:.2f} | {row['feature_term']:.3f} | "
                     f"{row['peak_rss_mb'] / 1024:.1f} GB |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = full_size_arguments(__doc__.split("\n")[0], MODELS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.threads, args.batch, args.ratio, args.repeats)
    import torch

    from dgo_compile import __version__

    report = {"dgo_compile": __version__, "torch": torch.__version__, "threads": args.threads, "batch": args.batch,
              "ratio": args.ratio, "repeats": args.repeats, "beside": args.beside,
              "models": (read_json(RESULTS / "full_size_features.json") or {}).get("models", {})}
    report["models"].update(full_size_rows(__file__, MODELS, args.models, [
        "--threads", str(args.threads), "--batch", str(args.batch), "--ratio", str(args.ratio),
        "--repeats", str(args.repeats)]))
    write_json(RESULTS / "full_size_features.json", report)
    write_markdown(report, RESULTS / "full_size_features.md")


if __name__ == "__main__":
    main()
