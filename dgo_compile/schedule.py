"""Static block schedules: for each sampler step, which gateable blocks compute and which reuse.

A schedule is DiP-GO's SubNet written as a table (steps x blocks). Reusing a block means its
output is the cached output from the last step where it ran. Built-in schedules make the honest
baselines one flag away: `full`, `deepcache:N[:branch]` and `steps:K` (reuse every block, which
for DDIM with eta 0 and trailing spacing is exactly DDIM with K uniform steps).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import fx

from dgo_compile.passes import block_of

from .errors import DgoError

OUTPUT = "(output)"
SPEC = re.compile(r"^(full|deepcache:(\d+)(?::(\d+))?|steps:(\d+))$")


class ScheduleError(DgoError):
    """A schedule is malformed, invalid for the model, or cannot be built from its spec."""


@dataclass(frozen=True)
class Schedule:
    name: str
    blocks: tuple[str, ...]
    compute: tuple[tuple[bool, ...], ...]  # compute[step][block]: True = run the block

    def __post_init__(self) -> None:
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
        """Also skip blocks whose every consumer is skipped at that step (their output would go unused)."""
        rows = []
        for row in self.compute:
            live = dict(zip(self.blocks, row))
            changed = True
            while changed:
                changed = False
                for block in self.blocks:
                    users = consumers.get(block, set())
                    if live[block] and users and not any(u == OUTPUT or live.get(u, False) for u in users):
                        live[block] = False
                        changed = True
            rows.append(tuple(live[b] for b in self.blocks))
        return Schedule(self.name, self.blocks, tuple(rows))

    def kept_macs(self, block_macs: dict[str, int], other_macs: int) -> list[int]:
        """MACs of each step: computed blocks plus everything outside the gateable blocks."""
        return [other_macs + sum(block_macs[b] for b, c in zip(self.blocks, row) if c) for row in self.compute]

    def to_json(self) -> dict:
        return {"name": self.name, "blocks": list(self.blocks),
                "compute": [[int(c) for c in row] for row in self.compute]}

    @classmethod
    def from_json(cls, data: dict) -> Schedule:
        try:
            name, blocks, compute = data["name"], data["blocks"], data["compute"]
            rows = tuple(tuple(_flag(c) for c in row) for row in compute)
            return cls(str(name), tuple(str(b) for b in blocks), rows)
        except (KeyError, TypeError) as exc:
            raise ScheduleError(f"schedule JSON needs 'name', 'blocks' and 'compute' (steps x blocks of 0/1): {exc}") \
                from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ScheduleError(f"cannot read schedule {path}: {exc}") from exc


def _flag(value) -> bool:
    if value in (0, 1, True, False):
        return bool(value)
    raise TypeError(f"entry {value!r} is not 0 or 1")


def builtin(spec: str, steps: int, blocks: tuple[str, ...]) -> Schedule:
    """`full`, `deepcache:N[:branch]` or `steps:K` over `blocks` (diffusers block names)."""
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
    interval, branch = int(match.group(2)), int(match.group(3) or 0)
    return _deepcache(spec, steps, blocks, interval, branch)


def _uniform_steps(steps: int, k: int) -> set[int]:
    """Indices of K evenly spaced compute steps, starting at 0 (exact DDIM-K when K divides steps)."""
    return {round(i * steps / k) for i in range(k)}


def _deepcache(spec: str, steps: int, blocks: tuple[str, ...], interval: int, branch: int) -> Schedule:
    """DeepCache at block granularity: between full steps run only the shallowest `branch`+1 down
    and up blocks; the cached input of the up path is the reused deeper up block's output."""
    downs = [b for b in blocks if b.startswith("down_blocks.")]
    ups = [b for b in blocks if b.startswith("up_blocks.")]
    if not downs or not ups:
        raise ScheduleError(f"deepcache needs a UNet (down and up blocks); this model has {', '.join(blocks[:3])}...")
    if interval < 1:
        raise ScheduleError(f"deepcache interval must be at least 1, got {interval}")
    if not 0 <= branch < len(downs):
        raise ScheduleError(f"deepcache branch must be in 0..{len(downs) - 1}, got {branch}")
    shallow = set(downs[: branch + 1]) | set(ups[len(ups) - branch - 1:])
    rows = tuple(tuple(i % interval == 0 or b in shallow for b in blocks) for i in range(steps))
    return Schedule(spec, blocks, rows)


def block_consumers(graph_module: fx.GraphModule, blocks: tuple[str, ...]) -> dict[str, set[str]]:
    """For each gateable block, the blocks (or OUTPUT) that read its outputs, looking through the
    glue between blocks (skip tuples, stem and head ops). Needs the annotate_blocks pass."""
    owner: dict[fx.Node, str | None] = {n: block_of(n).block for n in graph_module.graph.nodes}
    reaches: dict[fx.Node, set[str]] = {}
    for node in reversed(list(graph_module.graph.nodes)):
        found: set[str] = set()
        for user in node.users:
            if user.op == "output":
                found.add(OUTPUT)
            elif owner[user] is not None and owner[user] != owner[node]:
                found.add(owner[user])
            elif owner[user] is None or owner[user] == owner[node]:
                found |= reaches[user]
        reaches[node] = found
    consumers: dict[str, set[str]] = {b: set() for b in blocks}
    for node, block in owner.items():
        if block is not None:
            consumers[block] |= {c for c in reaches[node] if c != block}
    return consumers
