"""DiP-GO's SuperNet in PyTorch: the traced graph with a backup edge and a gate per element, and one
differentiable trajectory through it (what the pruner trains on).

Pipeline (each a pass, see dgo_compile.passes):
  annotate_blocks -> count_costs -> [fold_timestep] -> insert_backup_edges -> attach_gates
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import fx, nn

from dgo_compile.frontend.tracing import TracedDenoiser
from dgo_compile.passes import PassManager
from dgo_compile.passes.annotations import backup_edges, gates_of
from dgo_compile.passes.attach_gates import AttachGates
from dgo_compile.passes.fold_timestep import FoldTimestep
from dgo_compile.passes.insert_backup_edges import InsertBackupEdges, InsertBackupEdgesConfig
from dgo_compile.schedules.cost import analyse
from dgo_compile.schedules.schedule import ScheduleError


def gateable_elements(traced: TracedDenoiser, granularity: str = "block") -> tuple[str, ...]:
    """Schedule columns at a granularity: the model's blocks, or the units inside them."""
    if granularity == "block":
        return tuple(b.name for b in traced.blocks)
    return tuple(u for b in traced.blocks for u in b.units)


def block_units(traced: TracedDenoiser) -> dict[str, tuple[str, ...]]:
    """Each block's units in call order: what unit-granularity built-ins (deepcache) are laid out by."""
    return {b.name: b.units for b in traced.blocks}


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
            outputs = torch.utils.checkpoint.checkpoint(self.supernet, *inputs, *self.cache, *values,
                                                        use_reentrant=False)
        else:
            outputs = self.supernet(*inputs, *self.cache, *values)
        self.cache = list(outputs[1:])
        return outputs[0]


def activation_bytes(supernet: fx.GraphModule, batch: int) -> int:
    """An upper estimate of what autograd keeps for one SuperNet call at `batch`: the bytes of every
    node's output (it kept 0.72x of that on the shipped model), which a trajectory without
    checkpointing holds per call until its backward pass."""
    outputs, traced_batch = 0, None
    for node in supernet.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if not hasattr(meta, "shape"):
            continue
        if node.op == "placeholder" and traced_batch is None:
            traced_batch = meta.shape[0] if len(meta.shape) else None
        elif node.op in ("call_function", "call_method", "call_module"):
            outputs += meta.shape.numel() * meta.dtype.itemsize
    return outputs * batch // (traced_batch or 1)


def fits_without_checkpointing(supernet: fx.GraphModule, batch: int, calls: int, device: torch.device,
                               processes: int = 1) -> bool:
    """Whether `calls` SuperNet calls at `batch` can keep their activations for the backward pass:
    within a quarter of the machine's memory (shared by `processes` on it), or half of the GPU's free
    memory. Checkpointing gives the same gradients at about 1.7x the backward time."""
    if device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    else:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (4 * processes)
    return activation_bytes(supernet, batch) * calls <= budget
