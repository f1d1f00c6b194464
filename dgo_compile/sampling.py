"""A plain diffusers sampling loop over any denoiser callable, and image grids.

Noise comes from one seeded CPU generator so that two denoisers sampled with the same seed are
compared on the same noise (paired PSNR/SSIM).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler

from .errors import DgoError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    scheduler_config: dict,
    noise: torch.Tensor,
    steps: int = 50,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from `noise`; returns images in [-1, 1].

    A denoiser with block caches provides `new_run()`; each batch chunk gets a fresh run, so no
    cache is ever shared between two sampling runs.
    """
    if steps < 1:
        raise DgoError(f"steps must be at least 1, got {steps}")
    outputs = []
    for chunk in noise.split(batch_size):
        scheduler = DDIMScheduler.from_config(scheduler_config)  # one per run: no state shared between runs
        scheduler.set_timesteps(steps)
        x = chunk.clone()
        step_fn = denoiser.new_run() if hasattr(denoiser, "new_run") else denoiser
        for t in scheduler.timesteps:
            eps = step_fn(x, t.expand(x.shape[0]))
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            if progress is not None:
                progress(len(chunk))
        outputs.append(x.clamp(-1, 1))
    return torch.cat(outputs)


def save_grid(images: torch.Tensor, path: str | Path, scale: int = 2) -> Path:
    """Write images in [-1, 1] ([N,C,H,W], C = 1 or 3) as one PNG grid, nearly square."""
    from PIL import Image

    n, c, h, w = images.shape
    side = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / side))
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.zeros((rows * h, side * w, c), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, q = divmod(i, side)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)  # atomic: a failed save never leaves a half-written grid
    return path
