"""A plain diffusers sampling loop over any denoiser callable, any supported scheduler, and
classifier-free guidance; and image grids.

A denoiser is any callable `denoiser(sample, timestep, *conditions) -> prediction` on flat,
batch-major tensors in the model family's input order (see `families.py`), e.g. a
`TracedDenoiser`. One with block caches provides `new_run()`, a fresh per-run callable that
counts its calls: every scheduler here calls the denoiser exactly once per entry of its
`timesteps`, so a compiled schedule is indexed by call (see `denoiser_timesteps`), never by
timestep value (Heun and PNDM repeat timesteps).

Noise comes from one seeded CPU generator so that two denoisers sampled with the same seed are
compared on the same noise (paired PSNR/SSIM).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

from dgo_compile.core.errors import DgoError
from dgo_compile.core.files import write_atomic

Denoiser = Callable[..., torch.Tensor]

SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
    "heun": HeunDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}
DEFAULT_SCHEDULER = "ddim"


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: the denoiser runs on a batch of 2 (uncond then cond) and the
    prediction is uncond + scale * (cond - uncond).

    `cond` and `uncond` map condition input names to tensors of batch n (one per image) or 1
    (shared by all images); both name the same inputs, given in the denoiser's input order
    (after sample and timestep). `uncond` holds the null condition: the empty-prompt embedding
    for text models, the null class label (num_classes) for DiT.
    """

    scale: float
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]


def conditions_for(input_names: tuple[str, ...], n: int, class_labels: list[int] | None = None,
                   tensors_file: str | Path | None = None, guidance_scale: float | None = None,
                   null_class_label: int | None = None, tensors: dict[str, torch.Tensor] | None = None,
                   ) -> tuple[dict[str, torch.Tensor] | None, Guidance | None]:
    """Condition inputs for sampling `n` images, from class labels and/or a safetensors file.

    The file (or `tensors`, e.g. from `prompts.encode_prompts`) holds each condition input by name
    (e.g. `encoder_hidden_states`, batch 1 or n; other batches cycle over the n images) and, for
    guidance, `uncond.<name>` (e.g. the empty-prompt embedding). Class-label guidance uses the
    model's null class. Returns (conditions, None) without guidance, (None, guidance) with it.
    """
    wanted = [name for name in input_names if name not in ("sample", "timestep")]
    cond: dict[str, torch.Tensor] = {}
    uncond: dict[str, torch.Tensor] = {}
    stored = dict(tensors or {})
    if tensors_file is not None:
        from safetensors.torch import load_file

        try:
            stored.update(load_file(str(tensors_file)))
        except Exception as exc:
            raise DgoError(f"cannot read condition tensors from {tensors_file}: {exc}") from exc
    if stored:
        cond.update({k: v if v.shape[0] in (1, n) else v[torch.arange(n) % v.shape[0]]
                     for k, v in stored.items() if k in wanted})
        uncond.update({k.removeprefix("uncond."): v for k, v in stored.items() if k.startswith("uncond.")})
    if "class_labels" in wanted:
        if not class_labels:
            raise DgoError("this model is class-conditional: pass `class_labels` (repeat it for several classes)",
                           field="class_labels")
        cond["class_labels"] = torch.tensor([class_labels[i % len(class_labels)] for i in range(n)])
        if null_class_label is not None:
            uncond["class_labels"] = torch.tensor([null_class_label])
    elif class_labels:
        raise DgoError("`class_labels` given, but this model takes no class labels", field="class_labels")
    missing = [name for name in wanted if name not in cond]
    if missing:
        text = " (or `prompts`, with a pipeline folder that has a text encoder)" \
            if "encoder_hidden_states" in missing else ""
        raise DgoError(f"this model also takes {', '.join(missing)}: pass them in a safetensors file "
                       f"(`prompt_embeds`) under those names{text}", field=("prompt_embeds", "prompts"))
    if guidance_scale is None or not wanted:
        return (cond or None), None
    missing = [name for name in wanted if name not in uncond]
    if "class_labels" in missing:
        raise DgoError("guidance over class labels needs the model's null class, and this model declares none "
                       "(a UNet2DModel declares it as `null_class_label` in unet/config.json): drop "
                       "`guidance_scale`", field="guidance_scale")
    if missing:
        raise DgoError(f"guidance needs the null condition for {', '.join(missing)}: add uncond.<name> tensors "
                       "to the `prompt_embeds` file (class labels use the model's null class)", field="prompt_embeds")
    return None, Guidance(guidance_scale, {k: cond[k] for k in wanted}, {k: uncond[k] for k in wanted})


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def make_scheduler(scheduler_config: dict | None, name: str | None = None):
    """A fresh diffusers scheduler from `scheduler_config`.

    `name` is a key of SCHEDULERS; None takes the config's own class when it is one of them,
    else DDIM. The config's noise schedule (betas, prediction type, spacing) is kept either way.
    """
    config = dict(scheduler_config or {})
    if name is None:
        by_class = {cls.__name__: key for key, cls in SCHEDULERS.items()}
        name = by_class.get(config.get("_class_name"), DEFAULT_SCHEDULER)
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise DgoError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return cls.from_config(config)


