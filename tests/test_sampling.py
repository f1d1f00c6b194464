"""Sampling through the traced graph reproduces diffusers' loops on the eager model, for every
supported scheduler, with conditions and classifier-free guidance."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)

from dgo_compile import DgoError, load, trace
from dgo_compile.backend.sampling import (
    SCHEDULERS,
    Guidance,
    conditions_for,
    denoiser_timesteps,
    initial_noise,
    make_scheduler,
    sample,
    sample_ddim,
)
from dgo_compile.core.errors import UnsupportedModelError
from dgo_compile.frontend.families import family_of
from model_configs import TINY_DIT, TINY_SD, TINY_UNET2D_CLASS_COND
from pipelines import write_model_pipeline

STEPS = 4
# The scheduler classes each name must give (spelled out, not read from SCHEDULERS), and how
# many denoiser calls a 4-step run makes: Heun's second-order correction calls 2N - 1 times,
# PNDM's Runge-Kutta warm-up N + 9 times.
CASES = {
    "ddpm": (DDPMScheduler, 4),
    "pndm": (PNDMScheduler, 13),
    "heun": (HeunDiscreteScheduler, 7),
    "euler": (EulerDiscreteScheduler, 4),
    "dpm": (DPMSolverMultistepScheduler, 4),
}


@pytest.fixture(scope="module")
def shipped():
    loaded = load()
    return loaded, trace(loaded)


class Recording:
    """A denoiser wrapper that records the timestep and batch of every call."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def __call__(self, x, t, *conditions):
        self.calls.append((float(t[0]), x.shape[0]))
        return self.inner(x, t, *conditions)


