"""The dgo-compile CLI as a user runs it: real exit codes, one-line errors. One test runs it as a real
subprocess (the installed entry point); the rest call the same `main` in this process (tests/reliability.cli),
which saves torch's and diffusers' imports per call."""

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from model_configs import TINY
from reliability import cli, run


def test_inspect_shipped_model_table():
    result = run("inspect")  # a real process: `python -m dgo_compile.cli`
    assert result.returncode == 0, result.stderr
    for block in ["down_blocks.0", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.3", "total"]:
        assert block in result.stdout
    assert "2,244,609" in result.stdout  # total params of the shipped UNet


@pytest.mark.slow
def test_inspect_json_of_each_family(config_dir):
    for name in ("sd", "sdxl", "dit", "pixart"):
        result = cli("inspect", config_dir / name / "config.json", "--json")
        assert result.returncode == 0, (name, result.stderr)
        data = json.loads(result.stdout)
        assert data["random_weights"] is True and data["model"] == TINY[name]["_class_name"]
        gateable = [b for b in data["blocks"] if b["gateable"]]
        assert gateable and all(b["macs"] > 0 and b["output_shapes"] for b in gateable)
        assert sum(b["share"] for b in data["blocks"]) == pytest.approx(1.0)


@pytest.mark.parametrize("args, message", [
    (["inspect", "runwayml/stable-diffusion-v1-5"], "error: 'runwayml/stable-diffusion-v1-5' is not a local folder"),
    (["inspect", "/no/such/model"], "error: no such file or folder: /no/such/model"),
    (["sample", "-n", "0"], "error: -n must be at least 1, got 0"),
])
def test_bad_input_is_one_line_and_exit_1(args, message):
    result = cli(*args)
    assert result.returncode == 1
    assert result.stderr.strip() == message or result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sample_asks_for_conditions(config_dir, tmp_path):
    result = cli("sample", config_dir / "sd" / "config.json", "-o", tmp_path / "g.png")
    assert result.returncode == 1
    assert "has no scheduler/ config; pass a pipeline folder" in result.stderr
    pipeline = tiny_pipeline(tmp_path / "sd", "sd")
    result = cli("sample", pipeline, "--steps", "2", "-o", tmp_path / "g.png")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: this model also takes encoder_hidden_states: pass them in a safetensors "
                                     "file (--prompt-embeds) under those names (or --prompts, with a pipeline folder "
                                     "that has a text encoder)")
    assert not (tmp_path / "g.png").exists()


def tiny_pipeline(path, family):
    """A pipeline folder (random weights, DDIM scheduler) for a tiny config."""
    import torch
    from diffusers import DDIMScheduler

    from dgo_compile.frontend.families import FAMILIES

    config = TINY[family]
    torch.manual_seed(0)
    model = FAMILIES[config["_class_name"]].model_class.from_config(config)
    folder = "transformer" if "Transformer" in config["_class_name"] else "unet"
    model.save_pretrained(path / folder)
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline",
                                                       folder: ["diffusers", config["_class_name"]],
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    return path


@pytest.mark.slow
def test_class_conditional_dit_compiles_and_samples_with_guidance(tmp_path):
    pipeline = tiny_pipeline(tmp_path / "dit", "dit")
    artifact = tmp_path / "artifact"
    result = cli("compile", pipeline, "--schedule", "steps:2", "--steps", "3", "--scheduler", "heun",
                 "--guidance-scale", "4", "-o", artifact)
    assert result.returncode == 0, result.stderr
    assert "graphs for heun 3 steps" in result.stdout
    missing = cli("sample", artifact, "-o", tmp_path / "g.png")
    assert missing.returncode == 1
    assert missing.stderr.strip() == ("error: this model is class-conditional: pass --class-label "
                                      "(repeat it for several classes)")
    sampled = cli("sample", artifact, "-n", "3", "--class-label", "1", "--class-label", "7", "-o", tmp_path / "g.png")
    assert sampled.returncode == 0, sampled.stderr
    assert "heun 3 steps" in sampled.stdout and Image.open(tmp_path / "g.png").size == (2 * 8 * 2, 2 * 8 * 2)
    other = cli("sample", artifact, "--scheduler", "ddim", "--class-label", "1", "-o", tmp_path / "h.png")
    assert other.returncode == 1
    assert other.stderr.strip().endswith("was compiled for the heun sampler, not ddim; drop --scheduler or "
                                         "recompile with --scheduler ddim")


