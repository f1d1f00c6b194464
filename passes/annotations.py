"""The pass contract's data: every annotation key, its dataclass and its accessor, in one module.

Passes import this module (and `base`) instead of each other, so a pass that reads or keeps up
another pass's result depends on the result's shape, not on the pass that writes it. An accessor
that finds its annotation missing raises `AnnotationMissingError` naming the pass that writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from dgo_compile.core.errors import AnnotationMissingError

from .channel_plan import ChannelPlan

# The passes that write the annotations below (each pass class's `name`).
ANNOTATE_BLOCKS = "annotate_blocks"
COUNT_COSTS = "count_costs"
FOLD_TIMESTEP = "fold_timestep"
INSERT_BACKUP_EDGES = "insert_backup_edges"
ATTACH_GATES = "attach_gates"
FOLD_SCHEDULE = "fold_schedule"
CHANNEL_GROUPS = "channel_groups"

BLOCK_KEY = "dgo.block"  # node.meta: BlockAnnotation
COST_KEY = "dgo.cost"  # node.meta: NodeCost
CONSTANTS_KEY = "dgo.timestep_constants"  # graph_module.meta: names of the constant inputs, in order
EMBEDDER_KEY = "dgo.timestep_embedder"  # graph_module.meta: GraphModule(original inputs) -> constants
BACKUP_EDGES_KEY = "dgo.backup_edges"  # graph_module.meta: BackupEdges
GATES_KEY = "dgo.gates"  # graph_module.meta: Gates
VARIANT_KEY = "dgo.variant"  # graph_module.meta: VariantSignature
CHANNEL_PLAN_KEY = "dgo.channel_plan"  # graph_module.meta: ChannelPlan


@dataclass(frozen=True)
class BlockAnnotation:
    module: str | None  # deepest diffusers module path, "" for the model itself, None for graph glue
    block: str | None  # gateable block containing it, or None (stem, embeddings, head)
    unit: str | None  # unit inside the block, or None (block-level glue such as skip tuples)


GLUE = BlockAnnotation(None, None, None)  # what a transform's new nodes belong to: no element


@dataclass(frozen=True)
class NodeCost:
    weight_macs: int
    attention_macs: int
    shape: tuple[int, ...] | None  # output shape at the counted input shape (first output if several)

    @property
    def macs(self) -> int:
        return self.weight_macs + self.attention_macs


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
class VariantSignature:
    """How to call a folded variant: positional inputs in this order, then outputs."""

    inputs: tuple[str, ...]  # the denoiser's own inputs (sample, conditions; timestep unless folded)
    constant_inputs: tuple[str, ...]  # per-step timestep constants (see fold_timestep)
    cache_inputs: tuple[str, ...]
    cache_outputs: tuple[str, ...]  # outputs after the prediction

    @property
    def placeholders(self) -> tuple[str, ...]:
        return (*self.inputs, *self.constant_inputs, *self.cache_inputs)


def block_of(node: fx.Node) -> BlockAnnotation:
    return _node_annotation(node, BLOCK_KEY, ANNOTATE_BLOCKS)


def cost_of(node: fx.Node) -> NodeCost:
    return _node_annotation(node, COST_KEY, COUNT_COSTS)


def timestep_constants(graph_module: fx.GraphModule) -> tuple[str, ...]:
    """Names of the per-step constant inputs; () when the timestep was not folded (it stays an input)."""
    return graph_module.meta.get(CONSTANTS_KEY, ())


def timestep_embedder(graph_module: fx.GraphModule) -> fx.GraphModule:
    return _graph_annotation(graph_module, EMBEDDER_KEY, FOLD_TIMESTEP, "timestep embedder")


def backup_edges(graph_module: fx.GraphModule) -> BackupEdges:
    return _graph_annotation(graph_module, BACKUP_EDGES_KEY, INSERT_BACKUP_EDGES, "backup edges")


def gates_of(graph_module: fx.GraphModule) -> Gates:
    return _graph_annotation(graph_module, GATES_KEY, ATTACH_GATES, "gates")


def variant_signature(graph_module: fx.GraphModule) -> VariantSignature:
    return _graph_annotation(graph_module, VARIANT_KEY, FOLD_SCHEDULE, "variant signature")


def channel_plan(graph_module: fx.GraphModule) -> ChannelPlan:
    return _graph_annotation(graph_module, CHANNEL_PLAN_KEY, CHANNEL_GROUPS, "channel plan")


def mark_glue(node: fx.Node, like: fx.Node | None = None) -> None:
    """Keep the analyses true on a node a transform adds: it belongs to no element and costs nothing;
    its shape is that of `like`, the value it stands for (None if uncounted), or () for a scalar (a gate)."""
    node.meta[BLOCK_KEY] = GLUE
    counted = like.meta.get(COST_KEY) if like is not None else None
    node.meta[COST_KEY] = NodeCost(0, 0, counted.shape if counted is not None else None if like is not None else ())


def _node_annotation(node: fx.Node, key: str, pass_name: str):
    try:
        return node.meta[key]
    except KeyError:
        raise AnnotationMissingError(
            f"node {node.name} has no '{key}' annotation: run pass '{pass_name}' first") from None


def _graph_annotation(graph_module: fx.GraphModule, key: str, pass_name: str, what: str):
    try:
        return graph_module.meta[key]
    except KeyError:
        raise AnnotationMissingError(f"the graph has no {what} ('{key}'): run pass '{pass_name}' first") from None
