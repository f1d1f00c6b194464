"""What DiP-GO's pruner trains against: the calibration noise and conditions it cycles through, the
pipeline's VAE decoder (so the loss compares pictures, not latents) and the consistency loss itself.
Kept apart from the gate network (`dgo_compile.search.pruner`), which only consumes them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from dgo_compile.backend.sampling import conditions_for, initial_noise
from dgo_compile.core.configs import OptimizeConfig, PrunerError
from dgo_compile.core.metrics import ssim
from dgo_compile.frontend.prompts import encode_prompts, read_prompts
from dgo_compile.frontend.tracing import TracedDenoiser


def calibration_inputs(traced: TracedDenoiser, config: OptimizeConfig, null_class_label: int | None,
                 pipeline: str | None):
    """Noise, and condition inputs at batch `calibration` (or guidance), for the whole pool.
    Prompts cycle over the pool, encoded by the text encoder of the `pipeline` folder."""
    shape = tuple(traced.example_inputs(1)["sample"].shape[1:])
    noise = initial_noise(config.calibration, shape, config.seed)
    labels = list(config.class_labels) if config.class_labels else None
    if labels is None and "class_labels" in traced.input_names:
        labels = traced.example_inputs(config.calibration, seed=config.seed)["class_labels"].tolist()
    encoded = None
    if config.prompts is not None:
        if pipeline is None:
            raise PrunerError("`prompts` needs the model's pipeline folder, whose text encoder encodes them",
                              field="prompts")
        encoded = encode_prompts(pipeline, read_prompts(config.prompts))
    conditions, guidance = conditions_for(traced.input_names, config.calibration, labels, config.prompt_embeds,
                                          config.guidance_scale, null_class_label, tensors=encoded)
    return noise, conditions or {}, guidance


def _rows(tensors: dict[str, torch.Tensor], index: list[int]) -> tuple[torch.Tensor, ...]:
    return tuple(t if t.shape[0] == 1 else t[index] for t in tensors.values())


def condition_rows(conditions, guidance, index: list[int]) -> tuple[torch.Tensor, ...]:
    if guidance is None:
        return tuple(v.expand(len(index), *v.shape[1:]) if v.shape[0] == 1 else v for v in _rows(conditions, index))
    return tuple(torch.cat([u.expand(len(index), *u.shape[1:]), c.expand(len(index), *c.shape[1:])])
                 for u, c in zip(_rows(guidance.uncond, index), _rows(guidance.cond, index)))


def consistency(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1 - SSIM, with the window shrunk to fit small (latent) images."""
    window = min(11, min(images.shape[-2:]) - (1 - min(images.shape[-2:]) % 2))
    return 1 - ssim(images, reference, window_size=window).mean()


def vae_decoder(pipeline: str | Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a latent pipeline folder with a `vae/`: latents -> images in [-1, 1], differentiable, so
    the consistency loss compares pictures rather than latents. None without a VAE."""
    folder = Path(pipeline) / "vae"
    if not (folder / "config.json").is_file():
        return None
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(folder).eval()
    except Exception as exc:
        raise PrunerError(f"cannot load the VAE in {folder}: {exc}") from exc
    scale = vae.config.scaling_factor

    def decode(latents: torch.Tensor) -> torch.Tensor:
        vae.to(latents.device)  # a no-op after the first call
        return vae.decode(latents / scale).sample.clamp(-1, 1)

    return decode
