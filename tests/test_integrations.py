"""Compiled denoisers inside diffusers pipelines: same images as the plain pipeline or dgo's own
sampler, strict checks of scheduler, steps and guidance, and a pipeline that detaches cleanly."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline, UNet2DModel

import pipelines
from dgo_compile import load, trace
from dgo_compile.backend.artifact import compile_artifact
from dgo_compile.backend.folding import fold
from dgo_compile.backend.ort_runner import OrtArtifact
from dgo_compile.backend.sampling import denoiser_timesteps, initial_noise, sample
from dgo_compile.frontend.families import CLIP_TOKENS
from dgo_compile.frontend.loading import DEFAULT_MODEL
from dgo_compile.frontend.resolution import resolve
from dgo_compile.integrations.diffusers import CompiledDenoiser, IntegrationError, attach, detach
from dgo_compile.schedules.schedule import builtin
from dgo_compile.schedules.supernet import block_units, gateable_elements

# The tiny SD pipeline's scheduler config is "outdated" for diffusers (steps_offset 0); irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")

STEPS = 4
SD_STEPS = 3


@pytest.fixture(scope="module")
def shipped():
    loaded = load()
    return loaded, trace(loaded, verify=False)


def _compile(shipped, path, schedule, scheduler):
    loaded, traced = shipped
    return compile_artifact(traced, builtin(schedule, STEPS, gateable_elements(traced), block_units(traced)),
                            loaded.scheduler_config, path, scheduler=scheduler)


@pytest.fixture(scope="module")
def ddim_full(shipped, tmp_path_factory):
    return _compile(shipped, tmp_path_factory.mktemp("a") / "ddim_full", "full", "ddim")


@pytest.fixture(scope="module")
def ddim_deepcache(shipped, tmp_path_factory):
    return _compile(shipped, tmp_path_factory.mktemp("a") / "ddim_deepcache", "deepcache:2", "ddim")


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ddim():
    return _quiet(DDIMPipeline.from_pretrained(DEFAULT_MODEL))


def _images(pipe, steps=STEPS):
    return pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def _as_sampled(images):
    """Pipeline output (NHWC in [0, 1]) as dgo's sampler returns images (NCHW in [-1, 1])."""
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1


def test_full_artifact_matches_the_plain_ddim_pipeline(ddim_full):
    pipe = _ddim()
    original = pipe.unet
    plain = _images(pipe)
    assert isinstance(attach(pipe, ddim_full), CompiledDenoiser) and pipe.unet.config is original.config
    first = _images(pipe)
    assert np.abs(first - plain).max() < 1e-4
    np.testing.assert_array_equal(_images(pipe), first)  # a second run starts from call 0 again
    detach(pipe)
    assert pipe.unet is original and pipe.config.unet == ("diffusers", "UNet2DModel")
    np.testing.assert_array_equal(_images(pipe), plain)


def test_deepcache_artifact_matches_dgos_sampler(shipped, ddim_deepcache):
    loaded, _ = shipped
    artifact = OrtArtifact.open(ddim_deepcache)
    pipe = _ddim()
    plain = _images(pipe)
    attach(pipe, artifact)
    ours = _images(pipe)
    # DDIMPipeline draws its initial noise first from the generator: dgo's seeded noise.
    reference = sample(artifact, loaded.scheduler_config, initial_noise(2, (1, 32, 32), 0), STEPS, scheduler="ddim")
    assert (_as_sampled(ours) - reference).abs().max().item() < 1e-4
    assert np.abs(ours - plain).max() > 1e-3  # the cached blocks really are reused


def test_pytorch_models_attach_the_same_way(shipped, ddim_deepcache):
    loaded, traced = shipped
    pipe = _ddim()
    plain = _images(pipe, 5)
    attach(pipe, ddim_deepcache)
    from_artifact = _images(pipe)
    schedule = builtin("deepcache:2", STEPS, gateable_elements(traced), block_units(traced))
    attach(pipe, fold(traced, schedule, denoiser_timesteps(loaded.scheduler_config, STEPS)))
    assert np.abs(_images(pipe) - from_artifact).max() < 1e-4
    attach(pipe, traced)  # a plain denoiser: no schedule, any sampler
    assert np.abs(_images(pipe, 5) - plain).max() < 1e-4


def test_ddpm_pipeline_matches_the_plain_pipeline(shipped, ddim_full, tmp_path):
    loaded, _ = shipped
    path = _compile(shipped, tmp_path / "ddpm_full", "full", "ddpm")
    pipe = _quiet(DDPMPipeline(unet=UNet2DModel.from_pretrained(DEFAULT_MODEL / "unet"),
                               scheduler=DDPMScheduler.from_config(loaded.scheduler_config)))
    plain = _images(pipe)  # stochastic steps: the noise comes from the same generator
    attach(pipe, path)
    assert np.abs(_images(pipe) - plain).max() < 1e-4
    attach(pipe, ddim_full)  # same timesteps, but another sampler
    with pytest.raises(IntegrationError, match="compiled for DDIMScheduler with 4 steps .*; the pipeline runs "
                                               "DDPMScheduler with 4 steps"):
        _images(pipe)


