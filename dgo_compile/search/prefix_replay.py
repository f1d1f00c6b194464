"""Replaying the shared prefix of sampling runs: a run's calls whose graphs, in order, match the start of
the kept trajectory's return its kept prediction and cache instead of running the denoiser.

Two runs from the same noise and conditions that ran the same graphs at calls 0..j see the same inputs at
call j, so its outputs are equal too; the scheduler steps between calls still run, so a replayed run ends
on the same final samples bit for bit. The K-step search keeps its incumbent here: a trial that moves
chosen call i shares every call before it. What is kept is capped at `REPLAY_BYTES` (counted per
storage: reuse calls share their cache's tensors); past the cap a trajectory's later calls are not kept
and run again in the next trial.
"""

from __future__ import annotations

import torch

from dgo_compile.backend.torch_runner import ScheduleRun

REPLAY_BYTES = 2 << 30
Entry = tuple[torch.Tensor, dict[str, torch.Tensor]]  # a call's prediction, and the run's cache after it


class PrefixReplay:
    """The incumbent trajectory's per-call prediction and cache, keyed by the graphs run up to that call
    (equal keys: equal inputs, so equal outputs); `run` makes a run that replays what it shares."""

    def __init__(self, max_bytes: int = REPLAY_BYTES):
        self.max_bytes = max_bytes
        self.kept: dict[tuple, Entry] = {}
        self.denoiser_calls = 0  # calls actually run, over all runs

    def run(self, folded) -> "_ReplayRun":
        return _ReplayRun(folded, self)

    def keep(self, run: "_ReplayRun") -> None:
        """`run`'s trajectory is the new incumbent."""
        self.kept = run.recorded


class _ReplayRun(ScheduleRun):
    def __init__(self, folded, replay: PrefixReplay):
        super().__init__(folded)
        self.replay, self.prefix = replay, ()
        self.recorded: dict[tuple, Entry] = {}
        self._storages: set[int] = set()
        self._bytes, self._recording = 0, True

    def _run(self, step: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
        self.prefix += (self.folded.step_variant[step],)
        entry = self.replay.kept.get(self.prefix)
        if entry is None:
            self.replay.denoiser_calls += 1
            entry = (super()._run(step, named), dict(self.cache))
        else:
            self.cache = dict(entry[1])
        if self._recording:
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                        for t in (entry[0], *entry[1].values())}
            new = {k: v for k, v in storages.items() if k not in self._storages}
            if self._bytes + sum(new.values()) > self.replay.max_bytes:
                self._recording = False  # the prefix kept so far stays whole
            else:
                self._storages |= new.keys()
                self._bytes += sum(new.values())
                self.recorded[self.prefix] = entry
        return entry[0]
