"""Static block schedules: for each sampler step, which gateable blocks compute and which reuse.

A schedule is DiP-GO's SubNet written as a table (steps x blocks). Reusing a block means its
output is the cached output from the last step where it ran. Built-in schedules make the honest
baselines one flag away: `full`, `deepcache:N[:branch]` (the DeepCache package's rule, at unit
granularity: see dgo_compile.deepcache) and `steps:K` (reuse every block, which for DDIM with eta 0
and trailing spacing is exactly DDIM with K uniform steps).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .errors import DgoError
from .files import write_atomic

SPEC = re.compile(r"^(full|deepcache:(\d+)(?::(\d+))?|steps:(\d+))$")


class ScheduleError(DgoError):
    """A schedule is malformed, invalid for the model, or cannot be built from its spec."""


@dataclass(frozen=True)
class Schedule:
    name: str
    blocks: tuple[str, ...]  # gateable elements: blocks, or units inside blocks
    compute: tuple[tuple[bool, ...], ...]  # compute[step][block]: True = run the block
    granularity: str = "block"

    def __post_init__(self) -> None:
        from dgo_compile.passes.boundaries import GRANULARITIES  # torch: imported once a schedule is built

        if self.granularity not in GRANULARITIES:
            raise ScheduleError(f"schedule '{self.name}' has granularity '{self.granularity}'; "
                                f"use one of {', '.join(GRANULARITIES)}")
        if not self.compute:
            raise ScheduleError(f"schedule '{self.name}' has no steps")
        for i, row in enumerate(self.compute):
            if len(row) != len(self.blocks):
                raise ScheduleError(f"schedule '{self.name}' step {i} has {len(row)} entries for "
                                    f"{len(self.blocks)} blocks")
        if not all(self.compute[0]):
            skipped = [b for b, c in zip(self.blocks, self.compute[0]) if not c]
            raise ScheduleError(f"schedule '{self.name}' reuses {skipped[0]} at step 0, where no cache exists yet; "
                                "step 0 must compute every block")

    @property
    def steps(self) -> int:
        return len(self.compute)

    def with_closure(self, consumers: dict[str, set[str]]) -> Schedule:
        """Also skip blocks whose output nobody would read: no consumer runs at that step and no
        later step reads the cache before the block runs again. Results never change."""
        from dgo_compile.passes.boundaries import OUTPUT

        rows = [dict(zip(self.blocks, row)) for row in self.compute]
        changed = True
        while changed:
            changed = False
            for step in range(1, len(rows)):
                for block in self.blocks:
                    users = consumers.get(block, set())
                    if (rows[step][block] and users and not any(u == OUTPUT or rows[step].get(u, False) for u in users)
                            and not _cache_read_later(rows, users, block, step)):
                        rows[step][block] = False
                        changed = True
        return Schedule(self.name, self.blocks, tuple(tuple(r[b] for b in self.blocks) for r in rows), self.granularity)

    def cache_read_later(self, consumers: dict[str, set[str]], block: str, step: int) -> bool:
        """Whether some later step reads `block`'s cache before computing it again (so store it now)."""
        rows = [dict(zip(self.blocks, row)) for row in self.compute]
        return _cache_read_later(rows, consumers.get(block, set()), block, step)

    def for_units(self, units: dict[str, tuple[str, ...]]) -> Schedule:
        """The same schedule at unit granularity: every unit follows its block."""
        if self.granularity == "unit":
            return self
        names = tuple(u for b in self.blocks for u in units[b])
        rows = tuple(tuple(c for b, c in zip(self.blocks, row) for _ in units[b]) for row in self.compute)
        return Schedule(self.name, names, rows, "unit")

    def kept_macs(self, block_macs: dict[str, int], other_macs: int) -> list[int]:
        """MACs of each step: computed blocks plus everything outside the gateable blocks."""
        return [other_macs + sum(block_macs[b] for b, c in zip(self.blocks, row) if c) for row in self.compute]

    def to_json(self) -> dict:
        return {"name": self.name, "granularity": self.granularity, "blocks": list(self.blocks),
                "compute": [[int(c) for c in row] for row in self.compute]}

    @classmethod
    def from_json(cls, data: dict) -> Schedule:
        if not isinstance(data, dict):
            raise ScheduleError(f"schedule JSON must be an object with 'name', 'blocks' and 'compute' "
                                f"(steps x blocks of 0/1), not {type(data).__name__}")
        try:
            name, blocks, compute = data["name"], data["blocks"], data["compute"]
            rows = tuple(tuple(_flag(c) for c in row) for row in compute)
            return cls(str(name), tuple(str(b) for b in blocks), rows, str(data.get("granularity", "block")))
        except (KeyError, TypeError) as exc:
            raise ScheduleError(f"schedule JSON needs 'name', 'blocks' and 'compute' (steps x blocks of 0/1): {exc}") \
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


def builtin(spec: str, steps: int, blocks: tuple[str, ...],
            units: Mapping[str, Sequence[str]] | None = None) -> Schedule:
    """`full`, `deepcache:N[:branch]` or `steps:K` over `blocks` (diffusers block names). `deepcache`
    counts layers inside blocks and needs `units` (each block's unit names, e.g. `block_units(traced)`)."""
    match = SPEC.match(spec)
    if match is None:
        raise ScheduleError(f"unknown schedule '{spec}'; use full, deepcache:N[:branch] or steps:K")
    if steps < 1:
        raise ScheduleError(f"steps must be at least 1, got {steps}")
    if spec == "full":
        return Schedule(spec, blocks, tuple(tuple(True for _ in blocks) for _ in range(steps)))
    if match.group(4) is not None:
        k = int(match.group(4))
        if not 1 <= k <= steps:
            raise ScheduleError(f"steps:K needs 1 <= K <= {steps}, got {k}")
        computed = _uniform_steps(steps, k)
        return Schedule(spec, blocks, tuple(tuple(i in computed for _ in blocks) for i in range(steps)))
    from .deepcache import deepcache_schedule

    if units is None:
        raise ScheduleError(f"{spec} counts layers inside blocks: pass the model's units "
                            "(builtin(..., units=block_units(traced)) or builtin_for(spec, steps, traced))")
    return deepcache_schedule(spec, steps, blocks, units, int(match.group(2)), int(match.group(3) or 0))


def builtin_for(spec: str, steps: int, traced) -> Schedule:
    """`builtin` over a traced model's blocks (and, for deepcache, their units)."""
    return builtin(spec, steps, tuple(b.name for b in traced.blocks), {b.name: b.units for b in traced.blocks})


def _uniform_steps(steps: int, k: int) -> set[int]:
    """Indices of K evenly spaced compute steps, starting at 0 (exact DDIM-K when K divides steps)."""
    return {round(i * steps / k) for i in range(k)}
