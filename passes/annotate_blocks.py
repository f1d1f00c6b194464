"""Analysis: tag every node with the DiP-GO block and unit it was traced from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from dgo_compile.families import BlockSpec
from dgo_compile.tracing import module_path

from .base import Pass, PassResult, annotate, annotation

META_KEY = "dgo.block"


@dataclass(frozen=True)
class BlockAnnotation:
    module: str | None  # deepest diffusers module path, "" for the model itself, None for graph glue
    block: str | None  # gateable block containing it, or None (stem, embeddings, head)
    unit: str | None  # unit inside the block, or None (block-level glue such as skip tuples)


@dataclass(frozen=True)
class AnnotateBlocksConfig:
    blocks: tuple[BlockSpec, ...]


class AnnotateBlocks(Pass):
    name = "annotate_blocks"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: AnnotateBlocksConfig):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in graph_module.graph.nodes:
            path = module_path(node)
            block = _enclosing(path, (b.name for b in self.config.blocks))
            unit = None
            if block is not None:
                spec = next(b for b in self.config.blocks if b.name == block)
                unit = _enclosing(path, spec.units)
            modified |= annotate(node, META_KEY, BlockAnnotation(path, block, unit))
        return PassResult(graph_module, modified)


def block_of(node: fx.Node) -> BlockAnnotation:
    return annotation(node, META_KEY, AnnotateBlocks.name)


def _enclosing(path: str | None, prefixes) -> str | None:
    if not path:
        return None
    for prefix in prefixes:
        if path == prefix or path.startswith(prefix + "."):
            return prefix
    return None
