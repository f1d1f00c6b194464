"""Transform: a gate input per gateable element choosing its fresh or its cached outputs.

Every value an element hands on becomes `gate * fresh + (1 - gate) * cache`, with one 0-d
`gate__<element>` input per element. A gate of exactly 1.0 gives the fresh value bit for bit
(x * 1 + c * 0 == x for finite c), so the all-compute SuperNet is the original model; a gate of
0.0 gives the cache. The same form takes straight-through gates (hard forward, soft backward),
which is how the pruner learns them. Outputs 1.. now carry the mixed values: the next cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from . import annotations as ann
from .annotations import GATES_KEY, GatedEdge, Gates, backup_edges, mark_glue
from .base import PassResult, TransformPass, editable_copy
from .boundaries import element_of, gate_name

aten = torch.ops.aten


@dataclass(frozen=True)
class AttachGatesConfig:
    pass


class AttachGates(TransformPass):
    name = ann.ATTACH_GATES
    requires: ClassVar[tuple[str, ...]] = (ann.INSERT_BACKUP_EDGES,)

    def __init__(self, config: AttachGatesConfig = AttachGatesConfig()):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if GATES_KEY in graph_module.meta:
            return PassResult(graph_module, False)
        supernet = editable_copy(graph_module)
        graph = supernet.graph
        edges = backup_edges(supernet)
        nodes = {n.name: n for n in graph.nodes}
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        gates = {}
        for element in edges.elements:
            with graph.inserting_after(last):
                last = gates[element] = graph.placeholder(gate_name(element))
            last.meta["val"] = torch.empty(())
            mark_glue(last)
        gated = []
        for edge in edges.edges:
            fresh, cache, gate = nodes[edge.fresh], nodes[edge.cache], gates[edge.element]
            with graph.inserting_after(fresh):
                keep = graph.call_function(aten.mul.Tensor, (fresh, gate))
            with graph.inserting_after(keep):
                closed = graph.call_function(aten.rsub.Scalar, (gate, 1.0))
            with graph.inserting_after(closed):
                held = graph.call_function(aten.mul.Tensor, (cache, closed))
            with graph.inserting_after(held):
                mixed = graph.call_function(aten.add.Tensor, (keep, held))
            for node in (keep, closed, held, mixed):
                mark_glue(node, fresh)
            fresh.replace_all_uses_with(
                mixed, delete_user_cb=lambda user, e=edge.element, k=keep: user is not k and (
                    user.op == "output" or element_of(user, edges.granularity) != e))
            gated.append(GatedEdge(edge.element, fresh.name, cache.name, mixed.name))
        supernet.recompile()
        supernet.meta[GATES_KEY] = Gates(tuple((e, g.name) for e, g in gates.items()), tuple(gated))
        return PassResult(supernet, True)

