"""Analysis: tag every node with the DiP-GO block and unit it was traced from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from dgo_compile.frontend.families import BlockSpec
from dgo_compile.frontend.tracing import module_path

from . import annotations as ann
from .annotations import BLOCK_KEY, BlockAnnotation
from .base import AnalysisPass, PassResult, annotate


@dataclass(frozen=True)
class AnnotateBlocksConfig:
    blocks: tuple[BlockSpec, ...]


class AnnotateBlocks(AnalysisPass):
    name = ann.ANNOTATE_BLOCKS
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
            modified |= annotate(node, BLOCK_KEY, BlockAnnotation(path, block, unit))
        return PassResult(graph_module, modified)


def _enclosing(path: str | None, prefixes) -> str | None:
    if not path:
        return None
    for prefix in prefixes:
        if path == prefix or path.startswith(prefix + "."):
            return prefix
    return None
