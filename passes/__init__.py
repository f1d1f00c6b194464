"""Graph passes, one per module. Analyses annotate `node.meta`; transforms materialise.

Order (each later pass reads what an earlier one wrote):
  1. annotate_blocks     - which block and unit each node belongs to (everything else keys on it)
  2. count_costs         - per-node weight and attention MACs at the model's resolution
  3. fold_timestep       - (compiling for a known sampler) timestep-only subgraph -> per-step constants
  4. insert_backup_edges - SuperNet: a cache input and an exposed fresh output per element boundary
  5. attach_gates        - a gate per element mixing fresh and cached values (1.0 = the original model)
  6. fold_schedule       - binary gates for one step pattern: reused elements cut, dead code removed

Passes import `annotations` (every annotation key, its dataclass and its accessor) and `base`, never
each other. Each pass is an `AnalysisPass` (in place) or a `TransformPass` (functional), and the
`PassManager` checks that it kept to its kind.

Channel pruning runs before all of these, on its own: `channel_groups` (analysis) finds the groups
of channels that must be cut together; `dgo_compile.channels.channel_pruning` materialises the cut as new,
smaller modules, and the pruned model is traced afresh for the passes above.
"""

from .annotate_blocks import AnnotateBlocks, AnnotateBlocksConfig
from .annotations import (
    BackupEdges,
    BlockAnnotation,
    Gates,
    NodeCost,
    VariantSignature,
    backup_edges,
    block_of,
    channel_plan,
    cost_of,
    gates_of,
    variant_signature,
)
from .attach_gates import AttachGates, AttachGatesConfig
from .base import AnalysisPass, Pass, PassManager, PassResult, TransformPass
from .channel_groups import ChannelGroups, ChannelGroupsConfig
from .channel_plan import ChannelPlan
from .count_costs import CountCosts, CountCostsConfig
from .fold_schedule import FoldSchedule, FoldScheduleConfig
from .fold_timestep import FoldTimestep, FoldTimestepConfig
from .insert_backup_edges import InsertBackupEdges, InsertBackupEdgesConfig

__all__ = [
    "AnnotateBlocks", "AnnotateBlocksConfig", "BlockAnnotation", "block_of",
    "AttachGates", "AttachGatesConfig", "Gates", "gates_of",
    "BackupEdges", "backup_edges",
    "CountCosts", "CountCostsConfig", "NodeCost", "cost_of",
    "FoldSchedule", "FoldScheduleConfig", "VariantSignature", "variant_signature",
    "FoldTimestep", "FoldTimestepConfig",
    "InsertBackupEdges", "InsertBackupEdgesConfig",
    "AnalysisPass", "Pass", "PassManager", "PassResult", "TransformPass",
    "ChannelGroups", "ChannelGroupsConfig", "ChannelPlan", "channel_plan",
]
