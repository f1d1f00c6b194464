"""Diff-Pruning: timestep-aware Taylor channel pruning of a diffusers denoiser.

1. `plan_channels`: trace, then the `channel_groups` pass finds the dependency groups.
2. `importance`: Taylor |w * dL/dw| with the gradient accumulated over timesteps t = 0, 1, ...
   (small noise first) on one fixed batch and noise, stopping at the first t whose denoising loss
   falls below `threshold` x the running maximum (Diff-Pruning, Fang et al. 2023); or magnitude
   or random, as ablations. Summed per channel over every weight slice of its group.
3. `select` (`channel_selection`): which channels each group keeps: every GroupNorm group and head
   thinned alike, or whole GroupNorm groups removed.
4. `apply_pruning`: new, smaller modules in a copy of the model (the user's is untouched), the
   attention scale kept at its original 1/sqrt(head_dim), checked by re-tracing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from dgo_compile.channels.channel_selection import max_step, planned_cut, select, uniform_step  # noqa: F401  (re-exported)
from dgo_compile.core.configs import IMPORTANCES, SCOPES, PruneConfig, PruneError  # noqa: F401  (re-exported)
from dgo_compile.frontend.channel_surgery import BLOCK_CHANNELS, PRUNING_FORMAT, module_shape, resized
from dgo_compile.frontend.loading import LoadedModel
from dgo_compile.frontend.tracing import TracedDenoiser, trace
from dgo_compile.passes import PassManager
from dgo_compile.passes.annotations import channel_plan
from dgo_compile.passes.channel_groups import ChannelGroups, ChannelGroupsConfig
from dgo_compile.passes.channel_plan import NORMALIZED_SHAPE, ChannelPlan
from dgo_compile.schedules.cost import cost_report


@dataclass
class PrunedModel:
    model: nn.Module
    pruning: dict  # what dgo_pruning.json records
    keep: dict[int, torch.Tensor]  # group id -> kept channel indices
    taylor_losses: tuple[float, ...]  # Taylor: the denoising loss at t = 0, 1, ... until the stop
    traced: TracedDenoiser  # the pruned model's graph, re-traced and checked against it (callers need not trace again)


def plan_channels(source: LoadedModel | nn.Module | TracedDenoiser) -> tuple[TracedDenoiser, ChannelPlan]:
    traced = source if isinstance(source, TracedDenoiser) else trace(source, verify=False)
    PassManager([ChannelGroups(ChannelGroupsConfig(traced.family.equal_channel_sizes))]).run(traced.graph_module)
    return traced, channel_plan(traced.graph_module)


def importance(traced: TracedDenoiser, plan: ChannelPlan, config: PruneConfig, images: torch.Tensor | None = None,
               scheduler_config: dict | None = None) -> tuple[dict[int, torch.Tensor], tuple[float, ...]]:
    """Per-channel importance of every prunable group, and (Taylor) the loss at each timestep used."""
    model = traced.model
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    used: tuple[float, ...] = ()
    if config.importance == "taylor":
        if images is None:
            raise PruneError("Taylor importance needs calibration images")
        scores, used = _taylor_scores(traced, images, config, scheduler_config)
        score_of = scores.get
    elif config.importance == "magnitude":  # |w| of each tensor as it is read: no copy of every weight (SDXL: 10 GB)
        def score_of(name: str) -> torch.Tensor | None:
            return params[name].detach().abs() if name in params else None
    else:
        generator = torch.Generator().manual_seed(config.seed)
        scores = {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}
        score_of = scores.get
    result = {}
    for group in plan.prunable():
        total = torch.zeros(group.size)
        for s in group.slices:
            score = score_of(s.param)
            if score is None:
                continue
            dims = [d for d in range(score.dim()) if d != s.axis]
            per_index = score.sum(dim=dims) if dims else score
            total += per_index[s.start:s.start + group.size].float()
        result[group.id] = total
    return result, used


def _taylor_scores(traced: TracedDenoiser, images: torch.Tensor, config: PruneConfig,
                   scheduler_config: dict | None) -> tuple[dict[str, torch.Tensor], tuple[float, ...]]:
    from diffusers import DDPMScheduler

    model = copy.deepcopy(traced.model).train(False).requires_grad_(True)
    scheduler = DDPMScheduler.from_config(scheduler_config or {})
    generator = torch.Generator().manual_seed(config.seed)
    index = torch.randperm(len(images), generator=generator)[:config.batch]
    clean = images[index]
    noise = torch.randn(clean.shape, generator=generator)
    extra = {k: v for k, v in traced.example_inputs(len(clean), config.seed).items()
             if k not in ("sample", "timestep")}
    losses: list[float] = []
    limit = min(config.max_timesteps, scheduler.config.num_train_timesteps)
    for t in range(limit):
        timesteps = torch.full((len(clean),), t, dtype=torch.long)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = traced.family.adapter(model)(*[noisy, timesteps, *extra.values()])
        loss = nn.functional.mse_loss(prediction, noise)
        loss.backward()  # gradients accumulate over timesteps, as Diff-Pruning does
        losses.append(loss.item())
        if losses[-1] < config.threshold * max(losses):
            break
    scores = {name: (p.detach() * p.grad).abs() for name, p in model.named_parameters() if p.grad is not None}
    return scores, tuple(losses)


def apply_pruning(model: nn.Module, plan: ChannelPlan, keep: dict[int, torch.Tensor],
                  run: Callable[[nn.Module], object]) -> tuple[nn.Module, dict]:
    """A pruned copy of `model` and the `modules` / `tensors` / `attributes` records that rebuild it.
    `run(module)` calls it once on example inputs (to read what each sampler now receives)."""
    model = copy.deepcopy(model)
    axes: dict[str, dict[int, torch.Tensor]] = {}  # param -> axis -> kept indices
    for group in plan.groups:
        kept = keep.get(group.id)
        if kept is None:
            continue
        for s in group.slices:
            axes.setdefault(s.param, {}).setdefault(s.axis, []).append((s.start, group.size, kept + s.start))
    indices = {p: {a: _merge(parts, _length(model, p, a)) for a, parts in by_axis.items()}
               for p, by_axis in axes.items()}
    modules: dict[str, dict] = {}
    tensors: dict[str, dict] = {}
    by_module: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for param, by_axis in indices.items():
        owner, leaf = param.rsplit(".", 1) if "." in param else ("", param)
        module = model.get_submodule(owner)
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)) and \
                leaf in ("weight", "bias", NORMALIZED_SHAPE):
            by_module.setdefault(owner, {})[leaf] = by_axis
        else:
            for axis, idx in by_axis.items():
                _set_tensor(model, param, torch.index_select(_get_tensor(model, param).detach(), axis, idx))
                tensors[param] = {"axis": axis, "keep": idx.tolist()}
    for name, params in by_module.items():
        module = model.get_submodule(name)
        weight = params.get("weight", params.get(NORMALIZED_SHAPE, {}))
        keep_out = weight.get(0, params.get("bias", {}).get(0))
        keep_in = weight.get(1)
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            keep_in = None
        new = resized(module, keep_in, keep_out)
        model.set_submodule(name, new)
        modules[name] = module_shape(new)
    _keep_attention_scale(model, plan, keep)
    attributes = _sync_channel_attributes(model, run)
    return model, {"modules": modules, "tensors": tensors, "attributes": attributes}


def _length(model: nn.Module, param: str, axis: int) -> int:
    owner, leaf = param.rsplit(".", 1) if "." in param else ("", param)
    if leaf == NORMALIZED_SHAPE:
        return model.get_submodule(owner).normalized_shape[0]
    return _get_tensor(model, param).shape[axis]


def _merge(parts, length: int) -> torch.Tensor:
    """One index tensor for an axis from the groups covering stretches of it; the rest stays."""
    mask = torch.ones(length, dtype=torch.bool)
    for start, size, kept in parts:
        mask[start:start + size] = False
        mask[kept] = True
    return torch.nonzero(mask).flatten()


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    return getattr(model.get_submodule(owner), leaf)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    module = model.get_submodule(owner)
    if isinstance(getattr(module, leaf), nn.Parameter):
        setattr(module, leaf, nn.Parameter(value.clone(), requires_grad=getattr(module, leaf).requires_grad))
    else:
        setattr(module, leaf, value.clone())


def _keep_attention_scale(model: nn.Module, plan: ChannelPlan, keep: dict[int, torch.Tensor]) -> None:
    """SDPA without an explicit scale divides by sqrt(current head size): scale the queries so the
    logits keep the original 1/sqrt(head_dim)."""
    for site in plan.attention:
        kept = keep.get(site.group)
        if site.explicit_scale or kept is None:
            continue
        group = next(g for g in plan.groups if g.id == site.group)
        new_head = site.head_dim * len(kept) // group.size
        if new_head == site.head_dim:
            continue
        factor = math.sqrt(new_head / site.head_dim)
        for name in (site.query_weight, site.query_bias):
            if name is not None:
                _set_tensor(model, name, _get_tensor(model, name).detach() * factor)


def _sync_channel_attributes(model: nn.Module, run: Callable[[nn.Module], object]) -> dict[str, dict[str, int]]:
    """diffusers samplers assert `input.shape[1] == self.channels`: set it from what they now receive."""
    attributes: dict[str, dict[str, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "channels", None), int):
            def hook(mod, args, name=name):
                mod.channels = int(args[0].shape[1])
                conv = getattr(mod, "conv", None)
                if isinstance(getattr(mod, "out_channels", None), int) and isinstance(conv, nn.Conv2d):
                    mod.out_channels = conv.out_channels
                attributes[name] = {"channels": mod.channels, "out_channels": getattr(mod, "out_channels", None)}
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in hooks:
            h.remove()
    return attributes


def calibration_images(loaded: LoadedModel, images_file: str | None = None) -> torch.Tensor:
    """Real images for the Taylor gradients: a safetensors file's `images` [N, C, H, W] in [-1, 1],
    or the shipped MNIST digits for a 1x32x32 model."""
    shape = tuple(loaded.family.example_inputs(loaded.model, 1)["sample"].shape[1:])
    if images_file is not None:
        from safetensors.torch import load_file

        try:
            images = load_file(str(images_file))["images"].float()
        except Exception as exc:
            raise PruneError(f"cannot read 'images' from {images_file}: {exc}") from exc
        if tuple(images.shape[1:]) != shape:
            raise PruneError(f"{images_file} holds images of shape {tuple(images.shape[1:])}, the model takes {shape}")
        return images
    if shape == (1, 32, 32):
        from dgo_compile.channels.data import mnist_digits

        return mnist_digits()[0]
    raise PruneError(f"Taylor importance needs real images of shape {shape}: pass `images` F.safetensors "
                     "holding 'images' [N, C, H, W] in [-1, 1], or use `importance` magnitude",
                     field=("images", "importance"))


def prune(loaded: LoadedModel, config: PruneConfig, images: torch.Tensor | None = None, *,
          traced: TracedDenoiser | None = None) -> PrunedModel:
    """Prune `loaded`'s denoiser; the result re-traces (at `traced`'s size) and matches its own graph.

    `traced`, a trace of `loaded.model` the caller already has, saves tracing it again (a full-size UNet
    costs a minute to trace); its graph gets the channel-group annotations, its model is not changed."""
    if traced is not None and traced.model is not loaded.model:
        raise PruneError("prune: `traced` must be a trace of `loaded.model` (trace(loaded))")
    traced, plan = plan_channels(traced if traced is not None else loaded)
    if not plan.prunable():
        raise PruneError(f"{loaded.source} has no prunable channel group")
    scores, losses = importance(traced, plan, config, images, loaded.scheduler_config)
    keep = select(plan, scores, config)
    example = tuple(traced.example_inputs(1).values())
    try:
        model, records = apply_pruning(traced.model, plan, keep, lambda m: traced.family.adapter(m)(*example))
    except RuntimeError as exc:  # a shape in the model's code tying channel counts the graph does not show
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PruneError(f"the pruned {type(traced.model).__name__} does not run ({first}); its code ties the sizes "
                         "of channels the traced graph does not connect: name the modules in its family's "
                         "equal_channel_sizes (dgo_compile.frontend.families), or leave it unpruned") from exc
    model = model.eval().requires_grad_(False)
    # re-trace and check the pruned graph against the pruned eager model
    pruned_traced = trace(model, size=traced.sample_size)
    before, after = cost_report(traced).total, cost_report(pruned_traced).total
    pruning = {"format": PRUNING_FORMAT, "config": asdict(config), "source": str(loaded.source),
               "taylor_losses": list(losses), **merged_records(loaded.pruning, records),
               "params": {"before": before.params, "after": after.params},
               "macs": {"before": before.macs, "after": after.macs},
               "groups": {str(gid): {"size": next(g.size for g in plan.groups if g.id == gid), "kept": len(k)}
                          for gid, k in keep.items()}}
    channels = block_channels(traced.model, plan, keep, traced.family.blocks(traced.model), loaded.pruning)
    if channels is not None:
        pruning[BLOCK_CHANNELS] = channels
    if loaded.pruning is not None:  # pruned again: the record still rebuilds from the original config
        earlier = loaded.pruning.get("earlier", [])
        pruning["earlier"] = earlier + [{k: loaded.pruning[k] for k in ("config", "source", "params", "macs")
                                         if k in loaded.pruning}]
    return PrunedModel(model, pruning, keep, losses, pruned_traced)


def block_channels(model: nn.Module, plan: ChannelPlan | None, keep: dict[int, torch.Tensor], blocks,
                   earlier: dict | None) -> dict[str, dict] | None:
    """Per gateable block, which channels of its output the cut keeps, numbered as in the original model
    (composed with `earlier`'s when the model was pruned before; None when that record has none).

    A block's output channels are those of its last Conv2d or Linear: a sampler's conv, or the last writer
    to the residual stream the block hands on (resnet, attention, feed-forward), which shares its channels.
    Channel pruning only removes channels, so the student's channel j there is the original's keep[j]:
    what feature distillation (`finetune`'s `feature_distill`) compares. With no `keep` (and no `plan`),
    every channel of `model`'s blocks."""
    if earlier is not None and BLOCK_CHANNELS not in earlier:
        return None
    found = {}
    for spec in blocks:
        block = model.get_submodule(spec.name)
        writers = [(name, m) for name, m in block.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if not writers:
            continue
        name, module = writers[-1]
        param = f"{spec.name}.{name}.weight"
        parts = [(s.start, group.size, keep[group.id] + s.start) for group in (plan.groups if keep else ())
                 if group.id in keep
                 for s in group.slices if s.param == param and s.axis == 0]
        size = module.weight.shape[0]
        kept = _merge(parts, size).tolist()
        if earlier is not None:
            before = earlier[BLOCK_CHANNELS].get(spec.name)
            if before is None:
                continue
            kept, size = [before["keep"][i] for i in kept], before["size"]
        found[spec.name] = {"module": f"{spec.name}.{name}", "axis": 1 if isinstance(module, nn.Conv2d) else -1,
                            "size": size, "keep": kept}
    return found


def merged_records(earlier: dict | None, records: dict) -> dict:
    """The `modules` / `tensors` / `attributes` that rebuild a model pruned again (gradual pruning) from the
    original config: the latest size of every module, index cuts composed (the new cut indexes the old)."""
    if earlier is None:
        return records
    modules = {**earlier.get("modules", {}), **records["modules"]}
    tensors = dict(earlier.get("tensors", {}))
    for name, cut in records["tensors"].items():
        before = tensors.get(name)
        if before is None:
            tensors[name] = cut
        elif before["axis"] != cut["axis"]:
            raise PruneError(f"{name} was cut along axis {before['axis']} and now along {cut['axis']}: a pruning "
                             "record holds one axis per tensor; prune the original model instead")
        else:
            tensors[name] = {"axis": cut["axis"], "keep": [before["keep"][i] for i in cut["keep"]]}
    attributes = {name: dict(values) for name, values in earlier.get("attributes", {}).items()}
    for name, values in records["attributes"].items():
        attributes.setdefault(name, {}).update(values)
    return {"modules": modules, "tensors": tensors, "attributes": attributes}
