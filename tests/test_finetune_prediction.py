"""The fine-tuning loss follows the pipeline's scheduler: its noise schedule and prediction type
(epsilon, v_prediction, sample), Min-SNR-gamma weights for that prediction type and the configured
timestep sampling; anything else is refused, never trained as epsilon."""

import json

import pytest
import torch
from safetensors.torch import save_file

import pipelines
from dgo_compile import load
from dgo_compile.channels.data_folder import open_data
from dgo_compile.channels.finetune import FinetuneConfig, FinetuneError, finetune
from dgo_compile.channels.finetune_data import TeacherTrajectories, noise_schedule
from dgo_compile.frontend.families import family_of
from dgo_compile.frontend.loading import save_denoiser
from model_configs import TINY_UNET2D

SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_loss_targets_follow_the_prediction_type(prediction):
    schedule = noise_schedule({**SCHEDULER, "prediction_type": prediction}, "model")
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = schedule.batch(x0, (), torch.Generator().manual_seed(2))
    replay = torch.Generator().manual_seed(2)  # the same draws, in the same order: noise, then timesteps
    noise = torch.randn(x0.shape, generator=replay)
    t = torch.randint(0, 1000, (6,), generator=replay)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    noisy, timesteps = batch.inputs
    torch.testing.assert_close(noisy, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
    assert torch.equal(timesteps, t)
    expected = {"epsilon": noise, "sample": x0,
                "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0}[prediction]
    torch.testing.assert_close(batch.target, expected)
    if prediction == "v_prediction":
        assert torch.equal(batch.target, schedule.scheduler.get_velocity(x0, noise, t))


def _pipeline_with(tmp_path, **scheduler):
    """The tiny UNet's pipeline with its scheduler config changed, and a latents folder for it."""
    model = pipelines.write_model_pipeline(tmp_path / "m", TINY_UNET2D)
    config_file = model / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **scheduler}))
    (tmp_path / "data").mkdir()
    save_file({"latents": torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1},
              str(tmp_path / "data" / "x.safetensors"))
    return model, tmp_path / "data"


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_the_first_step_loss_is_towards_the_configured_target(tmp_path, prediction):
    model, data = _pipeline_with(tmp_path, prediction_type=prediction)
    result = finetune(model, FinetuneConfig(train_steps=1, batch=4, ema_decay=0, data=str(data)), tmp_path / "out")
    loaded = load(model)
    source = open_data(data, loaded, tmp_path / "cache")
    schedule = noise_schedule(loaded.scheduler_config, str(model))
    replay = torch.Generator().manual_seed(0)  # the run's first batch (seed 0): rows, noise, timesteps
    x0 = source.rows(torch.randint(0, 8, (4,), generator=replay))["latents"]
    noise = torch.randn(x0.shape, generator=replay)
    t = torch.randint(0, 1000, (4,), generator=replay)
    noisy = schedule.scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        predicted = family_of(loaded.model).call(loaded.model, noisy, t)
    target = schedule.scheduler.get_velocity(x0, noise, t) if prediction == "v_prediction" else x0
    loss = result.record.history[0]["loss"]
    assert loss == pytest.approx(torch.nn.functional.mse_loss(predicted, target).item(), rel=1e-5)
    assert loss != pytest.approx(torch.nn.functional.mse_loss(predicted, noise).item(), rel=1e-2)  # not epsilon


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_follow_the_prediction_type(prediction):
    gamma = 2.0
    schedule = noise_schedule({**SCHEDULER, "prediction_type": prediction}, "model")
    t = torch.tensor([0, 10, 100, 300, 500, 999])
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t]
    snr = alpha_bar / (1 - alpha_bar)  # the Min-SNR paper's weights, per prediction type
    expected = {"epsilon": snr.clamp(max=gamma) / snr, "v_prediction": snr.clamp(max=gamma) / (snr + 1),
                "sample": snr.clamp(max=gamma)}[prediction].float()
    torch.testing.assert_close(schedule.snr_weights(t.float(), gamma), expected)
    if prediction == "epsilon":  # low-noise steps count less, the rest 1
        assert schedule.snr_weights(t.float(), gamma)[0] < 0.01 and expected[3:].eq(1).all()


