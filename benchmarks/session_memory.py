"""Resident memory of an opened artifact under different onnxruntime session options.

    python benchmarks/session_memory.py          # ~10 minutes on 2 CPU cores

The numbers behind `ort_runner.session_options`: a 220 M-parameter SD-shaped UNet (SD-1.5's
config at half its widths, 32x32 latents, random weights) compiled with `deepcache:3:2` (2 variants)
over 10 DDIM steps, in fp32 and fp16, opened on the CPU provider (1 thread) in a fresh process per
setting, then run for 4 calls (both variants, twice). For each: RSS after opening and after every
call (call times go to the JSON only: this script measures memory, and is not run on a quiet machine).
Settings:
- `runner`: the options every artifact's sessions get (no spinning, no NCHWc layout pass, no
  prepacking; for fp16 on the CPU provider, no memory arena);
- `runner+arena` (fp16 only): the same with onnxruntime's per-session memory arena left on;
- `ort_default`: onnxruntime's default session options.
Results: results/session_memory.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from model_configs import SD15_UNET  # noqa: E402

CONFIG = {**SD15_UNET, "block_out_channels": [160, 320, 640, 640], "sample_size": 32}
STEPS, CALLS = 10, 4
SETTINGS = {"fp32": ["runner", "ort_default"], "fp16": ["runner", "runner+arena", "ort_default"]}


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def compile_one(folder: Path, precision: str) -> None:
    import torch

    from dgo_compile import load, trace
    from dgo_compile.backend.artifact import compile_artifact
    from dgo_compile.schedules.schedule import builtin_for

    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "model" / "config.json").write_text(json.dumps(CONFIG))
    torch.manual_seed(0)
    traced = trace(load(folder / "model" / "config.json"), verify=False)
    plan = builtin_for("deepcache:3:2", STEPS, traced)
    compile_artifact(traced, plan, {"_class_name": "DDIMScheduler"}, folder / precision, overwrite=True,
                     precision=precision)


def measure_one(artifact: Path, setting: str) -> dict:
    import onnxruntime as ort
    import torch

    from dgo_compile.backend import ort_runner

    base = ort_runner.session_options
    if setting == "runner+arena":
        def options(ort_module, threads=None, precision="fp32", device="cpu"):
            chosen = base(ort_module, threads, precision, device)
            chosen.enable_cpu_mem_arena = True
            return chosen
        ort_runner.session_options = options
    elif setting == "ort_default":
        def options(ort_module, threads=None, precision="fp32", device="cpu"):
            chosen = ort.SessionOptions()
            chosen.intra_op_num_threads = threads or 0
            return chosen
        ort_runner.session_options = options
    opened = ort_runner.OrtArtifact.open(artifact, ["CPUExecutionProvider"], threads=1)
    result = {"opened_gb": _rss_gb(), "after_call_gb": [], "call_s": []}
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, CONFIG["cross_attention_dim"], generator=generator)
    run = opened.new_run()
    for call in range(CALLS):
        start = time.perf_counter()
        run(sample, torch.tensor([opened.manifest.scheduler.timesteps[call]]), text)
        result["call_s"].append(time.perf_counter() - start)
        result["after_call_gb"].append(_rss_gb())
    result["variants"] = len(opened.sessions)
    return result


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def render(results: dict) -> str:
    lines = ["# Opened-artifact memory by session options", "",
             "Reproduce: `python benchmarks/session_memory.py`. A 220 M-parameter SD-shaped UNet (SD-1.5 at half "
             "width, 32x32 latents), `deepcache:3` over 10 DDIM steps (2 variants), CPU provider, 1 thread, a fresh "
             "process per row; calls 1 and 3 run variant 0 (every block), 2 and 4 variant 1. Resident memory in GB.",
             "", "| precision | session options | weights GB | opened | after call 1 | 2 | 3 | 4 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        calls = " | ".join(f"{v:.2f}" for v in row["after_call_gb"])
        lines.append(f"| {row['precision']} | {row['setting']} | {row['weights_gb']:.2f} | {row['opened_gb']:.2f} | "
                     f"{calls} |")
    lines += ["", "`runner` is what dgo-compile uses; `runner+arena` differs from it only in onnxruntime's CPU memory "
              "arena, `ort_default` is a plain `SessionOptions()`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for precision, settings in SETTINGS.items():
            subprocess.run([sys.executable, __file__, "_compile", str(folder), precision], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "2"})
            weights = (folder / precision / "weights.bin").stat().st_size / 1e9
            for setting in settings:
                row = {"precision": precision, "setting": setting, "weights_gb": weights,
                       **_child("_measure", str(folder / precision), setting)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    results = {"config": CONFIG, "steps": STEPS, "rows": rows}
    (RESULTS / "session_memory.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "session_memory.md").write_text(render(results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_compile":
        compile_one(Path(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_measure":
        print(json.dumps(measure_one(Path(sys.argv[2]), sys.argv[3])))
    else:
        main()
