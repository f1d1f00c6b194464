"""Compiled resolution: sizes each architecture accepts (one-line errors naming sizes that work),
every family compiled at a size other than its config's and matching PyTorch there, `sample` at
the compiled size, and an SDXL pipeline running an artifact at it with guidance. (The SD pipeline
runs its artifacts at a non-default size in test_integrations.)"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import pipelines
from dgo_compile import load, trace
from dgo_compile.backend.artifact import compile_artifact
from dgo_compile.backend.ort_runner import OrtArtifact
from dgo_compile.frontend.families import CLIP_TOKENS, FAMILIES
from dgo_compile.frontend.resolution import (
    ResolutionError,
    check_size,
    resolve,
    vae_scale_factor,
)
from dgo_compile.integrations.diffusers import IntegrationError, attach, detach
from dgo_compile.schedules.schedule import builtin
from dgo_compile.schedules.supernet import gateable_elements
from model_configs import TINY

pytestmark = pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")

STEPS = 2
# PixArt with its size conditions (resolution, aspect_ratio): its adaLN splits the width in 3.
PIXART_SIZED = {**TINY["pixart"], "num_attention_heads": 3, "cross_attention_dim": 24,
                "use_additional_conditions": True}
# Four blocks: 3 downsamplers, as SD-1.5's UNet.
UNET_3_DOWN = {**TINY["unet2d"], "block_out_channels": [8, 8, 16, 16], "down_block_types": ["DownBlock2D"] * 4,
               "up_block_types": ["UpBlock2D"] * 4}
PARITY = 1e-4  # onnxruntime vs eager PyTorch, relative L2, float32


def _model(config):
    return FAMILIES[config["_class_name"]].model_class.from_config(config).eval()


@pytest.mark.parametrize("config, size, message", [
    (TINY["unet2d"], (25, 16), "`height` 25 is not a multiple of 2 (the UNet's 2: 1 downsampler); use 24 or 26"),
    (UNET_3_DOWN, (64, 20), "`width` 20 is not a multiple of 8 (the UNet's 8: 3 downsamplers); use 16 or 24"),
    (TINY["sdxl"], (16, 1), "`width` 1 is not a multiple of 2 (the UNet's 2: 1 downsampler); use 2"),
    (TINY["dit"], (12, 7), "`width` 7 is not a multiple of 2 (the patch size 2); use 6 or 8"),
    (TINY["dit"], (12, 8), ("DiTTransformer2DModel runs square sizes only (it unpatchifies height = width); "
                            "`height` 12 and `width` 8 differ: use 8 or 12 for both")),
    (TINY["pixart"], (9, 6), "`height` 9 is not a multiple of 2 (the patch size 2); use 8 or 10"),
    (TINY["unet2d"], (0, 16), "`height` must be a positive whole number, got 0"),
])
def test_a_size_the_architecture_cannot_run_is_one_line_naming_sizes_that_work(config, size, message):
    with pytest.raises(ResolutionError) as error:
        resolve(_model(config), None, *size)  # no VAE: latent sizes
    assert str(error.value) == message


def test_pixels_through_the_vae_factor_read_without_loading_the_vae(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert vae_scale_factor(tmp_path) == 8 and vae_scale_factor(tmp_path / "nothing") is None
    model = _model(UNET_3_DOWN)
    with pytest.raises(ResolutionError) as error:
        resolve(model, tmp_path, 500, 512, names=("--height", "--width"))
    assert str(error.value) == "--height 500 is not a multiple of 64 (the VAE's 8 x the UNet's 8); use 448 or 512"
    resolution = resolve(model, tmp_path, width=384)  # height: the config's 16 latents
    assert (resolution.height, resolution.width, resolution.latent) == (128, 384, (16, 48))
    assert resolution.to_json() == {"height": 128, "width": 384, "unit": "pixels"}
    check_size(model, 24, 8)  # latent sizes that work
    with pytest.raises(ResolutionError, match=r"^latent height 12 is not a multiple of 8 .*; use 8 or 16$"):
        trace(model, size=(12, 8))  # before any export


def test_conditions_that_encode_the_size_follow_it():
    sdxl = _model(TINY["sdxl"])
    inputs = FAMILIES["UNet2DConditionModel"].example_inputs(sdxl, 2, size=(12, 20))
    assert inputs["sample"].shape == (2, 4, 12, 20)
    assert inputs["time_ids"].tolist() == [[96, 160, 0, 0, 96, 160]] * 2  # original size, crop, target (pixels)
    pixart = _model(PIXART_SIZED)
    inputs = FAMILIES["PixArtTransformer2DModel"].example_inputs(pixart, 1, size=(12, 6))
    assert inputs["sample"].shape == (1, 4, 12, 6)
    assert inputs["resolution"].tolist() == [[96.0, 48.0]] and inputs["aspect_ratio"].tolist() == [[2.0]]


def _assert_matches_pytorch(path, model, size, unit="latent", scale=1):
    """The artifact's graph is static at `size` and its first call matches the eager model there."""
    artifact = OrtArtifact.open(path)
    manifest = artifact.manifest.to_json()
    assert next(i for i in manifest["inputs"] if i["name"] == "sample")["shape"][2:] == list(size)
    assert manifest["resolution"] == {"height": size[0] * scale, "width": size[1] * scale, "unit": unit}
    family = FAMILIES[type(model).__name__]
    inputs = family.example_inputs(model, 2, seed=3, size=size)
    inputs["timestep"] = torch.full((2,), manifest["scheduler"]["timesteps"][0])
    with torch.no_grad():
        expected = family.adapter(model)(*inputs.values())
    actual = artifact.new_run()(*inputs.values())
    assert actual.shape == expected.shape and actual.shape[-2:] == size
    assert ((actual - expected).norm() / expected.norm()).item() < PARITY


