"""How long `dgo-compile optimize` takes with its defaults on the shipped model, where the time goes, its memory.

    python benchmarks/optimize_speed.py            # ~25 min on the 2-core machine, nothing else running

Per budget (0.25, the CLI's default, then 0.5 and 0.1): the commands as a user runs them, one after the
other in subprocesses on --threads threads (OMP_NUM_THREADS): `dgo-compile optimize --keep-macs R` with
every other default, then `dgo-compile schedule <pruner> --keep-macs R` (which scores the learned schedule
against the closed-form ones). Recorded: each command's wall time and peak RSS (os.wait4), and from
pruner.json the setup (the start's K-step search and the full model's consistency targets) and the
iterations. Then, in this process, the K-step search at that budget's K as optimize runs it (replaying the
incumbent's shared prefix, dgo_compile.search.prefix_replay) and with every trial run from call 0 (as
before prefix replay), side by side: both times and whether the results are equal. Last, for the
full-size published configs (random weights; tests/model_configs.py), what the replay keeps per call that
runs in full (the cache a K-step schedule's full calls expose, and the prediction) at 8 calibration
samples under classifier-free guidance, read off the shared fold of `StepSubsets`; no sampling.
Writes results/optimize_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import RESULTS, log, model_configs, write_json

from dgo_compile import __version__, load, trace
from dgo_compile.core.configs import OptimizeConfig
from dgo_compile.schedules.schedule_cost import ScheduleCost
from dgo_compile.search.selection import calibration_error, uniform_steps_within
from dgo_compile.search.step_search import DEFAULT_SAMPLES, StepSubsets, search_steps, searched_steps

BUDGETS = (0.25, 0.5, 0.1)
GOAL_MINUTES = 5


def timed_command(args: list, threads: int) -> dict:
    """Run `dgo-compile args` in a subprocess on `threads` threads: its wall seconds, peak RSS and output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log("dgo-compile " + " ".join(map(str, args)))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dgo_compile.cli", *map(str, args)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"dgo-compile {' '.join(map(str, args))} failed with {status}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": " ".join(stdout.split())}


def search_side_by_side(traced, scheduler_config: dict, k: int) -> dict:
    """optimize's K-step search (8 samples of its calibration noise), replayed and from call 0 each trial."""
    config = replace(OptimizeConfig(), calibration=DEFAULT_SAMPLES)
    error = calibration_error(traced, scheduler_config, config, None)
    calls = config.steps
    started = time.perf_counter()
    found = searched_steps(traced, calls, k, error)
    replayed = time.perf_counter() - started
    subsets = StepSubsets(traced, calls)
    started = time.perf_counter()
    fresh = search_steps(lambda chosen: error(subsets.folded(chosen).new_run()), calls, k)
    from_start = time.perf_counter() - started
    return {"k": k, "evaluations": found.evaluations, "seconds_replayed": replayed, "seconds_from_call_0": from_start,
            "equal": fresh == (found.chosen, found.score, found.uniform_score, found.evaluations)}


