"""Feature distillation: `prune` records which channels of each block's output it kept, and `finetune`'s
`feature_distill` pulls every block's output towards the teacher's at those channels."""

import json

import pytest
import torch
from safetensors.torch import load_file

import pipelines
from dgo_compile import load
from dgo_compile.channels.channel_pruning import PruneConfig, prune
from dgo_compile.channels.feature_distill import FeatureDistillation
from dgo_compile.channels.finetune import FinetuneConfig, FinetuneError, finetune, read_finetune
from dgo_compile.core.configs import DEFAULT_MODEL
from dgo_compile.frontend.channel_surgery import BLOCK_CHANNELS, PRUNING_FILE
from dgo_compile.frontend.families import family_of
from dgo_compile.frontend.loading import save_denoiser
from model_configs import TINY_DIT, TINY_PIXART, TINY_SD, TINY_UNET2D
from reliability import cli
from test_finetune import finetune_interrupted_at
from test_finetune_data import _image

CUT = PruneConfig(channel_ratio=0.5, importance="magnitude", min_group_channels=1)


def _pruned(teacher, path, config=CUT):
    loaded = load(teacher)
    pruned = prune(loaded, config)
    return save_denoiser(loaded, pruned.model, path, pruned.pruning)


def _block_outputs(model, names, inputs):
    found = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: found.__setitem__(n, o[0] if isinstance(o, tuple) else o)) for n in names]
    with torch.no_grad():
        family_of(model).call(model, *inputs)
    for h in hooks:
        h.remove()
    return found


