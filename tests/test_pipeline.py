"""`compile --config`: the whole pipeline from a TOML file, with the CLI winning over it, and a report."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dgo_compile.core.configs import FinetuneConfig, OptimizeConfig
from dgo_compile.core.errors import DgoError
from dgo_compile.driver.pipeline import read_config
from dgo_compile.schedules.schedule import Schedule
from reliability import cli


def run(*args):
    return subprocess.run([sys.executable, "-m", "dgo_compile.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=900)


def test_config_file_with_cli_overrides(tmp_path):
    path = tmp_path / "dgo.toml"
    path.write_text('schedule = "learned"\nsteps = 20\n[prune]\nchannel_ratio = 0.4\nimportance = "magnitude"\n'
                    "[optimize]\nkeep_macs = 0.3\niters = 5\n")
    config = read_config(path, {"steps": 10, "schedule": None})
    assert config.steps == 10 and config.schedule == "learned"  # the CLI wins, the file fills the rest
    assert config.prune.channel_ratio == 0.4 and config.prune.importance == "magnitude"
    assert config.optimize.steps == 10 and config.optimize.iters == 5  # the optimizer samples like the compile
    path.write_text("height = 48\nwidth = 64\n")
    assert (read_config(path, {"width": 24}).height, read_config(path, {"width": 24}).width) == (48, 24)


def test_config_file_paths_are_relative_to_the_file(tmp_path):
    """A config's model, output and schedule JSON are read from its folder, whatever the working folder;
    the command line's paths, absolute paths and built-in schedule names are kept as given."""
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "dgo.toml"
    path.write_text('model = "models/unet"\noutput = "out"\nschedule = "plans/s.json"\n')
    config = read_config(path, {})
    folder = tmp_path / "jobs"
    assert (config.model, config.output, config.schedule) == (
        str(folder / "models/unet"), str(folder / "out"), str(folder / "plans/s.json"))
    config = read_config(path, {"output": "here", "schedule": "other.json"})
    assert (config.output, config.schedule) == ("here", "other.json")
    path.write_text(f'model = "{tmp_path / "m"}"\nschedule = "steps:10"\n')
    config = read_config(path, {})
    assert (config.model, config.schedule, config.output) == (str(tmp_path / "m"), "steps:10", "artifact")


EXAMPLE = Path(__file__).parent.parent / "examples" / "dgo.toml"


def test_the_readme_example_config_reads_as_documented(tmp_path):
    """The quick start's `compile --config examples/dgo.toml`: the learned schedule committed beside it (read
    from the file's folder, 15 of 50 DDIM calls computed) and 32 report images, nothing else; channel pruning
    and fine-tuning are documented there as commented-out tables that read when enabled."""
    config = read_config(EXAMPLE, {"output": "artifact"})
    assert (config.schedule, config.steps, config.output, config.verify_samples) == (
        str(EXAMPLE.parent / "learned_30.json"), 50, "artifact", 32)
    plan = Schedule.load(config.schedule)
    assert len(plan.compute) == 50 and sum(any(call) for call in plan.compute) == 15
    assert config.prune is None and config.finetune is None and config.optimize is None
    # uncommenting the [prune] and [finetune] blocks (the documented option) gives a valid config
    lines, enabled, on = EXAMPLE.read_text().splitlines(), [], False
    for line in lines:
        if line.startswith("# [prune]") or line.startswith("# [finetune]"):
            on = True
        elif line.startswith("# [optimize]") or not line.startswith("#"):
            on = False
        enabled.append(line[2:] if on and line.startswith("# ") else line)
    path = tmp_path / "dgo.toml"
    path.write_text("\n".join(enabled) + "\n")
    tables = read_config(path, {})
    assert tables.prune.channel_ratio == 0.25 and tables.prune.importance == "taylor"
    assert tables.finetune.train_steps == 300


