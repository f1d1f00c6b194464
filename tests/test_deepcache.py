"""`deepcache:N[:B]` is the DeepCache package's rule: which units run on which calls, on every UNet
family, and (where the package is installed) the same latents as DeepCacheSDHelper in a pipeline."""

import re

import pytest
import torch

import pipelines
from dgo_compile import load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import denoiser_timesteps
from dgo_compile.frontend.families import CLIP_TOKENS, FAMILIES
from dgo_compile.integrations.diffusers import attach
from dgo_compile.schedules.schedule import Schedule, ScheduleError, builtin
from model_configs import TINY

pytestmark = pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")


def _units(family: str) -> dict[str, tuple[str, ...]]:
    """Block -> unit names of a tiny config, from the architecture alone (no weights, no tracing)."""
    config = TINY[family]
    with torch.device("meta"):
        model = FAMILIES[config["_class_name"]].model_class.from_config(config)
    return {b.name: b.units for b in FAMILIES[config["_class_name"]].blocks(model)}


def _deepcache(spec: str, calls: int, units: dict[str, tuple[str, ...]]) -> Schedule:
    return builtin(spec, calls, tuple(units), units)


def _running(schedule: Schedule, call: int) -> set[str]:
    return {u for u, c in zip(schedule.elements, schedule.compute[call]) if c}


# The tiny SD UNet: down_blocks.0 = CrossAttnDownBlock2D (resnets.0, attentions.0, downsamplers.0),
# down_blocks.1 = DownBlock2D (resnets.0), the mid block, up_blocks.0 = UpBlock2D (resnets.0, resnets.1,
# upsamplers.0), up_blocks.1 = CrossAttnUpBlock2D (resnets.0, attentions.0, resnets.1, attentions.1).
# Per branch B (block B // 3, layer B % 3), what DeepCacheSDHelper.is_skip_step lets run between full calls:
# down layers below the layer id (the downsampler is layer len(resnets)); up layers counted from the
# output (the last resnet/attention pair is layer 0, the upsampler too) up to and including it.
UP1 = {"up_blocks.1.resnets.0", "up_blocks.1.attentions.0", "up_blocks.1.resnets.1", "up_blocks.1.attentions.1"}
DOWN0 = {"down_blocks.0.resnets.0", "down_blocks.0.attentions.0"}
SD_BRANCHES = {
    0: {"up_blocks.1.resnets.1", "up_blocks.1.attentions.1"},
    1: DOWN0 | UP1,
    2: DOWN0 | {"down_blocks.0.downsamplers.0"} | UP1,
    3: DOWN0 | {"down_blocks.0.downsamplers.0"} | UP1 | {"up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0"},
    4: DOWN0 | {"down_blocks.0.downsamplers.0", "down_blocks.1.resnets.0"} | UP1
    | {"up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0"},
}


@pytest.mark.parametrize("branch", sorted(SD_BRANCHES))
def test_branch_counts_layers_inside_blocks_as_the_package(branch):
    units = _units("sd")
    schedule = _deepcache(f"deepcache:3:{branch}", 8, units)
    assert schedule.granularity == "unit" and schedule.elements == tuple(u for b in units.values() for u in b)
    for call in range(8):
        expected = set(schedule.elements) if call % 3 == 0 else SD_BRANCHES[branch]  # calls 0, 3, 6 run in full
        assert _running(schedule, call) == expected, call


@pytest.mark.parametrize("family, last_pair", [
    ("unet2d", {"up_blocks.1.resnets.1"}),  # UpBlock2D: no attention
    ("sd", {"up_blocks.1.resnets.1", "up_blocks.1.attentions.1"}),
    ("sdxl", {"up_blocks.1.resnets.1"}),
])
def test_branch_0_runs_only_the_last_layer_of_the_last_up_block(family, last_pair):
    schedule = _deepcache("deepcache:2", 4, _units(family))
    assert _running(schedule, 1) == _running(schedule, 3) == last_pair
    assert _running(schedule, 2) == set(schedule.elements)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_transformers_are_refused(family):
    units = _units(family)
    with pytest.raises(ScheduleError) as error:
        _deepcache("deepcache:3", 10, units)
    assert str(error.value) == ("deepcache needs a UNet (down and up blocks); this model has transformer_blocks.0, "
                                "transformer_blocks.1...: use steps:K, a schedule JSON or a learned schedule")


@pytest.mark.parametrize("spec, message", [
    ("deepcache:3:6", "deepcache branch must be in 0..5 (3 x block + layer, as DeepCache's cache_branch_id), got 6"),
    ("deepcache:0", "deepcache interval must be at least 1, got 0"),
])
def test_bad_branch_or_interval(spec, message):
    with pytest.raises(ScheduleError, match=f"^{re.escape(message)}$"):
        _deepcache(spec, 10, _units("sd"))


def test_deepcache_needs_the_units():
    with pytest.raises(ScheduleError, match=r"^deepcache:3 counts layers inside blocks: pass the model's units"):
        builtin("deepcache:3", 10, tuple(_units("sd")))


# --- beside the DeepCache package (skipped where it is not installed) ---------------------------

STEPS = 7  # DDIM: full calls 0, 3 and 6 at interval 3


def _with_helper(pipe, run, interval, branch):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return run(pipe)
    finally:
        helper.disable()


def _with_schedule(pipe, run, traced, scheduler_config, interval, branch):
    schedule = builtin(f"deepcache:{interval}:{branch}", STEPS, tuple(b.name for b in traced.blocks),
                       {b.name: b.units for b in traced.blocks})
    attach(pipe, fold(traced, schedule, denoiser_timesteps(scheduler_config, STEPS)))
    return run(pipe)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD pipeline folder and its traced UNet."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipelines, "TOKENS", CLIP_TOKENS)  # the 77-token prompts the graphs are traced for
        folder = pipelines.write_text_pipeline(tmp_path_factory.mktemp("sd") / "pipeline", vae=True)
    loaded = load(folder)
    return folder, loaded.scheduler_config, trace(loaded, verify=False)


@pytest.mark.parametrize("branch", [0, 1, 3])
def test_stable_diffusion_latents_match_deepcache_sd_helper(sd, branch):
    pytest.importorskip("DeepCache")
    from diffusers import StableDiffusionPipeline

    def run(pipe):  # guidance 7.5: the UNet sees [uncond, cond] rows, one call per step
        return pipe(prompt="a cat", num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    folder, scheduler_config, traced = sd
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    plain = run(pipe)
    package = _with_helper(pipe, run, 3, branch)
    ours = _with_schedule(pipe, run, traced, scheduler_config, 3, branch)
    assert ((package - plain).norm() / plain.norm()).item() > 1e-3  # the package really reuses
    assert ((ours - package).norm() / package.norm()).item() < 1e-5


def test_shipped_unet2d_matches_deepcache_sd_helper_in_a_ddim_pipeline():
    pytest.importorskip("DeepCache")
    from diffusers import DDIMPipeline

    from dgo_compile.frontend.loading import DEFAULT_MODEL

    def run(pipe):
        return pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    pipe = DDIMPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    plain = run(pipe)
    package = _with_helper(pipe, run, 3, 0)
    loaded = load()
    ours = _with_schedule(pipe, run, trace(loaded, verify=False), loaded.scheduler_config, 3, 0)
    assert abs(package - plain).max() > 1e-2  # the package really reuses
    # float32 rounding of the traced graph against eager over 7 steps, in images in [0, 1]
    assert abs(ours - package).max() < 5e-5