@pytest.mark.parametrize("config", [TINY_UNET2D, TINY_SD, TINY_DIT, TINY_PIXART], ids=["unet", "sd", "dit", "pixart"])
def test_prune_records_the_kept_channels_of_every_blocks_output(config, tmp_path):
    teacher = load(pipelines.write_model_pipeline(tmp_path / "teacher", config))
    student = load(_pruned(tmp_path / "teacher", tmp_path / "student"))
    record = student.pruning[BLOCK_CHANNELS]
    family = family_of(teacher.model)
    assert list(record) == [b.name for b in family.blocks(teacher.model)]
    inputs = tuple(family.example_inputs(teacher.model, 2).values())
    teacher_out = _block_outputs(teacher.model, record, inputs)
    student_out = _block_outputs(student.model, record, inputs)
    cut = 0
    for block, entry in record.items():
        writers = [n for n, m in teacher.model.get_submodule(block).named_modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert entry["module"] == f"{block}.{writers[-1]}"
        keep = torch.tensor(entry["keep"])
        original, kept = teacher.model.get_submodule(entry["module"]), student.model.get_submodule(entry["module"])
        assert torch.equal(kept.bias, original.bias[keep])  # the student's channel j is the teacher's keep[j]
        assert entry["size"] == original.weight.shape[0]
        assert teacher_out[block].shape[entry["axis"]] == entry["size"]  # and they are the block's output channels
        assert student_out[block].shape[entry["axis"]] == len(keep)
        assert entry["axis"] == (1 if "unet" in family.name or family.name == "sd" else -1)
        cut += len(keep) < entry["size"]
    assert cut >= len(record) // 2  # the cut reached the blocks' outputs


def test_a_pruned_again_model_records_channels_of_the_original(tmp_path):
    teacher = load(pipelines.write_model_pipeline(tmp_path / "teacher", TINY_UNET2D))
    once = _pruned(tmp_path / "teacher", tmp_path / "once", PruneConfig(channel_ratio=0.25, importance="magnitude",
                                                                       min_group_channels=1))
    twice = load(_pruned(once, tmp_path / "twice"))
    first = load(once).pruning[BLOCK_CHANNELS]
    for block, entry in twice.pruning[BLOCK_CHANNELS].items():
        assert entry["size"] == first[block]["size"] and set(entry["keep"]) <= set(first[block]["keep"])
        kept = twice.model.get_submodule(entry["module"]).bias
        assert torch.equal(kept, teacher.model.get_submodule(entry["module"]).bias[entry["keep"]])
    assert any(len(e["keep"]) < len(first[b]["keep"]) for b, e in twice.pruning[BLOCK_CHANNELS].items())


def test_the_feature_term_is_zero_on_the_teacher_and_weighs_rows(tmp_path):
    teacher = load(pipelines.write_model_pipeline(tmp_path / "teacher", TINY_UNET2D))
    student = load(_pruned(tmp_path / "teacher", tmp_path / "student"))
    inputs = tuple(family_of(teacher.model).example_inputs(teacher.model, 2).values())
    same = FeatureDistillation(teacher, teacher.model)  # an unpruned student keeps every channel
    with same.capture(teacher.model) as outputs:
        teacher.model(*inputs[:2])
    assert same.loss(outputs, outputs, None).item() == 0.0
    features = FeatureDistillation(student, teacher.model)
    with features.capture(student.model) as s, features.capture(teacher.model) as t, torch.no_grad():
        family_of(student.model).call(student.model, *inputs)
        family_of(teacher.model).call(teacher.model, *inputs)
    assert not student.model._forward_hooks and not student.model.get_submodule("mid_block")._forward_hooks
    plain = features.loss(s, t, None)
    assert plain.item() > 0
    torch.testing.assert_close(features.loss(s, t, torch.full((2,), 3.0)), 3 * plain)
    by_hand = []
    for target in features.targets:
        error = (s[target.block] - t[target.block][:, target.keep]).pow(2).flatten(1).mean(1)
        by_hand.append((error / t[target.block][:, target.keep].pow(2).flatten(1).mean(1)).mean())
    torch.testing.assert_close(plain, sum(by_hand) / len(by_hand))


# measured (before, plain distill, with features): UNet 0.78, 0.95, 0.49; DiT (blocks near identity at random
# initialisation) 0.0193, 0.0217, 0.0168
@pytest.mark.parametrize("config, bound", [(TINY_UNET2D, 0.7), (TINY_DIT, 0.9)], ids=["unet", "dit"])
def test_distill_only_with_features_brings_the_blocks_to_the_teachers(config, bound, tmp_path):
    teacher = pipelines.write_model_pipeline(tmp_path / "teacher", config)
    student = _pruned(teacher, tmp_path / "student")
    settings = FinetuneConfig(train_steps=30, batch=8, lr=1e-3, ema_decay=0, distill_only=True, trajectory_steps=8,
                              checkpoint_every=30, feature_distill=1.0, snr_gamma=5)
    result = finetune(student, settings, tmp_path / "out", teacher=teacher)
    assert len([h["features"] for h in result.record.history]) == 30
    first = result.record.history[0]
    assert first["loss"] == pytest.approx(first["distill"] + first["features"], rel=1e-6)
    plain = finetune(student, FinetuneConfig(**{**settings.__dict__, "feature_distill": 0.0}), tmp_path / "plain",
                     teacher=teacher)
    assert "features" not in plain.record.history[0] and plain.record.history[0]["distill"] == first["distill"]
    teacher_model = load(teacher).model
    distance = FeatureDistillation(load(student), teacher_model)  # on inputs neither run trained on
    inputs = tuple(family_of(teacher_model).example_inputs(teacher_model, 4, seed=99).values())

    def feature_error(folder):
        model = load(folder).model
        with distance.capture(model) as s, distance.capture(teacher_model) as t, torch.no_grad():
            family_of(model).call(model, *inputs)
            family_of(model).call(teacher_model, *inputs)
        return distance.loss(s, t, None).item()

    before, without, with_features = (feature_error(f) for f in (student, tmp_path / "plain", tmp_path / "out"))
    assert with_features < bound * without and with_features < bound * before, (before, without, with_features)


def test_data_and_distill_with_features_on_the_shipped_model_resumes_bit_identically(tmp_path):
    student = _pruned(DEFAULT_MODEL, tmp_path / "student", PruneConfig(channel_ratio=0.3, importance="magnitude"))
    config = FinetuneConfig(train_steps=4, batch=2, distill=1.0, feature_distill=0.05, checkpoint_every=2)
    straight = finetune(student, config, tmp_path / "straight", teacher=DEFAULT_MODEL)
    assert all(h["features"] > 0 for h in straight.record.history)
    finetune_interrupted_at(3, student, config, tmp_path / "resumed", teacher=DEFAULT_MODEL)
    resumed = finetune(student, config, tmp_path / "resumed", teacher=DEFAULT_MODEL, resume=True)
    assert resumed.record.history == straight.record.history
    a, b = (load_file(tmp_path / p / "unet" / "diffusion_pytorch_model.safetensors") for p in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_finetune(tmp_path / "resumed").config.feature_distill == 0.05


def test_feature_distill_refusals_write_nothing(tmp_path):
    teacher = pipelines.write_model_pipeline(tmp_path / "teacher", TINY_UNET2D)
    student = _pruned(teacher, tmp_path / "student")
    out = tmp_path / "out"
    with pytest.raises(FinetuneError, match=r"^`feature_distill` matches each block's output to a teacher's: set "
                                            r"`distill` W > 0 \(with data\) or `distill_only`, with `teacher`$"):
        FinetuneConfig(feature_distill=0.05)
    with pytest.raises(FinetuneError, match="`feature_distill` must be"):
        FinetuneConfig(distill_only=True, feature_distill=-1)
    settings = FinetuneConfig(distill_only=True, feature_distill=0.05, train_steps=2, batch=2, trajectory_steps=2)
    with pytest.raises(FinetuneError, match=r"`teacher`'s down_blocks.0.downsamplers.0.conv has 8 output channels, "
                                            r"the record says 16; distill from the unpruned model"):
        finetune(student, settings, out, teacher=student)  # the teacher must be the original
    old = tmp_path / "old"  # pruned by a dgo-compile that did not record the channels
    save_denoiser(load(student), load(student).model, old,
                  {k: v for k, v in load(student).pruning.items() if k != BLOCK_CHANNELS})
    with pytest.raises(FinetuneError, match=rf"{PRUNING_FILE} does not record \(pruned by an earlier dgo-compile\): "
                                            "prune the original model again, or leave `feature_distill` out"):
        finetune(old, settings, out, teacher=teacher)
    damaged = json.loads((student / "unet" / PRUNING_FILE).read_text())
    damaged[BLOCK_CHANNELS]["mid_block"]["keep"] = [5, 3]
    (old / "unet" / PRUNING_FILE).write_text(json.dumps(damaged))
    with pytest.raises(FinetuneError, match="block_channels mid_block: keep must be increasing channel numbers below "
                                            "size 32"):
        finetune(old, settings, out, teacher=teacher)
    images = tmp_path / "images"  # with data: refused before the data's cache folder is made
    for i in range(2):
        _image(images / f"{i}.png", (16, 16), seed=i)
    with pytest.raises(FinetuneError, match="block_channels mid_block: keep must be"):
        finetune(old, FinetuneConfig(data=str(images), distill=1.0, feature_distill=0.05), out, teacher=teacher)
    assert not out.exists() and not out.with_name("out.work").exists()
    result = cli("finetune", student, "--feature-distill", "0.05", "-o", out)
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: --feature-distill matches each block's output to a teacher's: set --distill W > 0 (with data) or "
        "--distill-only, with --teacher")
    result = cli("finetune", student, "--distill-only", "--teacher", teacher, "--feature-distill", "0.05",
                 "--train-steps", "2", "--batch", "2", "--trajectory-steps", "2", "-o", out)
    assert result.returncode == 0, result.stderr
    assert read_finetune(out).config.feature_distill == 0.05 and "features" in read_finetune(out).history[-1]
