"""Exact MACs of a block schedule, read from the graph rather than from per-block sums.

A call's cost is what stays live once reused elements hand on their caches: the stem dies with
every block it feeds, the head stays while it reads a cached output, and a computed block's
value that nobody reads now or later (a downsampler before a reused block) is not computed.
It is counted on the graph with the timestep path folded, node for node what `fold_schedule`
leaves in each artifact variant, so a ratio chosen here is the ratio the manifest reports.
"""

from __future__ import annotations

import torch
from torch import fx

from dgo_compile.frontend.tracing import TracedDenoiser
from dgo_compile.passes import FoldTimestep, PassManager, cost_of
from dgo_compile.passes.boundaries import boundary_values, data_inputs, element_consumers, element_of, sample_dependent
from dgo_compile.schedules.cost import analyse
from dgo_compile.schedules.schedule import Schedule, ScheduleError, VariantKey, variant_keys
from dgo_compile.schedules.supernet import gateable_elements

KEPT_TOLERANCE = 0.0125  # how far an extracted schedule's kept MACs may be from the asked share


class ScheduleCost:
    """Per-step and per-run MACs of schedules over one model's elements at one granularity."""

    def __init__(self, traced: TracedDenoiser, granularity: str = "block"):
        graph_module = PassManager([FoldTimestep()]).run(analyse(traced)).graph_module
        self.granularity = granularity
        self.elements = gateable_elements(traced, granularity)
        self._units = {b.name: b.units for b in traced.blocks}
        self.consumers = element_consumers(graph_module, self.elements, granularity)
        self._dependent = sample_dependent(graph_module)
        self._owner = {n: element_of(n, granularity) for n in graph_module.graph.nodes}
        self._roots = boundary_values(graph_module, granularity)
        self._output = next(n for n in graph_module.graph.nodes if n.op == "output")
        self._memo: dict[VariantKey, int] = {}
        self.full_macs = self.step_macs(frozenset())

    def step_macs(self, reused: frozenset[str], exposed: frozenset[str] = frozenset()) -> int:
        """MACs of one call that reuses `reused` and also stores the outputs of `exposed`."""
        key = (reused, exposed)
        if key not in self._memo:
            stack = list(self._output.all_input_nodes) + [n for e in exposed for n in self._roots.get(e, [])]
            live: set[fx.Node] = set()
            while stack:
                node = stack.pop()
                if node in live:
                    continue
                owner = self._owner[node]
                if owner in reused and node in self._dependent:
                    continue  # a reused element's value: read from its cache
                live.add(node)
                stack.extend(data_inputs(node))
            self._memo[key] = sum(cost_of(n).macs for n in live if n.op == "call_function")
        return self._memo[key]

    def close(self, schedule: Schedule) -> Schedule:
        """The schedule with its dependency closure; a unit cost model prices block schedules too
        (each unit follows its block), so block and unit candidates compare on one scale."""
        if schedule.granularity != self.granularity:
            if self.granularity != "unit":
                raise ScheduleError(f"schedule '{schedule.name}' is at {schedule.granularity} granularity; "
                                    f"price it with ScheduleCost(traced, '{schedule.granularity}')")
            schedule = schedule.for_units(self._units)
        return schedule.with_closure(self.consumers)

    def per_call(self, schedule: Schedule) -> list[int]:
        """MACs of each call of the closed schedule."""
        return [self.step_macs(*key) for key in variant_keys(self.close(schedule), self.consumers)]

    def kept_ratio(self, schedule: Schedule) -> float:
        """The closed schedule's MACs per run over the full model's."""
        return sum(self.per_call(schedule)) / (self.full_macs * schedule.calls)

    def cascade_shares(self) -> dict[str, float]:
        """DiP-GO's gamma: the share of a call's MACs that reusing one element saves, counting
        every element that dies with it (reusing a UNet's last up block saves nearly all)."""
        shares = {}
        for element in self.elements:
            rows = [tuple(True for _ in self.elements), tuple(e != element for e in self.elements),
                    tuple(True for _ in self.elements)]
            closed = self.close(Schedule("cascade", self.elements, tuple(rows), self.granularity))
            shares[element] = 1 - self.per_call(closed)[1] / self.full_macs
        return shares

    def reuse_all_share(self) -> float:
        """What reusing every element of a call saves (the head on the cached output remains)."""
        return 1 - self.step_macs(frozenset(self.elements)) / self.full_macs


def extract_schedule(scores: torch.Tensor, cost: ScheduleCost, keep_macs: float, name: str,
                     whole_calls: bool = False, tolerance: float = KEPT_TOLERANCE) -> tuple[Schedule, float]:
    """The closed schedule that reuses the highest-scoring pairs (scores: any reals, e.g. the
    pruner's reuse margins; call 0 is never reused), with kept MACs within `tolerance`
    of `keep_macs`: bisection over how many of the ranked pairs (or whole calls) to reuse, then a
    greedy sweep down the ranking where one pair's cascade jumps over the budget."""
    calls, columns = scores.shape
    if not 0 < keep_macs <= 1:
        raise ScheduleError(f"`keep_macs` must be in (0, 1] (the kept share of the full model's MACs), got {keep_macs}",
                            field="keep_macs")
    if whole_calls:
        ranked = [[(t, b) for b in range(columns)] for t in
                  sorted(range(1, calls), key=lambda t: (-scores[t].mean().item(), t))]
    else:
        ranked = [[(t, b)] for t, b in sorted(((t, b) for t in range(1, calls) for b in range(columns)),
                                              key=lambda tb: (-scores[tb].item(), tb))]

    def schedule_with(groups) -> Schedule:
        rows = [[True] * columns for _ in range(calls)]
        for group in groups:
            for t, b in group:
                rows[t][b] = False
        return Schedule(name, cost.elements, tuple(tuple(r) for r in rows), cost.granularity)  # kept_ratio closes it

    kepts: dict[int, float] = {}

    def kept(k: int) -> float:
        if k not in kepts:
            kepts[k] = cost.kept_ratio(schedule_with(ranked[:k]))
        return kepts[k]

    low, high = 0, len(ranked)  # kept(low) > keep_macs >= kept(high), when reachable
    if kept(high) > keep_macs + tolerance:
        raise ScheduleError(f"the smallest schedule keeps {kept(high):.1%} of the MACs (call 0 always runs in "
                            f"full); ask for `keep_macs` {kept(high):.3f} or more", field="keep_macs")
    if kept(low) <= keep_macs + tolerance:
        return cost.close(schedule_with([])), kept(low)
    while high - low > 1:
        middle = (low + high) // 2
        if kept(middle) > keep_macs:
            low = middle
        else:
            high = middle
    best = min((low, high), key=lambda k: abs(kept(k) - keep_macs))
    if abs(kept(best) - keep_macs) <= tolerance:
        return cost.close(schedule_with(ranked[:best])), kept(best)
    # The next pair in rank order overshoots (e.g. it kills a whole call): go on down the ranking,
    # skipping pairs that would overshoot, until the budget is met.
    chosen = list(ranked[:low])
    for group in ranked[low:]:
        trial = cost.kept_ratio(schedule_with(chosen + [group]))
        if trial >= keep_macs - tolerance:
            chosen.append(group)
            if trial <= keep_macs + tolerance:
                return cost.close(schedule_with(chosen)), trial
    raise ScheduleError(f"no schedule from these scores keeps {keep_macs:.1%} of the MACs within {tolerance:.2%} "
                        f"(nearest: {kept(low):.1%} and {kept(high):.1%}); choose another `keep_macs`",
                        field="keep_macs")
