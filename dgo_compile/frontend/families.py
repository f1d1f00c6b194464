"""The diffusers model families dgo-compile understands.

Each family knows three things the rest of the compiler must not guess: the flat tensor
signature of its denoiser (so graphs and ONNX files have named, batch-major inputs), example
inputs derived from the model config, and which submodules are DiP-GO's gateable blocks and
the finer units inside them, and the latent sizes its architecture accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

# Sequence length of text conditions in example inputs: CLIP's 77 for UNets, T5's 120 for PixArt.
CLIP_TOKENS = 77
T5_TOKENS = 120
TRANSFORMER_UNITS = ("attn1", "attn2", "ff")


@dataclass(frozen=True)
class BlockSpec:
    """A gateable block (DiP-GO granularity 'block') and its units (granularity 'unit')."""

    name: str  # module path inside the diffusers model, e.g. "down_blocks.1"
    kind: str  # diffusers class name, e.g. "AttnDownBlock2D"
    units: tuple[str, ...]  # module paths of the finer units, in execution order


class DenoiserAdapter(nn.Module):
    """Calls a diffusers model with flat tensor inputs and returns the prediction tensor.

    The wrapped model sits at attribute `model`, so graph module paths are "model.<path>".
    """

    def __init__(self, model: nn.Module, call: Callable[..., torch.Tensor], input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self._call = call
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._call(self.model, *inputs)


@dataclass(frozen=True)
class SizeRule:
    """The latent sizes a model accepts: heights and widths that are multiples of `multiple`."""

    multiple: int
    why: str  # what the multiple comes from, e.g. "the UNet's 8: 3 downsamplers"
    square: bool = False  # height must equal width (diffusers' DiT unpatchifies a square token grid)


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type
    input_names: Callable[[nn.Module], tuple[str, ...]]
    call: Callable[..., torch.Tensor]
    # (model, batch, generator, latent (h, w)) -> inputs; conditions that encode the size follow it
    example: Callable[[nn.Module, int, torch.Generator, tuple[int, int]], dict[str, torch.Tensor]]
    blocks: Callable[[nn.Module], tuple[BlockSpec, ...]]
    size_rule: Callable[[nn.Module], SizeRule]
    # The class label meaning "no class" for classifier-free guidance, where the model was trained with one.
    null_class_label: Callable[[nn.Module], int | None] = lambda model: None
    # Module pairs whose output channel counts the model's code ties by a shape (see ChannelGroupsConfig).
    equal_channel_sizes: tuple[tuple[str, str], ...] = ()

    def adapter(self, model: nn.Module) -> DenoiserAdapter:
        return DenoiserAdapter(model, self.call, self.input_names(model))

    def example_inputs(self, model: nn.Module, batch: int = 2, seed: int = 0,
                       size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Example inputs: the sample at latent `size` (h, w; default the config's sample_size) and
        each condition, those that encode the size (SDXL time_ids, PixArt resolution) at that size."""
        size = tuple(size) if size is not None else config_size(model)
        inputs = self.example(model, batch, torch.Generator().manual_seed(seed), size)
        device = next(model.parameters()).device  # "meta" when only costs are wanted
        return {name: inputs[name].to(device) for name in self.input_names(model)}


def config_size(model: nn.Module) -> tuple[int, int]:
    """The latent (h, w) of the model config's sample_size."""
    sample_size = model.config.sample_size
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)


def _sample_and_timestep(model: nn.Module, batch: int, gen: torch.Generator,
                         size: tuple[int, int]) -> dict[str, torch.Tensor]:
    cfg = model.config
    h, w = size
    return {
        "sample": torch.randn(batch, cfg.in_channels, h, w, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,),
                                  generator=gen).float(),  # float: Euler-type samplers use fractional timesteps
    }