def test_wrong_scheduler_or_steps_is_one_line_and_breaks_nothing(ddim_deepcache):
    pipe = _ddim()
    original, plain = pipe.unet, _images(pipe)
    attach(pipe, ddim_deepcache)
    expected = _images(pipe)
    with pytest.raises(IntegrationError) as error:
        _images(pipe, 5)
    assert str(error.value) == (
        f"the artifact {ddim_deepcache} was compiled for DDIMScheduler with 4 steps (timesteps 999, 749, 499, ...); "
        "the pipeline runs DDIMScheduler with 5 steps (timesteps 999, 799, 599, ...): set pipe.scheduler and "
        "num_inference_steps to match, or compile another artifact")
    ddim = pipe.scheduler
    pipe.scheduler = DDPMScheduler.from_config(ddim.config)
    with pytest.raises(IntegrationError, match="the pipeline runs DDPMScheduler with 4 steps") as error:
        _images(pipe)
    assert "\n" not in str(error.value)
    pipe.scheduler = ddim
    # A call at the wrong timestep, then a run abandoned after one call: the next run starts afresh.
    pipe.scheduler.set_timesteps(STEPS)
    noise = torch.zeros(2, 1, 32, 32)
    with pytest.raises(IntegrationError, match="call 1 of the artifact .* compiled for timestep 999; the pipeline "
                                               "passed 749: run every step from the first"):
        pipe.unet(noise, torch.tensor(749))
    pipe.unet(noise, torch.tensor(999))
    np.testing.assert_array_equal(_images(pipe), expected)
    detach(pipe)
    assert pipe.unet is original
    np.testing.assert_array_equal(_images(pipe), plain)


# Pixels: the tiny VAE's 2 x latent 24 x 12. The config's sample_size gives 32 x 32.
SD_SIZE = {"height": 48, "width": 24}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD pipeline with CLIP's 77-token prompts (the length artifacts are compiled for), and
    `full` artifacts at SD_SIZE (not the config's) without and with a guidance scale."""
    root = tmp_path_factory.mktemp("sd")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipelines, "TOKENS", CLIP_TOKENS)
        folder = pipelines.write_text_pipeline(root / "pipeline", vae=True)
    loaded = load(folder)
    traced = trace(loaded, verify=False, size=resolve(loaded.model, folder, **SD_SIZE).latent)
    schedule = builtin("full", SD_STEPS, gateable_elements(traced))
    return folder, {scale: compile_artifact(traced, schedule, loaded.scheduler_config, root / f"guidance_{scale}",
                                            model_source=str(folder), guidance_scale=scale) for scale in (None, 4.0)}


def _sd(folder):
    return _quiet(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                          feature_extractor=None))


def _prompted(pipe, guidance_scale=4.0, output_type="np", size=SD_SIZE):
    return pipe(prompt="a cat", num_inference_steps=SD_STEPS, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(0), output_type=output_type, **size).images


@pytest.mark.slow
def test_stable_diffusion_guidance_is_applied_once_by_diffusers(sd):
    folder, artifacts = sd
    pipe = _sd(folder)
    plain = _prompted(pipe)
    attach(pipe, artifacts[None])  # the unet sees [uncond, cond] rows; the artifact predicts each row
    assert np.abs(_prompted(pipe) - plain).max() < 1e-4
    attached = _prompted(pipe, 2.0)  # any scale
    detach(pipe)
    assert np.abs(attached - _prompted(pipe, 2.0)).max() < 1e-4


def test_stable_diffusion_runs_the_artifact_at_its_resolution_only(sd):
    folder, artifacts = sd
    assert OrtArtifact.open(artifacts[None]).manifest.to_json()["resolution"] == {**SD_SIZE, "unit": "pixels"}
    pipe = _sd(folder)
    plain = _prompted(pipe, output_type="latent")
    attach(pipe, artifacts[None])
    latents = _prompted(pipe, output_type="latent")
    assert latents.shape == (1, 4, 24, 12)
    assert ((latents - plain).norm() / plain.norm()).item() < 1e-4  # measured ~1e-6 (guidance 4, float32)
    with pytest.raises(IntegrationError) as error:
        _prompted(pipe, size={})  # the config's 32 x 32
    assert str(error.value) == (f"the artifact {artifacts[None]} was compiled for height=48, width=24; the pipeline "
                                "runs height=32, width=32: run it at height=48, width=24, or compile another "
                                "artifact with `height`/`width`")


def test_artifact_compiled_with_a_guidance_scale_runs_only_at_it(sd):
    folder, artifacts = sd
    pipe = _sd(folder)
    plain = _prompted(pipe)
    attach(pipe, artifacts[4.0])
    assert np.abs(_prompted(pipe) - plain).max() < 1e-4
    with pytest.raises(IntegrationError, match="compiled for classifier-free guidance at scale 4; the pipeline runs "
                                               "guidance_scale=7.0: pass guidance_scale=4"):
        _prompted(pipe, 7.0)


def test_artifact_from_another_model_or_prompt_length_is_refused(sd, ddim_full, tmp_path):
    folder, artifacts = sd
    pipe = _sd(folder)
    attach(pipe, ddim_full)
    with pytest.raises(IntegrationError, match="takes sample, timestep; the pipeline passes sample, timestep, "
                                               "encoder_hidden_states: attach a denoiser compiled from this"):
        _prompted(pipe)
    short = _sd(pipelines.write_text_pipeline(tmp_path / "short", vae=True))  # 8-token prompts
    attach(short, artifacts[None])
    with pytest.raises(IntegrationError, match=r"takes encoder_hidden_states of shape \[77, 32\] per row; the "
                                               r"pipeline passes \[8, 32\]"):
        _prompted(short)
