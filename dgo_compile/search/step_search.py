"""`steps-searched:K`: the best non-uniform K-step schedule this tool finds on calibration noise.

A K-step schedule runs every block at K of the sampler's calls (call 0 always) and reuses everything in
between; for DDIM with eta 0 that is DDIM on a non-uniform subset of the timesteps (as "Align Your
Steps" tunes per model). It is the honest competitor to a learned schedule that reuses whole calls, and
unlike `steps:K` it needs the model and calibration noise, so it is built here rather than parsed.

Search: coordinate descent started from uniform `steps:K`: each chosen call but call 0 tries moving by
+-stride between its neighbours, a move is kept only when it lowers the score (MSE of the final samples
against the full schedule's), and the stride halves from half the uniform gap down to 1 (coarse to
fine). Starting from `steps:K` and accepting only improvements makes the result never worse than
`steps:K` on the noise it was scored on. Why not more: all C(calls - 1, K - 1) subsets are out of reach
(C(49, 9) ~ 2e9 at DDIM 50, K 10) and greedy forward selection costs ~calls x K trajectories; here each
score is one trajectory of K full calls on a few samples, capped at `max_evaluations` (default 48),
about a minute on the shipped model at 8 samples, K 10, one CPU thread.

All subsets share one fold: a K-step schedule's calls have one of three graph patterns (full and
followed by a full call, full and followed by a reused call, reuse all), so the graphs of a template
schedule holding all three are reused with each subset's call order (`StepSubsets`); it runs exactly
what `fold` would build for the subset.

Most trials share a prefix with the incumbent: moving chosen call i changes nothing before it. The
incumbent's per-call predictions and caches are kept (`PrefixReplay`), so a trial replays its shared
prefix through the scheduler alone and runs the denoiser only from its first differing call: the same
final samples bit for bit, at about half the denoiser calls (`dgo_compile.search.prefix_replay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from dgo_compile.schedules.schedule import Schedule, ScheduleError, _uniform_steps

MAX_EVALUATIONS = 48
DEFAULT_SAMPLES = 8  # calibration samples of `search-steps` (selection scores on its own, 4 by default)
NAME = "steps-searched:{k}"


def step_subset(name: str, elements: Sequence[str], calls: int, chosen: Sequence[int]) -> Schedule:
    """Every element computed at the `chosen` calls (call 0 among them), every one reused elsewhere."""
    picked = set(chosen)
    if 0 not in picked or not all(0 <= c < calls for c in picked):
        raise ScheduleError(f"a K-step schedule runs call 0 and calls within 0..{calls - 1}; got {sorted(picked)}")
    return Schedule(name, tuple(elements), tuple(tuple(c in picked for _ in elements) for c in range(calls)))


@dataclass(frozen=True)
class StepSearch:
    schedule: Schedule  # steps-searched:K (block granularity)
    chosen: tuple[int, ...]  # the calls that run in full
    score: float  # its MSE against the full schedule on the calibration samples
    uniform_score: float  # steps:K's, the start of the search
    evaluations: int  # trajectories scored, the start included


def search_steps(score: Callable[[tuple[int, ...]], float], calls: int, k: int,
                 max_evaluations: int = MAX_EVALUATIONS) -> tuple[tuple[int, ...], float, float, int]:
    """Coordinate descent over which `k` of `calls` calls run (lower `score` is better), from uniform
    `steps:k`; returns (chosen calls, their score, the uniform score, evaluations)."""
    if not 1 <= k <= calls:
        raise ScheduleError(f"a K-step search needs 1 <= K <= {calls}, got {k}", field="k")
    chosen = sorted(_uniform_steps(calls, k))
    best = uniform = score(tuple(chosen))
    evaluations = 1
    stride = max(1, calls // k // 2)
    while stride >= 1 and evaluations < max_evaluations:
        improved = True
        while improved and evaluations < max_evaluations:
            improved = False
            for i in range(1, k):
                low, high = chosen[i - 1], chosen[i + 1] if i + 1 < k else calls
                for moved in (chosen[i] - stride, chosen[i] + stride):
                    if not low < moved < high or evaluations >= max_evaluations:
                        continue
                    trial = chosen[:i] + [moved] + chosen[i + 1:]
                    value = score(tuple(trial))
                    evaluations += 1
                    if value < best:
                        chosen, best, improved = trial, value, True
                        break
        stride //= 2
    return tuple(chosen), best, uniform, evaluations


class StepSubsets:
    """Folded K-step schedules over one model that share one fold's graphs (see the module note)."""

    def __init__(self, traced, calls: int, timesteps: list[float] | None = None):
        from dgo_compile.backend.folding import fold

        self.elements = tuple(b.name for b in traced.blocks)
        self.calls = calls
        self._traced, self._timesteps = traced, timesteps
        template = step_subset("template", self.elements, calls, (0, 1) if calls > 2 else (0,))
        self._template = fold(traced, template, timesteps)

    def folded(self, chosen: Sequence[int], name: str = "steps-subset"):
        """The FoldedSchedule of the subset: the template's graphs in the subset's call order."""
        from dgo_compile.backend.folding import fold
        from dgo_compile.schedules.schedule import variant_keys

        schedule = step_subset(name, self.elements, self.calls, chosen)
        consumers = self._consumers()
        closed = schedule.with_closure(consumers)
        keys = variant_keys(closed, consumers)
        if not set(keys) <= set(self._template.variants):  # not expected; fold it outright
            return fold(self._traced, schedule, self._timesteps)
        return replace(self._template, schedule=closed, step_variant=keys)

    def _consumers(self):
        if not hasattr(self, "_consumer_map"):
            from dgo_compile.passes.boundaries import element_consumers
            from dgo_compile.schedules.cost import analyse

            self._consumer_map = element_consumers(analyse(self._traced), self.elements, "block")
        return self._consumer_map


