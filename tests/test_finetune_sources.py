"""Fine-tuning without the shipped digits: `--distill-only` on the teacher's own DDIM trajectories
(tiny UNets and a tiny DiT), checked to lower the loss and bring the student towards the teacher
while reading no data."""

import pytest
import torch

import dgo_compile.channels.data
import dgo_compile.channels.finetune
import pipelines
from dgo_compile import load
from dgo_compile.channels.finetune import FinetuneConfig, FinetuneError, finetune, read_finetune
from dgo_compile.channels.finetune_data import TeacherTrajectories
from dgo_compile.frontend.families import family_of
from dgo_compile.frontend.loading import save_denoiser
from model_configs import TINY_DIT, TINY_UNET2D, TINY_UNET2D_CLASS_COND
from reliability import cli

TRAJECTORY_STEPS = 8


def _student(teacher, path, scale=0.05):
    """The teacher with every weight disturbed: a model that must move back towards it."""
    loaded = load(teacher)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return save_denoiser(loaded, loaded.model, path)


def _distance(model, teacher):
    """Mean squared distance to the teacher's predictions on states of 8 trajectories the run never drew."""
    held_out = TeacherTrajectories(teacher.model, teacher.scheduler_config, TRAJECTORY_STEPS, 8, seed=0)
    states = held_out.run(torch.Generator().manual_seed(12345), 8)
    family = family_of(model)
    inputs = [states[n] for n in family.input_names(model)]
    with torch.no_grad():
        return torch.nn.functional.mse_loss(family.call(model.eval(), *inputs), states["prediction"]).item()


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--distill-only read the shipped digits")

    monkeypatch.setattr(dgo_compile.channels.finetune, "mnist_digits", refuse)
    monkeypatch.setattr(dgo_compile.channels.data, "_mnist_digits", refuse)


