"""Whole-run timing of denoisers, side by side, so ratios come from one noisy machine at one moment.

Every compared denoiser runs on equal terms: onnxruntime artifacts all get `ort_runner.session_options`
(the same threads, no spinning), and runs are interleaved round by round, with the order reversed every
other round so neither side always runs right after the other. A speedup is the median of the per-round
ratios, reported with their range; a measured speedup above the MACs ratio is noise, and is called so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dgo_compile.backend.ort_runner import OrtArtifact
from dgo_compile.backend.sampling import initial_noise, sample


@dataclass(frozen=True)
class BenchResult:
    times: dict[str, tuple[float, ...]]  # seconds of each timed sampling run, round by round, per label
    macs: dict[str, int]  # MACs of one run at batch 1, per label

    @property
    def seconds(self) -> dict[str, float]:
        """Median seconds of one sampling run, per label."""
        return {label: statistics.median(ts) for label, ts in self.times.items()}

    def ratios(self, label: str, baseline: str) -> list[float]:
        """Speedup of `label` over `baseline` in each round (the two ran back to back)."""
        return [b / t for b, t in zip(self.times[baseline], self.times[label])]

    def speedup(self, label: str, baseline: str) -> float:
        return statistics.median(self.ratios(label, baseline))

    def spread(self, label: str, baseline: str) -> tuple[float, float]:
        """The lowest and highest per-round speedup."""
        ratios = self.ratios(label, baseline)
        return min(ratios), max(ratios)

    def theoretical(self, label: str, baseline: str) -> float:
        return self.macs[baseline] / self.macs[label]

    def describe(self, label: str, baseline: str) -> str:
        """`1.52x (1.41-1.60x over 5 rounds)`, with a plain note when it is above the MACs ratio."""
        low, high = self.spread(label, baseline)
        rounds = len(self.times[label])
        text = f"{self.speedup(label, baseline):.2f}x ({low:.2f}-{high:.2f}x over {rounds} rounds)"
        note = self.noise_note(label, baseline)
        return text + (f"; {note}" if note else "")

    def noise_note(self, label: str, baseline: str) -> str | None:
        """A measured speedup above the MACs ratio cannot come from the schedule: say it is noise.
        Compared as printed (2 decimals), so the note never reads "1.00x ... above the 1.00x ratio"."""
        speedup, theory = self.speedup(label, baseline), self.theoretical(label, baseline)
        if round(speedup, 2) <= round(theory, 2):
            return None
        return f"above the {theory:.2f}x MACs ratio: the excess is measurement noise, not a gain"


def time_rounds(denoisers: dict, scheduler_config: dict, shape: tuple[int, ...], steps: int, batch: int,
                repeats: int, scheduler: str | None = None,
                conditions: dict[str, torch.Tensor] | None = None,
                on_run: Callable[[], None] | None = None) -> dict[str, tuple[float, ...]]:
    """Wall time of `repeats` whole sampling runs of each denoiser, interleaved round by round (the
    order reversed every other round), after one warm-up run of each. `on_run()` is called after
    every run, warm-ups included: (repeats + 1) x len(denoisers) calls."""
    noise = initial_noise(batch, shape, seed=0)

    def run(denoiser) -> None:
        sample(denoiser, scheduler_config, noise, steps, scheduler=scheduler, conditions=conditions, batch_size=batch)
        if on_run is not None:
            on_run()

    times: dict[str, list[float]] = {label: [] for label in denoisers}
    for denoiser in denoisers.values():  # warm-up: first-run allocations are not the steady state
        run(denoiser)
    order = list(denoisers.items())
    for round_ in range(repeats):
        for label, denoiser in (order if round_ % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            run(denoiser)
            times[label].append(time.perf_counter() - start)
    return {label: tuple(ts) for label, ts in times.items()}


def time_runs(denoisers: dict, scheduler_config: dict, shape: tuple[int, ...], steps: int, batch: int,
              repeats: int, scheduler: str | None = None,
              conditions: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Median wall time of a whole sampling run for each denoiser (see `time_rounds`)."""
    rounds = time_rounds(denoisers, scheduler_config, shape, steps, batch, repeats, scheduler, conditions)
    return {label: statistics.median(ts) for label, ts in rounds.items()}


def bench_artifacts(artifacts: dict[str, OrtArtifact], batch: int = 1, repeats: int = 5,
                    on_run: Callable[[], None] | None = None) -> BenchResult:
    """Time artifacts compiled for the same sampler. Conditions are zeros: values do not change the work.
    The artifacts must have been opened alike (`OrtArtifact.open` gives every session the same options)."""
    first = next(iter(artifacts.values())).manifest
    inputs = first.input
    conditions = {name: torch.zeros((1, *spec.shape[1:]), dtype=getattr(torch, spec.dtype))
                  for name, spec in inputs.items() if name not in ("sample", "timestep")} or None
    times = time_rounds(artifacts, first.scheduler.config, tuple(inputs["sample"].shape[1:]),
                        first.scheduler.steps, batch, repeats, first.scheduler.name, conditions, on_run)
    return BenchResult(times, {label: a.manifest.macs.total for label, a in artifacts.items()})


@dataclass
class BenchOutcome:
    result: BenchResult
    manifest: object  # the timed artifact's dgo_compile.backend.manifest.Manifest
    provider: str


def bench_against(artifact, against=None, batch: int = 1, repeats: int = 5, on_status=None) -> BenchOutcome:
    """`bench`: time `artifact` against `against` (default: the `full` schedule of the artifact's own
    model, compiled now like it: same sampler, steps, resolution and precision). Both are opened with
    the same session options and timed in interleaved rounds. `on_status(what)` may return a context
    manager held while that happens."""
    import contextlib
    import tempfile
    from pathlib import Path

    from dgo_compile.backend.artifact import compile_artifact, read_manifest
    from dgo_compile.core.errors import DgoError

    status = on_status or (lambda _: contextlib.nullcontext())
    manifest = read_manifest(artifact)
    with tempfile.TemporaryDirectory() as tmp:
        if against is None:
            source = manifest.model.source
            if not source:
                raise DgoError(f"{artifact} does not record its model; pass `against` FULL_ARTIFACT", field="against")
            from dgo_compile import load, trace
            from dgo_compile.schedules.schedule import builtin

            traced = trace(load(source), size=manifest.latent_size)  # at the artifact's resolution
            with status("compiling the unpruned baseline"):
                against = compile_artifact(traced, builtin("full", manifest.scheduler.calls,
                                                           tuple(b.name for b in traced.blocks)),
                                           manifest.scheduler.config, Path(tmp) / "full", model_source=source,
                                           scheduler=manifest.scheduler.name, sampler_steps=manifest.scheduler.steps,
                                           precision=manifest.precision)
        artifacts = {"compiled": OrtArtifact.open(artifact), "full": OrtArtifact.open(against)}
        samplers = {label: (a.manifest.scheduler.name, a.steps) for label, a in artifacts.items()}
        if samplers["full"] != samplers["compiled"]:
            raise DgoError(f"{against} is compiled for {samplers['full'][0]} {samplers['full'][1]} steps and "
                           f"{artifact} for {samplers['compiled'][0]} {samplers['compiled'][1]}; compare artifacts "
                           "compiled for the same sampler and step count")
        with status(f"timing {repeats} interleaved rounds of each at batch {batch}"):
            result = bench_artifacts(artifacts, batch, repeats)
    return BenchOutcome(result, manifest, artifacts["compiled"].sessions[0].get_providers()[0])