def searched_steps(traced, calls: int, k: int, mse: Callable[[object], float],
                   max_evaluations: int = MAX_EVALUATIONS, timesteps: list[float] | None = None) -> StepSearch:
    """`steps-searched:k` over `calls` denoiser calls; `mse(denoiser)` runs one trajectory of a fresh
    per-run denoiser and returns its final samples' MSE against the full schedule's, from the same noise
    and conditions every time (the prefix replay relies on it)."""
    from dgo_compile.search.prefix_replay import PrefixReplay

    subsets = StepSubsets(traced, calls, timesteps)
    replay, incumbent = PrefixReplay(), [math.inf]

    def score(chosen: tuple[int, ...]) -> float:
        run = replay.run(subsets.folded(chosen))
        value = mse(run)
        if value < incumbent[0]:  # search_steps keeps exactly these
            incumbent[0] = value
            replay.keep(run)
        return value

    chosen, best, uniform, evaluations = search_steps(score, calls, k, max_evaluations)
    schedule = step_subset(NAME.format(k=k), subsets.elements, calls, chosen)
    return StepSearch(schedule, chosen, best, uniform, evaluations)


def search_for_model(model, k: int, output, *, steps: int | None = None, scheduler: str | None = None,
                     samples: int = DEFAULT_SAMPLES, max_evaluations: int = MAX_EVALUATIONS,
                     class_labels: tuple[int, ...] | None = None, prompt_embeds: str | None = None,
                     prompts: str | None = None, guidance_scale: float | None = None) -> StepSearch:
    """`steps-searched:k` for `model` (a path, or None for the shipped one) under its scheduler (or
    `scheduler`) at `steps` steps, scored on `samples` calibration samples of noise seed 30000 with the
    given conditions, saved as a schedule JSON at `output` (compile it with `--steps` `steps`)."""
    from dgo_compile.core.configs import OptimizeConfig, PrunerError, with_overrides

    if k < 1:  # settings are checked before torch is imported
        raise ScheduleError(f"`k` must be at least 1 (call 0 always runs), got {k}", field="k")
    if samples < 1:
        raise PrunerError(f"`calibration_samples` must be at least 1, got {samples}", field="calibration_samples")
    if max_evaluations < 1:
        raise PrunerError(f"`max_evaluations` must be at least 1, got {max_evaluations}", field="max_evaluations")
    config = with_overrides(OptimizeConfig, dict(steps=steps, scheduler=scheduler, calibration=samples,
                                                 class_labels=class_labels,
                                                 prompt_embeds=prompt_embeds, prompts=prompts,
                                                 guidance_scale=guidance_scale))
    from dgo_compile import load, trace
    from dgo_compile.backend.sampling import denoiser_calls
    from dgo_compile.search.calibration import vae_decoder
    from dgo_compile.search.selection import SELECTION_SEED, calibration_error

    config = replace(config, seed=SELECTION_SEED)
    loaded = load(model)
    loaded.require_scheduler()
    calls = denoiser_calls(loaded.scheduler_config, config.steps, config.scheduler)
    if not 1 <= k <= calls:
        raise ScheduleError(f"`k` must be in 1..{calls} (the denoiser calls of {config.steps} steps), got {k}",
                            field="k")
    traced = trace(loaded)
    source = loaded.source.resolve()
    error = calibration_error(traced, loaded.scheduler_config, config, str(source) if source.is_dir() else None,
                              null_class_label=traced.family.null_class_label(loaded.model),
                              decode=vae_decoder(source) if source.is_dir() else None)
    found = searched_steps(traced, calls, k, error, max_evaluations)
    found.schedule.save(output)
    return found
