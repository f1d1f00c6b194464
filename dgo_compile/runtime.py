"""Block schedules in PyTorch: the gated SuperNet, and folded per-pattern graphs with run-owned caches.

Pipeline (each a pass, see dgo_compile.passes):
  annotate_blocks -> count_costs -> [fold_timestep] -> insert_backup_edges -> attach_gates
  -> fold_schedule (once per distinct step pattern)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import fx, nn

from dgo_compile.passes import PassManager
from dgo_compile.passes.attach_gates import AttachGates, gates_of
from dgo_compile.passes.boundaries import element_consumers
from dgo_compile.passes.fold_schedule import FoldSchedule, FoldScheduleConfig, variant_signature
from dgo_compile.passes.fold_timestep import CONSTANTS_KEY, EMBEDDER_KEY, FoldTimestep
from dgo_compile.passes.insert_backup_edges import InsertBackupEdges, InsertBackupEdgesConfig, backup_edges

from .cost import analyse
from .schedule import Schedule, ScheduleError
from .tracing import TracedDenoiser

VariantKey = tuple[frozenset[str], frozenset[str]]  # (reused elements, exposed elements)


def gateable_elements(traced: TracedDenoiser, granularity: str = "block") -> tuple[str, ...]:
    """Schedule columns at a granularity: the model's blocks, or the units inside them."""
    if granularity == "block":
        return tuple(b.name for b in traced.blocks)
    return tuple(u for b in traced.blocks for u in b.units)


def build_supernet(traced: TracedDenoiser, granularity: str = "block", fold_timestep: bool = False,
                   dump_dir: str | Path | None = None) -> fx.GraphModule:
    """DiP-GO's SuperNet: the traced graph with backup edges and a gate per element."""
    passes = [FoldTimestep()] if fold_timestep else []
    passes += [InsertBackupEdges(InsertBackupEdgesConfig(granularity)), AttachGates()]
    return PassManager(passes, dump_dir).run(analyse(traced)).graph_module