def _set_timesteps(scheduler, steps: int, device: torch.device | str = "cpu") -> None:
    if steps < 1:
        raise DgoError(f"steps must be at least 1, got {steps}")
    try:
        scheduler.set_timesteps(steps, device=device)
    except ValueError as exc:  # e.g. more steps than training timesteps, PNDM's PRK warm-up below 4 steps
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DgoError(f"{type(scheduler).__name__} cannot make a {steps}-step schedule: {first_line}") from exc


def denoiser_timesteps(scheduler_config: dict | None, steps: int, name: str | None = None) -> list[float]:
    """The timestep of every denoiser call of one `steps`-step run, in call order.

    Its length is the number of denoiser calls, which is what a compiled schedule is folded
    for: `steps` for DDIM, DDPM, Euler and DPM-Solver; 2*steps - 1 for Heun; for PNDM
    steps + 9 with its Runge-Kutta warm-up (needs steps >= 4) or steps + 1 with
    `skip_prk_steps` (steps >= 2). Values may repeat (Heun, PNDM).
    """
    scheduler = make_scheduler(scheduler_config, name)
    _set_timesteps(scheduler, steps)
    return [float(t) for t in scheduler.timesteps]


def denoiser_calls(scheduler_config: dict | None, steps: int, name: str | None = None) -> int:
    """Denoiser calls of one `steps`-step run: the rows a schedule for it has (see denoiser_timesteps)."""
    return len(denoiser_timesteps(scheduler_config, steps, name))


def _batched(name: str, tensor: torch.Tensor, n: int) -> torch.Tensor:
    if tensor.ndim == 0 or tensor.shape[0] not in (1, n):
        shape = tuple(tensor.shape)
        raise DgoError(f"condition '{name}' has shape {shape}; its first dimension must be 1 or the batch ({n})")
    return tensor


