"""Full-size published UNet configs (random weights): compile cost, artifact size and memory, ORT CPU speed.

    python benchmarks/full_size.py                       # every cell; hours on 2 CPU cores
    python benchmarks/full_size.py --models sd15 --precisions fp16 --schedules deepcache:3:2

For SD-1.5 (512 px), SD-2.1 (768 px) and SDXL (1024 px) UNets built from their published
config.json with random weights, at fp32 and fp16, for `deepcache:3:2` and a 6-pattern schedule
JSON over DDIM 50 steps, each in a fresh process:
- compile: wall time and peak RSS of load + trace (verified) + fold + export + write;
- artifact bytes on disk, against the bytes of the weights its variants use (the model's);
- opened-artifact RSS (every variant's session) against one plain onnxruntime session of the
  full graph (variant 0, which computes every block);
- onnxruntime CPU time of one full denoiser call at batch 1 and 2 (CFG), median of `--repeats`;
- parity: the first 2 calls of the artifact against the same folded graphs in PyTorch fp32.
Results are appended to results/full_size.json cell by cell (a rerun skips measured cells unless
--again) and rendered to results/full_size.md. Thread counts are pinned (`--threads`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, model_configs

MODELS = {**model_configs().FULL_SIZE,
          "tiny_sd": model_configs().TINY["sd"]}  # tiny_sd: `--check` runs every step of the script in a minute

# Stable Diffusion's own scheduler (scaled-linear betas), DDIM with its leading spacing and offset.
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}
STEPS = 50


def six_patterns(blocks: list[str], calls: int) -> dict:
    """A schedule JSON with six distinct call patterns: full, then reuse of ever more levels from the
    middle out (mid; + the deepest down/up pair; ...), cycling over the calls."""
    downs = [b for b in blocks if b.startswith("down_blocks")]
    ups = [b for b in blocks if b.startswith("up_blocks")]
    levels = [{"mid_block"}] + [{d, u} for d, u in zip(reversed(downs), ups)]
    reused, patterns = set(), [set()]
    for level in levels:
        reused = reused | level
        if len(patterns) < 6 and len(reused) < len(blocks) - 1:
            patterns.append(set(reused))
    rows = [[int(b not in patterns[i % len(patterns)]) for b in blocks] for i in range(calls)]
    return {"name": "six_patterns", "granularity": "block", "blocks": blocks, "compute": rows}


def compile_one(model: str, precision: str, schedule: str, work: Path) -> dict:
    """In this process: build, trace, fold and export; returns timings (the parent measures RSS)."""
    import torch

    from dgo_compile import load, trace
    from dgo_compile.backend.artifact import compile_artifact
    from dgo_compile.schedules.schedule import Schedule, builtin_for

    config = work / model / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(MODELS[model]))
    times = {}
    start = time.perf_counter()
    torch.manual_seed(0)  # random weights, the same in the parity process
    loaded = load(config)
    times["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    traced = trace(loaded)
    times["trace_s"] = time.perf_counter() - start
    blocks = [b.name for b in traced.blocks]
    plan = builtin_for(schedule, STEPS, traced) if schedule != "six_patterns" \
        else Schedule.from_json(six_patterns(blocks, STEPS))
    start = time.perf_counter()
    path = compile_artifact(traced, plan, SD_SCHEDULER, work / "artifact", overwrite=True, precision=precision)
    times["fold_export_s"] = time.perf_counter() - start
    manifest = json.loads((path / "manifest.json").read_text())
    params = sum(p.numel() for p in loaded.model.parameters())
    return {**times, "variants": len(manifest["variants"]), "params": params, "attention": "fused",
            "weights_bytes": params * (2 if precision == "fp16" else 4),
            "macs_kept": manifest["macs"]["total"] / manifest["macs"]["full_total"]}


def measure_one(artifact: Path, mode: str, repeats: int) -> dict:
    """In this process: open the artifact (or only variant 0 as one plain session) and time it."""
    import numpy as np
    import onnxruntime as ort

    from dgo_compile.backend.ort_runner import OrtArtifact, session_options

    manifest = json.loads((artifact / "manifest.json").read_text())
    if mode == "one_session":  # a plain session reading weights.bin itself, with the runner's options
        options = session_options(ort, int(os.environ.get("OMP_NUM_THREADS", "2")), manifest["precision"])
        session = ort.InferenceSession(str(artifact / manifest["variants"][0]["file"]), options,
                                       providers=["CPUExecutionProvider"])
        return {"rss_bytes": _rss(), "inputs": len(session.get_inputs())}
    opened = OrtArtifact.open(artifact, ["CPUExecutionProvider"], threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    result = {"rss_bytes": _rss()}
    inputs = {i["name"]: i for i in manifest["inputs"]}
    rng = np.random.default_rng(0)
    for batch in (1, 2):
        feeds = [_example(inputs[n], batch, rng) for n in inputs]
        feeds[list(inputs).index("timestep")] = np.full((batch,), manifest["scheduler"]["timesteps"][0], np.float32)
        import torch

        tensors = [torch.from_numpy(x) for x in feeds]
        seconds = []
        for _ in range(repeats):
            run = opened.new_run()
            start = time.perf_counter()
            run(*tensors)
            seconds.append(time.perf_counter() - start)
        result[f"call_s_batch{batch}"] = statistics.median(seconds)
    # then the run's calls, batch 1, until every variant has run once: what a whole sampling run holds
    calls = manifest["call_variants"]
    last = max(calls.index(v) for v in set(calls))
    run, feeds = opened.new_run(), [torch.from_numpy(_example(inputs[n], 1, rng)) for n in inputs]
    for call in range(last + 1):
        feeds[list(inputs).index("timestep")] = torch.full((1,), float(manifest["scheduler"]["timesteps"][call]))
        run(*feeds)
    result["rss_after_calls_bytes"] = _rss()
    return result


def parity_one(model: str, precision: str, schedule: str, work: Path) -> dict:
    """The artifact's first 2 calls against PyTorch running the same folded graphs in fp32."""
    import torch

    from dgo_compile import load, trace
    from dgo_compile.backend.folding import fold
    from dgo_compile.backend.ort_runner import OrtArtifact
    from dgo_compile.backend.sampling import denoiser_timesteps
    from dgo_compile.schedules.schedule import Schedule, builtin_for

    torch.manual_seed(0)  # the compile process's random weights
    traced = trace(load(work / model / "config.json"), verify=False)
    blocks = [b.name for b in traced.blocks]
    plan = builtin_for(schedule, STEPS, traced) if schedule != "six_patterns" \
        else Schedule.from_json(six_patterns(blocks, STEPS))
    timesteps = denoiser_timesteps(SD_SCHEDULER, STEPS)
    reference, ours = fold(traced, plan, timesteps).new_run(), OrtArtifact.open(work / "artifact").new_run()
    errors = []
    sample = traced.example_inputs(1, seed=3)
    for call in range(2):
        sample["timestep"] = torch.full_like(sample["timestep"], timesteps[call])
        with torch.no_grad():
            expected = reference(*sample.values())
        actual = ours(*sample.values())
        errors.append(((actual - expected).abs().max() / expected.abs().max()).item())
        sample["sample"] = sample["sample"] - 0.1 * expected  # a step's worth of change, the same for both
    return {"parity_rel": max(errors)}


