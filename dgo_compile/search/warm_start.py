"""Where the pruner starts: DiP-GO's every-gate-keeps, or the best closed-form schedule at the budget.

DiP-GO initialises every gate to keep and lets the sparsity term walk the schedule down to the budget,
which on the shipped model costs most of the iterations and ends below `steps:K` at 50% and 25% kept
MACs (benchmarks/results/pruner.md). Starting instead at the budget, from `steps:K` (the largest K
within `keep_macs`) or from the searched K-step schedule (`dgo_compile.search.step_search`, scored on
the optimizer's own calibration noise), spends the iterations on what a block schedule can add to it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from dgo_compile.frontend.tracing import TracedDenoiser
from dgo_compile.schedules.schedule import Schedule
from dgo_compile.schedules.schedule_cost import ScheduleCost
from dgo_compile.search.selection import calibration_error, uniform_steps_within
from dgo_compile.search.step_search import DEFAULT_SAMPLES, searched_steps


def initial_schedule(traced: TracedDenoiser, scheduler_config: dict, config, calls: int, cost: ScheduleCost, *,
                     model_source: str | None = None, null_class_label: int | None = None,
                     decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Schedule | None:
    """The schedule `config.init` (an OptimizeConfig's) starts the gates at, or None for DiP-GO's start
    (also when no uniform schedule fits `config.keep_macs`)."""
    if config.init == "full":
        return None
    uniform = uniform_steps_within(traced, calls, config.keep_macs, cost)
    k = 0 if uniform is None else sum(map(any, uniform.compute))
    if config.init == "steps" or not 1 < k < calls:
        return uniform
    error = calibration_error(traced, scheduler_config, replace(config, calibration=DEFAULT_SAMPLES), model_source,
                              null_class_label=null_class_label, decode=decode)
    return searched_steps(traced, calls, k, error).schedule


def start_from(pruner, schedule: Schedule | None) -> None:
    """Set `pruner`'s head biases so that its gates at iteration 0 are `schedule`'s whole-call rows: a
    call it skips gets logits (reuse 1, keep 0), one it runs keeps DiP-GO's (0, 1)."""
    if schedule is None:
        return
    with torch.no_grad():
        for call, row in enumerate(schedule.compute):
            if not any(row):
                pruner.head_bias[call] = torch.tensor([1.0, 0.0])