def _chunk(tensor: torch.Tensor, start: int, size: int, device: torch.device) -> torch.Tensor:
    """Rows start..start+size of a batch-n tensor, or a batch-1 tensor broadcast to `size` rows."""
    rows = tensor.expand(size, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor[start:start + size]
    return rows.to(device).contiguous()


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler_config: dict | None,
    noise: torch.Tensor,
    steps: int = 50,
    *,
    scheduler: str | None = None,
    conditions: dict[str, torch.Tensor] | None = None,
    guidance: Guidance | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sample from `noise` (unit Gaussian, [n, C, H, W]) with a diffusers scheduler; images in [-1, 1].

    `scheduler` names one of SCHEDULERS (None: the config's class, else DDIM); DDIM runs with
    eta = 0. `conditions` are the denoiser's inputs after sample and timestep, given in its input
    order (dicts keep insertion order), each of batch n or 1. With `guidance`, the condition
    inputs come from `guidance.cond`/`guidance.uncond` instead, and each step calls the denoiser
    once on a doubled batch (uncond rows, then cond rows).

    The noise is scaled by the scheduler's `init_noise_sigma` (not 1 for Euler and Heun) and the
    denoiser input by `scale_model_input`, as diffusers pipelines do. A prediction with twice the
    sample's channels (learned sigma, e.g. DiT) keeps its first half. Noise batches of
    `batch_size` images are sampled one after the other, each with a fresh scheduler, a fresh
    `new_run()` of the denoiser when it has one, and (for stochastic schedulers such as DDPM) a
    CPU generator seeded with `seed + chunk index`. `progress(len(chunk))` is called after every
    denoiser call.
    """
    if steps < 1:
        raise DgoError(f"steps must be at least 1, got {steps}")
    n = noise.shape[0]
    if guidance is not None:
        if conditions:
            raise DgoError("pass condition inputs either as `conditions` or in `guidance`, not both; "
                           "give shared ones in both guidance.cond and guidance.uncond")
        if set(guidance.cond) != set(guidance.uncond):
            only_cond = sorted(set(guidance.cond) - set(guidance.uncond))
            only_uncond = sorted(set(guidance.uncond) - set(guidance.cond))
            raise DgoError(f"guidance.cond and guidance.uncond must name the same inputs; only in cond: "
                           f"{only_cond or 'none'}, only in uncond: {only_uncond or 'none'}")
        names = list(guidance.cond)
        cond = {k: _batched(k, guidance.cond[k], n) for k in names}
        uncond = {k: _batched(k, guidance.uncond[k], n) for k in names}
    else:
        conditions = {k: _batched(k, v, n) for k, v in (conditions or {}).items()}
    make_scheduler(scheduler_config, scheduler)  # fail on a bad name before any work

    outputs = []
    start = 0
    for index, chunk in enumerate(noise.split(batch_size)):
        b = chunk.shape[0]
        if guidance is not None:
            extra = tuple(torch.cat([_chunk(uncond[k], start, b, chunk.device),
                                     _chunk(cond[k], start, b, chunk.device)]) for k in names)
        else:
            extra = tuple(_chunk(v, start, b, chunk.device) for v in conditions.values())
        step_fn = denoiser.new_run() if hasattr(denoiser, "new_run") else denoiser
        outputs.append(trajectory(step_fn, scheduler_config, chunk, steps, scheduler=scheduler, extra=extra,
                                  guidance_scale=guidance.scale if guidance is not None else None,
                                  seed=seed + index, progress=progress))
        start += b
    return torch.cat(outputs)


def trajectory(
    step_fn: Denoiser,
    scheduler_config: dict | None,
    noise: torch.Tensor,
    steps: int,
    *,
    scheduler: str | None = None,
    extra: tuple[torch.Tensor, ...] = (),
    guidance_scale: float | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """One sampling run of one batch, differentiable: `sample`'s loop without `no_grad`, so the
    pruner can back-propagate from the final images through every denoiser call.

    `step_fn` is called once per scheduler timestep, in order; `extra` are its condition inputs
    already at the batch it sees (doubled, uncond rows first, with `guidance_scale`). Images are
    clamped to [-1, 1] unless `clamp` is False.
    """
    b = noise.shape[0]
    sched = make_scheduler(scheduler_config, scheduler)  # one per run: no state shared between runs
    _set_timesteps(sched, steps, noise.device)
    step_params = inspect.signature(sched.step).parameters
    step_kwargs = {}
    if isinstance(sched, DDIMScheduler):
        step_kwargs["eta"] = 0.0
    if "generator" in step_params:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    x = noise * sched.init_noise_sigma
    channels = x.shape[1]
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        if guidance_scale is not None:
            x_in = torch.cat([x_in, x_in])
        pred = step_fn(x_in, t.expand(x_in.shape[0]), *extra)
        if pred.shape[1] == 2 * channels:  # learned sigma: keep the noise prediction, as DiTPipeline does
            pred = pred[:, :channels]
        if guidance_scale is not None:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        x = sched.step(pred, t, x, **step_kwargs).prev_sample
        if progress is not None:
            progress(b)
    return x.clamp(-1, 1) if clamp else x


def sample_ddim(
    denoiser: Denoiser,
    scheduler_config: dict | None,
    noise: torch.Tensor,
    steps: int = 50,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): `sample(..., scheduler="ddim")`, kept for existing callers."""
    return sample(denoiser, scheduler_config, noise, steps, scheduler="ddim", batch_size=batch_size, progress=progress)


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
    return write_atomic(path, lambda p: image.save(p, format="PNG"))  # a failed save never leaves half a grid


@dataclass
class SamplingTarget:
    """What `sample` runs: an artifact on onnxruntime (its sampler and size fixed by it) or a model's
    traced graph, with what a sampling run needs to know about it."""

    denoiser: object
    scheduler_config: dict
    scheduler: str | None
    steps: int
    shape: tuple[int, ...]
    input_names: tuple[str, ...]
    guidance_scale: float | None = None
    null_class_label: int | None = None

    @property
    def calls(self) -> int:
        """Denoiser calls of one sampling run."""
        return denoiser_calls(self.scheduler_config, self.steps, self.scheduler)


def sampling_target(source: Path | None, steps: int | None = None, scheduler: str | None = None,
                    height: int | None = None, width: int | None = None) -> SamplingTarget:
    """The artifact folder `source` (any of steps, scheduler, height and width given must be what it was
    compiled for) or the model at `source` (default: the shipped one), traced at that size."""
    from dgo_compile import load, trace
    from dgo_compile.core.configs import DEFAULT_STEPS
    from dgo_compile.frontend.resolution import resolve

    if source is not None and (Path(source) / "manifest.json").is_file():
        from dgo_compile.backend.ort_runner import OrtArtifact

        artifact = OrtArtifact.open(source)
        manifest = artifact.manifest
        if steps is not None and steps != artifact.steps:
            raise DgoError(f"{source} was compiled for {artifact.steps} steps, not {steps}; "
                           f"drop `steps` or recompile with `steps` {steps}", field="steps")
        if scheduler is not None and scheduler != manifest.scheduler.name:
            raise DgoError(f"{source} was compiled for the {manifest.scheduler.name} sampler, not {scheduler}; "
                           f"drop `scheduler` or recompile with `scheduler` {scheduler}", field="scheduler")
        compiled = manifest.resolution
        if any(given is not None and given != getattr(compiled, key, None)
               for key, given in (("height", height), ("width", width))):
            raise DgoError(f"{source} was compiled for height {getattr(compiled, 'height', None)}, width "
                           f"{getattr(compiled, 'width', None)} ({getattr(compiled, 'unit', 'latent')}); "
                           "drop `height`/`width` or recompile with them", field=("height", "width"))
        spec = manifest.input
        return SamplingTarget(artifact, manifest.scheduler.config, manifest.scheduler.name, artifact.steps,
                              tuple(spec["sample"].shape[1:]), tuple(spec), manifest.guidance_scale,
                              manifest.model.null_class_label)
    loaded = load(source)
    traced = trace(loaded, size=resolve(loaded.model, loaded.source, height, width).latent)
    return SamplingTarget(traced, loaded.require_scheduler(), scheduler, steps or DEFAULT_STEPS,
                          tuple(traced.example_inputs(1)["sample"].shape[1:]), traced.input_names,
                          null_class_label=traced.family.null_class_label(loaded.model))