@pytest.mark.slow
def test_unit_granularity_and_dump_dir(tmp_path):
    artifact, dump = tmp_path / "artifact", tmp_path / "dump"
    result = cli("compile", "--schedule", "deepcache:2", "--steps", "4", "--granularity", "unit",
                 "--dump-dir", dump, "-o", artifact)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["schedule"]["granularity"] == "unit"
    assert manifest["schedule"]["blocks"][:2] == ["down_blocks.0.resnets.0", "down_blocks.0.resnets.1"]
    assert sorted(p.name for p in (dump / "supernet").iterdir()) == [
        "01_fold_timestep.txt", "02_insert_backup_edges.txt", "03_attach_gates.txt"]
    assert sorted(p.name for p in dump.iterdir()) == ["supernet", "variant_000", "variant_001"]
    assert "gate__down_blocks_0_resnets_0" in (dump / "supernet" / "03_attach_gates.txt").read_text()
    bad = cli("compile", "--granularity", "layer", "-o", tmp_path / "b")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --granularity must be one of block, unit, got 'layer'"


def test_sample_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    result = cli("sample", "-n", "4", "--steps", "3", "--seed", "0", "-o", out)
    assert result.returncode == 0, result.stderr
    image = Image.open(out)
    assert image.size == (2 * 32 * 2, 2 * 32 * 2)  # 2x2 grid of 32px tiles, shown at 2x
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temp file left behind


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """`compile --schedule deepcache:2 --steps 4` of the shipped model: (its result, the artifact). Tests only
    read the artifact."""
    artifact = tmp_path_factory.mktemp("compiled") / "artifact"
    return cli("compile", "--schedule", "deepcache:2", "--steps", "4", "-o", artifact), artifact


@pytest.mark.slow
def test_compile_then_sample_the_artifact(compiled, tmp_path):
    result, artifact = compiled
    assert result.returncode == 0, result.stderr
    assert "2 graphs" in result.stdout and (artifact / "manifest.json").is_file()
    again = cli("compile", "--schedule", "deepcache:2", "--steps", "4", "-o", artifact)
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr
    wrong_steps = cli("sample", artifact, "--steps", "5", "-o", tmp_path / "g.png")
    assert wrong_steps.returncode == 1
    assert wrong_steps.stderr.strip().endswith("was compiled for 4 steps, not 5; drop --steps or recompile with "
                                               "--steps 5")
    sampled = cli("sample", artifact, "-n", "2", "-o", tmp_path / "g.png")
    assert sampled.returncode == 0, sampled.stderr
    assert "ddim 4 steps" in sampled.stdout and (tmp_path / "g.png").is_file()


def test_compile_bad_schedule_leaves_no_artifact(tmp_path):
    result = cli("compile", "--schedule", "deepcache:0", "--steps", "4", "-o", tmp_path / "a")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: deepcache interval must be at least 1, got 0"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bench_compares_with_the_unpruned_model(tmp_path):
    artifact = tmp_path / "artifact"
    assert cli("compile", "--schedule", "steps:2", "--steps", "4", "-o", artifact).returncode == 0
    result = cli("bench", artifact, "--repeats", "1")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 5}
    assert set(rows) >= {"full", "compiled"}
    assert "2.00x" in rows["compiled"].split("│")[5]  # steps:2 of 4: two full calls, two that run only the head
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # the baseline lived in a temp dir


@pytest.mark.slow
def test_bench_of_an_artifact_against_itself_is_one_within_its_spread(compiled):
    """Both sides open with the same session options and run in interleaved rounds, so an artifact
    timed against itself must measure 1.0x inside its own min-max; a median above 1.0 (the MACs ratio)
    must be called noise."""
    artifact = compiled[1]
    assert compiled[0].returncode == 0, compiled[0].stderr
    result = cli("bench", artifact, "--against", artifact, "--repeats", "15")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("speedup "))
    median, low, high = (float(v) for v in re.match(r"speedup ([\d.]+)x \(([\d.]+)-([\d.]+)x over 15 rounds\)",
                                                    line).groups())
    assert low <= 1.0 <= high and low <= median <= high, line
    assert ("measurement noise" in line) == (median > 1.0), line


