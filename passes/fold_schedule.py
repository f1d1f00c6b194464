"""Transform: specialise the gated SuperNet to one step pattern of a schedule (binary gates).

A reused element's mixed values become its cache inputs, a computed element's become its fresh
values; then dead-code elimination removes the reused elements and whatever fed only them (the
dependency closure, materialised), the gate inputs and the unread cache inputs. Only the fresh
values of `exposed` elements (those a later step will read from the cache) stay outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from . import annotations as ann
from .annotations import VARIANT_KEY, VariantSignature, backup_edges, gates_of, timestep_constants
from .base import PassResult, TransformPass, editable_copy


@dataclass(frozen=True)
class FoldScheduleConfig:
    reused: frozenset[str]  # elements whose outputs come from the cache at this step
    exposed: frozenset[str]  # computed elements whose fresh outputs the runtime must store


class FoldSchedule(TransformPass):
    name = ann.FOLD_SCHEDULE
    requires: ClassVar[tuple[str, ...]] = (ann.ATTACH_GATES,)

    def __init__(self, config: FoldScheduleConfig):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        reused, exposed = self.config.reused, self.config.exposed
        if reused & exposed:
            raise ValueError(f"element {sorted(reused & exposed)[0]} cannot be both reused and exposed")
        gates, edges = gates_of(graph_module), backup_edges(graph_module)
        unknown = sorted((reused | exposed) - set(edges.elements))
        if unknown:
            raise ValueError(f"no gateable element '{unknown[0]}' at {edges.granularity} granularity; "
                             f"elements are {', '.join(edges.elements[:4])}...")
        folded = editable_copy(graph_module)
        graph = folded.graph
        nodes = {n.name: n for n in graph.nodes}
        for edge in gates.edges:
            source = edge.cache if edge.element in reused else edge.fresh
            nodes[edge.mixed].replace_all_uses_with(nodes[source])
        output = next(n for n in graph.nodes if n.op == "output")
        kept = [e for e in gates.edges if e.element in exposed]
        output.args = ((output.args[0][0], *(nodes[e.fresh] for e in kept)),)
        graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
        constants = set(timestep_constants(graph_module))
        inputs = set(edges.inputs) - constants  # always kept, even when unread: they are the call signature
        for node in [n for n in graph.nodes if n.op == "placeholder" and not n.users and n.name not in inputs]:
            graph.erase_node(node)  # gates, unread caches, timestep constants of removed elements
        result = fx.GraphModule(folded, graph, class_name="FoldedDenoiser")  # keeps only the used params
        result.meta = {k: v for k, v in graph_module.meta.items()}
        placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
        result.meta[VARIANT_KEY] = VariantSignature(
            tuple(p for p in placeholders if p in inputs),
            tuple(p for p in placeholders if p in constants),
            tuple(p for p in placeholders if p not in inputs and p not in constants),
            tuple(e.cache for e in kept))
        if result.meta[VARIANT_KEY].placeholders != tuple(placeholders):
            raise ValueError(f"placeholders out of order: {placeholders}")
        return PassResult(result, True)

