"""Graph passes, one per module. Analyses annotate `node.meta`; transforms materialise.

Order (each later pass reads what an earlier one wrote):
  1. annotate_blocks     - which block and unit each node belongs to (everything else keys on it)
  2. count_costs         - per-node weight and attention MACs at the model's resolution
  3. fold_timestep       - (compiling for a known sampler) timestep-only subgraph -> per-step constants
  4. insert_backup_edges - SuperNet: a cache input and an exposed fresh output per element boundary
  5. attach_gates        - a gate per element mixing fresh and cached values (1.0 = the original model)
  6. fold_schedule       - binary gates for one step pattern: reused elements cut, dead code removed

Channel pruning runs before all of these, on its own: `channel_groups` (analysis) finds the groups
of channels that must be cut together; `dgo_compile.channel_pruning` materialises the cut as new,
smaller modules, and the pruned model is traced afresh for the passes above.
"""

from .annotate_blocks import AnnotateBlocks, AnnotateBlocksConfig, BlockAnnotation, block_of
from .attach_gates import AttachGates, AttachGatesConfig
from .base import Pass, PassManager, PassResult
from .channel_groups import ChannelGroups, ChannelGroupsConfig, ChannelPlan, channel_plan
from .count_costs import CountCosts, CountCostsConfig, NodeCost, cost_of
from .fold_schedule import FoldSchedule, FoldScheduleConfig, VariantSignature, variant_signature
from .fold_timestep import FoldTimestep, FoldTimestepConfig
from .insert_backup_edges import InsertBackupEdges, InsertBackupEdgesConfig

__all__ = [
    "AnnotateBlocks", "AnnotateBlocksConfig", "BlockAnnotation", "block_of",
    "AttachGates", "AttachGatesConfig",
    "CountCosts", "CountCostsConfig", "NodeCost", "cost_of",
    "FoldSchedule", "FoldScheduleConfig", "VariantSignature", "variant_signature",
    "FoldTimestep", "FoldTimestepConfig",
    "InsertBackupEdges", "InsertBackupEdgesConfig",
    "Pass", "PassManager", "PassResult",
    "ChannelGroups", "ChannelGroupsConfig", "ChannelPlan", "channel_plan",
]