HEAVY = ("torch", "diffusers", "onnx", "onnxruntime")
PROBE = ("import sys\nfrom dgo_compile.cli.app import main\nsys.argv = ['dgo-compile', *sys.argv[1:]]\ncode = 0\n"
         "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
         f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\nsys.exit(code)\n")


@pytest.mark.parametrize("args, message", [
    (["--help"], None),
    (["compile", "--help"], None),
    (["compile", "--schedule", "bogus:3", "-o", "{tmp}/a"], "unknown schedule 'bogus:3'"),
    (["compile", "--config", "{tmp}/dgo.toml", "-o", "{tmp}/exists"], "exists already exists"),
    (["compile", "--config", "{tmp}/dgo.toml", "--schedule", "nope", "-o", "{tmp}/a"], "unknown schedule 'nope'"),
    (["prune", "--channel-ratio", "2", "-o", "{tmp}/p"], "--channel-ratio must be in [0, 1)"),
    (["sample", "-n", "0"], "-n must be at least 1"),
    (["finetune", "-o", "{tmp}/exists"], "exists already exists"),
    (["search-steps", "--k", "0", "-o", "{tmp}/a"], "--k must be at least 1"),
    # renamed options: one line naming the new one
    (["prune", "--ratio", "0.3"], "--ratio was renamed --channel-ratio (the share of channels removed)"),
    (["optimize", "--ratio=0.3"], "--ratio was renamed --keep-macs (the kept share of the full model's MACs)"),
    (["schedule", "{tmp}", "--ratio", "0.3"], "--ratio was renamed --keep-macs"),
    (["finetune", "--steps", "3"], "--steps was renamed --train-steps (optimizer steps, not sampler steps)"),
])
def test_help_and_bad_arguments_import_nothing_heavy(tmp_path, args, message):
    """Options, outputs and the schedule's syntax are checked before torch, diffusers or onnx are imported."""
    (tmp_path / "exists").mkdir()
    (tmp_path / "dgo.toml").write_text('schedule = "deepcache:3"\nsteps = 4\n[prune]\nchannel_ratio = 0.25\n')
    result = subprocess.run([sys.executable, "-c", PROBE, *(a.format(tmp=tmp_path) for a in args)],
                            capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stderr, result.stderr
    if message is None:
        assert result.returncode == 0 and "Usage:" in result.stdout
    else:
        assert result.returncode == (2 if "renamed" in message else 1) and message in result.stderr, result.stderr
        assert len([line for line in result.stderr.splitlines() if not line.startswith("HEAVY")]) == 1, result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()


def test_help_renders_flags_and_config_sections_as_written():
    result = cli("compile", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "<bool>" not in text
    assert "([prune], [finetune], [optimize], then compile" in text
    assert "--overwrite / --no-overwrite" in text


def test_one_library_error_names_the_field_for_python_and_toml_and_the_option_on_the_command_line(tmp_path):
    """The library's message names the config field; a config file names its table and key; the command
    line renders the same error with the option (cli/flags.py), and exits 1 with one line."""
    from dgo_compile.cli.flags import render

    from dgo_compile.core.configs import OptimizeConfig, PrunerError
    from dgo_compile.core.errors import DgoError
    from dgo_compile.driver.pipeline import read_config

    meaning = "must be in (0, 1] (the kept share of the full model's MACs), got 2.0"
    with pytest.raises(PrunerError) as info:
        OptimizeConfig(keep_macs=2.0)
    assert str(info.value) == f"`keep_macs` {meaning}" and info.value.fields == ("keep_macs",)
    assert render(info.value) == f"--keep-macs {meaning}"
    config = tmp_path / "dgo.toml"
    config.write_text('schedule = "learned"\n[optimize]\nkeep_macs = 2.0\n')
    with pytest.raises(DgoError, match=re.escape(f"[optimize] keep_macs {meaning}")):
        read_config(config, {})
    result = cli("optimize", "--keep-macs", "2", "-o", tmp_path / "p")
    assert result.returncode == 1 and result.stderr.strip() == f"error: --keep-macs {meaning}", result.stderr