def replay_bytes(name: str, config: dict, rows: int = 2 * DEFAULT_SAMPLES) -> dict:
    """Bytes the prefix replay keeps per full call of a K-step schedule on `config`'s model at `rows` rows."""
    from dgo_compile.passes.annotations import variant_signature

    from dgo_compile.search.prefix_replay import REPLAY_BYTES

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        traced = trace(load(path), verify=False)
    template = StepSubsets(traced, OptimizeConfig.steps)._template
    full = next(graph for (reused, _), graph in template.variants.items() if not reused)
    exposed = variant_signature(full).cache_outputs
    prediction = traced.example_inputs(1)["sample"][0].numel() * (2 if "DiT" in config["_class_name"] else 1)
    per_call = rows * 4 * (prediction + sum(math.prod(template.cache_shapes[c]) for c in exposed))
    return {"model": name, "exposed": {c: list(template.cache_shapes[c]) for c in exposed}, "rows": rows,
            "bytes_per_full_call": per_call, "full_calls_within_cap": REPLAY_BYTES // per_call,
            "cap_bytes": REPLAY_BYTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--full-size", nargs="*", default=["sd15", "sd21_768", "sdxl", "dit_xl_2"])
    parser.add_argument("--beside", default="nothing else running",
                        help="what else ran on the machine, for the table's header")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load()
    traced = trace(loaded, verify=False)
    cost = ScheduleCost(traced, "block")
    rows = []
    for budget in args.budgets:
        with tempfile.TemporaryDirectory() as tmp:
            pruner = Path(tmp) / "pruner"
            optimize = timed_command(["optimize", "--keep-macs", budget, "-o", pruner], args.threads)
            state = json.loads((pruner / "pruner.json").read_text())
            schedule = timed_command(["schedule", pruner, "--keep-macs", budget, "-o", Path(tmp) / "s.json"],
                                     args.threads)
        uniform = uniform_steps_within(traced, OptimizeConfig.steps, budget, cost)
        search = search_side_by_side(traced, loaded.scheduler_config, sum(map(any, uniform.compute)))
        rows.append({"keep_macs": budget, "optimize": optimize, "schedule": schedule,
                     "setup_seconds": state["setup_seconds"], "iteration_seconds": state["seconds"],
                     "iterations": state["iterations_done"], "final_kept": state["history"][-1]["kept"],
                     "search": search})
        log(f"{budget:g}: optimize {optimize['seconds']:.0f} s, schedule {schedule['seconds']:.0f} s, "
            f"search {search['seconds_replayed']:.0f} s vs {search['seconds_from_call_0']:.0f} s")
    configs = {**model_configs().FULL_SIZE, "dit_xl_2": model_configs().DIT_XL_2}
    sizes = [replay_bytes(name, configs[name]) for name in args.full_size]
    result = {"dgo_compile": __version__, "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "threads": args.threads, "beside": args.beside, "rows": rows,
              "replay_full_size": sizes}
    write_json(RESULTS / "optimize_speed.json", result)
    write_markdown(result)


def write_markdown(r: dict) -> None:
    lines = [
        "# `dgo-compile optimize` with its defaults on the shipped model: time and memory", "",
        f"Reproduce: `python benchmarks/optimize_speed.py` (dgo-compile {r['dgo_compile']}, torch {r['torch']}, "
        f"{r['cpus']} CPUs, {r['threads']} thread{'s' if r['threads'] > 1 else ''}, {r['beside']}). "
        "One run per budget: the commands as a "
        "user runs them, each in its own process; setup is the start's K-step search plus the full model's "
        f"consistency targets (pruner.json). Goal: optimize under {GOAL_MINUTES} min.", "",
        "| keep MACs | optimize wall | setup / iterations | peak RSS | final kept MACs | then `schedule` wall "
        "(peak RSS) | optimize + schedule |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        o, s = row["optimize"], row["schedule"]
        lines.append(f"| {row['keep_macs']:.0%} | {o['seconds'] / 60:.1f} min | {row['setup_seconds']:.0f} s / "
                     f"{row['iteration_seconds']:.0f} s ({row['iterations']}) | {o['peak_rss_mb']:.0f} MB | "
                     f"{row['final_kept']:.1%} | {s['seconds']:.0f} s ({s['peak_rss_mb']:.0f} MB) | "
                     f"{(o['seconds'] + s['seconds']) / 60:.1f} min |")
    lines += ["", "The K-step search optimize starts from (8 calibration samples, at most 48 trajectories), run in "
              "this process with the incumbent's shared prefix replayed and with every trial from call 0, one "
              "after the other:", "",
              "| keep MACs | K | trajectories | replayed | from call 0 | speedup | same schedule and scores |",
              "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        q = row["search"]
        lines.append(f"| {row['keep_macs']:.0%} | {q['k']} | {q['evaluations']} | {q['seconds_replayed']:.0f} s | "
                     f"{q['seconds_from_call_0']:.0f} s | {q['seconds_from_call_0'] / q['seconds_replayed']:.2f}x | "
                     f"{'yes' if q['equal'] else 'NO'} |")
    if r["replay_full_size"]:
        lines += ["", f"What the replay keeps on the full-size configs, per call that runs in full (8 samples under "
                  f"classifier-free guidance: {r['replay_full_size'][0]['rows']} rows, fp32); it keeps the "
                  f"incumbent's calls up to {r['replay_full_size'][0]['cap_bytes'] / 2**30:.0f} GiB and runs the "
                  "rest again:", "",
                  "| model | cache a full call exposes | per full call | full calls kept |", "|---|---|---|---|"]
        for size in r["replay_full_size"]:
            exposed = ", ".join(f"{name.removeprefix('cache__')} {'x'.join(map(str, shape))}"
                                for name, shape in size["exposed"].items())
            lines.append(f"| {size['model']} | {exposed} | {size['bytes_per_full_call'] / 2**20:.0f} MiB | "
                         f"{size['full_calls_within_cap']} |")
    lines += ["", "Wall times from a shared machine are one run each; the replayed and from-call-0 searches are "
              "bit-equal by construction (tests/test_step_search.py), so the quality tables "
              "(results/pruner.md) hold unchanged."]
    (RESULTS / "optimize_speed.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {RESULTS / 'optimize_speed.md'}")


if __name__ == "__main__":
    main()
