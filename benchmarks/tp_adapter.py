"""Torch-Pruning driven as Diff-Pruning's `ddpm_prune.py` drives it: the comparison's other side.

Shared by channel_pruning.py and width_time.py; kept out of both so that neither imports the other.
Needs torch-pruning (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from common import first_line
from torch import nn

from dgo_compile.channels.channel_pruning import PruneConfig
from dgo_compile.frontend.channel_surgery import PRUNING_FORMAT, module_shape


def taylor_batch(images: torch.Tensor, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration batch and noise exactly as dgo_compile.channels.channel_pruning draws them."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(images), generator=generator)[:batch]
    clean = images[index]
    return clean, torch.randn(clean.shape, generator=generator)


def accumulate_gradients(model: nn.Module, images: torch.Tensor, config: PruneConfig,
                         scheduler_config: dict | None) -> list[float]:
    """Diff-Pruning's loop (ddpm_prune.py, --pruner diff-pruning): .grad summed over t = 0, 1, ...
    until the loss falls below threshold x its running max (capped at max_timesteps)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config or {})
    clean, noise = taylor_batch(images, config.batch, config.seed)
    losses: list[float] = []
    for t in range(min(config.max_timesteps, scheduler.config.num_train_timesteps)):
        timesteps = torch.full((len(clean),), t, dtype=torch.long)
        prediction = model(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        loss = nn.functional.mse_loss(prediction, noise)
        loss.backward()
        losses.append(loss.item())
        if losses[-1] < config.threshold * max(losses):
            break
    return losses


def tp_pruner(model: nn.Module, ratio: float, round_to: int | None, global_pruning: bool):
    import torch_pruning as tp

    size = model.config.sample_size
    example = {"sample": torch.randn(1, model.config.in_channels, size, size), "timestep": torch.ones((1,)).long()}
    ignored = [model.conv_out] + ([model.class_embedding] if getattr(model, "class_embedding", None) else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pruner.MagnitudePruner(model, example, importance=tp.importance.TaylorImportance(),
                                         iterative_steps=1, pruning_ratio=ratio, ignored_layers=ignored,
                                         round_to=round_to, global_pruning=global_pruning)


def tp_cut(pruner, model: nn.Module) -> None:
    """Prune, then Diff-Pruning's static-attribute fix (diffusers samplers assert their channel count)."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group in pruner.step(interactive=True):
            group.prune()
    for m in model.modules():
        if isinstance(m, (Upsample2D, Downsample2D)) and getattr(m, "conv", None) is not None:
            m.channels = m.conv.in_channels
            m.out_channels = m.conv.out_channels
    model.zero_grad(set_to_none=True)
    model.eval().requires_grad_(False)


def tp_from_gradients(base: nn.Module, grads: dict[str, torch.Tensor], ratio: float, round_to: int | None = None,
                      global_pruning: bool = False) -> tuple[nn.Module | None, float, str | None]:
    """Torch-Pruning on a copy of `base` with the stored accumulated gradients; (model, seconds, error)."""
    model = copy.deepcopy(base).eval().requires_grad_(True)
    started = time.perf_counter()
    try:
        pruner = tp_pruner(model, ratio, round_to, global_pruning)
        for name, p in model.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
        tp_cut(pruner, model)
    except Exception as exc:
        return None, time.perf_counter() - started, first_line(exc)
    return model, time.perf_counter() - started, None


def pruning_record(original: nn.Module, model: nn.Module, source: str) -> dict:
    """A dgo_pruning.json for a model pruned elsewhere: every resized module's new shape and the
    samplers' channel counts, so `load` rebuilds it exactly (lets both sides share `finetune`)."""
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)):
            shape = module_shape(m)
            if shape != module_shape(original.get_submodule(name)):
                modules[name] = shape
    attributes = {name: {"channels": m.channels, "out_channels": getattr(m, "out_channels", None)}
                  for name, m in model.named_modules() if isinstance(getattr(m, "channels", None), int)}
    return {"format": PRUNING_FORMAT, "source": source, "modules": modules, "tensors": {}, "attributes": attributes}
