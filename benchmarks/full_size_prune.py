"""Channel-group analysis (`prune --dry-run`) on full-size published configs (random weights).

    python benchmarks/full_size_prune.py                 # SD-1.5, SD-2.1-768, SDXL, DiT-XL/2; minutes
    python benchmarks/full_size_prune.py --models dit_xl_2

Each model runs in a fresh process, as `dgo-compile prune CONFIG --dry-run --scope global` does:
build the model from its config.json, trace it, analyse its channel groups and plan a global cut.
Measured: wall time and peak RSS of that process, the groups, how many are prunable, and why the
rest are fixed (the time MLP, the model's input/output, an embedding table, ...). Results go to
results/full_size_prune.json and .md. Thread counts are pinned (`--threads`).
"""

from __future__ import annotations

import json
import resource
import time
from collections import Counter
from pathlib import Path

from common import RESULTS, full_size_arguments, full_size_rows, model_configs, read_json, write_json

CONFIGS = model_configs()
MODELS = {**CONFIGS.FULL_SIZE, "dit_xl_2": CONFIGS.DIT_XL_2}
REASONS = (("timestep-only", "the time MLP (timestep-only)"), ("the model input", "the model input"),
           ("the model output", "the model output"), ("embedding table", "an embedding table"),
           ("shares GroupNorm groups or heads", "shares a split with fixed channels"))


def reason_kind(reason: str) -> str:
    return next((label for key, label in REASONS if key in reason), reason.split(" (")[0][:60])


def child(config_file: Path, threads: int, surgery: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    from dgo_compile import load
    from dgo_compile.channels.channel_pruning import apply_pruning, importance, plan_channels, planned_cut, select
    from dgo_compile.core.configs import PruneConfig

    started = time.perf_counter()
    traced, plan = plan_channels(load(config_file))
    cut = planned_cut(plan, PruneConfig(scope="global", channel_ratio=0.3))
    seconds = time.perf_counter() - started
    # whole GroupNorm groups (`--groupnorm-cut groups`): the units, and a global magnitude cut at 0.3
    units = plan.units()
    config = PruneConfig(scope="global", channel_ratio=0.3, importance="magnitude", groupnorm_cut="groups")
    started = time.perf_counter()
    scores, _ = importance(traced, plan, config)
    keep = select(plan, scores, config)
    groups = {"unit_shares": len(units), "units": sum(len(u) for u in units.values()),
              "largest_unit": max((sum(s for _, _, s in unit) for us in units.values() for unit in us), default=0),
              "select_seconds": time.perf_counter() - started,
              "kept_channels": sum(len(k) for k in keep.values()) / sum(g.size for g in plan.prunable())}
    if surgery:  # the cut modules, their GroupNorms regrouped, and one forward pass of the cut model
        example = tuple(traced.example_inputs(1).values())
        started = time.perf_counter()
        model, records = apply_pruning(traced.model, plan, keep, lambda m: traced.family.adapter(m)(*example))
        groups["surgery_seconds"] = time.perf_counter() - started
        groups["regrouped_norms"] = sum(1 for name, shape in records["modules"].items() if shape["kind"] == "GroupNorm"
                                        and shape["groups"] < traced.model.get_submodule(name).num_groups)
    fixed = Counter(reason_kind(g.fixed) for g in plan.groups if g.fixed)
    timestep_only = sorted({m for g in plan.groups if g.fixed and "timestep-only" in g.fixed for m in g.modules})
    print(json.dumps({"seconds": seconds, "groups": len(plan.groups), "prunable": len(plan.prunable()),
                      "fixed": dict(fixed), "timestep_only_modules": timestep_only[:8],
                      "timestep_only_module_count": len(timestep_only), "planned_groups": len(cut),
                      "whole_groups": groups,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# Channel-group analysis on full-size configs (random weights)", "",
             f"Reproduce: `python benchmarks/full_size_prune.py` (dgo-compile {report['dgo_compile']}, torch "
             f"{report['torch']}, {report['threads']} thread(s), each model in a fresh process). What "
             "`dgo-compile prune CONFIG --dry-run --scope global` does: build from config.json, trace, analyse the "
             "channel groups, plan a global cut. Time: that work in the process; peak RSS: the whole process."
             + (f" Machine load: {report['beside']}." if report.get("beside") else ""), "",
             "| model | time | peak RSS | groups | prunable | fixed: why (groups) | "
             "modules of the timestep-only groups |",
             "|---|---|---|---|---|---|---|"]
    for name, row in report["models"].items():
        fixed = "; ".join(f"{k} ({v})" for k, v in sorted(row["fixed"].items(), key=lambda kv: -kv[1]))
        shown = ", ".join(f"`{m}`" for m in row["timestep_only_modules"][:3])
        more = row["timestep_only_module_count"] - min(3, len(row["timestep_only_modules"]))
        lines.append(f"| {name} | {row['seconds']:.1f} s | {row['peak_rss_mb'] / 1024:.1f} GB | {row['groups']} | "
                     f"{row['prunable']} | {fixed} | {shown}{f' +{more}' if more > 0 else ''} |")
    lines += ["", "## Whole GroupNorm groups (`--groupnorm-cut groups`)", "",
              "Units: the smallest sets of channels that are whole groups of every GroupNorm over them (partitions "
              "that disagree, as at a skip `cat`, merge into larger units). Select: magnitude importance and a global "
              "cut at channel ratio 0.3. Surgery (where run): the cut modules built and one forward pass.", "",
              "| model | shares cut by units | units | largest unit | importance + select | kept channels | "
              "surgery | GroupNorms regrouped |", "|---|---|---|---|---|---|---|---|"]
    for name, row in report["models"].items():
        g = row.get("whole_groups")
        if g is None:
            continue
        surgery = f"{g['surgery_seconds']:.1f} s" if "surgery_seconds" in g else "not run"
        lines.append(f"| {name} | {g['unit_shares']} | {g['units']} | {g['largest_unit']} | "
                     f"{g['select_seconds']:.1f} s | {g['kept_channels']:.1%} | {surgery} | "
                     f"{g.get('regrouped_norms', '')} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = full_size_arguments(__doc__.split("\n")[0], MODELS)
    parser.add_argument("--surgery", nargs="*", default=["sd15", "sd21_768", "dit_xl_2"],
                        help="models whose groups cut is also built (SDXL's copy does not fit beside other work)")
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.threads, args.child.parent.name in (args.surgery or ()))
    import torch

    from dgo_compile import __version__

    old = read_json(RESULTS / "full_size_prune.json") or {}
    report = {"dgo_compile": __version__, "torch": torch.__version__, "threads": args.threads, "beside": args.beside,
              "models": old.get("models", {})}
    for name, row in full_size_rows(__file__, MODELS, args.models,
                                    ["--threads", str(args.threads), "--surgery", *(args.surgery or ())]):
        report["models"][name] = row
    write_json(RESULTS / "full_size_prune.json", report)
    write_markdown(report, RESULTS / "full_size_prune.md")


if __name__ == "__main__":
    main()
