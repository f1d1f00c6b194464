"""Load a denoiser from a local diffusers folder or config; never reach the network.

Accepted: a diffusers model folder (config.json + weights), a pipeline folder
(model_index.json; its unet/ or transformer/ is taken and its scheduler/ config kept), or a
bare config.json (random weights, for architecture work).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn

from dgo_compile.core.configs import CLASS_CONDITIONAL_MODEL, DEFAULT_MODEL  # noqa: F401  (re-exported)
from dgo_compile.core.errors import DgoError, ModelLoadError, UnsupportedModelError
from dgo_compile.core.finite import check_finite
from dgo_compile.core.outputs import check_output, staged, write_error
from dgo_compile.frontend.bounds import check_config, read_json_object
from dgo_compile.frontend.channel_surgery import SurgeryError, apply_record, has_record, read_record, write_record
from dgo_compile.frontend.families import FAMILIES, Family

DENOISER_SUBFOLDERS = ("unet", "transformer")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    """A denoiser ready to trace. `model` is ours: callers may not assume it is the user's object."""

    model: nn.Module
    family: Family
    source: Path
    config: dict[str, Any]
    scheduler_config: dict[str, Any] | None
    random_weights: bool
    pruning: dict[str, Any] | None = None  # dgo_pruning.json of a channel-pruned model

    @property
    def denoiser_folder(self) -> Path | None:
        """The folder holding the denoiser's config and weights (None for a bare config.json)."""
        if self.source.is_file():
            return None
        return next((self.source / s for s in DENOISER_SUBFOLDERS if (self.source / s / "config.json").is_file()),
                    self.source)

    @property
    def class_name(self) -> str:
        return type(self.model).__name__

    def require_scheduler(self, role: str | None = None, error: type[DgoError] = ModelLoadError,
                          needed_for: str = "") -> dict[str, Any]:
        """The scheduler config that sampling (or training: `needed_for`) needs; a bare denoiser folder
        has none. The one place this is checked; `role` names the model in the message (`teacher`)."""
        if self.scheduler_config is None:
            who = f"{role} ({self.source})" if role else str(self.source)
            field = role.strip("`") if role and role.startswith("`") else None
            raise error(f"{who} has no scheduler/ config{needed_for}; pass a pipeline folder", field=field)
        return self.scheduler_config


def load(path: str | os.PathLike | None = None) -> LoadedModel:
    """Load the denoiser at `path` (default: the shipped MNIST model) in eval mode, float32."""
    diffusers_logging.set_verbosity_error()  # its advice to install accelerate is noise to our users
    path = DEFAULT_MODEL if path is None else Path(path)
    if not path.exists():
        if HUB_ID.match(str(path)):
            raise ModelLoadError(
                f"'{path}' is not a local folder; dgo-compile never downloads models: fetch it yourself "
                f"(e.g. `hf download {path}`) and pass the local folder"
            )
        raise ModelLoadError(f"no such file or folder: {path}")
    if path.is_file():
        if path.name.endswith(".json"):
            return _from_config_file(path)
        raise ModelLoadError(f"{path} is a file; pass a diffusers model or pipeline folder, or a config.json")

    scheduler_config = None
    folder = path
    if (path / "model_index.json").is_file():
        index = read_json_object(path / "model_index.json")
        sub = next((s for s in DENOISER_SUBFOLDERS if s in index and (path / s).is_dir()), None)
        if sub is None:
            raise UnsupportedModelError(
                f"pipeline {path} ({index.get('_class_name', '?')}) has no unet/ or transformer/ folder to compile"
            )
        folder = path / sub
        if (path / "scheduler" / "scheduler_config.json").is_file():
            scheduler_config = read_json_object(path / "scheduler" / "scheduler_config.json")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass a diffusers model or pipeline folder")
    config = read_json_object(folder / "config.json")
    family = _family(config, folder / "config.json")
    check_config(config, family.model_class, folder / "config.json")  # before anything is allocated
    if has_record(folder):
        return _load_pruned(folder, path, config, family, scheduler_config)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"{folder} has config.json but no weights ({WEIGHT_FILES[0]} or .bin); "
            f"pass {folder / 'config.json'} itself to build the model with random weights"
        )
    try:
        model, info = family.model_class.from_pretrained(
            folder, local_files_only=True, output_loading_info=True, torch_dtype=torch.float32)
    except Exception as exc:  # diffusers/safetensors raise many types for bad files
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"could not read the weights in {folder} (corrupt or truncated?): {first_line}") from exc
    missing = info.get("missing_keys") or []
    if missing:
        raise ModelLoadError(
            f"weights in {folder} do not match its config: {len(missing)} tensors missing (first: {missing[0]})"
        )
    check_finite(model, str(folder), "the weights are corrupt: retrain or re-export the model")
    return LoadedModel(_prepare(model), family, path, dict(config), scheduler_config, random_weights=False)


