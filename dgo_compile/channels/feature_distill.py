"""Feature distillation on the kept channels: every block's output is pulled towards the teacher's.

Channel pruning only removes channels, so channel j of a pruned block's output is channel keep[j] of the
unpruned teacher's (`dgo_pruning.json`'s `block_channels`, written by `prune`). The output loss alone
tells the student only what the whole network must end with; matching each block's output at those
channels (a hint loss, as FitNets and the feature terms of diffusion distillation use) tells every block
what it should hand on, and on the shipped model recovers quality in far fewer steps
(benchmarks/results/finetune.md).

Per block the term is the squared error over the teacher's mean square at those channels, per row, so a
block with large activations counts no more than one with small ones; rows are weighted like the output
term (Min-SNR), and the blocks are averaged. The teacher's outputs come from hooks on its forward pass on
the very inputs the student sees: the one `distill` already makes, or one more with `distill_only`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from dgo_compile.channels.channel_pruning import block_channels
from dgo_compile.core.configs import FinetuneError
from dgo_compile.frontend.channel_surgery import BLOCK_CHANNELS, PRUNING_FILE
from dgo_compile.frontend.families import family_of
from dgo_compile.frontend.loading import LoadedModel

POWER_FLOOR = 1e-6  # a row whose teacher output is all but zero is not divided by ~0


@dataclass(frozen=True)
class BlockTarget:
    block: str  # module path of the block, e.g. "down_blocks.1"
    axis: int  # the channel axis of its output: 1 (UNet feature maps) or -1 (transformer tokens)
    keep: torch.Tensor  # the teacher's channels that the student's are, in order
    size: int  # the teacher's channel count there


class FeatureDistillation:
    """The feature term of one fine-tuning run: which blocks, which channels, and the loss."""

    def __init__(self, student: LoadedModel, teacher: nn.Module):
        self.targets = block_targets(student, teacher)

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """While open, every forward pass of `model` leaves each block's output in the yielded dict."""
        outputs: dict[str, torch.Tensor] = {}
        handles = [model.get_submodule(t.block).register_forward_hook(_recorder(outputs, t.block))
                   for t in self.targets]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    def loss(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
             weights: torch.Tensor | None) -> torch.Tensor:
        """The mean over blocks of the (row-weighted) relative squared error at the kept channels."""
        total = 0.0
        for t in self.targets:
            if teacher[t.block].shape[t.axis] != t.size or student[t.block].shape[t.axis] != len(t.keep):
                raise FinetuneError(f"`feature_distill`: {t.block}'s output has {student[t.block].shape[t.axis]} "
                                    f"channels (teacher: {teacher[t.block].shape[t.axis]}) along axis {t.axis}, "
                                    f"its pruning record says {len(t.keep)} of {t.size}; leave `feature_distill` out",
                                    field="feature_distill")
            target = teacher[t.block].index_select(t.axis, t.keep)
            error = (student[t.block] - target).pow(2).flatten(1).mean(dim=1)
            relative = error / target.pow(2).flatten(1).mean(dim=1).clamp(min=POWER_FLOOR)
            total = total + (relative * weights if weights is not None else relative).mean()
        return total / len(self.targets)


def _recorder(outputs: dict[str, torch.Tensor], block: str):
    def hook(module, args, output):  # UNet down blocks return (hidden states, skip connections)
        outputs[block] = output[0] if isinstance(output, tuple) else output
    return hook


def block_targets(student: LoadedModel, teacher: nn.Module) -> tuple[BlockTarget, ...]:
    """The blocks and kept channels from the student's pruning record (an unpruned student keeps all),
    each checked against both models, since the record is a file from wherever the model came."""
    where = (student.denoiser_folder or student.source.parent) / PRUNING_FILE
    if student.pruning is None:
        record = block_channels(student.model, None, {}, family_of(student.model).blocks(student.model), None)
    else:
        record = student.pruning.get(BLOCK_CHANNELS)
        if not isinstance(record, dict) or not record:
            raise FinetuneError(f"`feature_distill` needs the kept channels of each block, which {where} does not "
                                "record (pruned by an earlier dgo-compile): prune the original model again, or "
                                "leave `feature_distill` out", field="feature_distill")
    targets = []
    for block, entry in record.items():
        targets.append(_target(block, entry, student.model, teacher, where))
    return tuple(targets)


def _target(block: str, entry, student: nn.Module, teacher: nn.Module, where) -> BlockTarget:
    def bad(why: str) -> FinetuneError:
        return FinetuneError(f"`feature_distill`: {where} {BLOCK_CHANNELS} {block}: {why}; prune the original model "
                             "again, or leave `feature_distill` out", field="feature_distill")

    if not isinstance(entry, dict) or not isinstance(entry.get("module"), str) or entry.get("axis") not in (1, -1):
        raise bad("is not a {module, axis, size, keep} record")
    size, keep = entry.get("size"), entry.get("keep")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or not isinstance(keep, list) or not keep or \
            any(isinstance(k, bool) or not isinstance(k, int) for k in keep) or \
            any(a >= b for a, b in zip(keep, keep[1:])) or keep[0] < 0 or keep[-1] >= size:
        raise bad(f"keep must be increasing channel numbers below size {size!r}")
    for model, name, expected in ((student, "the model", len(keep)), (teacher, "`teacher`", size)):
        try:
            writer = model.get_submodule(entry["module"])
        except AttributeError:
            raise bad(f"{name} has no module {entry['module']}") from None
        channels = writer.weight.shape[0] if isinstance(writer, (nn.Conv2d, nn.Linear)) else None
        if channels != expected:
            raise bad(f"{name}'s {entry['module']} has {channels} output channels, the record says {expected}"
                      + ("; distill from the unpruned model" if name == "`teacher`" else ""))
    return BlockTarget(block, entry["axis"], torch.tensor(keep), size)