def graph_on(graph_module: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of `graph_module` that runs on `device`: parameters, buffers and tensor constants moved,
    and the devices that tracing wrote into factory calls (`arange(..., device=cpu)`) rewritten."""
    moved = copy.deepcopy(graph_module).to(device)
    for node in moved.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device):
            node.kwargs = {**node.kwargs, "device": device}
        elif node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            module = moved.get_submodule(owner) if owner else moved
            value = getattr(module, name)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.device != device:
                setattr(module, name, value.to(device))
    moved.recompile()
    return moved


class SuperNetRun:
    """One trajectory through the gated SuperNet: call with that step's gates (element -> 0-d tensor).

    Caches start at zero, so step 0 must compute everything; afterwards each call's mixed outputs
    are the next call's caches, exactly what a folded schedule stores. Gradients flow through;
    `checkpointed` recomputes each call in the backward pass instead of keeping its activations,
    so training memory stays flat in the number of steps.
    """

    def __init__(self, supernet: fx.GraphModule, checkpointed: bool = False):
        self.supernet = supernet
        self.checkpointed = checkpointed
        self.edges = backup_edges(supernet)
        self.gate_names = gates_of(supernet).gates
        self.cache: list[torch.Tensor] | None = None

    def __call__(self, *inputs: torch.Tensor, gates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        gates = gates or {}
        unknown = set(gates) - {e for e, _ in self.gate_names}
        if unknown:
            raise ScheduleError(f"no gateable element {sorted(unknown)[0]}")
        one = inputs[0].new_ones(())
        values = [gates.get(element, one) for element, _ in self.gate_names]
        if self.cache is None:
            if any(not bool((v == 1).all()) for v in values):
                raise ScheduleError("the first step has no cache to reuse: every gate must be 1")
            batch = inputs[0].shape[0]
            placeholders = {n.name: n for n in self.supernet.graph.nodes if n.op == "placeholder"}
            self.cache = [inputs[0].new_zeros((batch, *placeholders[e.cache].meta["tensor_meta"].shape[1:]))
                          for e in self.edges.edges]
        if self.checkpointed:
            outputs = torch.utils.checkpoint.checkpoint(self.supernet, *inputs, *self.cache, *values, use_reentrant=False)
        else:
            outputs = self.supernet(*inputs, *self.cache, *values)
        self.cache = list(outputs[1:])
        return outputs[0]


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


class StepRun:
    """One sampling run of a compiled schedule: call once per denoiser call, in order.

    Calls are counted by index, never matched by timestep value, so schedulers that repeat a
    timestep (Heun, PNDM) work. A folded timestep is checked, so a sampler with another
    scheduler or step count fails loudly instead of producing wrong images. The caches belong
    to this run alone.
    """

    def __init__(self, calls: int, input_names: tuple[str, ...], timesteps: tuple[float, ...] | None):
        self.calls, self.input_names, self.timesteps = calls, input_names, timesteps
        self.step = 0

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.step >= self.calls:
            raise ScheduleError(f"the schedule was compiled for {self.calls} denoiser calls; this is call "
                                f"{self.step + 1}: sample with the scheduler and step count it was compiled for")
        if len(inputs) != len(self.input_names):
            raise ScheduleError(f"expected inputs {', '.join(self.input_names)}; got {len(inputs)} tensors")
        named = dict(zip(self.input_names, inputs))
        if self.timesteps is not None and "timestep" in named:
            expected, got = self.timesteps[self.step], named["timestep"].float()
            if not torch.allclose(got, torch.full_like(got, expected), rtol=1e-5, atol=1e-3):
                raise ScheduleError(f"call {self.step + 1} was compiled for timestep {expected:g}, got "
                                    f"{got.flatten()[0].item():g}: sample with the scheduler and step count "
                                    "it was compiled for")
        prediction = self._run(self.step, named)
        self.step += 1
        return prediction

    def _run(self, step: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class ScheduleRun(StepRun):
    def __init__(self, folded: FoldedSchedule):
        super().__init__(len(folded.step_variant), folded.input_names, folded.timesteps)
        self.folded = folded
        self.cache: dict[str, torch.Tensor] = {}

    def _run(self, step: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
        graph_module = self.folded.variants[self.folded.step_variant[step]]
        signature = variant_signature(graph_module)
        batch = named["sample"].shape[0]
        constants = self.folded.constants[step] if self.folded.constants else {}
        outputs = graph_module(*(named[n] for n in signature.inputs),
                               *(constants[n].expand(batch, *constants[n].shape[1:]) for n in signature.constant_inputs),
                               *(self.cache[n] for n in signature.cache_inputs))
        self.cache.update(zip(signature.cache_outputs, outputs[1:]))
        return outputs[0]


def variant_keys(closed: Schedule, consumers: dict[str, set[str]]) -> list[VariantKey]:
    """Each call's (reused, exposed) graph key for a closed schedule.

    Calls that reuse the same elements share one graph exposing every value any of them must
    store: an extra output costs no compute, a second graph costs a second copy of the weights.
    """
    reused_at = [frozenset(b for b, c in zip(closed.blocks, row) if not c) for row in closed.compute]
    exposed_with: dict[frozenset[str], set[str]] = {r: set() for r in reused_at}
    for t, row in enumerate(closed.compute):
        exposed_with[reused_at[t]] |= {b for b, c in zip(closed.blocks, row)
                                       if c and closed.cache_read_later(consumers, b, t)}
    return [(r, frozenset(exposed_with[r])) for r in reused_at]


def fold(traced: TracedDenoiser, schedule: Schedule, timesteps: list[float] | None = None,
         dump_dir: str | Path | None = None) -> FoldedSchedule:
    """Close the schedule over the model's dataflow and fold one graph per distinct step pattern.

    With `timesteps` (one per denoiser call, e.g. from sampling.denoiser_timesteps) the
    timestep-only subgraph is evaluated here, once per call, and leaves the graphs.
    """
    names = gateable_elements(traced, schedule.granularity)
    if schedule.blocks != names:
        raise ScheduleError(f"schedule '{schedule.name}' is for {schedule.granularity}s {list(schedule.blocks)[:3]}..., "
                            f"this model has {list(names)[:3]}...")
    if timesteps is not None and len(timesteps) != schedule.steps:
        raise ScheduleError(f"schedule '{schedule.name}' has {schedule.steps} steps but the sampler makes "
                            f"{len(timesteps)} denoiser calls; build the schedule for {len(timesteps)} steps")
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
    names = supernet.meta.get(CONSTANTS_KEY, ())
    if not names:
        return [{} for _ in timesteps]
    embedder = supernet.meta[EMBEDDER_KEY]
    example = traced.example_inputs(batch=1)
    constants = []
    for t in timesteps:
        example["timestep"] = torch.full_like(example["timestep"], t)
        constants.append(dict(zip(names, embedder(*example.values()))))
    return constants
