"""DiP-GO's pruner on a GPU: seconds per iteration and peak memory, fp32 vs bf16 autocast, beside the CPU.

Reproduce on a machine with a CUDA GPU: `python benchmarks/pruner_gpu.py` (writes
benchmarks/results/pruner_gpu.{json,md}; a few minutes on an H100). Same protocol as
`benchmarks/pruner.py` (shipped model, DDIM 50, ratio 0.2, lr 0.03), shortened to a few iterations:
the time of one iteration does not depend on how many follow.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import RESULTS

from dgo_compile import __version__, load, trace
from dgo_compile.search.pruner import OptimizeConfig, optimize


def run(traced, scheduler_config, device: str, precision: str, batch: int, iters: int) -> dict:
    config = OptimizeConfig(keep_macs=0.2, steps=50, iters=iters, batch=batch, calibration=max(32, batch),
                            precision=precision, checkpoint_every=iters)
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trained = optimize(traced, scheduler_config, config, Path(folder) / "p", on_iteration=records.append,
                           device=device)
    seconds = trained.state.seconds
    return {"device": device, "precision": precision, "batch": batch, "iters": iters,
            "seconds_total": seconds, "seconds_per_iteration": seconds / iters,
            "peak_memory_mb": trained.state.peak_memory_mb,
            "consistency": [r["consistency"] for r in records], "kept": [r["kept"] for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--cpu-iters", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    loaded = load()
    traced = trace(loaded, verify=False)
    rows = [run(traced, loaded.scheduler_config, "cpu", "fp32", 2, args.cpu_iters)]
    print(rows[-1], flush=True)
    for batch in args.batches:
        for precision in ("fp32", "bf16"):
            run(traced, loaded.scheduler_config, "cuda", precision, batch, 1)  # warm-up: kernels, allocator
            rows.append(run(traced, loaded.scheduler_config, "cuda", precision, batch, args.iters))
            print(rows[-1], flush=True)
    report = {"dgo_compile": __version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
              "cpu_threads": torch.get_num_threads(), "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "pruner_gpu.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, args.results / "pruner_gpu.md")


def write_markdown(report: dict, path: Path) -> None:
    lines = ["# DiP-GO's pruner on a GPU", "",
             f"Reproduce: `python benchmarks/pruner_gpu.py` (dgo-compile {report['dgo_compile']}, torch "
             f"{report['torch']}, {report['gpu']}; CPU row on the same machine, {report['cpu_threads']} threads). "
             "Shipped model, DDIM 50, ratio 0.2, lr 0.03; every iteration samples `batch` whole 50-step "
             "trajectories through the gated SuperNet and back-propagates through all of them "
             "(each call gradient-checkpointed). Seconds per iteration: the mean over the iterations (GPU rows after "
             "a one-iteration warm-up run of the same setting).", "",
             "Peak memory: CUDA allocations on the GPU rows, the process's resident memory on the CPU row.", "",
             "| device | precision | batch | s / iteration | speed per trajectory vs CPU | peak memory |",
             "|---|---|---|---|---|---|"]
    cpu = report['rows'][0]["seconds_per_iteration"]
    for r in report['rows']:
        per_trajectory = r["seconds_per_iteration"] / r["batch"]
        speed = cpu / 2 / per_trajectory
        lines.append(f"| {r['device']} | {r['precision']} | {r['batch']} | {r['seconds_per_iteration']:.2f} | "
                     f"{speed:.1f}x | {r['peak_memory_mb']:.0f} MB |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
