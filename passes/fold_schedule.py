"""Transform: specialise the graph to one step pattern of a block schedule.

Reused blocks are cut out: every value a reused block hands to the rest of the graph becomes a
cache input (`cache__<block>__<i>`), and dead-code elimination removes the block and whatever
fed only it (the dependency closure, materialised). Blocks whose fresh outputs a later step
will reuse have those values appended to the outputs, so the runtime can store them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from .annotate_blocks import BlockAnnotation, block_of
from .base import Pass, PassResult

META_KEY = "dgo.variant"


@dataclass(frozen=True)
class VariantSignature:
    """How to call a folded variant: graph inputs then cache inputs; prediction then cache outputs."""

    inputs: tuple[str, ...]
    cache_inputs: tuple[str, ...]
    cache_outputs: tuple[str, ...]


@dataclass(frozen=True)
class FoldScheduleConfig:
    reused: frozenset[str]  # blocks whose output comes from the cache at this step
    exposed: frozenset[str]  # computed blocks whose fresh outputs the runtime must store


class FoldSchedule(Pass):
    name = "fold_schedule"
    requires: ClassVar[tuple[str, ...]] = ("annotate_blocks",)

    def __init__(self, config: FoldScheduleConfig):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if self.config.reused & self.config.exposed:
            overlap = sorted(self.config.reused & self.config.exposed)
            raise ValueError(f"block {overlap[0]} cannot be both reused and exposed")
        source = copy.deepcopy(graph_module)  # never edit the caller's graph
        graph = source.graph
        boundary = boundary_values(source)
        inputs = tuple(n.name for n in graph.nodes if n.op == "placeholder")
        last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]

        cache_inputs = []
        for block in sorted(self.config.reused, key=_order(boundary)):
            for i, node in enumerate(boundary.get(block, ())):
                name = cache_name(block, i)
                with graph.inserting_after(last_placeholder):
                    placeholder = graph.placeholder(name)
                # Shapes carry over; provenance does not: the cache input belongs to no block.
                placeholder.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
                placeholder.meta["dgo.block"] = BlockAnnotation(None, None, None)
                last_placeholder = placeholder
                node.replace_all_uses_with(placeholder, delete_user_cb=lambda user, b=block: block_of(user).block != b)
                cache_inputs.append(placeholder)

        output = next(n for n in graph.nodes if n.op == "output")
        prediction = output.args[0]
        prediction = prediction[0] if isinstance(prediction, (tuple, list)) else prediction
        cache_outputs = [(cache_name(block, i), node)
                         for block in sorted(self.config.exposed, key=_order(boundary))
                         for i, node in enumerate(boundary.get(block, ()))]
        output.args = ((prediction, *(node for _, node in cache_outputs)),)
        graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
        unused = [p for p in cache_inputs if not p.users]
        for p in unused:
            graph.erase_node(p)
        folded = fx.GraphModule(source, graph, class_name="FoldedDenoiser")  # keeps only the used params
        folded.meta[META_KEY] = VariantSignature(
            inputs, tuple(p.name for p in cache_inputs if p not in unused), tuple(name for name, _ in cache_outputs))
        modified = bool(self.config.reused or self.config.exposed)
        return PassResult(folded, modified)


def boundary_values(graph_module: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Per gateable block, its nodes read from outside it, in graph order: what a cache holds."""
    found: dict[str, list[fx.Node]] = {}
    for node in graph_module.graph.nodes:
        block = block_of(node).block
        if block is None or node.op == "get_attr":
            continue
        if any(user.op == "output" or block_of(user).block != block for user in node.users):
            found.setdefault(block, []).append(node)
    return found


def variant_signature(graph_module: fx.GraphModule) -> VariantSignature:
    return graph_module.meta[META_KEY]


def cache_name(block: str, index: int) -> str:
    return f"cache__{block.replace('.', '_')}__{index}"


def _order(boundary: dict[str, list[fx.Node]]):
    """Sort key putting blocks in graph order (boundary_values builds its dict in that order)."""
    order = {block: i for i, block in enumerate(boundary)}
    return lambda block: order.get(block, len(order))
