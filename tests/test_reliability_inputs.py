"""Reliability, "trusts what it loads" and "answers with a traceback": every option and config value
is type- and range-checked the same way on the command line and in `--config`, sizes in model
configs and pruning records are bounded before anything is allocated, and damaged resume state is
one line."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from dgo_compile import load
from dgo_compile.core.errors import ModelLoadError
from dgo_compile.driver.pipeline import ConfigError, read_config
from dgo_compile.frontend.loading import DEFAULT_MODEL, save_denoiser
from model_configs import TINY_UNET2D
from reliability import assert_nothing_left, assert_one_line_error, cli


class TestTypedConfig:
    @pytest.mark.parametrize("text, message", [
        ('overwrite = "false"\n', 'overwrite must be true or false, got "false"'),
        ('steps = "50"\n', 'steps must be an integer, got "50"'),
        ("steps = 0\n", "steps must be at least 1, got 0"),
        ("steps = 50.0\n", "steps must be an integer, got 50.0"),
        ("guidance_scale = nan\n", "guidance_scale must be a finite number, got nan"),
        ("guidance_scale = true\n", "guidance_scale must be a number, got true"),
        ("verify_samples = 1_000_000_000\n", "verify_samples must be at most 4096, got 1000000000"),
        ("seed = -1\n", "seed must be 0 or more, got -1"),
        ('granularity = "layer"\n', 'granularity must be one of block, unit, got "layer"'),
        ('[prune]\nchannel_ratio = "x"\n', '[prune] channel_ratio must be a number, got "x"'),
        ("[prune]\nchannel_ratio = inf\n", "[prune] channel_ratio must be a finite number, got inf"),
        ("[finetune]\nlr = -inf\n", "[finetune] lr must be a finite number, got -inf"),
        ("[finetune]\ntrain_steps = 10_000_000_000\n", "[finetune] train_steps must be at most 10,000,000"),
        ('[optimize]\nclass_labels = [1, "2"]\n', "[optimize] class_labels must be an integer"),
        ("[optimize]\ntimestep_conditioning = 1\n", "[optimize] timestep_conditioning must be true or false, got 1"),
        ("prune = 3\n", "prune must be a table ([prune] with its keys), got 3"),
    ])
    def test_config_values_are_typed(self, tmp_path, text, message):
        path = tmp_path / "dgo.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            read_config(path, {})
        assert message in str(info.value) and len(str(info.value).splitlines()) == 1

    def test_command_line_values_are_named_as_fields_and_rendered_as_options(self):
        from dgo_compile.cli.flags import render

        with pytest.raises(ConfigError, match=r"^`guidance_scale` must be a finite number, got nan$") as info:
            read_config(None, {"guidance_scale": float("nan")})
        assert render(info.value) == "--guidance-scale must be a finite number, got nan"


class TestNumericOptions:
    """0, negative, NaN, inf and absurd values: one line, before any work (these used to run, or trace back)."""

    @pytest.mark.parametrize("args, message", [
        (["compile", "--steps", "0"], "--steps must be at least 1, got 0"),  # used to become 50
        (["compile", "--steps", "-3"], "--steps must be at least 1, got -3"),
        (["compile", "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
        (["compile", "--steps", "100000"], "--steps must be at most 1000, got 100000"),
        (["sample", "--guidance-scale", "inf"], "--guidance-scale must be a finite number, got inf"),
        (["sample", "-n", "100000000"], "-n must be at most 4096"),
        (["sample", "--seed", "-1"], "--seed must be 0 or more, got -1"),
        (["inspect", "--batch", "0"], "--batch must be at least 1, got 0"),
        (["bench", "{tmp}/a", "--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["schedule", "{tmp}/p", "--keep-macs", "nan"], "--keep-macs must be a finite number, got nan"),
        (["prune", "--channel-ratio", "nan"], "--channel-ratio must be a finite number, got nan"),
        (["prune", "--batch", "100000000"], "--batch must be at most 4096"),
        (["finetune", "--lr", "inf"], "--lr must be a finite number, got inf"),
        (["finetune", "--ema-decay", "nan"], "--ema-decay must be a finite number"),
        (["optimize", "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["optimize", "--iters", "0"], "--iters must be at least 1, got 0"),
    ])
    def test_refused_in_one_line(self, tmp_path, args, message):
        output = tmp_path / "out"
        args = [a.format(tmp=tmp_path) for a in args] + (["-o", output] if args[0] != "inspect" and
                                                         args[0] != "bench" else [])
        started = time.perf_counter()
        assert_one_line_error(cli(*args), message)
        assert time.perf_counter() - started < 5  # refused before any model is loaded
        assert_nothing_left(output)


def _model_folder(root, config, name="m"):
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def pruned_tiny(tiny, tmp_path_factory):
    from dgo_compile.channels.channel_pruning import PruneConfig, prune

    loaded, _, _ = tiny
    pruned = prune(loaded, PruneConfig(channel_ratio=0.5, importance="magnitude"))
    return save_denoiser(loaded, pruned.model, tmp_path_factory.mktemp("pruned") / "p", pruned.pruning)


class TestSizesAreBoundedFirst:
    @pytest.mark.parametrize("change, message", [
        ({"block_out_channels": [16, 320_000]}, "B parameters; dgo-compile accepts at most 20 B"),
        ({"block_out_channels": [16, 10**12]}, "sets block_out_channels[1] to 1000000000000, far beyond"),
        ({"layers_per_block": 100_000}, "sets layers_per_block to 100000; at most 512"),
        ({"sample_size": 100_000}, "describes samples of 30,000,000,000 values each"),
    ])
    def test_absurd_config_is_refused_before_it_is_built(self, tmp_path, change, message):
        folder = _model_folder(tmp_path, {**TINY_UNET2D, **change})
        started = time.perf_counter()
        for path in (folder, folder / "config.json"):
            with pytest.raises(ModelLoadError, match=message.replace("[", r"\[").replace("]", r"\]")):
                load(path)
        assert time.perf_counter() - started < 5

    def test_a_huge_config_file_is_not_read(self, tmp_path):
        folder = tmp_path / "m"
        folder.mkdir()
        with open(folder / "config.json", "wb") as handle:
            handle.truncate(100 << 20)  # sparse: no disk used
        with pytest.raises(ModelLoadError, match="config.json is 100 MB; a diffusers config or pruning record"):
            load(folder)

    @pytest.mark.parametrize("key, value", [("out", 4_000_000), ("out", 0), ("in", "16"), ("channels", 10**6)])
    def test_pruning_record_beyond_the_original_is_refused(self, pruned_tiny, tmp_path, key, value):
        copy = shutil.copytree(pruned_tiny, tmp_path / "p")
        record = json.loads((copy / "dgo_pruning.json").read_text())
        name, shape = next((n, s) for n, s in record["modules"].items() if key in s)
        shape[key] = value
        (copy / "dgo_pruning.json").write_text(json.dumps(record))
        with pytest.raises(ModelLoadError, match=rf"dgo_pruning.json records {name} with {key} = {value!r}, but the "
                                                 r"original has \d+"):
            load(copy)


class TestDamagedResumeState:
    def test_finetune_resume_with_an_empty_or_hostile_state(self, finetuned, tmp_path):
        for damage in ("empty", "list"):
            copy = shutil.copytree(finetuned, tmp_path / damage)
            state = copy / "finetune_state.pt"
            if damage == "empty":
                state.write_bytes(b"")
            else:
                import torch

                torch.save([1, 2, 3], state)
            assert_one_line_error(cli("finetune", "--resume", "-o", copy), f"cannot read {state}", "it is damaged")

    def test_finetune_resume_with_a_hostile_record(self, finetuned, tmp_path):
        copy = shutil.copytree(finetuned, tmp_path / "r")
        record = json.loads((copy / "finetune.json").read_text())
        record["config"]["train_steps"] = "many"
        (copy / "finetune.json").write_text(json.dumps(record))
        assert_one_line_error(cli("finetune", "--resume", "-o", copy), "--train-steps must be an integer, got 'many'")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """`finetune --train-steps 1 --batch 2` of the shipped model: a complete, resumable run folder."""
    from dgo_compile.channels.finetune import FinetuneConfig, finetune

    output = tmp_path_factory.mktemp("finetune") / "F"
    finetune(DEFAULT_MODEL, FinetuneConfig(train_steps=1, batch=2, checkpoint_every=1), output)
    return output
