"""`distill_only` with `student_rollouts`: part of each pool's trajectories are run by the student,
the teacher predicting at the states it reaches (on-policy distillation)."""

import pytest
import torch
from safetensors.torch import load_file

import pipelines
from dgo_compile import load
from dgo_compile.channels.finetune import STATE_FILE, FinetuneConfig, FinetuneError, finetune, read_finetune
from dgo_compile.channels.finetune_data import TeacherTrajectories
from dgo_compile.frontend.families import family_of
from model_configs import TINY_DIT, TINY_UNET2D
from reliability import cli
from test_finetune import finetune_interrupted_at
from test_finetune_sources import _distance, _student

STEPS = 4


def _sources(teacher, share):
    return TeacherTrajectories(teacher.model, teacher.scheduler_config, STEPS, 4, seed=0, student_share=share)


@pytest.mark.parametrize("config", [TINY_UNET2D, TINY_DIT], ids=["unet", "dit"])
def test_student_rows_follow_the_student_and_keep_the_teachers_targets(config, tmp_path):
    teacher = load(pipelines.write_model_pipeline(tmp_path / "teacher", config))
    student = load(_student(tmp_path / "teacher", tmp_path / "student", scale=0.2)).model.train()
    family = family_of(teacher.model)
    plain = _sources(teacher, 0.0).run(torch.Generator().manual_seed(7), 4)
    mixed = _sources(teacher, 0.5).run(torch.Generator().manual_seed(7), 4, student)
    assert student.training  # put back as it was
    names = family.input_names(teacher.model)
    rows = torch.arange(4 * STEPS)
    first, student_rows = rows < 4, rows % 4 < 2  # the states are stacked step by step, 4 trajectories each
    for name in names:  # same noise and labels; the student's two trajectories leave the teacher's after step 1
        assert torch.equal(mixed[name][first | ~student_rows], plain[name][first | ~student_rows]), name
    assert not torch.allclose(mixed["sample"][~first & student_rows], plain["sample"][~first & student_rows])
    with torch.no_grad():  # every target is the teacher's prediction at the state, the student's states too
        again = family.call(teacher.model, *(mixed[name] for name in names))
    torch.testing.assert_close(mixed["prediction"], again, rtol=1e-5, atol=1e-5)
    same = _sources(teacher, 0.5).run(torch.Generator().manual_seed(7), 4, teacher.model)
    for k in plain:  # the teacher as student runs its own trajectories (to rounding: it sees 2 rows, not 4)
        torch.testing.assert_close(same[k], plain[k], rtol=1e-3, atol=1e-3)


def test_student_rollouts_resume_bit_identically_mid_pool(tmp_path):
    teacher = pipelines.write_model_pipeline(tmp_path / "teacher", TINY_UNET2D)
    student = _student(teacher, tmp_path / "student")
    # a pool lasts 4 steps; the checkpoint at step 6 falls mid-pool, whose student rollouts ran at step 5
    config = FinetuneConfig(train_steps=8, batch=4, lr=1e-3, ema_decay=0, distill_only=True, trajectory_steps=STEPS,
                            student_rollouts=0.5, checkpoint_every=6)
    straight = finetune(student, config, tmp_path / "straight", teacher=teacher)
    finetune_interrupted_at(7, student, config, tmp_path / "resumed", teacher=teacher)
    assert read_finetune(tmp_path / "resumed").steps_done == 6
    resumed = finetune(student, config, tmp_path / "resumed", teacher=teacher, resume=True)
    assert resumed.record.history == straight.record.history
    raw_a, raw_b = (load_file(tmp_path / p / "unet" / "diffusion_pytorch_model.safetensors")
                    for p in ("straight", "resumed"))
    assert raw_a.keys() == raw_b.keys() and all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    state = torch.load(tmp_path / "resumed" / STATE_FILE, weights_only=True)
    assert state["trajectory_pool"][0] == 1  # the second pool (steps 5-8) is the one kept
    teacher_only = finetune(student, FinetuneConfig(**{**config.__dict__, "student_rollouts": 0.0}),
                            tmp_path / "teacher_only", teacher=teacher)
    assert teacher_only.record.history[:4] != straight.record.history[:4]  # the student's states were trained on
    assert torch.load(tmp_path / "teacher_only" / STATE_FILE, weights_only=True)["trajectory_pool"] is None


def test_student_rollouts_bring_the_student_to_the_teacher(tmp_path):
    teacher = pipelines.write_model_pipeline(tmp_path / "teacher", TINY_UNET2D)
    student = _student(teacher, tmp_path / "student")
    settings = FinetuneConfig(train_steps=40, batch=8, lr=1e-3, ema_decay=0, distill_only=True, trajectory_steps=8,
                              student_rollouts=0.5, checkpoint_every=40)
    finetune(student, settings, tmp_path / "out", teacher=teacher)
    teacher_model = load(teacher)
    before, after = _distance(load(student).model, teacher_model), _distance(load(tmp_path / "out").model,
                                                                                 teacher_model)
    assert after < 0.5 * before, (before, after)


def test_student_rollouts_are_checked(tmp_path):
    with pytest.raises(FinetuneError, match="`student_rollouts` is the share of `distill_only`'s trajectories"):
        FinetuneConfig(student_rollouts=0.5)
    with pytest.raises(FinetuneError, match="student_rollouts"):
        FinetuneConfig(distill_only=True, student_rollouts=1.5)
    result = cli("finetune", "--student-rollouts", "0.5", "-o", tmp_path / "out")
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: --student-rollouts is the share of --distill-only's trajectories that the student runs: set "
        "--distill-only or leave --student-rollouts out")
    assert not (tmp_path / "out").exists()