def _example(spec: dict, batch: int, rng):
    import numpy as np

    shape = (batch, *spec["shape"][1:])
    if spec["dtype"].startswith("int"):
        return rng.integers(0, 10, shape).astype(spec["dtype"])
    return rng.standard_normal(shape).astype(np.float32)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(*args: str) -> tuple[dict, float, int]:
    """Run this script's `args` subcommand in a fresh process: (its JSON plus its CPU seconds as `cpu_s`,
    wall seconds, peak RSS bytes). CPU time is what a busy machine does not inflate."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed")
    result = {**json.loads(out.strip().splitlines()[-1]), "cpu_s": usage.ru_utime + usage.ru_stime}
    return result, time.perf_counter() - start, usage.ru_maxrss * 1024


def render(results: dict) -> str:
    gb = lambda b: f"{b / 1e9:.2f}"
    lines = ["# Full-size UNets (random weights): compile, artifact, memory and ORT CPU time", "",
             "Reproduce: `python benchmarks/full_size.py` (cells already in full_size.json are kept). "
             "2-core CPU machine, torch and onnxruntime pinned to `threads` threads; DDIM 50 steps, "
             "Stable Diffusion's scheduler. Memory in GB (1e9 bytes).", "",
             "| model | precision | schedule | attention | variants | kept MACs | compile min | compile CPU min | "
             "peak RSS | artifact | "
             "artifact / weights | opened RSS | one-session RSS | ratio | RSS after calls | ORT call b1 s | b2 s | "
             "parity (2 calls) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["cells"].items():
        model, precision, schedule = key.split("|")
        cpu = f"{r['compile_cpu_s'] / 60:.1f}" if "compile_cpu_s" in r else "not kept"
        after = gb(r["rss_after_calls"]) if "rss_after_calls" in r else "not kept"
        lines.append(
            f"| {model} | {precision} | {schedule} | {r.get('attention', 'decomposed')} | {r['variants']} | "
            f"{r['macs_kept']:.1%} | "
            f"{r['compile_wall_s'] / 60:.1f} | {cpu} | {gb(r['compile_peak_rss'])} | {gb(r['artifact_bytes'])} | "
            f"{r['artifact_bytes'] / r['weights_bytes']:.3f} | {gb(r['open_rss'])} | {gb(r['one_session_rss'])} | "
            f"{r['open_rss'] / r['one_session_rss']:.2f} | {after} | {r['call_s_batch1']:.1f} | "
            f"{r['call_s_batch2']:.1f} | {r['parity_rel']:.1e} |")
    lines += ["", "Columns: compile = load + trace (verified at batch 1) + fold + export + write, in a fresh process "
              "(wall minutes, and CPU minutes of that process: the wall time of a busy machine overstates it); "
              "artifact / weights = bytes on disk over the model's weights at that precision; opened RSS = resident "
              "memory after opening every variant's session (dgo_compile's runner); one-session RSS = one plain "
              "onnxruntime session of variant 0 (the full graph); ORT call = one full denoiser call on the CPU "
              "provider; RSS after calls = the opened artifact's resident memory after the timed calls (after the "
              "timed calls and a run's first calls up to the last variant's first use: caches and, for fp16 on the "
              "CPU provider, fp32 casts of the weights); parity = max |artifact - PyTorch fp32 folded graphs| / "
              "max |PyTorch| over the first 2 calls; attention = how the artifact's attention was exported "
              "(fused: onnxruntime's MultiHeadAttention, the default since it was added; decomposed: torch.onnx's "
              "MatMul-Softmax-MatMul, which materialises every layer's scores)."]
    lines += [""] + [f"- {note}" for note in results.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sd21_768", "sdxl"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    parser.add_argument("--schedules", nargs="+", default=["deepcache:3:2", "six_patterns"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--again", action="store_true", help="re-measure cells already in the results")
    parser.add_argument("--render", action="store_true", help="only rewrite full_size.md from full_size.json")
    parser.add_argument("--check", action="store_true", help="run every step on a tiny SD UNet into a temporary "
                        "folder, leaving the committed results alone")
    args = parser.parse_args()
    folder = RESULTS
    if args.check:
        folder, args.models, args.again = Path(tempfile.mkdtemp()), ["tiny_sd"], True
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    path = folder / "full_size.json"
    results = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    results["threads"] = args.threads
    if args.render:
        (folder / "full_size.md").write_text(render(results))
        return
    for model in args.models:
        for precision in args.precisions:
            for schedule in args.schedules:
                key = f"{model}|{precision}|{schedule}"
                if key in results["cells"] and not args.again:
                    continue
                with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:  # the same disk as the results
                    work = Path(tmp)
                    cell, wall, peak = _child("_compile", model, precision, schedule, str(work))
                    cell["compile_cpu_s"] = cell.pop("cpu_s")
                    cell.update(compile_wall_s=wall, compile_peak_rss=peak,
                                artifact_bytes=sum(f.stat().st_size for f in (work / "artifact").iterdir()))
                    print(key, "compiled", json.dumps(cell), flush=True)
                    opened, _, _ = _child("_measure", str(work / "artifact"), "artifact", str(args.repeats))
                    one, _, _ = _child("_measure", str(work / "artifact"), "one_session", "1")
                    cell.update(open_rss=opened["rss_bytes"], one_session_rss=one["rss_bytes"],
                                call_s_batch1=opened["call_s_batch1"], call_s_batch2=opened["call_s_batch2"],
                                rss_after_calls=opened["rss_after_calls_bytes"])
                    parity = _child("_parity", model, precision, schedule, str(work))[0]
                    cell.update(parity_rel=parity["parity_rel"])
                results["cells"][key] = cell
                path.write_text(json.dumps(results, indent=1))
                (folder / "full_size.md").write_text(render(results))
                print(key, json.dumps(cell), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        command, rest = sys.argv[1], sys.argv[2:]
        if command == "_compile":
            print(json.dumps(compile_one(rest[0], rest[1], rest[2], Path(rest[3]))))
        elif command == "_measure":
            print(json.dumps(measure_one(Path(rest[0]), rest[1], int(rest[2]))))
        else:
            print(json.dumps(parity_one(rest[0], rest[1], rest[2], Path(rest[3]))))
    else:
        main()