def _load_pruned(folder: Path, path: Path, config: dict[str, Any], family: Family,
                 scheduler_config: dict[str, Any] | None) -> LoadedModel:
    """A channel-pruned model: the original architecture, resized as recorded, then its weights."""
    from safetensors.torch import load_file

    pruning = read_record(folder, check_config(config, family.model_class, folder / "config.json"))
    weights = folder / WEIGHT_FILES[0]
    try:
        model = family.model_class.from_config(config)
        apply_record(model, pruning)
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except SurgeryError as exc:
        raise ModelLoadError(f"{folder} is not a consistent pruned model: {exc}") from exc
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"could not read the pruned weights in {weights} (missing, corrupt or truncated?): "
                             f"{first_line}") from exc
    check_finite(model, str(folder), "the weights are corrupt: prune or fine-tune the model again")
    return LoadedModel(_prepare(model.float()), family, path, dict(config), scheduler_config, random_weights=False,
                       pruning=pruning)


def save_denoiser(loaded: LoadedModel, model: nn.Module, output: str | os.PathLike,
                  pruning: dict[str, Any] | None = None) -> Path:
    """Write `model` (a version of `loaded`'s denoiser) where `load` reads it back exactly.

    A pipeline source gives a pipeline folder (its other parts copied, the denoiser replaced); a
    model folder or config gives a model folder. Written to a temporary folder, then renamed.
    """
    import shutil

    from safetensors.torch import save_file

    output = Path(output)
    check_finite(model, f"the model to save at {output}", "nothing was written")
    check_output(output, "model", protected=[loaded.source], exists_hint="choose another `output` or remove it",
                 error=ModelLoadError)
    try:
        with staged(output, "model") as tmp:
            denoiser = loaded.denoiser_folder
            target = tmp
            if denoiser is not None and denoiser != loaded.source:
                # the pipeline's other components only: the source's own results (samples.png, loss.csv,
                # recipe.json, ...) describe it, and beside this model they would read as this model's
                index = read_json_object(loaded.source / "model_index.json")
                parts = {"model_index.json"} | {k for k in index if not k.startswith("_")}
                for item in loaded.source.iterdir():
                    if item != denoiser and item.name not in DENOISER_SUBFOLDERS and item.name in parts:
                        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
                target = tmp / denoiser.name
            target.mkdir(exist_ok=True)
            (target / "config.json").write_text(json.dumps(loaded.config, indent=2))
            state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(target / WEIGHT_FILES[0]))
            if pruning is not None:
                write_record(target, pruning)
    except OSError as exc:
        raise write_error(output, exc) from exc
    return output


def _from_config_file(path: Path) -> LoadedModel:
    config = read_json_object(path)
    family = _family(config, path)
    check_config(config, family.model_class, path)
    try:
        model = family.model_class.from_config(config)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid {family.model_class.__name__} config: {exc}") from exc
    return LoadedModel(_prepare(model), family, path, dict(config), None, random_weights=True)


def _prepare(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def _family(config: dict[str, Any], where: Path) -> Family:
    class_name = config.get("_class_name")
    if class_name not in FAMILIES:
        raise UnsupportedModelError(
            f"{where} describes {class_name or 'no _class_name'}, which dgo-compile does not compile; "
            f"supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[class_name]
