"""Fine-tuning: a pruned model trains and stays loadable, EMA weights are saved, resume, distillation, the CLI."""

import copy
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from dgo_compile import DEFAULT_MODEL, load
from dgo_compile.channels.finetune import STATE_FILE, FinetuneConfig, FinetuneError, finetune, read_finetune
from dgo_compile.frontend.loading import save_denoiser
from reliability import cli, run

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Two raw-weight steps on the shipped model: the run the others are compared with."""
    return finetune(None, FinetuneConfig(train_steps=2, batch=2, ema_decay=0), tmp_path_factory.mktemp("plain") / "out")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """The shipped model with its time MLP's hidden width halved: a small, real channel pruning."""
    from dgo_compile.frontend.channel_surgery import PRUNING_FORMAT, module_shape, resized

    loaded = load()
    model = copy.deepcopy(loaded.model)
    keep = torch.arange(0, 128, 2)
    model.time_embedding.linear_1 = resized(model.time_embedding.linear_1, None, keep)
    model.time_embedding.linear_2 = resized(model.time_embedding.linear_2, keep, None)
    names = ("time_embedding.linear_1", "time_embedding.linear_2")
    pruning = {"format": PRUNING_FORMAT, "modules": {n: module_shape(model.get_submodule(n)) for n in names}}
    return save_denoiser(loaded, model, tmp_path_factory.mktemp("pruned") / "model", pruning=pruning)


def test_pruned_model_trains_and_stays_loadable(pruned, tmp_path):
    result = finetune(pruned, FinetuneConfig(train_steps=2, batch=2, ema_decay=0), tmp_path / "out")
    before, after = load(pruned), load(tmp_path / "out")
    assert after.pruning == before.pruning and after.scheduler_config == before.scheduler_config
    old, new = before.model.state_dict(), after.model.state_dict()
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in old.items()}
    assert new["time_embedding.linear_1.weight"].shape == (64, 32)
    assert any(not torch.equal(old[k], new[k]) for k in old)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, new[k]), k
    record = read_finetune(tmp_path / "out")
    assert record.complete and record.steps_done == 2 and len(record.history) == 2
    assert record.model_source == str(pruned.resolve()) and record.teacher is None
    assert all(0 < h["loss"] < 1 for h in record.history)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_saved_weights_are_the_ema_of_the_raw_weights(plain, tmp_path):
    one = finetune(None, FinetuneConfig(train_steps=1, batch=2, ema_decay=0), tmp_path / "one")
    finetune(None, FinetuneConfig(train_steps=2, batch=2, ema_decay=0.999), tmp_path / "ema")
    raw2 = torch.load(plain.output / STATE_FILE, weights_only=True)["model"]
    assert all(torch.equal(v, raw2[k]) for k, v in load_file(plain.output / WEIGHTS).items())  # ema_decay 0: raw
    raw1 = one.model.state_dict()
    saved = load(tmp_path / "ema").model.state_dict()
    # diffusers' EMA warmup: decay 0 at the first step, 1 - 2**-0.75 at the second.
    decay = 1 - 2 ** -0.75
    assert read_finetune(tmp_path / "ema").history[1]["ema_decay"] == pytest.approx(decay)
    for name, initial in load().model.state_dict().items():
        ema = initial - (initial - raw1[name])
        ema = ema - (1 - decay) * (ema - raw2[name])
        torch.testing.assert_close(saved[name], ema, rtol=0, atol=1e-7)
    assert any(not torch.equal(saved[k], raw2[k]) for k in saved)
    assert [h["lr"] for h in plain.record.history] == pytest.approx([2e-4, 1e-4])  # cosine over 2 steps


