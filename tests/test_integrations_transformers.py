"""Compiled DiT and PixArt transformers inside DiTPipeline and PixArtAlpha/SigmaPipeline: the same
latents as the plain pipeline (class labels with DiT's null-class guidance and learned sigma; T5
captions, PixArt-Alpha's resolution and aspect-ratio conditions), and padding masks refused."""

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline

import pipelines
from dgo_compile import load, trace
from dgo_compile.backend.artifact import compile_artifact
from dgo_compile.backend.ort_runner import OrtArtifact
from dgo_compile.frontend.families import T5_TOKENS
from dgo_compile.frontend.resolution import resolve
from dgo_compile.integrations.diffusers import CompiledDenoiser, IntegrationError, attach, detach
from dgo_compile.schedules.schedule import builtin
from dgo_compile.schedules.supernet import gateable_elements

STEPS = 3
PARITY = 1e-4  # relative L2 of the final latents, float32 (measured ~4e-7)
PIXART_SIZE = {"height": 32, "width": 16}  # pixels: latent 16 x 8, not square, so the aspect ratio is 2
# The character tokenizer makes one token per letter (and one per word): these fill the 120 tokens.
PROMPT, NEGATIVE = "a small red cat " * 20, "blurry and dark " * 20


def _compiled(folder, root, size=None):
    loaded = load(folder)
    latent = resolve(loaded.model, folder, **size).latent if size else None
    traced = trace(loaded, verify=False, size=latent)
    return compile_artifact(traced, builtin("full", STEPS, gateable_elements(traced)), loaded.scheduler_config,
                            root / "artifact", model_source=str(folder))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    folder = pipelines.write_dit_pipeline(root / "pipeline")
    return folder, _compiled(folder, root)


def _dit_run(pipe, labels=(3, 7), guidance_scale=4.0):
    """DiTPipeline always decodes: its latents are caught on their way into the VAE."""
    caught, decode = [], pipe.vae.decode
    pipe.vae.decode = lambda z, **kw: (caught.append(z.clone()), decode(z, **kw))[1]
    try:
        images = pipe(class_labels=list(labels), guidance_scale=guidance_scale, num_inference_steps=STEPS,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    finally:
        del pipe.vae.decode
    return caught[0], images


def test_dit_pipeline_with_null_class_guidance_and_learned_sigma_matches_the_plain_pipeline(dit):
    folder, artifact = dit
    pipe = _quiet(DiTPipeline.from_pretrained(folder))
    original = pipe.transformer
    assert original.config.out_channels == 2 * original.config.in_channels  # learned sigma
    plain_latents, plain_images = _dit_run(pipe)
    plain_unguided, _ = _dit_run(pipe, guidance_scale=1.0)
    assert isinstance(attach(pipe, artifact), CompiledDenoiser) and pipe.transformer.config is original.config
    latents, images = _dit_run(pipe)  # rows [3, 7, null, null]; the pipeline guides the noise half
    assert _relative(latents, plain_latents) < PARITY
    assert np.abs(images - plain_images).max() < 1e-4
    assert _relative(_dit_run(pipe, guidance_scale=1.0)[0], plain_unguided) < PARITY  # rows [3, 7], no null class
    other, _ = _dit_run(pipe, labels=(5, 7))  # the labels reach the graphs row by row
    assert _relative(other[0], latents[0]) > 1e-3 and _relative(other[1], latents[1]) < PARITY
    detach(pipe)
    assert pipe.transformer is original and pipe.config.transformer == ("diffusers", "DiTTransformer2DModel")
    assert torch.equal(_dit_run(pipe)[0], plain_latents)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """PixArt-Alpha at sample_size 128 (resolution conditions) and Sigma (none), each with a full
    artifact at PIXART_SIZE."""
    made = {}
    for sigma in (False, True):
        root = tmp_path_factory.mktemp("sigma" if sigma else "alpha")
        folder = pipelines.write_pixart_pipeline(root / "pipeline", sigma=sigma)
        made[sigma] = folder, _compiled(folder, root, PIXART_SIZE)
    return made


def _pixart(folder, sigma):
    return _quiet((PixArtSigmaPipeline if sigma else PixArtAlphaPipeline).from_pretrained(folder))


def _captioned(pipe, **kwargs):
    options = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "max_sequence_length": T5_TOKENS, **kwargs}
    return pipe(num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                output_type="latent", use_resolution_binning=False, clean_caption=False, **PIXART_SIZE,
                **options).images


def test_pixart_alpha_passes_captions_resolution_and_aspect_ratio_to_the_artifact(pixart):
    folder, artifact = pixart[False]
    names = [i.name for i in OrtArtifact.open(artifact).manifest.inputs]
    assert names == ["sample", "timestep", "encoder_hidden_states", "resolution", "aspect_ratio"]
    pipe = _pixart(folder, sigma=False)
    plain = _captioned(pipe)
    attach(pipe, artifact)
    latents = _captioned(pipe)
    assert latents.shape == (1, 4, 16, 8) and _relative(latents, plain) < PARITY
    detach(pipe)
    assert torch.equal(_captioned(pipe), plain)


def test_pixart_sigma_with_prompt_embeds_and_all_ones_masks_matches_the_plain_pipeline(pixart):
    folder, artifact = pixart[True]
    pipe = _pixart(folder, sigma=True)
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, T5_TOKENS, pipe.text_encoder.config.d_model, generator=generator)
    ones = torch.ones(1, T5_TOKENS, dtype=torch.long)
    given = {"prompt": None, "negative_prompt": None, "prompt_embeds": embeds[:1], "prompt_attention_mask": ones,
             "negative_prompt_embeds": embeds[1:], "negative_prompt_attention_mask": ones}
    plain = _captioned(pipe, **given)
    attach(pipe, artifact)
    assert _relative(_captioned(pipe, **given), plain) < PARITY
    assert _relative(_captioned(pipe), _captioned(_pixart(folder, sigma=True))) < PARITY  # prompts filling 120 tokens


def test_pixart_padding_masks_and_other_prompt_lengths_are_refused(pixart):
    folder, artifact = pixart[True]
    pipe = _pixart(folder, sigma=True)
    plain = _captioned(pipe)
    attach(pipe, artifact)
    with pytest.raises(IntegrationError) as error:
        _captioned(pipe, prompt="a cat")  # 7 tokens padded to 120; the negative prompt fills its 120
    assert str(error.value) == (
        f"the artifact {artifact} attends to every token; the pipeline passes an encoder_attention_mask that masks "
        "113 of 240 tokens: pass prompt_embeds with all-ones attention masks, or prompts that fill max_sequence_length")
    with pytest.raises(IntegrationError, match=r"takes encoder_hidden_states of shape \[120, 12\] per row; the "
                                               r"pipeline passes \[300, 12\]"):
        _captioned(pipe, prompt=PROMPT * 2, negative_prompt=NEGATIVE * 2, max_sequence_length=300)  # Sigma's default
    assert _relative(_captioned(pipe), plain) < PARITY  # a refused run leaves nothing behind
