"""Run a block schedule in PyTorch over folded per-pattern graphs, with caches owned by one run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from dgo_compile.passes import PassManager
from dgo_compile.passes.fold_schedule import FoldSchedule, FoldScheduleConfig, variant_signature

from .cost import analyse
from .schedule import OUTPUT, Schedule, ScheduleError, block_consumers
from .tracing import TracedDenoiser

VariantKey = tuple[frozenset[str], frozenset[str]]  # (reused blocks, exposed blocks)


@dataclass
class FoldedSchedule:
    """Static graphs for a schedule: steps with the same pattern share one graph."""

    schedule: Schedule  # closed: dead blocks already marked as not computed
    variants: dict[VariantKey, fx.GraphModule]
    step_variant: list[VariantKey]

    def new_run(self) -> "ScheduleRun":
        return ScheduleRun(self)


class ScheduleRun:
    """One sampling run: call once per sampler step, in order. Holds that run's block caches."""

    def __init__(self, folded: FoldedSchedule):
        self.folded = folded
        self.step = 0
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.step >= len(self.folded.step_variant):
            raise IndexError(f"the schedule has {len(self.folded.step_variant)} steps; this is call {self.step + 1}")
        graph_module = self.folded.variants[self.folded.step_variant[self.step]]
        signature = variant_signature(graph_module)
        outputs = graph_module(*inputs, *(self.cache[name] for name in signature.cache_inputs))
        self.cache.update(zip(signature.cache_outputs, outputs[1:]))
        self.step += 1
        return outputs[0]


def fold(traced: TracedDenoiser, schedule: Schedule) -> FoldedSchedule:
    """Close the schedule over the model's block dataflow and fold one graph per distinct pattern."""
    graph_module = analyse(traced)
    names = tuple(b.name for b in traced.blocks)
    if schedule.blocks != names:
        raise ScheduleError(f"schedule '{schedule.name}' is for blocks {list(schedule.blocks)[:3]}..., "
                            f"this model has {list(names)[:3]}...")
    consumers = block_consumers(graph_module, names)
    closed = schedule.with_closure(consumers)
    keys = []
    for t, row in enumerate(closed.compute):
        reused = frozenset(b for b, c in zip(names, row) if not c)
        exposed = frozenset(b for b, c in zip(names, row) if c and _cache_read_later(closed, consumers, b, t))
        keys.append((reused, exposed))
    variants = {key: PassManager([FoldSchedule(FoldScheduleConfig(*key))]).run(graph_module).graph_module
                for key in dict.fromkeys(keys)}
    return FoldedSchedule(closed, variants, keys)


def _cache_read_later(schedule: Schedule, consumers: dict[str, set[str]], block: str, step: int) -> bool:
    """Whether some later step reads `block`'s cache before computing it again (so store it now)."""
    index = {b: i for i, b in enumerate(schedule.blocks)}
    for row in schedule.compute[step + 1:]:
        if row[index[block]]:
            return False
        if any(c == OUTPUT or row[index[c]] for c in consumers[block]):
            return True
    return False
