"""A compiled denoiser as the unet (or transformer) of a diffusers pipeline, so users keep calling `pipe(...)`.

    attach(pipe, "artifact")   # or an OrtArtifact, fold(traced, schedule, timesteps), a TracedDenoiser
    images = pipe(num_inference_steps=50).images
    detach(pipe)               # the original unet is back

`pipe.unet` (`pipe.transformer` in DiT and PixArt pipelines) becomes a `CompiledDenoiser`: an
`nn.Module` that keeps the original model's `config`, so the pipeline sizes its latents as before,
and sends denoiser call i of a run to the compiled graphs for call i.

Runs. A compiled schedule is indexed by call, so the wrapper must see where a run starts. Every
diffusers pipeline calls `scheduler.set_timesteps` at the start of a run, and every scheduler's
`set_timesteps` assigns a new `scheduler.timesteps` tensor: a call that finds a
`pipe.scheduler.timesteps` object it has not seen starts a new run (fresh caches, call 0). This
needs no hook on the pipeline or scheduler, survives a run that raised half-way and a scheduler
swapped after `attach`, and never matches timestep values (Heun and PNDM repeat them).

Checks, each a one-line `IntegrationError`: at the start of a run, the scheduler class, step count
and every call's timestep against the compiled ones; at every call, the call index, its timestep
(so a run that skips steps, e.g. img2img with strength < 1, is refused), the inputs and their
shapes.

Guidance. The compiled graphs never apply classifier-free guidance: they map each row of the batch
to its prediction, whatever the batch. A manifest's guidance scale (`compile --guidance-scale`) is
the scale `dgo-compile sample` applies and a learned schedule was calibrated at, nothing more.
diffusers' Stable Diffusion and PixArt pipelines batch [uncond, cond] rows (the manifest's order),
DiT's [cond, null class] rows, and each applies guidance itself (DiT to the noise half of a learned
sigma output), so it is applied once, by diffusers. An artifact compiled with a scale runs only at
that `guidance_scale` where the pipeline exposes it (SD, SDXL); DiT and PixArt pipelines keep it
local, so there it cannot be checked.

Attention masks. The compiled graphs attend to every caption token. PixArt pipelines pass the
tokenizer's padding mask; a mask that keeps every token is the same computation and is dropped, one
that masks tokens is refused (pass `prompt_embeds` with all-ones masks, or prompts that fill
`max_sequence_length`).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from dgo_compile.backend.folding import FoldedSchedule
from dgo_compile.backend.ort_runner import OrtArtifact
from dgo_compile.backend.sampling import SCHEDULERS
from dgo_compile.core.errors import DgoError
from dgo_compile.frontend.families import family_of

TIMESTEP_ATOL = 1e-3  # as the runtime's own per-call check
SLOTS = ("unet", "transformer")  # where pipelines keep their denoiser
MASKS = ("attention_mask", "encoder_attention_mask")  # accepted only when they keep every token


class IntegrationError(DgoError):
    """A pipeline does not run the way the attached denoiser was compiled to run."""


@dataclass(frozen=True)
class _Compiled:
    """A denoiser and what a pipeline run must match for it; None where the denoiser does not say."""

    denoiser: Any  # new_run() gives one run's callable; otherwise called directly
    label: str  # names it in errors
    input_names: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]] | None = None  # per input, without the batch
    scheduler: str | None = None  # diffusers class name
    steps: int | None = None
    calls: int | None = None
    timesteps: tuple[float, ...] | None = None
    guidance_scale: float | None = None
    latent: tuple[int, int] | None = None  # the sample's (h, w) the denoiser was compiled at


def _compiled(denoiser: Any, model: nn.Module) -> _Compiled:
    """What `attach` was given, with all it says about the runs it was compiled for."""
    if isinstance(denoiser, (str, os.PathLike)):
        denoiser = OrtArtifact.open(denoiser)
    if isinstance(denoiser, OrtArtifact):
        manifest, sampler = denoiser.manifest, denoiser.manifest.scheduler
        shapes = {i.name: tuple(i.shape[1:]) for i in manifest.inputs}
        return _Compiled(denoiser, f"the artifact {denoiser.path}", tuple(shapes), shapes,
                         SCHEDULERS[sampler.name].__name__, sampler.steps, sampler.calls,
                         sampler.timesteps, manifest.guidance_scale, manifest.latent_size)
    if isinstance(denoiser, FoldedSchedule):
        return _Compiled(denoiser, "the folded graphs", denoiser.input_names, calls=len(denoiser.step_variant),
                         timesteps=denoiser.timesteps, latent=_folded_latent(denoiser))
    if not (callable(denoiser) or hasattr(denoiser, "new_run")):
        raise IntegrationError(f"cannot attach a {type(denoiser).__name__}: pass an artifact folder, an OrtArtifact, "
                               "fold(traced, schedule, timesteps) or a denoiser callable")
    names = getattr(denoiser, "input_names", None) or family_of(model).input_names(model)
    latent = getattr(denoiser, "sample_size", None)  # a TracedDenoiser's static size
    return _Compiled(denoiser, f"the {type(denoiser).__name__}", tuple(names), latent=latent and tuple(latent))


def _folded_latent(folded: FoldedSchedule) -> tuple[int, int] | None:
    """The sample size the folded graphs are static at, from their `sample` input's traced shape."""
    graph = next(iter(folded.variants.values())).graph
    value = next((n.meta.get("val") for n in graph.nodes if n.op == "placeholder" and n.name == "sample"), None)
    return tuple(int(s) for s in value.shape[-2:]) if isinstance(value, torch.Tensor) else None


