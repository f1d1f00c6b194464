"""Graph passes, one per module. Analyses annotate `node.meta`; transforms materialise.

Default order (each later pass reads what an earlier one wrote):
  1. annotate_blocks - which block and unit each node belongs to (everything else keys on it)
  2. count_costs     - per-node weight and attention MACs at the model's resolution
"""

from .annotate_blocks import AnnotateBlocks, AnnotateBlocksConfig, BlockAnnotation, block_of
from .base import Pass, PassManager, PassResult
from .count_costs import CountCosts, CountCostsConfig, NodeCost, cost_of

__all__ = [
    "AnnotateBlocks", "AnnotateBlocksConfig", "BlockAnnotation", "block_of",
    "CountCosts", "CountCostsConfig", "NodeCost", "cost_of",
    "Pass", "PassManager", "PassResult",
]