@pytest.mark.parametrize("text, message", [
    ("stepz = 3\n", "has unknown key(s) stepz"),
    ("[prune]\nration = 0.3\n", "[prune] has unknown key(s) ration"),
    ('schedule = "learned"\n', 'schedule = "learned" needs an [optimize] table'),
    # the report must not score a learned schedule on its own calibration noise
    ('schedule = "learned"\nseed = 0\n[optimize]\nkeep_macs = 0.3\n',
     "seed = 0 is [optimize] seed, the noise the learned schedule is trained on"),
    ('schedule = "learned"\nseed = 7\n[optimize]\nseed = 7\n', "seed = 7 is [optimize] seed"),
    ("[prune]\nchannel_ratio = 1.5\n", "[prune] channel_ratio must be in [0, 1)"),
    ("steps = \n", "cannot read the config"),
    # renamed keys: one line naming the new one ([optimize] steps stays: sampler steps)
    ("[prune]\nratio = 0.3\n", "[prune] ratio was renamed [prune] channel_ratio (the share of channels removed)"),
    ("[optimize]\nratio = 0.3\n", "[optimize] ratio was renamed [optimize] keep_macs (the kept share of the full"),
    ("[finetune]\nsteps = 30\n", "[finetune] steps was renamed [finetune] train_steps (optimizer steps, not"),
])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, text, message):
    path = tmp_path / "dgo.toml"
    path.write_text(text)
    with pytest.raises(DgoError) as info:
        read_config(path, {})
    assert message in str(info.value)
    result = cli("compile", "--config", path, "-o", tmp_path / "a")  # the same `main`, in this process
    assert result.returncode == 1 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "a").exists()


def test_stored_runs_with_the_old_field_names_read_as_the_new():
    """pruner.json and finetune.json written before the renames resume with the same settings."""
    assert OptimizeConfig.from_json({"ratio": 0.4, "steps": 7}).keep_macs == 0.4
    assert OptimizeConfig.from_json({"ratio": 0.4, "steps": 7}).steps == 7  # [optimize] steps: sampler steps
    assert FinetuneConfig.from_json({"steps": 30}).train_steps == 30