@pytest.mark.parametrize("config, size", [(TINY["dit"], (12, 12)), (PIXART_SIZED, (12, 6))], ids=["dit", "pixart"])
def test_transformers_compile_at_another_size(config, size, tmp_path):
    folder = pipelines.write_model_pipeline(tmp_path / "model", config)
    loaded = load(folder)
    traced = trace(loaded, verify=False, size=size)
    assert traced.sample_size == size and traced.example_inputs(1)["sample"].shape[-2:] == size
    path = compile_artifact(traced, builtin("full", STEPS, gateable_elements(traced)), loaded.scheduler_config,
                            tmp_path / "artifact", model_source=str(folder))
    _assert_matches_pytorch(path, loaded.model, size)


def test_cli_compiles_and_samples_at_the_compiled_size(tmp_path):
    from dgo_compile.cli.app import app

    folder = pipelines.write_model_pipeline(tmp_path / "unet2d", TINY["unet2d"])  # no VAE: latent sizes
    runner, artifact = CliRunner(), tmp_path / "artifact"
    result = runner.invoke(app, ["compile", str(folder), "--height", "25", "--steps", str(STEPS), "-o", str(artifact)])
    assert isinstance(result.exception, ResolutionError) and not artifact.exists()
    assert str(result.exception) == "`height` 25 is not a multiple of 2 (the UNet's 2: 1 downsampler); use 24 or 26"
    result = runner.invoke(app, ["compile", str(folder), "--height", "24", "--width", "16", "--steps", str(STEPS),
                                 "-o", str(artifact)])
    assert result.exit_code == 0, result.output
    _assert_matches_pytorch(artifact, load(folder).model, (24, 16))
    result = runner.invoke(app, ["sample", str(artifact), "-n", "2", "-o", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "grid.png").size == (2 * 2 * 16, 2 * 24)  # 2 images side by side, scale 2
    result = runner.invoke(app, ["sample", str(artifact), "--height", "16", "-o", str(tmp_path / "g.png")])
    assert "was compiled for height 24, width 16 (latent); drop `height`/`width`" in str(result.exception)


SDXL_SIZE = {"height": 48, "width": 24}  # pixels: the tiny VAE's 2 x latent 24 x 12; the config's is 32 x 32


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL pipeline (two CLIP text encoders, 77-token prompts) and a `full` artifact at 48 x 24 pixels."""
    root = tmp_path_factory.mktemp("sdxl")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipelines, "TOKENS", CLIP_TOKENS)
        folder = pipelines.write_sdxl_pipeline(root / "pipeline")
    loaded = load(folder)
    resolution = resolve(loaded.model, folder, **SDXL_SIZE)
    traced = trace(loaded, verify=False, size=resolution.latent)
    artifact = compile_artifact(traced, builtin("full", STEPS, gateable_elements(traced)), loaded.scheduler_config,
                                root / "artifact", model_source=str(folder))
    return folder, artifact


def _sdxl_run(pipe, output_type, **size):
    return pipe(prompt="a cat", num_inference_steps=STEPS, guidance_scale=4.0, output_type=output_type,
                generator=torch.Generator().manual_seed(0), **size).images


def test_sdxl_pipeline_runs_the_artifact_at_its_resolution_with_guidance(sdxl):
    from diffusers import StableDiffusionXLPipeline

    folder, artifact = sdxl
    _assert_matches_pytorch(artifact, load(folder).model, (24, 12), "pixels", 2)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    plain_latents, plain_images = _sdxl_run(pipe, "latent", **SDXL_SIZE), _sdxl_run(pipe, "np", **SDXL_SIZE)
    attach(pipe, artifact)  # text_embeds (pooled) and time_ids come from the pipeline, per row of [uncond, cond]
    latents, images = _sdxl_run(pipe, "latent", **SDXL_SIZE), _sdxl_run(pipe, "np", **SDXL_SIZE)
    assert latents.shape == (1, 4, 24, 12) and images.shape == (1, 48, 24, 3)
    assert ((latents - plain_latents).norm() / plain_latents.norm()).item() < 1e-4  # measured ~1e-6
    assert np.abs(images - plain_images).max() < 1e-4
    with pytest.raises(IntegrationError) as error:
        _sdxl_run(pipe, "latent")  # the config's 32 x 32
    assert str(error.value) == (f"the artifact {artifact} was compiled for height=48, width=24; the pipeline runs "
                                "height=32, width=32: run it at height=48, width=24, or compile another artifact "
                                "with `height`/`width`")
    detach(pipe)
    assert torch.equal(_sdxl_run(pipe, "latent", **SDXL_SIZE), plain_latents)