def _unet_blocks(model: nn.Module) -> tuple[BlockSpec, ...]:
    named = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
    named.append(("mid_block", model.mid_block))
    named += [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]
    specs = []
    for name, block in named:
        if block is None:
            continue
        # Call order is resnet i then attention i, in every block, the mid block included.
        units = []
        resnets = getattr(block, "resnets", None) or []
        attentions = getattr(block, "attentions", None) or []
        for i in range(len(resnets)):
            units.append(f"{name}.resnets.{i}")
            if i < len(attentions) and attentions[i] is not None:
                units.append(f"{name}.attentions.{i}")
        for sampler_list in ("downsamplers", "upsamplers"):
            units += [f"{name}.{sampler_list}.{i}" for i in range(len(getattr(block, sampler_list, None) or []))]
        specs.append(BlockSpec(name, type(block).__name__, tuple(units)))
    return tuple(specs)


def _transformer_blocks(model: nn.Module) -> tuple[BlockSpec, ...]:
    specs = []
    for i, block in enumerate(model.transformer_blocks):
        units = tuple(f"transformer_blocks.{i}.{u}" for u in TRANSFORMER_UNITS if getattr(block, u, None) is not None)
        specs.append(BlockSpec(f"transformer_blocks.{i}", type(block).__name__, units))
    return tuple(specs)


def _unet_size_rule(model: nn.Module) -> SizeRule:
    downsamplers = sum(1 for block in model.down_blocks if getattr(block, "downsamplers", None))
    plural = "" if downsamplers == 1 else "s"
    return SizeRule(2 ** downsamplers, f"the UNet's {2 ** downsamplers}: {downsamplers} downsampler{plural}")


def _patch_size_rule(square: bool) -> Callable[[nn.Module], SizeRule]:
    # PatchEmbed recomputes its sin-cos table for another grid (no pos_embed_max_size bound in DiT/PixArt)
    return lambda model: SizeRule(model.config.patch_size, f"the patch size {model.config.patch_size}", square)


def _has_class_labels(model: nn.Module) -> bool:
    return getattr(model, "class_embedding", None) is not None


# --- UNet2DModel -------------------------------------------------------------------------

def _unet2d_names(model):
    return ("sample", "timestep", "class_labels") if _has_class_labels(model) else ("sample", "timestep")


def _unet2d_call(model, sample, timestep, class_labels=None):
    return model(sample, timestep, class_labels=class_labels, return_dict=False)[0]


def _class_labels(model, batch, gen):
    n = model.config.num_class_embeds or 10
    return torch.randint(0, n, (batch,), generator=gen)


def _unet2d_example(model, batch, gen, size):
    inputs = _sample_and_timestep(model, batch, gen, size)
    if _has_class_labels(model):
        inputs["class_labels"] = _class_labels(model, batch, gen)
    return inputs


def _declared_null_class(model) -> int | None:
    """A class-conditional UNet's null class where its config.json declares one (`null_class_label`:
    diffusers has no field for it and keeps the key in `model.config`), as the shipped class-conditional
    digits model does; None otherwise (no classifier-free guidance over class labels)."""
    value = getattr(model.config, "null_class_label", None)
    if value is None or not _has_class_labels(model):
        return None
    classes = model.config.num_class_embeds
    if not isinstance(value, int) or isinstance(value, bool) or classes is None or not 0 <= value < classes:
        from dgo_compile.core.errors import UnsupportedModelError

        raise UnsupportedModelError(f"the UNet's config declares `null_class_label` {value!r}, which is not one of "
                                    f"its {classes} class embeddings; fix or remove the key in unet/config.json")
    return value


# --- UNet2DConditionModel (SD-1.x/2.x, SDXL text_time) ------------------------------------

def _is_text_time(model) -> bool:
    return model.config.addition_embed_type == "text_time"


def _unet2d_cond_names(model):
    names = ["sample", "timestep", "encoder_hidden_states"]
    if _is_text_time(model):
        names += ["text_embeds", "time_ids"]
    if _has_class_labels(model):
        names.append("class_labels")
    return tuple(names)


def _unet2d_cond_call(model, *inputs):
    given = dict(zip(_unet2d_cond_names(model), inputs))
    added = {"text_embeds": given["text_embeds"], "time_ids": given["time_ids"]} if "text_embeds" in given else None
    return model(given["sample"], given["timestep"], given["encoder_hidden_states"],
                 class_labels=given.get("class_labels"), added_cond_kwargs=added, return_dict=False)[0]


