"""Transform: take the timestep-only subgraph out of the denoiser, to be evaluated at compile time.

A compiled schedule knows every call's timestep, so whatever depends on the timestep alone (the
sinusoidal embedding, the time MLP, each resnet's time projection) is the same for every image.
Its frontier values (timestep-only nodes that sample- or condition-dependent nodes read) become
inputs `timestep_constant__<i>`, and the subgraph leaves the denoiser. `embedder` computes the
frontier from the denoiser's inputs; a compiler evaluates it once per step at batch 1 and the
runtime broadcasts each step's constants to the batch. Graphs stay shared between steps with
the same pattern, which baking constants into the graph would prevent.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from . import annotations as ann
from .annotations import CONSTANTS_KEY, EMBEDDER_KEY, mark_glue
from .base import PassResult, TransformPass, editable_copy
from .boundaries import input_dependencies


@dataclass(frozen=True)
class FoldTimestepConfig:
    input: str = "timestep"


class FoldTimestep(TransformPass):
    name = ann.FOLD_TIMESTEP
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: FoldTimestepConfig = FoldTimestepConfig()):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if CONSTANTS_KEY in graph_module.meta:
            return PassResult(graph_module, False)
        placeholders = {n.name: n for n in graph_module.graph.nodes if n.op == "placeholder"}
        if self.config.input not in placeholders:
            raise ValueError(f"graph has no input '{self.config.input}'; inputs are {', '.join(placeholders)}")
        frontier, timestep_only = _frontier(graph_module, placeholders[self.config.input])
        if not frontier:
            return PassResult(graph_module, False)

        embedder_graph = copy.deepcopy(graph_module.graph)
        by_name = {n.name: n for n in embedder_graph.nodes}
        embedder_output = next(n for n in embedder_graph.nodes if n.op == "output")
        embedder_output.args = (tuple(by_name[n.name] for n in frontier),)
        embedder_graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
        embedder = fx.GraphModule(graph_module, embedder_graph, class_name="TimestepEmbedder")

        folded = editable_copy(graph_module)
        graph = folded.graph
        by_name = {n.name: n for n in graph.nodes}
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        names = []
        for i, node in enumerate(frontier):
            value = by_name[node.name]
            with graph.inserting_after(last):
                last = graph.placeholder(f"timestep_constant__{i}")
            last.meta.update({k: v for k, v in value.meta.items() if k in ("val", "tensor_meta")})
            mark_glue(last, value)
            # Readers outside the subgraph read the constant; the subgraph itself is about to go.
            value.replace_all_uses_with(last, delete_user_cb=lambda user: user.name not in timestep_only)
            names.append(last.name)
        graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
        timestep = by_name[self.config.input]
        if not timestep.users:
            graph.erase_node(timestep)
        result = fx.GraphModule(folded, graph, class_name=type(graph_module).__name__)
        result.meta = {**graph_module.meta, CONSTANTS_KEY: tuple(names), EMBEDDER_KEY: embedder}
        return PassResult(result, True)


def _frontier(graph_module: fx.GraphModule, timestep: fx.Node) -> tuple[list[fx.Node], set[str]]:
    """Timestep-only tensor nodes with a batch-leading shape read by something that is not, and
    the names of all timestep-only nodes."""
    deps = input_dependencies(graph_module)
    only = {n for n in graph_module.graph.nodes if n is not timestep and deps[n] == {timestep}
            and isinstance(n.meta.get("val"), torch.Tensor)}
    while True:
        frontier = [n for n in graph_module.graph.nodes if n in only and any(u not in only for u in n.users)]
        unbatched = [n for n in frontier if not _batch_leading(n, timestep)]
        if not unbatched:
            break
        only -= set(unbatched)
    return frontier, {n.name for n in only}


def _batch_leading(node: fx.Node, timestep: fx.Node) -> bool:
    """Whether a value's first dimension is the (symbolic) batch, so batch-1 values broadcast."""
    val, t = node.meta["val"], timestep.meta.get("val")
    return (val.dim() >= 1 and isinstance(t, torch.Tensor) and t.dim() == 1
            and str(val.shape[0]) == str(t.shape[0]) and not isinstance(val.shape[0], int))
