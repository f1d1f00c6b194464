"""The CLI's one progress display, for every command: the library's stages (dgo_compile.core.progress)
drawn with rich.

On a terminal (stdout and stderr both are one) each stage gets a live line on stderr: what it does, a
bar with done/total where its length is known (a spinner where not), elapsed and remaining time, and
a note (loss, kept MACs); finished stages stay on screen with their time. Without a terminal (CI, a
pipe, a log file) nothing is redrawn: one line per finished stage, with its time, goes to stderr.
A failed stage leaves no line: the error that follows says what went wrong, in one line.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dgo_compile.core.progress import Stages, Step


class ConsoleStages(Stages):
    """Stages drawn on `console`; use as a context manager around the work (it stops the live display).
    `live` None: live only when stdout and `console` are terminals. `enabled` False: show nothing."""

    def __init__(self, console: Console, live: bool | None = None, enabled: bool = True) -> None:
        super().__init__()
        self.console = console
        self.enabled = enabled
        self.live = console.is_terminal and sys.stdout.isatty() if live is None else live
        self._progress: Progress | None = None
        self._tasks: dict[int, int] = {}

    def __enter__(self) -> ConsoleStages:
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def named(self, name: str):
        """`what -> context manager`: a stage called `name` per call, for the library's `on_status` hooks."""
        return lambda what: self.stage(name, what)

    def _bar(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(SpinnerColumn(finished_text="[green]done"), TextColumn("{task.description}"),
                                      BarColumn(), TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                                      console=self.console)
            self._progress.start()
        return self._progress

    def begin(self, step: Step) -> None:
        if self.enabled and self.live:
            self._tasks[id(step)] = self._bar().add_task(self._description(step), total=step.total,
                                                         count=self._counted(step), note=escape(step.note))

    def changed(self, step: Step) -> None:
        if self.enabled and self.live and id(step) in self._tasks:
            self._bar().update(self._tasks[id(step)], completed=step.completed, total=step.total,
                               description=self._description(step), count=self._counted(step),
                               note=escape(step.note))

    def end(self, step: Step, seconds: float, failed: bool) -> None:
        """A finished stage keeps its line; a failed one is taken away, so the error stays one line."""
        if not self.enabled:
            return
        if self.live and id(step) in self._tasks:
            task = self._tasks.pop(id(step))
            if failed:
                self._bar().remove_task(task)
            else:
                total = step.total or 1
                self._bar().update(task, total=total, completed=total, count=self._counted(step),
                                   note=escape(step.note))
        elif not self.live and not failed:
            note = f" ({step.note})" if step.note else ""
            self.console.print(f"{step.name}: {seconds:.1f} s, {step.what}{note}", markup=False, highlight=False,
                               soft_wrap=True)

    @staticmethod
    def _description(step: Step) -> str:
        return f"[bold]{escape(step.name)}[/] {escape(step.what)}"

    @staticmethod
    def _counted(step: Step) -> str:
        return f"{step.completed}/{step.total}" if step.total else ""
