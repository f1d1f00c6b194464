"""Which channels a cut keeps (`select`), given each prunable group's importance.

Thinning (the default, as Diff-Pruning and Torch-Pruning do): every atom, a stretch that one
GroupNorm group or head covers, loses the same share, so groups keep their count and the model stays
valid without re-grouping. Whole groups (`groupnorm_cut` "groups"): a share that only GroupNorms
constrain loses whole units (`ChannelPlan.units`), so kept groups keep every channel and their
statistics, and GroupNorms of few channels per group can still be cut.
"""

from __future__ import annotations

import torch

from dgo_compile.core.configs import PruneConfig
from dgo_compile.passes.channel_plan import ChannelGroup, ChannelPlan, Unit


def select(plan: ChannelPlan, scores: dict[int, torch.Tensor], config: PruneConfig) -> dict[int, torch.Tensor]:
    """Kept channel indices per group. A share (groups tied by a GroupNorm or head split) is cut in
    equal steps; each step removes the same share of every atom, lowest importance first. With
    `groupnorm_cut` "groups", a share that only GroupNorms constrain loses whole units instead
    (`ChannelPlan.units`), lowest mean importance first, each group keeping at least one."""
    shares = plan.shares()
    units = plan.units() if config.groupnorm_cut == "groups" else {}
    steps = {share: 0 for share in shares if share not in units}
    normalised = {g.id: scores[g.id] / scores[g.id].mean().clamp_min(1e-12) for g in plan.prunable()}
    removal = _UnitRemoval(plan, units, normalised)
    if config.scope == "uniform":
        for share in steps:
            steps[share] = uniform_step(shares[share], config)
        for share, members in units.items():
            for _ in range(round(config.channel_ratio * len(members))):
                if removal.cheapest(share) is None:
                    break
                removal.remove(share, removal.cheapest(share)[1])
    else:  # global: remove the cheapest step or unit anywhere until `channel_ratio` of all prunable channels are gone
        total = sum(g.size for g in plan.prunable())
        removed = 0
        limits = {share: max_step(shares[share], config.min_group_channels) for share in steps}

        def next_cut(share: int) -> tuple[float, int | None] | None:
            """A share's cheapest next cut (a step, or the index of a unit); it changes only when that share is cut."""
            if share in units:
                return removal.cheapest(share)
            return (_step_cost(shares[share], normalised, steps[share] + 1), None) \
                if steps[share] < limits[share] else None

        pending = {share: next_cut(share) for share in (*steps, *units)}
        while removed < config.channel_ratio * total:
            candidates = [(cut[0], share, cut[1]) for share, cut in pending.items() if cut is not None]
            if not candidates:
                break
            _, share, unit = min(candidates, key=lambda c: c[0])
            if unit is None:
                steps[share] += 1
                removed += sum(g.size // g.steps for g in shares[share])
            else:
                removed += removal.remove(share, unit)
            pending[share] = next_cut(share)
    kept = {g.id: _kept(g, scores[g.id], step) for share, step in steps.items() for g in shares[share]}
    return {**kept, **removal.kept()}


class _UnitRemoval:
    """Which units of each share are gone; a unit may go while every group it touches keeps a channel."""

    def __init__(self, plan: ChannelPlan, units: dict, normalised: dict[int, torch.Tensor]):
        self.units = units
        self.sizes = {g.id: g.size for g in plan.prunable()}
        self.left = dict(self.sizes)
        self.gone: dict[int, set[int]] = {share: set() for share in units}
        self.order = {share: sorted(range(len(members)), key=lambda i, m=members: (_unit_cost(m[i], normalised), i))
                      for share, members in units.items()}
        self.costs = {share: {i: _unit_cost(m, normalised) for i, m in enumerate(members)}
                      for share, members in units.items()}

    def _allowed(self, unit) -> bool:
        taken: dict[int, int] = {}
        for gid, _, size in unit:
            taken[gid] = taken.get(gid, 0) + size
        return all(self.left[gid] > n for gid, n in taken.items())

    def cheapest(self, share: int) -> tuple[float, int] | None:
        for index in self.order[share]:
            if index not in self.gone[share] and self._allowed(self.units[share][index]):
                return self.costs[share][index], index
        return None

    def remove(self, share: int, index: int) -> int:
        self.gone[share].add(index)
        for gid, _, size in self.units[share][index]:
            self.left[gid] -= size
        return sum(size for _, _, size in self.units[share][index])

    def kept(self) -> dict[int, torch.Tensor]:
        masks = {gid: torch.ones(self.sizes[gid], dtype=torch.bool)
                 for members in self.units.values() for unit in members for gid, _, _ in unit}
        for share, gone in self.gone.items():
            for index in gone:
                for gid, start, size in self.units[share][index]:
                    masks[gid][start:start + size] = False
        return {gid: torch.nonzero(mask).flatten() for gid, mask in masks.items()}


def _unit_cost(unit: Unit, normalised: dict[int, torch.Tensor]) -> float:
    """Mean normalised importance of a unit's channels."""
    return sum(float(normalised[gid][start:start + size].sum()) for gid, start, size in unit) / \
        max(sum(size for _, _, size in unit), 1)


def max_step(members: tuple[ChannelGroup, ...], min_group_channels: int) -> int:
    """The most steps a share may be cut: every atom keeps a channel, every GroupNorm group keeps
    `min_group_channels` (or all it had)."""
    steps = members[0].steps
    limit = steps - 1
    for group in members:
        if group.norm_group:
            keep = min(min_group_channels, group.norm_group)
            limit = min(limit, (group.norm_group - keep) * steps // group.norm_group)
    return limit


def uniform_step(members: tuple[ChannelGroup, ...], config: PruneConfig) -> int:
    """Steps a uniform cut at `config.channel_ratio` takes from a share."""
    return min(round(config.channel_ratio * members[0].steps), max_step(members, config.min_group_channels))


def planned_cut(plan: ChannelPlan, config: PruneConfig) -> dict[int, int | None]:
    """Channels each prunable group keeps under `config`, before any importance is computed: exact for
    the uniform scope; None where the cut depends on the importance scores (the global scope, and
    shares that lose whole GroupNorm groups)."""
    shares = plan.shares()
    units = plan.units() if config.groupnorm_cut == "groups" else {}
    return {g.id: (g.size - g.size // g.steps * uniform_step(shares[g.share], config)
                   if config.scope == "uniform" and g.share not in units else None) for g in plan.prunable()}


def _atoms(group: ChannelGroup):
    start = 0
    for size in group.atoms:
        yield start, size
        start += size


def _kept(group: ChannelGroup, score: torch.Tensor, step: int) -> torch.Tensor:
    keep = []
    for start, size in _atoms(group):
        drop = size * step // group.steps
        order = torch.argsort(score[start:start + size], stable=True)
        keep.append(torch.sort(order[drop:]).values + start)
    return torch.cat(keep)


def _step_cost(members: tuple[ChannelGroup, ...], score: dict[int, torch.Tensor], step: int) -> float:
    """Mean normalised importance of the channels the `step`-th step removes from a share."""
    cost, count = 0.0, 0
    for group in members:
        for start, size in _atoms(group):
            ordered = torch.sort(score[group.id][start:start + size]).values
            lo, hi = size * (step - 1) // group.steps, size * step // group.steps
            cost += float(ordered[lo:hi].sum())
            count += hi - lo
    return cost / max(count, 1)
