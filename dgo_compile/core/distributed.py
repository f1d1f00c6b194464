"""Data parallelism under `torchrun` for the two training loops (`optimize`, `finetune`).

Every process draws the same global batch from the same seed and keeps its own equal slice;
gradients are averaged over processes before the optimizer step, so N processes follow the
one-process run at the same global batch (up to the order of float sums). Only process 0
writes files and prints. Data-parallel training runs on CPUs, so the collectives use gloo
(`optimize --device cuda` is one process; NCCL across GPUs is not built).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist

from dgo_compile.core.errors import DgoError


class DistributedError(DgoError):
    """A setting that cannot be split over the processes torchrun started."""


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: int, field: str) -> slice:
        """This process's rows of a global batch of `batch` rows (the config field `field`)."""
        if batch % self.size:
            raise DistributedError(f"`{field}` {batch} does not split evenly over {self.size} processes; "
                                   f"pass a multiple of {self.size} (it is the global batch)", field=field)
        rows = batch // self.size
        return slice(self.rank * rows, (self.rank + 1) * rows)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every `.grad` by its mean over the processes. A missing `.grad` (an unused
        parameter: the same on every process) stays missing, as in one process, where the
        optimizer then skips it, weight decay included."""
        if self.size == 1:
            return
        params = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def mean(self, value: float) -> float:
        """`value` averaged over the processes (for the loss history, which is the global batch's)."""
        if self.size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return total.item() / self.size

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def current_world() -> World:
    """The world torchrun describes in the environment; joins its process group on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return World(dist.get_rank(), dist.get_world_size())
