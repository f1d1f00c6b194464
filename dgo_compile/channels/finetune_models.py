"""Which models a fine-tuning run can train, and with which teacher and conditions.

The shipped digits feed only 1x32x32 UNet2DModel denoisers (class-conditional on the 10 digits or
not); `--distill-only` makes its own inputs, so it pairs any student with the unpruned version of the
same architecture whose conditions it can make (class labels, prompts through the pipeline's text
encoder, PixArt's size); `--data` checks its folder against the model itself (`data_folder`).
"""

from __future__ import annotations

import os

from torch import nn

from dgo_compile.channels.data import IMAGE_SIZE
from dgo_compile.core.configs import FinetuneConfig, FinetuneError
from dgo_compile.core.errors import DgoError
from dgo_compile.frontend.families import family_of
from dgo_compile.frontend.loading import LoadedModel, load

DATA_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
DIGIT_CLASSES = 10
DISTILL_ONLY_CLASSES = ("UNet2DModel", "DiTTransformer2DModel", "UNet2DConditionModel", "PixArtTransformer2DModel")
# the conditions --distill-only can make: class labels, prompts through the text encoder, PixArt's size
DISTILL_ONLY_CONDITIONS = ("class_labels", "encoder_hidden_states", "resolution", "aspect_ratio")


def trajectory_prompts(config: FinetuneConfig, teacher: LoadedModel) -> tuple:
    """(prompts, their encoder) for a text-conditional teacher's trajectories; () for any other."""
    from dgo_compile.frontend.prompts import prompt_encoder, read_prompts

    text = "encoder_hidden_states" in family_of(teacher.model).input_names(teacher.model)
    if not text:
        if config.prompts is not None:
            raise FinetuneError(f"`prompts`: `teacher` ({teacher.source}, a {teacher.class_name}) takes no text "
                                "conditions; leave `prompts` out", field=("prompts", "teacher"))
        return ()
    if config.prompts is None:
        raise FinetuneError(f"`distill_only` on a text-conditional `teacher` ({teacher.class_name}) needs `prompts` "
                            "FILE, one prompt per line, which its pipeline's text encoder encodes",
                            field=("distill_only", "teacher", "prompts"))
    try:
        return read_prompts(config.prompts), prompt_encoder(teacher.source)
    except DgoError as exc:
        raise FinetuneError(f"`prompts`: {exc}", field="prompts") from exc


def load_teacher(teacher: str | os.PathLike, student: LoadedModel, conditional: bool | None) -> nn.Module:
    """The teacher of --distill: for the shipped digits (`conditional` given) a digit model, else the
    student's architecture."""
    loaded = load(teacher)
    if conditional is None:
        _check_pair(student, loaded)
    elif _check_inputs(loaded, "`teacher`") != conditional:
        raise FinetuneError(f"`teacher` {teacher} and the model differ in class conditioning; distill from the "
                            "unpruned version of the same model", field="teacher")
    return loaded.model


def check_distill_only(loaded: LoadedModel, teacher: LoadedModel) -> bool:
    """Refuse a student and teacher that --distill-only cannot pair; True when they take class labels."""
    if teacher.class_name not in DISTILL_ONLY_CLASSES:
        raise FinetuneError(f"`teacher` ({teacher.source}) is a {teacher.class_name}; `distill_only` samples "
                            f"the trajectories of {', '.join(DISTILL_ONLY_CLASSES)} denoisers",
                            field=("teacher", "distill_only"))
    other = [n for n in family_of(teacher.model).input_names(teacher.model)[2:] if n not in DISTILL_ONLY_CONDITIONS]
    if other:
        raise FinetuneError(f"`teacher` ({teacher.source}) takes {', '.join(other)}, which `distill_only` cannot "
                            "make (SDXL-style conditions); fine-tune it with `data`, a folder of latents "
                            "that holds them", field=("teacher", "distill_only", "data"))
    teacher.require_scheduler("`teacher`", FinetuneError, ", which sets the noise schedule of its trajectories")
    if teacher.model.config.get("class_embed_type") is not None:  # a UNet2DModel conditioned on other vectors
        raise FinetuneError(f"`teacher` ({teacher.source}) is conditioned on something other than class labels",
                            field="teacher")
    return "class_labels" in _check_pair(loaded, teacher)


def _check_pair(loaded: LoadedModel, teacher: LoadedModel) -> tuple[str, ...]:
    """Refuse a teacher of another architecture than the student's; the inputs both take."""
    names = family_of(teacher.model).input_names(teacher.model)
    shape = {k: teacher.model.config.get(k) for k in ("in_channels", "out_channels", "sample_size")}
    student = {k: loaded.model.config.get(k) for k in shape}
    if loaded.class_name != teacher.class_name or student != shape or \
            family_of(loaded.model).input_names(loaded.model) != names:
        raise FinetuneError(f"the model ({loaded.source}, a {loaded.class_name}) and `teacher` ({teacher.source}, a "
                            f"{teacher.class_name}) differ in class, sample shape or inputs; distill from the "
                            "unpruned version of the same model", field="teacher")
    return names


def check_student(loaded: LoadedModel) -> bool:
    """Refuse a model the recipe cannot train on the shipped digits; True when it takes class labels."""
    role = "the model"
    conditional = _check_inputs(loaded, role)
    loaded.require_scheduler(role, FinetuneError, ", which sets the noise schedule")
    return conditional


def _check_inputs(loaded: LoadedModel, role: str) -> bool:
    """Refuse a denoiser the shipped digits cannot feed; True when it takes class labels."""
    if loaded.class_name != "UNet2DModel":
        raise FinetuneError(f"{role} ({loaded.source}) is a {loaded.class_name}; the shipped MNIST digits only "
                            "train UNet2DModel denoisers: pass `data`, your own images or latents",
                            field=("data", "teacher"))
    cfg = loaded.model.config
    size = (cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    shape = (cfg.in_channels, *size)
    if shape != DATA_SHAPE or cfg.out_channels != cfg.in_channels:
        raise FinetuneError(f"{role} ({loaded.source}) denoises {'x'.join(map(str, shape))} samples into "
                            f"{cfg.out_channels} channels; the shipped data (MNIST digits) only fits "
                            f"{'x'.join(map(str, DATA_SHAPE))} models: pass `data`, your own images or latents",
                            field=("data", "teacher"))
    if getattr(loaded.model, "class_embedding", None) is None:
        return False
    if cfg.class_embed_type is not None or (cfg.num_class_embeds or 0) < DIGIT_CLASSES:
        raise FinetuneError(f"{role} ({loaded.source}) is conditioned on something other than {DIGIT_CLASSES} "
                            "class labels; the shipped digits only carry their digit")
    return True
