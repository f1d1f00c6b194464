"""`compile --config` run again on one -o: a stage is reused only with the same settings, and the report
describes the model actually built. (Its own file: three whole pipeline runs, which pytest-xdist then
runs beside test_pipeline.py.)"""

import json

import pytest

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

    again = run("compile", "--config", path, "-o", out, "--overwrite")  # same settings: reused, not rebuilt
    assert again.returncode == 0 and "rebuilding" not in again.stderr, again.stderr

    path.write_text(common + "channel_ratio = 0.5\n")
    second = run("compile", "--config", path, "-o", out, "--overwrite")
    assert second.returncode == 0, second.stderr
    assert "rebuilding" in second.stderr and "channel_ratio 0.25 -> 0.5" in second.stderr, second.stderr
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
