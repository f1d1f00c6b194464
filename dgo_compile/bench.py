"""Whole-run timing of artifacts, side by side, so ratios come from one noisy machine at one moment."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .artifact import OrtArtifact
from .sampling import Denoiser, initial_noise, sample_ddim


@dataclass(frozen=True)
class BenchResult:
    seconds: dict[str, float]  # median seconds of one sampling run, per label
    macs: dict[str, int]  # MACs of one run at batch 1, per label

    def speedup(self, label: str, baseline: str) -> float:
        return self.seconds[baseline] / self.seconds[label]

    def theoretical(self, label: str, baseline: str) -> float:
        return self.macs[baseline] / self.macs[label]


def time_runs(denoisers: dict[str, Denoiser], scheduler_config: dict, shape: tuple[int, ...], steps: int,
              batch: int, repeats: int) -> dict[str, float]:
    """Median wall time of a whole sampling run for each denoiser, interleaved round by round."""
    noise = initial_noise(batch, shape, seed=0)
    times: dict[str, list[float]] = {label: [] for label in denoisers}
    for label, denoiser in denoisers.items():  # warm-up: first-run allocations are not the steady state
        sample_ddim(denoiser, scheduler_config, noise, steps, batch)
    for _ in range(repeats):
        for label, denoiser in denoisers.items():
            start = time.perf_counter()
            sample_ddim(denoiser, scheduler_config, noise, steps, batch)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(ts) for label, ts in times.items()}


def bench_artifacts(artifacts: dict[str, OrtArtifact], batch: int = 1, repeats: int = 5) -> BenchResult:
    first = next(iter(artifacts.values())).manifest
    shape = tuple(next(i for i in first["inputs"] if i["name"] == "sample")["shape"][1:])
    steps = first["scheduler"]["steps"]
    torch.manual_seed(0)
    seconds = time_runs(artifacts, first["scheduler"]["config"], shape, steps, batch, repeats)
    return BenchResult(seconds, {label: a.manifest["macs"]["total"] for label, a in artifacts.items()})
