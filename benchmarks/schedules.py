"""Built-in block schedules on the shipped model: cost, onnxruntime CPU speed and quality.

    python benchmarks/schedules.py          # ~20 min on 2 CPU cores

For `full`, `deepcache:2/3/5` and `steps:K` at the MACs of each deepcache (DDIM 50 steps):
MACs per run, median whole-run wall time at batch 1 and 8 on onnxruntime CPU (all artifacts timed
round-robin in one process), speedup against `full`, realised / theoretical; PyTorch running
the same folded graphs (eager fx GraphModules) at both batches for comparison; PSNR / SSIM against
`full` from the same noise and the Frechet distance of N samples against N real digits; and
ORT-vs-PyTorch whole-run parity.
Writes results/schedules.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from common import RESULTS

from dgo_compile import __version__, load, trace
from dgo_compile.backend.artifact import compile_artifact
from dgo_compile.backend.bench import time_runs
from dgo_compile.backend.folding import fold
from dgo_compile.backend.ort_runner import OrtArtifact
from dgo_compile.backend.sampling import denoiser_timesteps, initial_noise, sample_ddim
from dgo_compile.channels.data import real_digit_sample
from dgo_compile.core.metrics import classifier_features, frechet_distance, load_digit_classifier, psnr, ssim
from dgo_compile.schedules.schedule import builtin_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("-n", type=int, default=500, help="samples per schedule for quality")
    parser.add_argument("--seed", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load()
    traced = trace(loaded)
    config = loaded.scheduler_config
    shape = (1, 32, 32)
    classifier = load_digit_classifier()
    real = real_digit_sample(args.n, args.seed)
    real_features = classifier_features(real, classifier)

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}

        def compile_spec(spec: str) -> None:
            path = compile_artifact(traced, builtin_for(spec, args.steps, traced), config,
                                    Path(tmp) / spec.replace(":", "_"))
            artifacts[spec] = OrtArtifact.open(path, ["CPUExecutionProvider"], args.threads)

        for spec in ("full", "deepcache:2", "deepcache:3", "deepcache:5"):
            compile_spec(spec)
        full_macs = artifacts["full"].manifest.macs.total
        for spec in ("deepcache:2", "deepcache:3", "deepcache:5"):
            k = round(args.steps * artifacts[spec].manifest.macs.total / full_macs)
            if f"steps:{k}" not in artifacts:
                compile_spec(f"steps:{k}")

        timing = {b: time_runs(artifacts, config, shape, args.steps, b, args.repeats) for b in (1, 8)}
        timesteps = denoiser_timesteps(config, args.steps)
        torch_schedules = {spec: fold(traced, builtin_for(spec, args.steps, traced), timesteps) for spec in artifacts}
        eager = {b: time_runs(torch_schedules, config, shape, args.steps, b, max(1, args.repeats // 2)) for b in (1, 8)}

        noise = initial_noise(args.n, shape, args.seed)
        samples = {spec: sample_ddim(a, config, noise, args.steps, 100) for spec, a in artifacts.items()}
        parity_noise = noise[:8]
        parity = {}
        for spec in artifacts:
            difference = sample_ddim(torch_schedules[spec], config, parity_noise, args.steps) - samples[spec][:8]
            parity[spec] = (difference.norm() / samples[spec][:8].norm()).item(), difference.abs().max().item()

    rows = []
    for spec, artifact in artifacts.items():
        macs = artifact.manifest.macs.total
        row = {"schedule": spec, "macs_per_run": macs, "macs_ratio": macs / full_macs,
               "theoretical_speedup": full_macs / macs,
               "psnr_vs_full": float(psnr(samples[spec], samples["full"]).clamp(max=100).mean()),
               "ssim_vs_full": float(ssim(samples[spec], samples["full"]).mean()),
               "fd_vs_real": frechet_distance(classifier_features(samples[spec], classifier), real_features),
               "ort_vs_torch_rel_l2": parity[spec][0], "ort_vs_torch_max_abs": parity[spec][1]}
        for b in (1, 8):
            row[f"torch_seconds_batch{b}"] = eager[b][spec]
            row[f"ort_over_torch_speed_batch{b}"] = eager[b][spec] / timing[b][spec]
            row[f"ort_seconds_batch{b}"] = timing[b][spec]
            row[f"speedup_batch{b}"] = timing[b]["full"] / timing[b][spec]
            row[f"realised_over_theoretical_batch{b}"] = row[f"speedup_batch{b}"] / row["theoretical_speedup"]
        rows.append(row)

    meta = {"dgo_compile": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
            "threads": args.threads, "steps": args.steps, "sampler": "DDIM eta 0, trailing spacing",
            "n_quality_samples": args.n, "noise_seed": args.seed, "repeats": args.repeats}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "schedules.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Built-in schedules on the shipped model (DDIM 50, onnxruntime CPU)", "",
             f"Reproduce: `python benchmarks/schedules.py` (torch {torch.__version__}, onnxruntime {ort.__version__}, "
             f"{args.threads} threads, median of {args.repeats} whole runs, artifacts timed round-robin).", "",
             "| schedule | MACs | theory | b1 s/run | b1 speedup | b1 real/theory | b1 torch s/run | b8 s/run | "
             "b8 speedup | b8 real/theory | b8 torch s/run | PSNR vs full | SSIM vs full | FD | ORT-torch rel L2 | "
             "ORT-torch max abs |",
             "|" + "---|" * 16]
    for r in rows:
        lines.append(
            f"| {r['schedule']} | {r['macs_ratio']:.1%} | {r['theoretical_speedup']:.2f}x | "
            f"{r['ort_seconds_batch1']:.2f} | {r['speedup_batch1']:.2f}x | "
            f"{r['realised_over_theoretical_batch1']:.2f} | "
            f"{r['torch_seconds_batch1']:.2f} | {r['ort_seconds_batch8']:.2f} | {r['speedup_batch8']:.2f}x | "
            f"{r['realised_over_theoretical_batch8']:.2f} | "
            f"{r['torch_seconds_batch8']:.2f} | {r['psnr_vs_full']:.1f} | {r['ssim_vs_full']:.3f} | "
            f"{r['fd_vs_real']:.1f} | {r['ort_vs_torch_rel_l2']:.1e} | {r['ort_vs_torch_max_abs']:.1e} |")
    lines += ["", f"FD: {args.n} samples vs {args.n} real digits on the shipped classifier's features; "
              "the real-vs-real floor at this n is in results/shipped_model.md. PSNR is capped at 100 dB "
              "(identical images)."]
    (RESULTS / "schedules.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
