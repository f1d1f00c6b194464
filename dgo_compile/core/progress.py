"""Progress of long work, as the library reports it: named stages, each with what it does and how far
along it is. The library only calls; a front end draws (the CLI's `cli/progress.py` draws with rich,
or prints one line per finished stage when there is no terminal). The default shows nothing.

    with stages.stage("verify", "sampling 16 images", total=2400) as step:
        ...
        step.update(advance=16)

Each finished stage's wall time is kept in `stages.seconds` (name -> seconds), in order.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Step:
    """One running stage: `total` None means its length is unknown (a spinner, no bar)."""
    name: str
    what: str
    total: int | None = None
    completed: int = 0
    note: str = ""
    started: float = field(default_factory=time.perf_counter)
    owner: Stages | None = field(default=None, repr=False)

    def update(self, completed: int | None = None, *, advance: int = 0, total: int | None = None,
               note: str | None = None, what: str | None = None) -> None:
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if note is not None:
            self.note = note
        if what is not None:
            self.what = what
        if self.owner is not None:
            self.owner.changed(self)

    def advance(self, k: int = 1) -> None:
        """`update(advance=k)`, as a one-argument callback (e.g. `sample(progress=step.advance)`)."""
        self.update(advance=k)


class Stages:
    """Receives stages; subclasses draw them by overriding `begin`, `changed` and `end`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, what: str, total: int | None = None) -> Iterator[Step]:
        step = Step(name, what, total, owner=self)
        self.begin(step)
        failed = True
        try:
            yield step
            failed = False
        finally:
            seconds = time.perf_counter() - step.started
            if not failed:
                self.seconds[name] = seconds
            self.end(step, seconds, failed)

    def begin(self, step: Step) -> None:
        """A stage started."""

    def changed(self, step: Step) -> None:
        """A running stage moved on (`step.completed`, `step.note` or `step.what` changed)."""

    def end(self, step: Step, seconds: float, failed: bool) -> None:
        """A stage finished (`failed`: by an exception)."""