def _size(latent: tuple[int, ...], pipe: Any) -> str:
    """A latent size as the pipeline's caller gives it: pixels through the pipeline's VAE, if it has one."""
    scale = getattr(pipe, "vae_scale_factor", None) if getattr(pipe, "vae", None) is not None else None
    if scale:
        return f"height={latent[0] * scale}, width={latent[1] * scale}"
    return f"a {latent[0]}x{latent[1]} (height x width) sample"


def _describe(scheduler: str | None, steps: int | None, calls: int | None, timesteps) -> str:
    what = f"{scheduler} with {steps} steps" if scheduler and steps else f"{calls} denoiser calls"
    if timesteps is None:
        return what
    return f"{what} (timesteps {', '.join(f'{t:g}' for t in timesteps[:3])}{', ...' if len(timesteps) > 3 else ''})"


class CompiledDenoiser(nn.Module):
    """Stands in for `pipe.unet` or `pipe.transformer` (see the module docstring).

    The original model is held outside the submodules, so `pipe.to()` and `state_dict()` skip it;
    `device` and `dtype` follow `.to()` through an empty buffer, so the pipeline makes its latents
    there. Inputs reach the compiled denoiser in float32 and its prediction comes back on the
    sample's device and dtype (onnxruntime places its own work; PyTorch graphs run where they live).
    """

    def __init__(self, pipe: Any, original: nn.Module, compiled: _Compiled):
        super().__init__()
        self.config = original.config
        self.compiled = compiled
        self._pipe = pipe
        self._original = (original,)
        self._signature = inspect.signature(original.forward)
        self.register_buffer("_anchor", torch.empty(0, device=original.device, dtype=original.dtype),
                             persistent=False)
        self._seen: torch.Tensor | None = None  # the scheduler.timesteps tensor of the current run
        self._run: Any = None
        self._call = 0

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def add_embedding(self) -> nn.Module | None:
        """SDXL pipelines read the width of the original's added-conditions embedding to check their time_ids."""
        return getattr(self.original, "add_embedding", None)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @torch.no_grad()
    def forward(self, *args, return_dict: bool = True, **kwargs):
        inputs = self._inputs(*args, **kwargs)
        sample = inputs["sample"]
        self._advance(inputs["timestep"])
        prediction = self._run(*inputs.values()).to(sample.device, sample.dtype)
        self._call += 1
        return UNet2DOutput(sample=prediction) if return_dict else (prediction,)

    def _inputs(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The compiled denoiser's inputs, in its order, from what the pipeline passed the model."""
        c = self.compiled
        passed = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        if "hidden_states" in passed:  # transformers name their sample so
            passed["sample"] = passed.pop("hidden_states")
        passed.update(passed.pop("added_cond_kwargs", None) or {})  # SDXL's text_embeds, time_ids; PixArt's resolution
        for mask in MASKS:
            self._check_mask(mask, passed.pop(mask, None))
        passed = {k: v for k, v in passed.items() if v is not None and not (isinstance(v, dict) and not v)}
        sample, timestep = passed.get("sample"), passed.get("timestep")
        if set(passed) != set(c.input_names):
            raise IntegrationError(f"{c.label} takes {', '.join(c.input_names)}; the pipeline passes "
                                   f"{', '.join(passed)}: attach a denoiser compiled from this pipeline's model")
        passed["timestep"] = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(sample.shape[0])
        if c.latent is not None and tuple(sample.shape[-2:]) != c.latent:
            raise IntegrationError(f"{c.label} was compiled for {_size(c.latent, self._pipe)}; the pipeline runs "
                                   f"{_size(tuple(sample.shape[-2:]), self._pipe)}: "
                                   f"run it at {_size(c.latent, self._pipe)}, "
                                   "or compile another artifact with `height`/`width`", field=("height", "width"))
        for name, shape in (c.shapes or {}).items():
            if tuple(passed[name].shape[1:]) != shape:
                raise IntegrationError(f"{c.label} takes {name} of shape {list(shape)} per row; the pipeline passes "
                                       f"{list(passed[name].shape[1:])}: run at the image size and prompt length "
                                       "it was compiled for")
        return {n: passed[n].float() if passed[n].is_floating_point() else passed[n] for n in c.input_names}

    def _check_mask(self, name: str, mask: torch.Tensor | None) -> None:
        """A mask that keeps every token changes nothing; one that drops tokens the graphs cannot apply."""
        if mask is None or (mask.ndim == 2 and bool((mask == 1).all())):
            return
        dropped = f"{int((mask == 0).sum())} of {mask.numel()}" if mask.ndim == 2 else "some"
        raise IntegrationError(f"{self.compiled.label} attends to every token; the pipeline passes an {name} that "
                               f"masks {dropped} tokens: pass prompt_embeds with all-ones attention masks, "
                               "or prompts that fill max_sequence_length")

    def _advance(self, timestep: torch.Tensor) -> None:
        """Start a run at a scheduler.timesteps tensor not seen before; check this call against the compiled one."""
        c, scheduler = self.compiled, self._pipe.scheduler
        if scheduler.timesteps is not self._seen:
            self._check_run(scheduler)
            self._seen, self._call = scheduler.timesteps, 0
            self._run = c.denoiser.new_run() if hasattr(c.denoiser, "new_run") else c.denoiser
        if c.calls is not None and self._call >= c.calls:
            raise IntegrationError(f"{c.label} was compiled for {c.calls} denoiser calls per run; the pipeline makes "
                                   "more (does it call the model more than once per step?)")
        if c.timesteps is not None:
            expected = c.timesteps[self._call]
            if not torch.allclose(timestep, torch.full_like(timestep, expected), rtol=0, atol=TIMESTEP_ATOL):
                raise IntegrationError(f"call {self._call + 1} of {c.label} was compiled for timestep {expected:g}; "
                                       f"the pipeline passed {timestep[0].item():g}: run every step from the first "
                                       "(no img2img strength, no custom timesteps or sigmas)")

    def _check_run(self, scheduler: Any) -> None:
        c = self.compiled
        name, steps = type(scheduler).__name__, getattr(scheduler, "num_inference_steps", None)
        timesteps = [float(t) for t in scheduler.timesteps]
        same = (c.scheduler in (None, name) and c.steps in (None, steps) and c.calls in (None, len(timesteps))
                and (c.timesteps is None or (len(timesteps) == len(c.timesteps) and all(
                    abs(a - b) <= TIMESTEP_ATOL for a, b in zip(timesteps, c.timesteps)))))
        if not same:
            raise IntegrationError(f"{c.label} was compiled for "
                                   f"{_describe(c.scheduler, c.steps, c.calls, c.timesteps)}; "
                                   f"the pipeline runs {_describe(name, steps, len(timesteps), timesteps)}: set "
                                   "pipe.scheduler and num_inference_steps to match, or compile another artifact")
        exposed = hasattr(self._pipe, "guidance_scale")  # SD and SDXL do; DiT and PixArt keep it local
        scale = getattr(self._pipe, "guidance_scale", None)
        if c.guidance_scale is not None and exposed and scale != c.guidance_scale:
            raise IntegrationError(f"{c.label} was compiled for classifier-free guidance at scale "
                                   f"{c.guidance_scale:g}; "
                                   f"the pipeline runs guidance_scale={scale}: pass guidance_scale="
                                   f"{c.guidance_scale:g}, or compile without `guidance_scale` to run at any scale",
                                   field="guidance_scale")


def _slot(pipe: Any) -> str:
    """The pipeline attribute that holds its denoiser: `unet`, or `transformer` (DiT, PixArt)."""
    for slot in SLOTS:
        if isinstance(getattr(pipe, slot, None), nn.Module):
            return slot
    raise IntegrationError(f"{type(pipe).__name__} has no unet or transformer; attach works with DDPMPipeline, "
                           "DDIMPipeline, StableDiffusion(XL)Pipeline, DiTPipeline and PixArtAlpha/SigmaPipeline")


def attach(pipe: Any, denoiser: Any) -> CompiledDenoiser:
    """Make `denoiser` the unet (or transformer) of `pipe`: an artifact folder, an `OrtArtifact`,
    folded graphs (`folding.fold(traced, schedule, timesteps)`) or any denoiser `sampling.sample`
    takes. Attaching again replaces the previous one; `detach` restores the original model."""
    slot = _slot(pipe)
    model = getattr(pipe, slot)
    original = model.original if isinstance(model, CompiledDenoiser) else model
    setattr(pipe, slot, CompiledDenoiser(pipe, original, _compiled(denoiser, original)))
    return getattr(pipe, slot)


def detach(pipe: Any) -> None:
    """Give `pipe` its original unet (or transformer) back; nothing happens when none is attached."""
    for slot in SLOTS:
        model = getattr(pipe, slot, None)
        if isinstance(model, CompiledDenoiser):
            setattr(pipe, slot, model.original)
