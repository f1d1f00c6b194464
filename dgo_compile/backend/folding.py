"""Compile-time folding of a block schedule: the SuperNet closed over the schedule, one static graph
per distinct call pattern (the `fold_schedule` pass), and the timestep-only values of every call
evaluated once. What `compile_artifact` exports; `FoldedSchedule.new_run` runs it in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from dgo_compile.backend.torch_runner import ScheduleRun
from dgo_compile.frontend.tracing import TracedDenoiser
from dgo_compile.passes import PassManager
from dgo_compile.passes.annotations import backup_edges, timestep_constants, timestep_embedder
from dgo_compile.passes.boundaries import element_consumers
from dgo_compile.passes.fold_schedule import FoldSchedule, FoldScheduleConfig
from dgo_compile.schedules.cost import analyse
from dgo_compile.schedules.schedule import Schedule, ScheduleError, VariantKey, variant_keys
from dgo_compile.schedules.supernet import build_supernet, gateable_elements


@dataclass
class FoldedSchedule:
    """Static graphs for a schedule: steps with the same pattern share one graph."""

    schedule: Schedule  # closed: dead elements already marked as not computed
    variants: dict[VariantKey, fx.GraphModule]
    step_variant: list[VariantKey]
    input_names: tuple[str, ...]  # what a sampler passes, in order
    timesteps: tuple[float, ...] | None = None  # per call, when the timestep path was folded
    constants: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per call, at batch 1
    cache_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # cache name -> shape past the batch

    def new_run(self) -> "ScheduleRun":
        return ScheduleRun(self)


def fold(traced: TracedDenoiser, schedule: Schedule, timesteps: list[float] | None = None,
         dump_dir: str | Path | None = None) -> FoldedSchedule:
    """Close the schedule over the model's dataflow and fold one graph per distinct step pattern.

    With `timesteps` (one per denoiser call, e.g. from sampling.denoiser_timesteps) the
    timestep-only subgraph is evaluated here, once per call, and leaves the graphs.
    """
    names = gateable_elements(traced, schedule.granularity)
    if schedule.elements != names:
        raise ScheduleError(f"schedule '{schedule.name}' is for {schedule.granularity}s "
                            f"{list(schedule.elements)[:3]}..., "
                            f"this model has {list(names)[:3]}...")
    if timesteps is not None and len(timesteps) != schedule.calls:
        raise ScheduleError(f"schedule '{schedule.name}' has {schedule.calls} calls but the sampler makes "
                            f"{len(timesteps)} denoiser calls; build the schedule for {len(timesteps)} calls")
    dump = Path(dump_dir) if dump_dir is not None else None
    supernet = build_supernet(traced, schedule.granularity, timesteps is not None, dump and dump / "supernet")
    consumers = element_consumers(analyse(traced), names, schedule.granularity)
    closed = schedule.with_closure(consumers)
    keys = variant_keys(closed, consumers)
    variants = {}
    for index, key in enumerate(dict.fromkeys(keys)):
        manager = PassManager([FoldSchedule(FoldScheduleConfig(*key))], dump and dump / f"variant_{index:03d}")
        variants[key] = manager.run(supernet).graph_module
    constants = _timestep_constants(traced, supernet, timesteps) if timesteps is not None else []
    placeholders = {n.name: n for n in supernet.graph.nodes if n.op == "placeholder"}
    cache_shapes = {e.cache: tuple(placeholders[e.cache].meta["tensor_meta"].shape[1:])
                    for e in backup_edges(supernet).edges}
    return FoldedSchedule(closed, variants, keys, traced.input_names,
                          tuple(float(t) for t in timesteps) if timesteps is not None else None, constants,
                          cache_shapes)


@torch.no_grad()
def _timestep_constants(traced: TracedDenoiser, supernet: fx.GraphModule,
                        timesteps: list[float]) -> list[dict[str, torch.Tensor]]:
    """Each call's timestep-only values at batch 1 (the runtime broadcasts them to the batch)."""
    names = timestep_constants(supernet)
    if not names:
        return [{} for _ in timesteps]
    embedder = timestep_embedder(supernet)
    example = traced.example_inputs(batch=1)
    constants = []
    for t in timesteps:
        example["timestep"] = torch.full_like(example["timestep"], t)
        constants.append(dict(zip(names, embedder(*example.values()))))
    return constants
