"""Whole-run timing of denoisers, side by side, so ratios come from one noisy machine at one moment."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .ort_runner import OrtArtifact
from .sampling import initial_noise, sample


@dataclass(frozen=True)
class BenchResult:
    seconds: dict[str, float]  # median seconds of one sampling run, per label
    macs: dict[str, int]  # MACs of one run at batch 1, per label

    def speedup(self, label: str, baseline: str) -> float:
        return self.seconds[baseline] / self.seconds[label]

    def theoretical(self, label: str, baseline: str) -> float:
        return self.macs[baseline] / self.macs[label]


def time_runs(denoisers: dict, scheduler_config: dict, shape: tuple[int, ...], steps: int, batch: int,
              repeats: int, scheduler: str | None = None,
              conditions: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Median wall time of a whole sampling run for each denoiser, interleaved round by round."""
    noise = initial_noise(batch, shape, seed=0)

    def run(denoiser) -> None:
        sample(denoiser, scheduler_config, noise, steps, scheduler=scheduler, conditions=conditions, batch_size=batch)

    times: dict[str, list[float]] = {label: [] for label in denoisers}
    for denoiser in denoisers.values():  # warm-up: first-run allocations are not the steady state
        run(denoiser)
    for _ in range(repeats):
        for label, denoiser in denoisers.items():
            start = time.perf_counter()
            run(denoiser)
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(ts) for label, ts in times.items()}


def bench_artifacts(artifacts: dict[str, OrtArtifact], batch: int = 1, repeats: int = 5) -> BenchResult:
    """Time artifacts compiled for the same sampler. Conditions are zeros: values do not change the work."""
    first = next(iter(artifacts.values())).manifest
    inputs = first.input
    conditions = {name: torch.zeros((1, *spec.shape[1:]), dtype=getattr(torch, spec.dtype))
                  for name, spec in inputs.items() if name not in ("sample", "timestep")} or None
    seconds = time_runs(artifacts, first.scheduler.config, tuple(inputs["sample"].shape[1:]),
                        first.scheduler.steps, batch, repeats, first.scheduler.name, conditions)
    return BenchResult(seconds, {label: a.manifest.macs.total for label, a in artifacts.items()})