def finetune_interrupted_at(step, model, config, output, **options):
    """Run `finetune` and stop it by an exception raised once `step` has trained (after its checkpoint, if any)."""
    class Interrupt(Exception):
        pass

    def interrupt(entry):
        if entry["step"] == step:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(model, config, output, on_step=interrupt, **options)


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    config = FinetuneConfig(train_steps=4, batch=2, checkpoint_every=2)
    straight = finetune(None, config, tmp_path / "straight")
    finetune_interrupted_at(3, None, config, tmp_path / "resumed")
    assert read_finetune(tmp_path / "resumed").steps_done == 2
    load(tmp_path / "resumed")  # a loadable model mid-run
    with pytest.raises(FinetuneError, match=r"fine-tuned with other settings \(`lr`, `seed`\)"):
        finetune(None, replace(config, lr=1e-3, seed=1), tmp_path / "resumed", resume=True)
    resumed = finetune(None, config, tmp_path / "resumed", resume=True)
    assert resumed.record.history == straight.record.history
    a, b = load_file(tmp_path / "straight" / WEIGHTS), load_file(tmp_path / "resumed" / WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raw_a, raw_b = (torch.load(tmp_path / p / STATE_FILE, weights_only=True)["model"] for p in ("straight", "resumed"))
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    with pytest.raises(FinetuneError, match="already exists; pass `resume`"):
        finetune(None, config, tmp_path / "straight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "straight"]


def test_distilling_from_the_model_itself_adds_nothing_until_it_moves(plain, tmp_path):
    result = finetune(None, FinetuneConfig(train_steps=2, batch=2, ema_decay=0, distill=0.5), tmp_path / "d",
                      teacher=DEFAULT_MODEL)
    first, second = result.record.history
    reference = plain.record.history
    # Step 1: the teacher's prediction is the student's (up to rounding: the student runs in train mode,
    # the teacher in eval mode), so loss and gradient are the plain run's.
    assert first["distill"] < 1e-10 and first["loss"] == pytest.approx(reference[0]["loss"], rel=1e-6)
    # Step 2: same weights and batch as the plain run, plus the weighted distance to the teacher.
    assert second["distill"] > 0
    assert second["loss"] == pytest.approx(reference[1]["loss"] + 0.5 * second["distill"], rel=1e-5)
    assert result.record.teacher == str(DEFAULT_MODEL.resolve())


@pytest.mark.parametrize("options, message", [
    (dict(train_steps=0), "`train_steps` must be at least 1, got 0"),
    (dict(batch=0), "`batch` must be at least 1, got 0"),
    (dict(lr=0.0), "`lr` must be positive, got 0.0"),
    (dict(ema_decay=1.0), "`ema_decay` must be in [0, 1)"),
    (dict(distill=-1.0), "`distill` must be 0 or more, got -1.0"),
    (dict(warmup=-1), "`warmup` must be 0 or more, got -1"),
    (dict(snr_gamma=0.0), "`snr_gamma` must be positive (the SNR cap of Min-SNR weighting), got 0.0"),
    (dict(timestep_sampling="mode"), "`timestep_sampling` must be one of uniform, logit_normal"),
    (dict(logit_std=0.0), "`logit_std` must be"),
    (dict(distill_only=True, timestep_sampling="logit_normal"), "`timestep_sampling` logit_normal draws the "
     "timesteps of data batches; `distill_only` trains on every state of the teacher's trajectories"),
])
def test_config_is_validated(options, message):
    with pytest.raises(FinetuneError) as info:
        FinetuneConfig(**options)
    assert str(info.value).startswith(message)


def test_bad_models_and_teacher_options_are_refused_before_writing(config_dir, tmp_path):
    with pytest.raises(FinetuneError, match="only fits 1x32x32 models"):
        finetune(config_dir / "unet2d" / "config.json", FinetuneConfig(train_steps=1), tmp_path / "o")
    with pytest.raises(FinetuneError, match="`distill` needs `teacher`"):
        finetune(None, FinetuneConfig(distill=1.0), tmp_path / "o")
    with pytest.raises(FinetuneError, match="`teacher` needs `distill`"):
        finetune(None, FinetuneConfig(), tmp_path / "o", teacher=DEFAULT_MODEL)
    with pytest.raises(FinetuneError, match="only fits 1x32x32 models"):
        finetune(None, FinetuneConfig(distill=1.0), tmp_path / "o", teacher=config_dir / "unet2d" / "config.json")
    assert list(tmp_path.iterdir()) == []



def test_cli_finetune_then_resume_with_other_settings(tmp_path):
    out = tmp_path / "out"
    result = run("finetune", "--train-steps", "2", "--batch", "2", "--checkpoint-every", "1", "-o", out)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: 2 steps in" in result.stdout and "final loss" in result.stdout
    assert read_finetune(out).complete and load(out).model is not None
    result = cli("finetune", "--resume", "--lr", "0.1", "-o", out)  # the refusal in this process
    assert result.returncode == 1
    assert "fine-tuned with other settings (--lr)" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--train-steps", "0", "-o", "{tmp}/p"], "error: --train-steps must be at least 1, got 0"),
    (["-o", "{tmp}"], "already exists; pass --resume to continue it"),
    (["--resume", "-o", "{tmp}/p"], "is not a fine-tuning output (needs finetune.json and finetune_state.pt)"),
    (["--distill", "0.5", "-o", "{tmp}/p"], "error: --distill needs --teacher"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    result = cli("finetune", *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == []
