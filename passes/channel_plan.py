"""The channel plan: what `channel_groups` finds and `dgo_compile.channels.channel_pruning` cuts.

A data contract kept apart from the analysis so that its consumers (the surgery, the benchmarks,
the annotations module) read the plan's types without importing the op rules or networkx walks.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from dgo_compile.core.errors import DgoError

NORMALIZED_SHAPE = "normalized_shape"  # ParamSlice.param leaf of a LayerNorm without weights


class ChannelRuleError(DgoError):
    """An op whose channel semantics the analysis does not know, or uses it cannot follow."""


@dataclass(frozen=True)
class ParamSlice:
    """Channels [offset, offset + size) of a group are indices [start, start + size) of `param`'s `axis`."""

    param: str  # the model's parameter name, e.g. "down_blocks.0.resnets.0.conv1.weight"
    axis: int
    start: int


@dataclass(frozen=True)
class ChannelGroup:
    """One leaf space: channels that must be removed together from every slice listed."""

    id: int
    size: int
    slices: tuple[ParamSlice, ...]
    atoms: tuple[int, ...]  # sizes of the stretches that must each lose the same share (GroupNorm, heads)
    fixed: str | None  # why it cannot be pruned, or None
    constraints: tuple[str, ...]  # human-readable: "GroupNorm(16) down_blocks.0.resnets.0.norm1", "8 heads ..."
    share: int  # groups with the same share id sit under one GroupNorm / head split: they lose the same share
    steps: int  # the share is cut in this many equal steps; each removes atom/steps channels of every atom
    norm_group: int = 0  # channels per group of the finest GroupNorm over these channels (0: none)

    @property
    def prunable(self) -> bool:
        return self.fixed is None

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.param.rsplit(".", 1)[0] for s in self.slices))


@dataclass(frozen=True)
class AttentionSite:
    """An SDPA call whose scale follows the head size: pruning must keep its original scale."""

    node: str
    query_weight: str  # parameter producing the queries (scaled to keep the original 1/sqrt(d))
    query_bias: str | None
    head_dim: int
    explicit_scale: bool
    group: int  # the group holding the query/key channels


Stretch = tuple[int, int, int]  # (group id, start, size): channels [start, start + size) of a group
Unit = tuple[Stretch, ...]  # channels removed together when whole GroupNorm groups go


@dataclass(frozen=True)
class ChannelPlan:
    groups: tuple[ChannelGroup, ...]
    attention: tuple[AttentionSite, ...]
    # share -> its units: the smallest sets of channels that are whole groups of every GroupNorm over them.
    # Only shares that GroupNorms alone constrain (no heads, no shape ties) have units.
    norm_units: tuple[tuple[int, tuple[Unit, ...]], ...] = ()

    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def shares(self) -> dict[int, tuple[ChannelGroup, ...]]:
        """Prunable groups by share: the unit that `select` cuts."""
        out: dict[int, list[ChannelGroup]] = {}
        for g in self.prunable():
            out.setdefault(g.share, []).append(g)
        return {k: tuple(v) for k, v in out.items()}

    def units(self) -> dict[int, tuple[Unit, ...]]:
        """Prunable shares' units, for removing whole GroupNorm groups instead of thinning each."""
        shares = self.shares()
        return {share: units for share, units in self.norm_units if share in shares}

    def coupling_graph(self) -> nx.Graph:
        """Modules as nodes, an edge per group they share: the dependency structure to inspect."""
        graph = nx.Graph()
        for group in self.groups:
            modules = group.modules
            graph.add_nodes_from(modules)
            graph.add_edges_from((a, b, {"group": group.id}) for a in modules for b in modules if a < b)
        return graph
