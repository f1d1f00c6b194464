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

from .annotate_blocks import META_KEY as BLOCK_KEY
from .base import Pass, PassResult, editable_copy
from .boundaries import element_of, gate_name
from .count_costs import META_KEY as COST_KEY, NodeCost
from .insert_backup_edges import GLUE, InsertBackupEdges, backup_edges

META_KEY = "dgo.gates"
aten = torch.ops.aten


@dataclass(frozen=True)
class GatedEdge:
    element: str
    fresh: str
    cache: str
    mixed: str  # the node every outside reader now reads


@dataclass(frozen=True)
class Gates:
    gates: tuple[tuple[str, str], ...]  # (element, gate input name), in graph order
    edges: tuple[GatedEdge, ...]


@dataclass(frozen=True)
class AttachGatesConfig:
    pass


class AttachGates(Pass):
    name = "attach_gates"
    requires: ClassVar[tuple[str, ...]] = (InsertBackupEdges.name,)

    def __init__(self, config: AttachGatesConfig = AttachGatesConfig()):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if META_KEY in graph_module.meta:
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
            _glue(last)
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
                _glue(node, fresh)
            fresh.replace_all_uses_with(
                mixed, delete_user_cb=lambda user, e=edge.element, k=keep: user is not k and (
                    user.op == "output" or element_of(user, edges.granularity) != e))
            gated.append(GatedEdge(edge.element, fresh.name, cache.name, mixed.name))
        supernet.recompile()
        supernet.meta[META_KEY] = Gates(tuple((e, g.name) for e, g in gates.items()), tuple(gated))
        return PassResult(supernet, True)


def gates_of(graph_module: fx.GraphModule) -> Gates:
    try:
        return graph_module.meta[META_KEY]
    except KeyError:
        raise ValueError(f"graph has no gates: run pass '{AttachGates.name}' first") from None


def _glue(node: fx.Node, like: fx.Node | None = None) -> None:
    """New nodes belong to no element and cost nothing worth counting."""
    node.meta[BLOCK_KEY] = GLUE
    shape = like.meta[COST_KEY].shape if like is not None and COST_KEY in like.meta else ()
    node.meta[COST_KEY] = NodeCost(0, 0, shape)
