"""Static block schedules: for each denoiser call, which gateable elements (blocks, or units inside
blocks) compute and which reuse.

A schedule is DiP-GO's SubNet written as a table (calls x elements). A sampler step may make more
than one call (Heun: 2N-1 calls for N steps, PNDM: N+9), so rows count calls, not steps. Reusing an
element means its output is the cached output from the last call where it ran. The closure (what
else a schedule may skip) and the graph key of each call (`variant_keys`) live here too; the JSON
file keeps its keys (`blocks`, `compute`) for the elements and the rows. Built-in schedules make the
honest baselines one flag away: `full`, `deepcache:N[:branch]` (the DeepCache package's rule, at unit
granularity: see dgo_compile.schedules.deepcache) and `steps:K` (reuse every block, which for DDIM with eta 0
and trailing spacing is exactly DDIM with K uniform steps).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from dgo_compile.core.errors import DgoError
from dgo_compile.core.files import write_atomic

SPEC = re.compile(r"^(full|deepcache:(\d+)(?::(\d+))?|steps:(\d+))$")


class ScheduleError(DgoError):
    """A schedule is malformed, invalid for the model, or cannot be built from its spec."""


@dataclass(frozen=True)
class Schedule:
    name: str
    elements: tuple[str, ...]  # gateable elements: blocks, or units inside blocks
    compute: tuple[tuple[bool, ...], ...]  # compute[call][element]: True = run the element
    granularity: str = "block"

    def __post_init__(self) -> None:
        from dgo_compile.passes.boundaries import GRANULARITIES  # torch: imported once a schedule is built

        if self.granularity not in GRANULARITIES:
            raise ScheduleError(f"schedule '{self.name}' has granularity '{self.granularity}'; "
                                f"use one of {', '.join(GRANULARITIES)}")
        if not self.compute:
            raise ScheduleError(f"schedule '{self.name}' has no calls")
        for i, row in enumerate(self.compute):
            if len(row) != len(self.elements):
                raise ScheduleError(f"schedule '{self.name}' call {i} has {len(row)} entries for "
                                    f"{len(self.elements)} {self.granularity}s")
        if not all(self.compute[0]):
            skipped = [b for b, c in zip(self.elements, self.compute[0]) if not c]
            raise ScheduleError(f"schedule '{self.name}' reuses {skipped[0]} at call 0, where no cache exists yet; "
                                f"call 0 must compute every {self.granularity}")

    @property
    def calls(self) -> int:
        """Denoiser calls (rows): the sampler steps only for one-call-per-step samplers."""
        return len(self.compute)

    def with_closure(self, consumers: dict[str, set[str]]) -> Schedule:
        """Also skip blocks whose output nobody would read: no consumer runs at that step and no
        later step reads the cache before the block runs again. Results never change."""
        from dgo_compile.passes.boundaries import OUTPUT

        rows = [dict(zip(self.elements, row)) for row in self.compute]
        changed = True
        while changed:
            changed = False
            for step in range(1, len(rows)):
                for block in self.elements:
                    users = consumers.get(block, set())
                    if (rows[step][block] and users and not any(u == OUTPUT or rows[step].get(u, False) for u in users)
                            and not _cache_read_later(rows, users, block, step)):
                        rows[step][block] = False
                        changed = True
        return Schedule(self.name, self.elements, tuple(tuple(r[b] for b in self.elements) for r in rows),
                        self.granularity)

    def for_units(self, units: dict[str, tuple[str, ...]]) -> Schedule:
        """The same schedule at unit granularity: every unit follows its block."""
        if self.granularity == "unit":
            return self
        names = tuple(u for b in self.elements for u in units[b])
        rows = tuple(tuple(c for b, c in zip(self.elements, row) for _ in units[b]) for row in self.compute)
        return Schedule(self.name, names, rows, "unit")

    def to_json(self) -> dict:  # the file's keys predate the attribute names: "blocks" holds the elements
        return {"name": self.name, "granularity": self.granularity, "blocks": list(self.elements),
                "compute": [[int(c) for c in row] for row in self.compute]}

    @classmethod
    def from_json(cls, data: dict) -> Schedule:
        if not isinstance(data, dict):
            raise ScheduleError(f"schedule JSON must be an object with 'name', 'blocks' and 'compute' "
                                f"(calls x elements of 0/1), not {type(data).__name__}")
        try:
            name, blocks, compute = data["name"], data["blocks"], data["compute"]
            rows = tuple(tuple(_flag(c) for c in row) for row in compute)
            return cls(str(name), tuple(str(b) for b in blocks), rows, str(data.get("granularity", "block")))
        except (KeyError, TypeError) as exc:
            raise ScheduleError(f"schedule JSON needs 'name', 'blocks' and 'compute' (calls x elements of 0/1): "
                                f"{exc}") \
                from exc

    def save(self, path: str | Path) -> None:
        write_atomic(path, lambda p: p.write_text(json.dumps(self.to_json(), indent=1)))

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
            raise ScheduleError(f"cannot read schedule {path}: {exc}") from exc


def _cache_read_later(rows: list[dict[str, bool]], users: set[str], block: str, step: int) -> bool:
    from dgo_compile.passes.boundaries import OUTPUT

    for row in rows[step + 1:]:
        if row[block]:
            return False
        if any(u == OUTPUT or row.get(u, False) for u in users):
            return True
    return False


VariantKey = tuple[frozenset[str], frozenset[str]]  # (reused elements, exposed elements)


def variant_keys(closed: Schedule, consumers: dict[str, set[str]]) -> list[VariantKey]:
    """Each call's (reused, exposed) graph key for a closed schedule.

    Calls that reuse the same elements share one graph exposing every value any of them must
    store: an extra output costs no compute, a second graph costs a second copy of the weights.
    """
    rows = [dict(zip(closed.elements, row)) for row in closed.compute]  # built once, not once per (element, call)
    reused_at = [frozenset(e for e, c in zip(closed.elements, row) if not c) for row in closed.compute]
    exposed_with: dict[frozenset[str], set[str]] = {r: set() for r in reused_at}
    for t, row in enumerate(closed.compute):
        exposed_with[reused_at[t]] |= {e for e, c in zip(closed.elements, row)
                                       if c and _cache_read_later(rows, consumers.get(e, set()), e, t)}
    return [(r, frozenset(exposed_with[r])) for r in reused_at]


def _flag(value) -> bool:
    if value in (0, 1, True, False):
        return bool(value)
    raise TypeError(f"entry {value!r} is not 0 or 1")


def check_spec(spec: str, *, learned: bool = False) -> None:
    """Refuse a schedule that cannot be right for any model, before one is loaded: an unknown name, a
    zero interval, an unreadable JSON file ("learned" only where `learned`, i.e. with --config)."""
    if learned and spec == "learned":
        return
    if spec.endswith(".json"):
        Schedule.load(spec)
        return
    match = SPEC.match(spec)
    if match is None:
        raise ScheduleError(f"unknown schedule '{spec}'; use full, deepcache:N[:branch], steps:K, a schedule JSON"
                            + (" or learned" if learned else ""))
    if match.group(2) is not None and int(match.group(2)) < 1:
        raise ScheduleError(f"deepcache interval must be at least 1, got {match.group(2)}")
    if match.group(4) is not None and int(match.group(4)) < 1:
        raise ScheduleError(f"steps:K needs K >= 1, got {match.group(4)}")


def builtin(spec: str, calls: int, elements: tuple[str, ...],
            units: Mapping[str, Sequence[str]] | None = None) -> Schedule:
    """`full`, `deepcache:N[:branch]` or `steps:K` over `calls` denoiser calls and `elements` (diffusers
    block names). `deepcache` counts layers inside blocks and needs `units` (each block's unit names,
    e.g. `block_units(traced)`)."""
    match = SPEC.match(spec)
    if match is None:
        raise ScheduleError(f"unknown schedule '{spec}'; use full, deepcache:N[:branch] or steps:K")
    if calls < 1:
        raise ScheduleError(f"calls must be at least 1, got {calls}")
    if spec == "full":
        return Schedule(spec, elements, tuple(tuple(True for _ in elements) for _ in range(calls)))
    if match.group(4) is not None:
        k = int(match.group(4))
        if not 1 <= k <= calls:
            raise ScheduleError(f"steps:K needs 1 <= K <= {calls}, got {k}")
        computed = _uniform_steps(calls, k)
        return Schedule(spec, elements, tuple(tuple(i in computed for _ in elements) for i in range(calls)))
    from dgo_compile.schedules.deepcache import deepcache_schedule

    if units is None:
        raise ScheduleError(f"{spec} counts layers inside blocks: pass the model's units "
                            "(builtin(..., units=block_units(traced)) or builtin_for(spec, calls, traced))")
    return deepcache_schedule(spec, calls, elements, units, int(match.group(2)), int(match.group(3) or 0))


def builtin_for(spec: str, calls: int, traced) -> Schedule:
    """`builtin` over a traced model's blocks (and, for deepcache, their units)."""
    return builtin(spec, calls, tuple(b.name for b in traced.blocks), {b.name: b.units for b in traced.blocks})


def _uniform_steps(steps: int, k: int) -> set[int]:
    """Indices of K evenly spaced compute steps, starting at 0 (exact DDIM-K when K divides steps)."""
    return {round(i * steps / k) for i in range(k)}
