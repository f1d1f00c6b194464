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

from . import annotations as ann
from .annotations import BACKUP_EDGES_KEY, BackupEdge, BackupEdges, mark_glue
from .base import PassResult, TransformPass, editable_copy
from .boundaries import GRANULARITIES, Granularity, boundary_values, cache_name


@dataclass(frozen=True)
class InsertBackupEdgesConfig:
    granularity: Granularity = "block"


class InsertBackupEdges(TransformPass):
    name = ann.INSERT_BACKUP_EDGES
    requires: ClassVar[tuple[str, ...]] = (ann.ANNOTATE_BLOCKS,)

    def __init__(self, config: InsertBackupEdgesConfig = InsertBackupEdgesConfig()):
        if config.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {config.granularity!r}")
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if BACKUP_EDGES_KEY in graph_module.meta:
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
                mark_glue(last, node)  # the cache belongs to no element
                edges.append(BackupEdge(element, node.name, last.name))
        output = next(n for n in graph.nodes if n.op == "output")
        prediction = output.args[0]
        prediction = prediction[0] if isinstance(prediction, (tuple, list)) else prediction
        nodes = {n.name: n for n in graph.nodes}
        output.args = ((prediction, *(nodes[e.fresh] for e in edges)),)
        supernet.recompile()
        supernet.meta[BACKUP_EDGES_KEY] = BackupEdges(self.config.granularity, tuple(p.name for p in placeholders),
                                              tuple(edges))
        return PassResult(supernet, True)