def _diffusers_loop(scheduler, noise, steps, predict, **step_kwargs):
    """What every diffusers pipeline does, written out so that it starts from our noise."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            x = scheduler.step(predict(x_in, t), t, x, **step_kwargs).prev_sample
    return x.clamp(-1, 1)


# --- DDIM, the shipped model's own scheduler ---------------------------------------------------

def test_traced_ddim_matches_the_diffusers_pipeline(shipped):
    loaded, traced = shipped
    noise = initial_noise(3, (1, 32, 32), seed=7)
    ours = sample(traced, loaded.scheduler_config, noise, steps=5)  # config's class: DDIM
    reference = _diffusers_loop(DDIMScheduler.from_config(loaded.scheduler_config), noise, 5,
                                lambda x, t: loaded.model(x, t).sample, eta=0.0)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.equal(sample_ddim(traced, loaded.scheduler_config, noise, 5), ours)


def test_same_seed_same_images_different_seed_different_images(shipped):
    loaded, traced = shipped
    a = sample(traced, loaded.scheduler_config, initial_noise(2, (1, 32, 32), 1), steps=3)
    b = sample(traced, loaded.scheduler_config, initial_noise(2, (1, 32, 32), 1), steps=3)
    c = sample(traced, loaded.scheduler_config, initial_noise(2, (1, 32, 32), 2), steps=3)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# --- every other scheduler ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_traced_sampling_matches_a_diffusers_loop_on_the_eager_model(shipped, name):
    loaded, traced = shipped
    cls, calls = CASES[name]
    noise = initial_noise(2, (1, 32, 32), seed=3)
    recording = Recording(traced)
    ours = sample(recording, loaded.scheduler_config, noise, STEPS, scheduler=name, seed=5)

    kwargs = {"generator": torch.Generator().manual_seed(5)} if name == "ddpm" else {}
    reference = _diffusers_loop(cls.from_config(loaded.scheduler_config), noise, STEPS,
                                lambda x, t: loaded.model(x, t).sample, **kwargs)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max().item()

    timesteps = denoiser_timesteps(loaded.scheduler_config, STEPS, name)
    assert len(timesteps) == len(recording.calls) == calls
    assert [t for t, _ in recording.calls] == timesteps
    if name == "ddpm":  # stochastic: the seed is used, and decides the images
        other = sample(traced, loaded.scheduler_config, noise, STEPS, scheduler=name, seed=6)
        assert not torch.allclose(ours, other, atol=1e-3)


def test_scheduler_defaults_to_the_configs_class_else_ddim(shipped):
    loaded, _ = shipped
    config = dict(loaded.scheduler_config)
    assert type(make_scheduler(config)) is DDIMScheduler
    assert type(make_scheduler({**config, "_class_name": "EulerDiscreteScheduler"})) is EulerDiscreteScheduler
    assert type(make_scheduler({**config, "_class_name": "LMSDiscreteScheduler"})) is DDIMScheduler
    assert type(make_scheduler(config, "heun")) is HeunDiscreteScheduler
    assert set(SCHEDULERS) == {"ddim", "ddpm", "pndm", "heun", "euler", "dpm"}
    # The config's noise schedule survives the change of class.
    assert make_scheduler(config, "euler").config.timestep_spacing == config["timestep_spacing"]


# --- runs, call indices and chunks --------------------------------------------------------------

class CountingRuns:
    """A denoiser with `new_run()`, like a compiled schedule: each run answers by call index."""

    def __init__(self):
        self.runs = []

    def new_run(self):
        calls = []
        self.runs.append(calls)

        def run(x, t, *conditions):
            calls.append((len(calls), float(t[0]), x.shape[0]))
            return 0.1 * x * (1 + len(calls))  # differs per call, as a cached schedule's output may

        return run

    def __call__(self, x, t, *conditions):
        raise AssertionError("sample must call new_run() for a denoiser that has it")


def test_heun_repeated_timesteps_get_distinct_call_indices_and_each_chunk_a_fresh_run():
    config = dict(DDIMScheduler().config)
    denoiser = CountingRuns()
    progressed = []
    sample(denoiser, config, initial_noise(3, (1, 4, 4), 0), 3, scheduler="heun", batch_size=2,
           progress=progressed.append)
    timesteps = denoiser_timesteps(config, 3, "heun")
    assert len(timesteps) == 5 and len(set(timesteps)) == 3  # 2N - 1 calls, repeated timesteps
    assert len(denoiser.runs) == 2  # chunks of 2 and 1 images, one fresh run each
    for run, batch in zip(denoiser.runs, (2, 1)):
        assert run == [(i, t, batch) for i, t in enumerate(timesteps)]
    assert progressed == [2] * 5 + [1] * 5


# --- conditions and classifier-free guidance ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(TINY_SD).eval()
    return model, trace(model)


def _embeddings(n, seed):
    return torch.randn(n, 77, TINY_SD["cross_attention_dim"], generator=torch.Generator().manual_seed(seed))


def test_text_cfg_matches_a_hand_written_cfg_loop(tiny_sd):
    model, traced = tiny_sd
    config = dict(DDIMScheduler().config)
    noise = initial_noise(2, (4, 16, 16), seed=1)
    cond, uncond = _embeddings(2, 2), _embeddings(1, 3)  # one prompt per image, one empty prompt for all
    guided = Guidance(3.0, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond})
    recording = Recording(traced)
    ours = sample(recording, config, noise, 3, guidance=guided)
    assert [b for _, b in recording.calls] == [4] * 3  # uncond rows then cond rows, once per step

    def cfg(x, t):  # StableDiffusionPipeline's loop: one call on the doubled batch
        both = model(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand(len(x), -1, -1), cond]))
        u, c = both.sample.chunk(2)
        return u + 3.0 * (c - u)

    reference = _diffusers_loop(DDIMScheduler.from_config(config), noise, 3, cfg, eta=0.0)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max().item()

    # Guidance matters, and at scale 1 it is sampling on the condition alone.
    plain = sample(traced, config, noise, 3, conditions={"encoder_hidden_states": cond})
    assert (plain - ours).abs().max().item() > 1e-2
    once = sample(traced, config, noise, 3, guidance=Guidance(1.0, guided.cond, guided.uncond))
    assert torch.allclose(once, plain, atol=1e-4), (once - plain).abs().max().item()  # batch 4 vs 2: rounding only

    # Chunks take their own rows of a batch-n condition (batch sizes change rounding only).
    chunked = sample(traced, config, noise, 3, guidance=guided, batch_size=1)
    assert torch.allclose(chunked, ours, atol=1e-3), (chunked - ours).abs().max().item()


def test_dit_class_cfg_with_learned_sigma_matches_a_hand_written_loop():
    torch.manual_seed(0)
    model = DiTTransformer2DModel.from_config(TINY_DIT).eval()
    traced = trace(model)
    config = dict(DDIMScheduler().config)
    noise = initial_noise(2, (4, 8, 8), seed=4)
    labels = torch.tensor([1, 7])
    null = torch.tensor([TINY_DIT["num_embeds_ada_norm"]])  # DiT's null class
    guided = Guidance(4.0, {"class_labels": labels}, {"class_labels": null})
    ours = sample(traced, config, noise, 3, guidance=guided)

    def cfg(x, t):  # DiTPipeline's loop: one call on the doubled batch, guide the noise half of 8 channels
        both = model(torch.cat([x, x]), timestep=t.expand(2 * len(x)),
                     class_labels=torch.cat([null.expand(len(x)), labels]))
        u, c = both.sample[:, :4].chunk(2)
        return u + 4.0 * (c - u)

    reference = _diffusers_loop(DDIMScheduler.from_config(config), noise, 3, cfg, eta=0.0)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max().item()
    plain = sample(traced, config, noise, 3, conditions={"class_labels": labels})
    assert (plain - ours).abs().max().item() > 1e-2


def test_a_class_conditional_unet_declares_its_null_class_in_its_config(tmp_path):
    """diffusers' UNet2DModel has no null-class field: the config.json key `null_class_label` (which
    the shipped class-conditional digits model has) is where guidance over class labels finds it."""
    declared = {**TINY_UNET2D_CLASS_COND, "num_class_embeds": 11, "null_class_label": 10}
    folder = write_model_pipeline(tmp_path / "declared", declared)
    loaded = load(folder)
    assert family_of(loaded.model).null_class_label(loaded.model) == 10
    traced = trace(loaded)
    noise = initial_noise(2, (3, 16, 16), seed=4)
    labels = torch.tensor([1, 7])
    _, guided = conditions_for(traced.input_names, 2, [1, 7], guidance_scale=3.0, null_class_label=10)
    assert guided.uncond["class_labels"].tolist() == [10]
    ours = sample(traced, loaded.scheduler_config, noise, 3, guidance=guided)

    def cfg(x, t):  # one call on the doubled batch: null-class rows, then the labels
        u, c = loaded.model(torch.cat([x, x]), t, class_labels=torch.tensor([10, 10, 1, 7])).sample.chunk(2)
        return u + 3.0 * (c - u)

    reference = _diffusers_loop(DDIMScheduler.from_config(loaded.scheduler_config), noise, 3, cfg, eta=0.0)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max().item()
    plain = sample(traced, loaded.scheduler_config, noise, 3, conditions={"class_labels": labels})
    assert (plain - ours).abs().max().item() > 1e-2

    undeclared = load(write_model_pipeline(tmp_path / "undeclared", TINY_UNET2D_CLASS_COND))
    assert family_of(undeclared.model).null_class_label(undeclared.model) is None
    with pytest.raises(DgoError, match=r"^guidance over class labels needs the model's null class, and this model "
                                       r"declares none .* drop `guidance_scale`$"):
        conditions_for(traced.input_names, 2, [1, 7], guidance_scale=3.0, null_class_label=None)
    wrong = load(write_model_pipeline(tmp_path / "wrong", {**declared, "null_class_label": 11}))
    with pytest.raises(UnsupportedModelError, match=r"^the UNet's config declares `null_class_label` 11, which is "
                                                    r"not one of its 11 class embeddings; fix or remove the key"):
        family_of(wrong.model).null_class_label(wrong.model)


# --- errors ------------------------------------------------------------------------------------

def test_unknown_scheduler_names_the_choices(shipped):
    loaded, traced = shipped
    with pytest.raises(DgoError, match=r"unknown scheduler 'lms'; choose one of ddim, ddpm, pndm, heun, euler, dpm"):
        sample(traced, loaded.scheduler_config, initial_noise(1, (1, 32, 32), 0), 2, scheduler="lms")
    with pytest.raises(DgoError, match="unknown scheduler"):
        denoiser_timesteps(loaded.scheduler_config, 2, "lms")


def test_guidance_with_mismatched_inputs_names_them():
    noise = initial_noise(1, (1, 4, 4), 0)
    bad = Guidance(2.0, {"encoder_hidden_states": torch.zeros(1, 3)}, {"class_labels": torch.zeros(1)})
    message = r"only in cond: \['encoder_hidden_states'\], only in uncond: \['class_labels'\]"
    with pytest.raises(DgoError, match=message):
        sample(lambda x, t, *c: x, {}, noise, 2, guidance=bad)


def test_bad_steps_and_condition_batches_are_dgo_errors():
    noise = initial_noise(2, (1, 4, 4), 0)
    identity = lambda x, t, *c: x  # noqa: E731
    with pytest.raises(DgoError, match="steps must be at least 1"):
        sample(identity, {}, noise, 0)
    with pytest.raises(DgoError, match="PNDMScheduler cannot make a 2-step schedule"):
        sample(identity, {}, noise, 2, scheduler="pndm")
    with pytest.raises(DgoError, match=r"condition 'class_labels' has shape \(3,\)"):
        sample(identity, {}, noise, 2, conditions={"class_labels": torch.zeros(3)})