def test_min_snr_weight_of_zero_snr_is_its_limit():
    schedule = noise_schedule({**SCHEDULER, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, "m")
    weights = schedule.snr_weights(torch.tensor([998.0, 999.0]), 5.0)
    assert weights.tolist() == [1.0, 1.0]  # not 0 / 0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_first_step_loss_is_min_snr_weighted(tmp_path, prediction):
    model, data = _pipeline_with(tmp_path, prediction_type=prediction)
    config = FinetuneConfig(train_steps=1, batch=4, ema_decay=0, data=str(data), snr_gamma=0.05)
    result = finetune(model, config, tmp_path / "out")
    loaded = load(model)
    schedule = noise_schedule(loaded.scheduler_config, str(model))
    replay = torch.Generator().manual_seed(0)  # the run's first batch (seed 0): rows, noise, timesteps
    x0 = open_data(data, loaded, tmp_path / "cache").rows(torch.randint(0, 8, (4,), generator=replay))["latents"]
    batch = schedule.batch(x0, (), replay)
    with torch.no_grad():
        rows = (family_of(loaded.model).call(loaded.model, *batch.inputs) - batch.target).pow(2).mean(dim=(1, 2, 3))
    weights = schedule.snr_weights(batch.inputs[1], 0.05)
    assert weights.min() < 0.5  # the batch has steps that count less
    loss = result.record.history[0]["loss"]
    assert loss == pytest.approx((rows * weights).mean().item(), rel=1e-5)
    assert loss < 0.9 * rows.mean().item()


def test_logit_normal_timesteps_are_sd3s_draws():
    schedule = noise_schedule(SCHEDULER, "model", ("logit_normal", -1.0, 0.5))
    x0 = torch.zeros(4000, 1, 1, 1)
    t = schedule.batch(x0, (), torch.Generator().manual_seed(3)).inputs[1]
    replay = torch.Generator().manual_seed(3)  # noise first, then t / 1000 = sigmoid(N(-1, 0.5))
    torch.randn(x0.shape, generator=replay)
    expected = (torch.sigmoid(torch.randn(4000, generator=replay) * 0.5 - 1.0) * 1000).long()
    assert torch.equal(t, expected)
    assert abs(t.float().median().item() - 1000 * torch.sigmoid(torch.tensor(-1.0)).item()) < 10  # 269


def test_logit_normal_puts_more_rows_mid_schedule():
    generator = torch.Generator().manual_seed(0)
    middle = {scheme: noise_schedule(SCHEDULER, "m", (scheme, 0.0, 1.0)).timesteps(20000, generator)
              for scheme in ("uniform", "logit_normal")}
    share = {k: ((t >= 250) & (t < 750)).float().mean().item() for k, t in middle.items()}
    assert share["uniform"] == pytest.approx(0.5, abs=0.015)
    assert share["logit_normal"] == pytest.approx(0.727, abs=0.015)  # P(|N(0, 1)| < ln 3)
    assert 0 <= middle["logit_normal"].min() and middle["logit_normal"].max() <= 999


def test_the_first_step_trains_at_the_configured_timesteps(tmp_path):
    model, data = _pipeline_with(tmp_path)
    config = FinetuneConfig(train_steps=1, batch=4, ema_decay=0, data=str(data), timestep_sampling="logit_normal",
                            logit_mean=3.0)
    result = finetune(model, config, tmp_path / "out")
    loaded = load(model)
    replay = torch.Generator().manual_seed(0)  # the run's first batch (seed 0): rows, noise, timesteps
    x0 = open_data(data, loaded, tmp_path / "cache").rows(torch.randint(0, 8, (4,), generator=replay))["latents"]
    batch = noise_schedule(loaded.scheduler_config, "m", ("logit_normal", 3.0, 1.0)).batch(x0, (), replay)
    assert batch.inputs[1].min() > 500  # sigmoid(3 + N(0, 1)): noisy steps
    with torch.no_grad():
        predicted = family_of(loaded.model).call(loaded.model, *batch.inputs)
    loss = result.record.history[0]["loss"]
    assert loss == pytest.approx(torch.nn.functional.mse_loss(predicted, batch.target).item(), rel=1e-5)
    assert result.record.config.timestep_sampling == "logit_normal"


def test_distill_only_weights_the_teachers_states_by_their_timestep(tmp_path):
    teacher = pipelines.write_model_pipeline(tmp_path / "teacher", TINY_UNET2D)
    loaded = load(teacher)
    with torch.no_grad():  # a student away from the teacher
        for p in loaded.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    student = save_denoiser(loaded, loaded.model, tmp_path / "student")
    config = FinetuneConfig(train_steps=1, batch=4, ema_decay=0, distill_only=True, trajectory_steps=4,
                            snr_gamma=0.05)
    result = finetune(student, config, tmp_path / "out", teacher=teacher)
    teacher_model = load(teacher).model
    batch = TeacherTrajectories(teacher_model, loaded.scheduler_config, 4, 4, seed=0).draw(1)
    model = load(student).model.train()  # the student's first step runs in train mode
    with torch.no_grad():
        rows = (family_of(model).call(model, *batch.inputs) - batch.target).pow(2).mean(dim=(1, 2, 3))
    weights = noise_schedule(loaded.scheduler_config, "m").snr_weights(batch.inputs[1], 0.05)
    assert weights.min() < 0.5 and weights.max() == 1.0  # states of low and of high noise
    loss = result.record.history[0]["loss"]
    assert loss == pytest.approx((rows * weights).mean().item(), rel=1e-4)
    assert loss < 0.9 * rows.mean().item()


@pytest.mark.parametrize("scheduler, message", [
    (dict(prediction_type="flow_prediction"), "scheduler_config.json: prediction_type 'flow_prediction' is not one "
                                              "finetune trains \\(epsilon, v_prediction, sample\\)"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler"), "scheduler_config.json: _class_name "
                                                           "FlowMatchEulerDiscreteScheduler is not a DDPM-style"),
])
def test_unsupported_schedulers_are_refused_naming_the_field(tmp_path, scheduler, message):
    model, data = _pipeline_with(tmp_path, **scheduler)
    with pytest.raises(FinetuneError, match=message):
        finetune(model, FinetuneConfig(train_steps=1, batch=2, data=str(data)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