@pytest.mark.slow
def test_compile_config_runs_prune_compile_verify_report(tmp_path):
    path = tmp_path / "dgo.toml"
    path.write_text('schedule = "deepcache:2"\nsteps = 20\nverify_samples = 4\n'
                    '[prune]\nchannel_ratio = 0.5\nimportance = "magnitude"\n')
    result = run("compile", "--config", path, "--steps", "4", "-o", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "a"
    report = json.loads((folder / "report.json").read_text())
    stored = json.loads((folder / "dgo_config.json").read_text())
    assert stored["steps"] == 4 and stored["prune"]["channel_ratio"] == 0.5  # the resolved config, CLI included
    assert (stored["height"], stored["width"]) == (32, 32)  # the shipped model's sample_size (no VAE: latent)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["resolution"] == {"height": 32, "width": 32, "unit": "latent"}
    assert manifest["scheduler"]["steps"] == 4
    assert report["macs"]["per_run"] == manifest["macs"]["total"]
    # width: uniform 0.5 halves the 64-channel spaces; the 32-channel ones keep 2 per GroupNorm group (57% kept)
    assert report["macs"]["compiled_per_call_full"] < 0.6 * report["macs"]["original_per_call"]
    assert stored["prune"]["min_group_channels"] == 2
    assert report["macs"]["per_run"] < 4 * report["macs"]["compiled_per_call_full"]  # and time
    assert report["parity_rel_l2"] < 1e-4
    assert -1 <= report["quality"]["ssim_vs_original"] < 0.99 and report["measured"]["speedup"] > 0  # pruned, not tuned
    text = (folder / "report.md").read_text()
    assert "| MACs per run |" in text and "| realised speedup (median (min-max) of 5 interleaved rounds) |" in text
    assert "| seconds per sampling run" in text and "| realised / theoretical |" in text
    measured = report["measured"]
    assert f"{measured['ort_intra_op_threads']} intra-op threads per session" in text
    assert f"{measured['speedup']:.2f}x ({measured['speedup_min']:.2f}-{measured['speedup_max']:.2f}x)" in text
    for label in ("full", "compiled"):
        times = measured["times"][label]
        assert len(times["runs"]) == 5 and times["min"] <= times["median"] <= times["max"]
    assert measured["realised_share"] == pytest.approx(measured["speedup"] / report["predicted_speedup"], rel=1e-3)
    assert ("**Warning" in text) == bool(measured["warnings"])
    assert (folder / "samples.png").is_file() and (folder / "schedule.png").is_file()
    assert (tmp_path / "a.work" / "pruned" / "unet" / "dgo_pruning.json").is_file()
    # no terminal: one line per stage, in order, each with its time; the result goes to stdout
    stages = [re.match(r"^(\w+): \d+\.\d s, ", line) for line in result.stderr.splitlines()]
    # pruning traced the model it saved, so no trace stage follows it
    assert [m.group(1) for m in stages if m] == ["load", "prune", "schedule", "compile", "verify", "bench",
                                                 "report"], result.stderr
    assert list(report["timings_s"]) == ["load", "prune", "schedule", "compile", "verify", "bench"]
    assert "wrote " in result.stdout and "SSIM vs original" in result.stdout


def test_stage_stamps_match_only_the_same_settings_and_inputs(tmp_path):
    from dgo_compile.core.configs import PruneConfig
    from dgo_compile.driver.stages import make_stamp, model_digest, stale_reason, write_stamp

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    stamp = make_stamp("prune", PruneConfig(channel_ratio=0.25), {"model": model_digest(model)})
    folder = tmp_path / "pruned"
    assert stale_reason(folder, stamp) == "not built yet"
    folder.mkdir()
    assert "no stage.json" in stale_reason(folder, stamp)
    write_stamp(folder, stamp)
    assert stale_reason(folder, stamp) is None
    assert "channel_ratio 0.25 -> 0.5" in stale_reason(folder, make_stamp("prune", PruneConfig(channel_ratio=0.5),
                                                                   {"model": model_digest(model)}))
    (model / "config.json").write_text('{"changed": 1}')
    assert "input changed (model)" in stale_reason(folder, make_stamp("prune", PruneConfig(channel_ratio=0.25),
                                                                       {"model": model_digest(model)}))
    assert model_digest(folder).startswith("stage:")  # a later stage is keyed on this stage's stamp


def test_a_model_file_is_read_once_per_run_until_it_changes(tmp_path, monkeypatch):
    """The original model is digested by every stage and as the teacher: its files are hashed once,
    and a rewrite (same size, new mtime) is still seen."""
    import os

    from dgo_compile.core import files
    from dgo_compile.driver import stages

    model = tmp_path / "model"
    model.mkdir()
    weights = model / "weights.bin"
    weights.write_bytes(b"a" * 4096)
    reads = []
    real_open = open
    monkeypatch.setattr(files, "open", lambda f, *a, **k: reads.append(f) or real_open(f, *a, **k), raising=False)
    first = stages.model_digest(model)
    assert stages.model_digest(model) == first and len(reads) == 1
    weights.write_bytes(b"b" * 4096)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert stages.model_digest(model) != first and len(reads) == 2


def test_a_distilling_finetune_stage_gets_the_unpruned_model_as_its_teacher(tmp_path):
    """[finetune] distill_only in a config file: the pipeline passes the original model as the teacher, and the
    stage's stamp names it, so a rerun against another original rebuilds."""
    from dgo_compile.channels.finetune import read_finetune
    from dgo_compile.core.configs import FinetuneConfig
    from dgo_compile.driver.stages import finetuned, read_stamp
    from dgo_compile.frontend.loading import DEFAULT_MODEL

    folder = finetuned(DEFAULT_MODEL, FinetuneConfig(train_steps=1, batch=2, distill_only=True), tmp_path / "ft",
                       teacher=DEFAULT_MODEL)
    assert read_stamp(folder)["inputs"]["teacher"].startswith("files:")
    record = read_finetune(folder)
    assert record.complete and record.teacher is not None and len(record.history) == 1
