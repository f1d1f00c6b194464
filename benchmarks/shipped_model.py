"""Quality and size of the shipped model: what every later benchmark is measured against.

    python benchmarks/shipped_model.py            # ~10 min on 2 CPU cores

Samples N images with DDIM-50 (eta 0) from fixed noise through the traced graph, and reports
the Frechet distance on the shipped digit classifier's features against N real digits, next
to the real-vs-real floor at the same N; the share of samples the classifier reads confidently;
params and MACs; and onnxruntime CPU vs PyTorch eager latency per denoiser call at batch 1 and 8
(medians, measured side by side in one run). Writes results/shipped_model.{json,md} and a grid.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import RESULTS

from dgo_compile import __version__, load, trace
from dgo_compile.backend.export import export_onnx
from dgo_compile.backend.ort_runner import session_options
from dgo_compile.backend.sampling import initial_noise, sample_ddim, save_grid
from dgo_compile.channels.data import real_digit_sample
from dgo_compile.core.metrics import (
    DEFAULT_CLASSIFIER_DIR,
    classifier_features,
    frechet_distance,
    load_digit_classifier,
)
from dgo_compile.schedules.cost import cost_report


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=10_000, help="noise seed (never used in training)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load()
    traced = trace(loaded)
    report = cost_report(traced, batch=1)
    shape = tuple(traced.example_inputs(1)["sample"].shape[1:])
    start = time.perf_counter()
    samples = sample_ddim(traced, loaded.scheduler_config, initial_noise(args.n, shape, args.seed), args.steps, 100)
    sampling_seconds = time.perf_counter() - start
    save_grid(samples[:64], RESULTS / "shipped_model_samples.png")

    classifier = load_digit_classifier()
    real = real_digit_sample(args.n, args.seed)
    fd = frechet_distance(classifier_features(samples, classifier), classifier_features(real, classifier))
    with torch.no_grad():
        probs = torch.softmax(classifier(samples), dim=1)
    confident = (probs.max(dim=1).values > 0.9).float().mean().item()
    class_counts = np.bincount(probs.argmax(dim=1).numpy(), minlength=10).tolist()
    floor = json.loads((DEFAULT_CLASSIFIER_DIR / "classifier.json").read_text())

    latency = {}
    options = session_options(ort, args.threads)  # the artifacts' options: equal terms with torch's threads
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(traced.graph_module, traced.example_inputs(2), Path(tmp) / "denoiser.onnx")[0]
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        for batch in (1, 8):
            inputs = traced.example_inputs(batch)
            feed = {k: v.numpy() for k, v in inputs.items()}
            with torch.no_grad():
                eager = median_seconds(lambda: traced.family.adapter(loaded.model)(*inputs.values()), args.repeats)
            onnx = median_seconds(lambda: session.run(None, feed), args.repeats)
            ort_out = session.run(None, feed)[0]
            with torch.no_grad():
                ref = traced.graph_module(*inputs.values()).numpy()
            latency[f"batch{batch}"] = {"torch_eager_ms": eager * 1e3, "onnxruntime_ms": onnx * 1e3,
                                        "ort_speedup_vs_eager": eager / onnx,
                                        "ort_max_abs_diff": float(np.abs(ort_out - ref).max())}

    total = report.total
    result = {
        "model": "dgo_compile/assets/mnist_ddpm (UNet2DModel)", "dgo_compile": __version__,
        "torch": torch.__version__, "onnxruntime": ort.__version__, "machine": platform.machine(),
        "threads": args.threads, "params": total.params, "weight_macs_per_call": total.weight_macs,
        "attention_macs_per_call": total.attention_macs, "macs_per_call": total.macs,
        "sampler": f"DDIM {args.steps} steps, eta 0", "n_samples": args.n, "noise_seed": args.seed,
        "fd_vs_real": fd, "fd_floor_real_vs_real_same_n_mean": floor["fd_real_vs_real_500v500_mean"],
        "fd_floor_real_vs_real_same_n_std": floor["fd_real_vs_real_500v500_std"],
        "fd_real_vs_noise": floor["fd_real_vs_uniform_noise_500v500"],
        "classifier_held_out_accuracy": floor["held_out_accuracy"],
        "share_confidently_classified": confident, "predicted_class_counts": class_counts,
        "sampling_seconds_torch": sampling_seconds, "latency_per_call": latency,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shipped_model.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Shipped model (MNIST DDPM UNet, quarter-width DDPM-CIFAR10 architecture)", "",
        f"Reproduce: `python benchmarks/shipped_model.py` (torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{args.threads} threads).", "",
        "| quantity | value |", "|---|---|",
        f"| params | {total.params:,} |",
        f"| MACs per call (weight + attention) | {total.weight_macs / 1e6:.1f} M + "
        f"{total.attention_macs / 1e6:.1f} M |",
        f"| FD vs real, {args.n} v {args.n} (DDIM {args.steps}) | {fd:.2f} |",
        f"| FD floor, real v real at the same n | {result['fd_floor_real_vs_real_same_n_mean']:.2f} "
        f"± {result['fd_floor_real_vs_real_same_n_std']:.2f} |",
        f"| FD real v uniform noise (scale) | {result['fd_real_vs_noise']:.0f} |",
        f"| samples the classifier reads with p > 0.9 | {confident:.1%} |",
        f"| predicted class counts 0-9 | {class_counts} |",
    ]
    lines += ["", "| batch | torch eager ms/call | onnxruntime ms/call | ORT speedup | ORT max abs diff |",
              "|---|---|---|---|---|"]
    for key, row in latency.items():
        lines.append(f"| {key[5:]} | {row['torch_eager_ms']:.1f} | {row['onnxruntime_ms']:.1f} | "
                     f"{row['ort_speedup_vs_eager']:.2f}x | {row['ort_max_abs_diff']:.1e} |")
    lines += ["", "Medians of repeated calls, measured side by side in one run; the machine is shared and noisy."]
    (RESULTS / "shipped_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