@pytest.mark.parametrize("config", [TINY_UNET2D, TINY_UNET2D_CLASS_COND, TINY_DIT], ids=["unet", "unet_class", "dit"])
def test_distill_only_brings_the_student_to_the_teacher_without_data(config, no_data, tmp_path):
    teacher = pipelines.write_model_pipeline(tmp_path / "teacher", config)
    student = _student(teacher, tmp_path / "student")
    settings = FinetuneConfig(train_steps=40, batch=8, lr=1e-3, ema_decay=0, distill_only=True,
                              trajectory_steps=TRAJECTORY_STEPS, checkpoint_every=40)
    result = finetune(student, settings, tmp_path / "out", teacher=teacher)
    losses = [h["loss"] for h in result.record.history]
    assert all(h["distill"] == h["loss"] for h in result.record.history)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)  # measured: UNets 0.30, DiT 0.54
    teacher_model = load(teacher)
    before, after = _distance(load(student).model, teacher_model), _distance(load(tmp_path / "out").model,
                                                                                 teacher_model)
    assert after < 0.5 * before, (before, after)  # measured: UNets 0.23-0.26, DiT 0.42
    assert read_finetune(tmp_path / "out").teacher == str(teacher.resolve())


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_distill_only_on_a_text_to_image_model_samples_the_users_prompts(family, no_data, tmp_path):
    from dgo_compile.frontend.prompts import prompt_encoder

    teacher = pipelines.write_text_pipeline(tmp_path / "teacher") if family == "sd" else \
        pipelines.write_pixart_pipeline(tmp_path / "teacher", sigma=True)
    prompts = ["a red cat", "a blue dog", "a green bird"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    student = _student(teacher, tmp_path / "student")
    settings = FinetuneConfig(train_steps=30, batch=8, lr=1e-3, ema_decay=0, distill_only=True, checkpoint_every=30,
                              trajectory_steps=TRAJECTORY_STEPS, prompts=str(tmp_path / "prompts.txt"))
    result = finetune(student, settings, tmp_path / "out", teacher=teacher)
    losses = [h["loss"] for h in result.record.history]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    encode = prompt_encoder(teacher)
    teacher_model = load(teacher)
    held_out = TeacherTrajectories(teacher_model.model, teacher_model.scheduler_config, TRAJECTORY_STEPS, 8, seed=0,
                                   prompts=prompts, encode=encode)
    states = held_out.run(torch.Generator().manual_seed(12345), 8)
    known = encode(prompts + [""])  # every trajectory runs on one of the prompts, or the empty one
    rows = states["encoder_hidden_states"]
    assert all(any(torch.equal(row, k) for k in known) for row in rows)
    assert len({i for row in rows for i, k in enumerate(known) if torch.equal(row, k)}) > 1
    family_ = family_of(teacher_model.model)
    inputs = [states[n] for n in family_.input_names(teacher_model.model)]

    def distance(model):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(family_.call(model.eval(), *inputs), states["prediction"]).item()

    before, after = distance(load(student).model), distance(load(tmp_path / "out").model)
    assert after < 0.6 * before, (before, after)


def test_distill_only_pools_cover_each_state_once_and_resume_the_same(tmp_path):
    teacher = load(pipelines.write_model_pipeline(tmp_path / "teacher", TINY_DIT))
    source = TeacherTrajectories(teacher.model, teacher.scheduler_config, 4, 3, seed=0)
    pool = [source.draw(step) for step in range(1, 5)]  # 3 trajectories x 4 states, 3 per step
    seen = torch.cat([b.inputs[0] for b in pool]).flatten(1)
    assert len(torch.unique(seen, dim=0)) == 12
    assert torch.unique(torch.cat([b.inputs[1] for b in pool])).numel() == 4  # the 4 DDIM timesteps
    labels = torch.cat([b.inputs[2] for b in pool])
    assert labels.max() <= TINY_DIT["num_embeds_ada_norm"]  # the null class may be drawn too
    fresh = TeacherTrajectories(teacher.model, teacher.scheduler_config, 4, 3, seed=0)
    assert torch.equal(fresh.draw(3).target, pool[2].target)  # a resumed run draws the same batches
    assert not torch.equal(source.draw(5).inputs[0], pool[0].inputs[0])  # the next pool is new trajectories


def test_distill_only_options_are_checked_before_writing(config_dir, tmp_path):
    teacher = pipelines.write_model_pipeline(tmp_path / "teacher", TINY_DIT)
    unet = pipelines.write_model_pipeline(tmp_path / "unet", TINY_UNET2D)
    out = tmp_path / "out"
    cases = [
        (dict(), None, "`distill_only` needs `teacher`"),
        (dict(distill=0.5), teacher, "`distill_only` trains on the distillation term alone: leave out `distill`"),
    ]
    for extra, given, message in cases:
        with pytest.raises(FinetuneError, match=message):
            finetune(teacher, FinetuneConfig(distill_only=True, **extra), out, teacher=given)
    with pytest.raises(FinetuneError, match="differ in class, sample shape or inputs"):
        finetune(unet, FinetuneConfig(distill_only=True), out, teacher=teacher)
    with pytest.raises(FinetuneError, match="takes text_embeds, time_ids, which `distill_only` cannot make"):
        finetune(teacher, FinetuneConfig(distill_only=True), out, teacher=config_dir / "sdxl" / "config.json")
    text = pipelines.write_text_pipeline(tmp_path / "sd")
    with pytest.raises(FinetuneError, match=r"text-conditional `teacher` \(UNet2DConditionModel\) needs `prompts`"):
        finetune(text, FinetuneConfig(distill_only=True), out, teacher=text)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    with pytest.raises(FinetuneError, match="takes no text conditions; leave `prompts` out"):
        finetune(teacher, FinetuneConfig(distill_only=True, prompts=str(tmp_path / "prompts.txt")), out,
                 teacher=teacher)
    with pytest.raises(FinetuneError, match="`prompts` is read by `distill_only`"):
        FinetuneConfig(prompts="p.txt")
    with pytest.raises(FinetuneError, match="`trajectory_steps` must be at least 1, got 0"):
        FinetuneConfig(distill_only=True, trajectory_steps=0)
    assert not out.exists()


@pytest.mark.slow
def test_cli_distill_only(tmp_path):
    import subprocess
    import sys

    teacher = pipelines.write_model_pipeline(tmp_path / "teacher", TINY_UNET2D)
    student = _student(teacher, tmp_path / "student")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "dgo_compile.cli", "finetune", *map(str, args)],
                              capture_output=True, text=True, timeout=600)

    result = cli("finetune", student, "--distill-only", "-o", tmp_path / "refused")  # refusal: in this process
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: --distill-only needs --teacher, the unpruned model whose trajectories are the data")
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    result = run(student, "--distill-only", "--teacher", teacher, "--trajectory-steps", "4", "--train-steps", "2",
                 "--batch", "2", "--snr-gamma", "5", "-o", out)
    assert result.returncode == 0, result.stderr
    record = read_finetune(out)
    assert record.complete and record.config.distill_only and record.config.trajectory_steps == 4
    assert record.config.snr_gamma == 5.0
    result = cli("finetune", "--resume", "-o", out)  # the stored settings, teacher included, carry over
    assert result.returncode == 0, result.stderr
