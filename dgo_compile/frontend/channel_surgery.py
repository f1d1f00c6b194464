"""Channel surgery: new, smaller modules that keep chosen input/output channels.

Pruned diffusers models cannot be described by their config (block widths stop being uniform),
so a pruned model is saved as the original config plus `dgo_pruning.json`: the new size of every
resized module. Loading builds the original architecture, resizes the same modules, then loads
the weights strictly, so the round trip is exact.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgo_compile.core.errors import DgoError, ModelLoadError
from dgo_compile.frontend.bounds import check_numbers, read_json_object

__all__ = ["BLOCK_CHANNELS", "PRUNING_FILE", "PRUNING_FORMAT", "SurgeryError", "apply_record", "check_record",
           "has_record", "module_shape", "read_record", "resized", "write_record"]
PRUNING_FILE = "dgo_pruning.json"
BLOCK_CHANNELS = "block_channels"  # per block: the original's output channels the cut keeps (feature distillation)
PRUNING_FORMAT = 2  # 2: a GroupNorm's record gives its groups (whole groups can be removed)
READABLE_FORMATS = (1, PRUNING_FORMAT)


class SurgeryError(DgoError):
    """A module cannot be resized, or a recorded pruning does not fit the model."""


def resized(module: nn.Module, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None,
            num_groups: int | None = None) -> nn.Module:
    """A new module like `module` with only the kept input/output channels (None keeps all). A GroupNorm
    keeps `num_groups` groups; by default its kept channels say: whole groups kept or gone drop the gone
    ones, an equal share of every group keeps them all."""
    new = copy.deepcopy(module)
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise SurgeryError(f"grouped convolution ({module}) cannot be resized: channel pruning supports groups=1")
        weight = module.weight.detach()
        if keep_out is not None:
            weight = weight[keep_out]
        if keep_in is not None:
            weight = weight[:, keep_in]
        new.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
        if module.bias is not None and keep_out is not None:
            new.bias = nn.Parameter(module.bias.detach()[keep_out].clone(), requires_grad=module.bias.requires_grad)
        if isinstance(module, nn.Conv2d):
            new.in_channels, new.out_channels = weight.shape[1], weight.shape[0]
        else:
            new.in_features, new.out_features = weight.shape[1], weight.shape[0]
        return new
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        keep = keep_out if keep_out is not None else keep_in
        if keep is None:
            return new
        size = len(keep)
        if isinstance(module, nn.GroupNorm):
            groups = num_groups if num_groups is not None else _kept_groups(module, keep)
            if size % groups:
                raise SurgeryError(f"GroupNorm({module.num_groups}, {module.num_channels}) cannot keep {size} "
                                   f"channels in {groups} groups: not a multiple of its groups")
            new.num_channels, new.num_groups = size, groups
        else:
            if len(module.normalized_shape) != 1:
                raise SurgeryError(f"{module} normalizes over several dims; only 1-D LayerNorm can be resized")
            new.normalized_shape = (size,)
        if module.weight is not None:
            new.weight = nn.Parameter(module.weight.detach()[keep].clone(), requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach()[keep].clone(), requires_grad=module.bias.requires_grad)
        return new
    raise SurgeryError(f"cannot resize a {type(module).__name__}: channel pruning resizes Conv2d, Linear, "
                       "GroupNorm and LayerNorm")


def _kept_groups(module: nn.GroupNorm, keep: torch.Tensor) -> int:
    """The groups a GroupNorm keeps: fewer when each of its groups is kept whole or not at all."""
    per_group = module.num_channels // module.num_groups
    counts = torch.bincount(keep // per_group, minlength=module.num_groups)
    whole = bool(((counts == 0) | (counts == per_group)).all()) and len(keep) < module.num_channels
    return int((counts > 0).sum()) if whole else module.num_groups


def module_shape(module: nn.Module) -> dict[str, Any]:
    """What `dgo_pruning.json` records of a resized module."""
    if isinstance(module, nn.Conv2d):
        return {"kind": "Conv2d", "in": module.in_channels, "out": module.out_channels}
    if isinstance(module, nn.Linear):
        return {"kind": "Linear", "in": module.in_features, "out": module.out_features}
    if isinstance(module, nn.GroupNorm):
        return {"kind": "GroupNorm", "channels": module.num_channels, "groups": module.num_groups}
    if isinstance(module, nn.LayerNorm):
        return {"kind": "LayerNorm", "channels": module.normalized_shape[0]}
    raise SurgeryError(f"cannot record the shape of a {type(module).__name__}")


def apply_record(model: nn.Module, pruning: dict[str, Any]) -> nn.Module:
    """Resize `model` in place as `dgo_pruning.json` records: module sizes (weights are placeholders
    until loaded), index cuts of other tensors (e.g. DiT's position table, which is not saved), and
    the channel counts that diffusers samplers check their inputs against."""
    for name, shape in pruning.get("modules", {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise SurgeryError(f"{PRUNING_FILE} names {name}, which this model does not have") from exc
        if type(module).__name__ != shape["kind"]:
            raise SurgeryError(f"{PRUNING_FILE} records {name} as {shape['kind']}, but the model has "
                               f"{type(module).__name__}")
        if "channels" in shape:
            groups = shape.get("groups", getattr(module, "num_groups", None))  # format 1: groups were kept
            new = resized(module, None, torch.arange(shape["channels"]), groups)
        else:
            new = resized(module, torch.arange(shape["in"]), torch.arange(shape["out"]))
        model.set_submodule(name, new)
    for name, cut in pruning.get("tensors", {}).items():
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        module = model.get_submodule(owner)
        value = torch.index_select(getattr(module, leaf).detach(), cut["axis"], torch.tensor(cut["keep"]))
        setattr(module, leaf, nn.Parameter(value) if isinstance(getattr(module, leaf), nn.Parameter) else value)
    for name, values in pruning.get("attributes", {}).items():
        module = model.get_submodule(name)
        for attribute, value in values.items():
            if value is not None:
                setattr(module, attribute, value)
    return model


def has_record(folder: Path) -> bool:
    """Whether `folder` holds a channel-pruned model (its record beside config.json)."""
    return (folder / PRUNING_FILE).is_file()


def read_record(folder: Path, original: nn.Module | None) -> dict[str, Any]:
    """The pruning record of a pruned model folder: its format, and every size checked against the
    original architecture (`original`, built on the meta device) before anything is resized."""
    where = folder / PRUNING_FILE
    pruning = read_json_object(where)
    if pruning.get("format") not in READABLE_FORMATS:
        raise ModelLoadError(f"{where} has format {pruning.get('format')!r}; this dgo-compile reads formats "
                             f"{', '.join(map(str, READABLE_FORMATS))}: prune the model again with this version")
    check_record(original, pruning, where)
    return pruning


def write_record(folder: Path, pruning: dict[str, Any]) -> None:
    """Write the record `read_record` reads back (inside a staging folder the caller publishes)."""
    (folder / PRUNING_FILE).write_text(json.dumps(pruning, indent=1))


def check_record(model: torch.nn.Module | None, pruning: dict[str, Any], where: Path | str) -> None:
    """Every size a pruning record gives a module is a whole number from 1 to the original module's size."""
    for part in ("modules", "tensors", "attributes"):  # sizes; its "params" and "macs" are counts, not sizes
        check_numbers(pruning.get(part), where, part)
    modules = pruning.get("modules", {})
    if not isinstance(modules, dict) or model is None:
        return
    for name, shape in modules.items():
        if not isinstance(shape, dict):
            raise ModelLoadError(f"{where} records {name} as {shape!r}, not a module shape")
        try:
            original = module_shape(model.get_submodule(name))
        except (AttributeError, SurgeryError):
            continue  # applying the record names the problem
        for key in ("in", "out", "channels", "groups"):
            if key not in shape or key not in original:
                continue
            value = shape[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= original[key]:
                raise ModelLoadError(f"{where} records {name} with {key} = {value!r}, but the original has "
                                     f"{original[key]}: a pruned model keeps between 1 and all of them")