def _unet2d_cond_example(model, batch, gen, size):
    cfg = model.config
    inputs = _sample_and_timestep(model, batch, gen, size)
    inputs["encoder_hidden_states"] = torch.randn(batch, CLIP_TOKENS, cfg.cross_attention_dim, generator=gen)
    if _is_text_time(model):
        n_time_ids = 6  # SDXL: original size, crop top-left, target size
        text_dim = cfg.projection_class_embeddings_input_dim - n_time_ids * cfg.addition_time_embed_dim
        inputs["text_embeds"] = torch.randn(batch, text_dim, generator=gen)
        h, w = (8 * side for side in size)  # pixel size: 8x the latent
        inputs["time_ids"] = torch.tensor([[h, w, 0, 0, h, w]] * batch, dtype=torch.float32)
    if _has_class_labels(model):
        inputs["class_labels"] = _class_labels(model, batch, gen)
    return inputs


# --- DiT and PixArt transformers ----------------------------------------------------------

def _dit_call(model, sample, timestep, class_labels):
    return model(sample, timestep, class_labels=class_labels, return_dict=False)[0]


def _dit_example(model, batch, gen, size):
    inputs = _sample_and_timestep(model, batch, gen, size)
    inputs["class_labels"] = torch.randint(0, model.config.num_embeds_ada_norm, (batch,), generator=gen)
    return inputs


def _pixart_names(model):
    base = ("sample", "timestep", "encoder_hidden_states")
    return base + ("resolution", "aspect_ratio") if model.use_additional_conditions else base


def _pixart_call(model, sample, timestep, encoder_hidden_states, resolution=None, aspect_ratio=None):
    added = {"resolution": resolution, "aspect_ratio": aspect_ratio}
    return model(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                 added_cond_kwargs=added, return_dict=False)[0]


def _pixart_example(model, batch, gen, size):
    cfg = model.config
    inputs = _sample_and_timestep(model, batch, gen, size)
    inputs["encoder_hidden_states"] = torch.randn(batch, T5_TOKENS, cfg.caption_channels, generator=gen)
    if model.use_additional_conditions:
        h, w = size
        inputs["resolution"] = torch.tensor([[h * 8.0, w * 8.0]] * batch)
        inputs["aspect_ratio"] = torch.tensor([[h / w]] * batch)
    return inputs


FAMILIES: dict[str, Family] = {
    f.model_class.__name__: f
    for f in (
        Family("unet2d", UNet2DModel, _unet2d_names, _unet2d_call, _unet2d_example, _unet_blocks,
               _unet_size_rule, null_class_label=_declared_null_class),
        Family("unet2d_condition", UNet2DConditionModel, _unet2d_cond_names, _unet2d_cond_call,
               _unet2d_cond_example, _unet_blocks, _unet_size_rule, null_class_label=_declared_null_class),
        # DiT's forward unpatchifies with height = width = sqrt(tokens): square sizes only
        Family("dit", DiTTransformer2DModel, lambda m: ("sample", "timestep", "class_labels"), _dit_call,
               _dit_example, _transformer_blocks, _patch_size_rule(square=True),
               null_class_label=lambda m: m.config.num_embeds_ada_norm),
        Family("pixart", PixArtTransformer2DModel, _pixart_names, _pixart_call, _pixart_example, _transformer_blocks,
               _patch_size_rule(square=False),
               # forward() views the projected captions as [B, -1, hidden_states.shape[-1]]
               equal_channel_sizes=(("caption_projection.linear_2", "pos_embed.proj"),)),
    )
}


def family_of(model: nn.Module) -> Family:
    """The family of a diffusers model instance; raises for classes dgo-compile does not handle."""
    from dgo_compile.core.errors import UnsupportedModelError

    family = FAMILIES.get(type(model).__name__)
    if family is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported; dgo-compile compiles {', '.join(FAMILIES)}"
        )
    return family
