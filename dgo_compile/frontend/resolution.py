"""The resolution an artifact is compiled for, and the sizes each architecture accepts.

Users speak pixels where the model folder is a pipeline with a `vae/` (the latent is the image
divided by the VAE's scale factor, 2 ** (len(block_out_channels) - 1), read from vae/config.json
without loading the VAE) and latent (= sample) sizes where there is no VAE (a bare config.json,
a UNet2DModel pipeline). Tracing, export and every later stage see only the latent size.

Accepted latent sizes (`Family.size_rule`): UNets need multiples of 2 ** (number of
downsamplers), so every skip connection meets an upsampled map of its own size; DiT and PixArt
need multiples of the patch size (their PatchEmbed recomputes its sin-cos position table for
another grid: neither sets `pos_embed_max_size`, so nothing bounds it), and DiT a square, as its
forward unpatchifies `height = width = sqrt(tokens)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from dgo_compile.core.errors import DgoError
from dgo_compile.frontend.families import config_size, family_of

PIXELS, LATENT = "pixels", "latent"


class ResolutionError(DgoError):
    """A height or width the architecture cannot run at; the message names the nearest ones that work."""


@dataclass(frozen=True)
class Resolution:
    """A compiled size: height and width in `unit`; `scale` pixels per latent (1 for latent sizes)."""

    height: int
    width: int
    unit: str = LATENT
    scale: int = 1

    @property
    def latent(self) -> tuple[int, int]:
        """The denoiser's sample size (h, w)."""
        return self.height // self.scale, self.width // self.scale

    def to_json(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "unit": self.unit}

    def __str__(self) -> str:
        return f"height {self.height}, width {self.width} {'pixels' if self.unit == PIXELS else '(latent)'}"


def vae_scale_factor(source: str | os.PathLike | None) -> int | None:
    """Pixels per latent of the pipeline folder `source` (None when it has no vae/config.json)."""
    if source is None:
        return None
    config = Path(source) / "vae" / "config.json"
    if not config.is_file():
        return None
    try:
        channels = json.loads(config.read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResolutionError(f"cannot read block_out_channels from {config}: {exc}") from exc
    return 2 ** (len(channels) - 1)


def _nearest(value: int, multiple: int) -> str:
    lower = value // multiple * multiple
    return " or ".join(str(v) for v in (lower, lower + multiple) if v > 0)


def check_size(model: nn.Module, height: int, width: int, scale: int = 1,
               names: tuple[str, str] = ("`height`", "`width`")) -> None:
    """Raise ResolutionError unless `model` runs at (height, width), given in units of 1/`scale` latent
    (scale 1: latent sizes; the VAE's factor: pixels). `names` are what the caller calls the two sizes."""
    rule = family_of(model).size_rule(model)
    multiple = rule.multiple * scale
    why = f"the VAE's {scale} x {rule.why.split(':')[0]}" if scale > 1 else rule.why
    for name, value in zip(names, (height, width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ResolutionError(f"{name} must be a positive whole number, got {value!r}", field=("height", "width"))
        if value % multiple:
            raise ResolutionError(f"{name} {value} is not a multiple of {multiple} ({why}); "
                                  f"use {_nearest(value, multiple)}", field=("height", "width"))
    if rule.square and height != width:
        raise ResolutionError(f"{type(model).__name__} runs square sizes only (it unpatchifies height = width); "
                              f"{names[0]} {height} and {names[1]} {width} differ: use {min(height, width)} "
                              f"or {max(height, width)} for both", field=("height", "width"))


def resolve(model: nn.Module, source: str | os.PathLike | None, height: int | None = None, width: int | None = None,
            names: tuple[str, str] = ("`height`", "`width`")) -> Resolution:
    """The resolution to compile `model` at: pixels when `source` is a pipeline folder with a vae/,
    else latent; a size left out is the config's sample_size (times the VAE's factor). Checked."""
    scale = vae_scale_factor(source) or 1
    default_h, default_w = (side * scale for side in config_size(model))
    resolution = Resolution(default_h if height is None else height, default_w if width is None else width,
                            PIXELS if scale > 1 else LATENT, scale)
    check_size(model, resolution.height, resolution.width, scale, names)
    return resolution


def artifact_resolution(latent: tuple[int, int], model_source: str | os.PathLike | None) -> dict[str, Any]:
    """The manifest's `resolution`: in pixels when the model folder has a vae/, else latent."""
    scale = vae_scale_factor(model_source) or 1
    return Resolution(latent[0] * scale, latent[1] * scale, PIXELS if scale > 1 else LATENT, scale).to_json()



