"""The learned-schedule commands as library calls: train DiP-GO's pruner for a model (`prepare_optimize`,
then `OptimizeRun.run`), and extract a schedule from a trained pruner folder (`schedule_from_pruner`).

Settings and outputs are checked before torch is imported, so a bad option answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dgo_compile.core.configs import DEFAULT_MODEL, OptimizeConfig, PrunerError, with_overrides
from dgo_compile.core.outputs import check_output


@dataclass
class OptimizeRun:
    """A pruner run ready to train: its resolved settings, the traced model and where it is kept."""

    config: OptimizeConfig
    loaded: Any  # dgo_compile.frontend.loading.LoadedModel
    traced: Any  # dgo_compile.frontend.tracing.TracedDenoiser
    output: Path
    resume: bool

    def run(self, device: str = "cpu", on_iteration: Callable[[dict], None] | None = None):
        """Train (or continue) the pruner; returns the `TrainedPruner`."""
        from dgo_compile.search.calibration import vae_decoder
        from dgo_compile.search.pruner import optimize

        loaded, traced = self.loaded, self.traced
        return optimize(traced, loaded.scheduler_config, self.config, self.output,
                        model_source=str(loaded.source.resolve()),
                        null_class_label=traced.family.null_class_label(loaded.model), resume=self.resume,
                        decode=vae_decoder(loaded.source) if loaded.source.is_dir() else None,
                        on_iteration=on_iteration, device=device)


def prepare_optimize(model: str | Path | None, given: dict[str, Any], output: str | Path,
                     resume: bool = False) -> OptimizeRun:
    """The settings `given` (None values left out) over the defaults, or over the stored run's with
    `resume`; the model loaded (it needs a scheduler) and traced."""
    output = Path(output)
    if not resume:  # settings and a plain new output are checked before torch is imported
        with_overrides(OptimizeConfig, given)
        if not output.exists():
            check_output(output, "pruner", protected=[model or DEFAULT_MODEL], error=PrunerError)
    from dgo_compile import load, trace
    from dgo_compile.search.pruner import load_pruner, restartable

    stored = None
    if resume and not restartable(output):
        stored = load_pruner(output, allow_unfinished=True).state
        model = model or stored.model_path
    config = with_overrides(OptimizeConfig, given, stored.config if stored is not None else None)
    if not restartable(output):
        check_output(output, "pruner", resume=resume, protected=[model or DEFAULT_MODEL], error=PrunerError,
                     exists_hint="pass `resume` to continue it or choose another `output`")
    loaded = load(model)
    loaded.require_scheduler()
    return OptimizeRun(config, loaded, trace(loaded), output, resume)


@dataclass
class ExtractedSchedule:
    schedule: Any  # dgo_compile.schedules.schedule.Schedule
    kept: float  # its kept share of the full model's MACs
    state: Any  # the pruner's PrunerState
    selection: Any  # dgo_compile.search.selection.Selection: how it compared with the closed-form schedules


def schedule_from_pruner(pruner: str | Path, keep_macs: float, output: str | Path, heatmap: str | Path,
                         model: str | Path | None = None, calibration_samples: int = 32) -> ExtractedSchedule:
    """The schedule at `keep_macs` from the trained pruner folder `pruner`, saved to `output` with its
    heatmap; `model` is the pruner's model when it has moved since training. With
    `calibration_samples` > 0 the learned schedule is scored against the closed-form ones at the
    same MACs on calibration noise, and the best is saved (`dgo_compile.search.selection`)."""
    from dgo_compile import load, trace
    from dgo_compile.core.options import check
    from dgo_compile.driver.report import save_heatmap
    from dgo_compile.schedules.schedule_cost import ScheduleCost
    from dgo_compile.search.calibration import vae_decoder
    from dgo_compile.search.pruner import load_pruner
    from dgo_compile.search.selection import schedule_at

    check("schedule", {"keep_macs": keep_macs})
    if calibration_samples < 0:
        raise PrunerError(f"`calibration_samples` must be 0 or more, got {calibration_samples}",
                          field="calibration_samples")
    pruner = Path(pruner)
    trained = load_pruner(pruner)
    state = trained.state
    loaded = load(model or state.model_path)
    traced = trace(loaded)
    cost = ScheduleCost(traced, state.schedule_granularity)
    if cost.elements != state.elements:
        raise PrunerError(f"{pruner} was trained on elements {list(state.elements)[:3]}..., this model has "
                          f"{list(cost.elements)[:3]}...; pass the pruner's `model`", field="model")
    decode = vae_decoder(loaded.source) if state.decoded_with_vae and loaded.source.is_dir() else None
    selection = schedule_at(traced, trained, keep_macs, samples=calibration_samples, decode=decode,
                            null_class_label=traced.family.null_class_label(loaded.model))
    plan, kept = selection.best.schedule, selection.best.kept
    scores = trained.reuse_scores() if plan.elements == state.elements else None  # a closed-form winner has none
    title = (f"{pruner.name}: {plan.name}, {kept:.1%} of the MACs kept "
             f"({state.scheduler['class']} {state.scheduler['steps']} steps)")
    save_heatmap(scores, plan, heatmap, title)
    plan.save(output)
    return ExtractedSchedule(plan, kept, state, selection)
