"""Transform: DiP-GO's SuperNet wiring. Every gateable element gets backup edges.

For each element (block or unit) and each value it hands to the rest of the graph, a cache
input `cache__<element>__<i>` is added (that value from the last step where the element ran)
and the fresh value is appended to the graph outputs so a runtime can store it. Nothing reads
the cache inputs yet: attach_gates decides, per step, between fresh and cached values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from .annotate_blocks import META_KEY as BLOCK_KEY, BlockAnnotation
from .base import Pass, PassResult, editable_copy
from .boundaries import GRANULARITIES, Granularity, boundary_values, cache_name
from .count_costs import META_KEY as COST_KEY, NodeCost

META_KEY = "dgo.backup_edges"
GLUE = BlockAnnotation(None, None, None)


@dataclass(frozen=True)
class BackupEdge:
    element: str
    fresh: str  # node computing the value inside the element
    cache: str  # placeholder holding the value from the last step where the element ran


@dataclass(frozen=True)
class BackupEdges:
    granularity: str
    inputs: tuple[str, ...]  # the denoiser's own inputs, before any cache input
    edges: tuple[BackupEdge, ...]  # in graph order; output i + 1 is edge i's fresh value

    @property
    def elements(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.element for e in self.edges))


@dataclass(frozen=True)
class InsertBackupEdgesConfig:
    granularity: Granularity = "block"


class InsertBackupEdges(Pass):
    name = "insert_backup_edges"
    requires: ClassVar[tuple[str, ...]] = ("annotate_blocks",)

    def __init__(self, config: InsertBackupEdgesConfig = InsertBackupEdgesConfig()):
        if config.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {config.granularity!r}")
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if META_KEY in graph_module.meta:
            return PassResult(graph_module, False)
        supernet = editable_copy(graph_module)  # never edit the caller's graph
        graph = supernet.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        last = placeholders[-1]
        edges = []
        for element, values in boundary_values(supernet, self.config.granularity).items():
            for i, node in enumerate(values):
                if not isinstance(node.meta.get("val"), torch.Tensor):
                    raise ValueError(f"node {node.name} leaving {element} is not a single tensor; cannot cache it")
                with graph.inserting_after(last):
                    last = graph.placeholder(cache_name(element, i))
                last.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
                last.meta[BLOCK_KEY] = GLUE  # the cache belongs to no element
                if COST_KEY in node.meta:
                    last.meta[COST_KEY] = NodeCost(0, 0, node.meta[COST_KEY].shape)
                edges.append(BackupEdge(element, node.name, last.name))
        output = next(n for n in graph.nodes if n.op == "output")
        prediction = output.args[0]
        prediction = prediction[0] if isinstance(prediction, (tuple, list)) else prediction
        nodes = {n.name: n for n in graph.nodes}
        output.args = ((prediction, *(nodes[e.fresh] for e in edges)),)
        supernet.recompile()
        supernet.meta[META_KEY] = BackupEdges(self.config.granularity, tuple(p.name for p in placeholders),
                                              tuple(edges))
        return PassResult(supernet, True)


def backup_edges(graph_module: fx.GraphModule) -> BackupEdges:
    try:
        return graph_module.meta[META_KEY]
    except KeyError:
        raise ValueError(f"graph has no backup edges: run pass '{InsertBackupEdges.name}' first") from None
