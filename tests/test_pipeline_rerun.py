"""`compile --config` run again on one -o: a stage is reused only with the same settings, and the report
describes the model actually built. (Its own file: three whole pipeline runs, which pytest-xdist then
runs beside test_pipeline.py.)"""

import json

import pytest

from reliability import cli
from test_pipeline import run


@pytest.mark.slow
def test_rerun_with_changed_settings_rebuilds_and_the_report_matches_the_built_model(tmp_path):
    """The issue's case: a rerun with another [prune] ratio used to reuse the old cut and report the new ratio."""
    path, out = tmp_path / "dgo.toml", tmp_path / "a"
    pruned = tmp_path / "a.work" / "pruned"
    common = 'schedule = "full"\nsteps = 2\nverify_samples = 2\n[prune]\nimportance = "magnitude"\n'
    path.write_text(common + "channel_ratio = 0.25\n")
    first = run("compile", "--config", path, "-o", out)
    assert first.returncode == 0, first.stderr
    small = json.loads((out / "report.json").read_text())
    stamp = json.loads((pruned / "stage.json").read_text())
    assert stamp["settings"]["channel_ratio"] == 0.25 and stamp["inputs"]["model"].startswith("files:")
    # the source's own results are not copied beside the pruned model, where they would read as its own
    assert {p.name for p in pruned.iterdir()} == {"model_index.json", "scheduler", "unet", "stage.json"}
    baseline = tmp_path / "a.work" / "original" / "artifact" / "manifest.json"  # the bench stage's `full` artifact
    built = baseline.stat().st_mtime_ns

    # the reruns in this process (the first run above is the real command, with its exit code)
    again = cli("compile", "--config", path, "-o", out, "--overwrite")  # same settings: reused, not rebuilt
    assert again.returncode == 0 and "rebuilding" not in again.stderr, again.stderr
    assert "\ntrace: " in again.stderr and "\nprune: " in again.stderr  # the reused pruned model is traced anew

    path.write_text(common + "channel_ratio = 0.5\n")
    second = cli("compile", "--config", path, "-o", out, "--overwrite")
    assert second.returncode == 0, second.stderr
    assert "rebuilding" in second.stderr and "channel_ratio 0.25 -> 0.5" in second.stderr, second.stderr
    assert "\ntrace: " not in second.stderr  # pruned now: pruning's own trace of the model it saved is used
    assert baseline.stat().st_mtime_ns == built  # the original model and sampler did not change: never recompiled
    report = json.loads((out / "report.json").read_text())
    record = json.loads((pruned / "unet" / "dgo_pruning.json").read_text())
    assert report["params"]["compiled"] == record["params"]["after"] < small["params"]["compiled"]
    assert report["macs"]["compiled_per_call_full"] == record["macs"]["after"]
    assert report["built"]["prune"]["channel_ratio"] == 0.5
    text = (out / "report.md").read_text()
    assert "channel pruning 0.5 of the channels removed (magnitude importance" in text
    assert f"{record['params']['after'] / 1e6:.2f} M |" in text
    measured = report["measured"]
    assert measured["speedup_min"] <= measured["speedup"] <= measured["speedup_max"]
    assert ("measurement noise" in text) == (round(measured["speedup"], 2) > round(report["predicted_speedup"], 2))


def test_the_original_full_artifact_is_reused_until_the_model_or_a_setting_changes(tiny, tmp_path, monkeypatch,
                                                                                   caplog):
    """The bench stage's baseline (the original's `full` artifact) is compiled once into `<output>.work/original`
    and reused by a rerun; another model, other sampler settings or a damaged file rebuild it, saying why.
    (One real compile; each rebuild after it records its arguments and copies that artifact, for speed.)"""
    import shutil

    from dgo_compile.backend import artifact as artifact_module
    from dgo_compile.backend.artifact import read_manifest
    from dgo_compile.driver.stages import original_full, read_stamp

    _, traced, scheduler_config = tiny
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    compiled, real = [], artifact_module.compile_artifact
    monkeypatch.setattr(artifact_module, "compile_artifact", lambda *a, **k: compiled.append(k) or real(*a, **k))
    settings = {"scheduler": None, "steps": 2, "precision": "fp32", "calls": 2,
                "latent_size": list(traced.example_inputs(1)["sample"].shape[-2:])}
    folder = tmp_path / "a.work" / "original"
    first = original_full(traced, scheduler_config, settings, model, folder)
    manifest = read_manifest(first, checksums=True)
    assert len(compiled) == 1 and manifest.scheduler.steps == 2 and manifest.precision == "fp32"
    assert manifest.schedule["name"] == "full" and all(all(row) for row in manifest.schedule["compute"])
    assert read_stamp(folder)["settings"] == settings and read_stamp(folder)["inputs"]["model"].startswith("files:")
    written = (first / "manifest.json").stat().st_mtime_ns

    assert original_full(traced, scheduler_config, settings, model, folder) == first  # the rerun: reused
    assert len(compiled) == 1 and (first / "manifest.json").stat().st_mtime_ns == written
    assert "rebuilding" not in caplog.text

    saved = shutil.copytree(first, tmp_path / "saved")
    monkeypatch.setattr(artifact_module, "compile_artifact",
                        lambda traced, plan, config, output, **k: compiled.append(k) or shutil.copytree(saved, output))
    three = {**settings, "steps": 3, "calls": 3}
    original_full(traced, scheduler_config, three, model, folder)
    assert len(compiled) == 2 and compiled[-1]["sampler_steps"] == 3 and "steps 2 -> 3" in caplog.text
    assert read_stamp(folder)["settings"] == three

    (model / "config.json").write_text('{"changed": 1}')  # another model at the same path
    original_full(traced, scheduler_config, three, model, folder)
    assert len(compiled) == 3 and "input changed (model)" in caplog.text
    assert original_full(traced, scheduler_config, three, model, folder) == first and len(compiled) == 3

    weights = first / manifest.weights.file
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")  # damaged: rebuilt, never benched
    original_full(traced, scheduler_config, three, model, folder)
    assert len(compiled) == 4 and "its artifact does not check" in caplog.text
    read_manifest(first, checksums=True)
