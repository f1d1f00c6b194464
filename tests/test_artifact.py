"""Compiled artifacts: onnxruntime matches the PyTorch schedule, the manifest is checked, writes are atomic."""

import json
import shutil

import pytest
import torch

from dgo_compile import load, trace
from dgo_compile.artifact import ArtifactError, OrtArtifact, compile_artifact, read_manifest
from dgo_compile.runtime import fold
from dgo_compile.sampling import initial_noise, sample_ddim
from dgo_compile.schedule import Schedule, builtin


@pytest.fixture(scope="module")
def shipped_artifact(tmp_path_factory):
    loaded = load()
    traced = trace(loaded, verify=False)
    schedule = builtin("deepcache:3", 9, tuple(b.name for b in traced.blocks))
    path = compile_artifact(traced, schedule, loaded.scheduler_config, tmp_path_factory.mktemp("a") / "artifact")
    return loaded, traced, schedule, path


def test_onnxruntime_run_matches_pytorch_schedule(shipped_artifact):
    loaded, traced, schedule, path = shipped_artifact
    noise = initial_noise(3, (1, 32, 32), 11)
    ours = sample_ddim(OrtArtifact.open(path, ["CPUExecutionProvider"]), loaded.scheduler_config, noise, 9)
    reference = sample_ddim(fold(traced, schedule), loaded.scheduler_config, noise, 9)
    assert (ours - reference).abs().max().item() < 1e-4


def test_manifest_describes_how_to_run(shipped_artifact):
    _, traced, _, path = shipped_artifact
    manifest = read_manifest(path)
    assert manifest["steps"] == [0, 1, 1, 0, 1, 1, 0, 1, 1]
    assert [v["file"] for v in manifest["variants"]] == ["variant_000.onnx", "variant_001.onnx"]
    assert manifest["variants"][1]["cache_inputs"] == ["cache__up_blocks_2__0"]
    assert manifest["variants"][0]["cache_outputs"] == ["cache__up_blocks_2__0"]
    assert [i["name"] for i in manifest["inputs"]] == ["sample", "timestep"]
    assert manifest["scheduler"]["steps"] == 9 and manifest["scheduler"]["config"]["_class_name"] == "DDIMScheduler"
    per_step = manifest["macs"]["per_step"]
    assert per_step[0] == per_step[3] > per_step[1] == per_step[2]
    assert manifest["macs"]["total"] == sum(per_step) < manifest["macs"]["full_total"]
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "variant_000.onnx", "variant_001.onnx"]


@pytest.mark.parametrize("family", ["sd", "dit"])
def test_conditional_families_match_onnxruntime_step_by_step(config_dir, tmp_path, family):
    traced = trace(load(config_dir / family / "config.json"), verify=False)
    names = tuple(b.name for b in traced.blocks)
    reuse = {"sd": "mid_block", "dit": "transformer_blocks.1"}[family]
    schedule = Schedule("manual", names, (tuple(True for _ in names), tuple(n != reuse for n in names)))
    path = compile_artifact(traced, schedule, {"_class_name": "DDIMScheduler"}, tmp_path / "a")
    ort_run, torch_run = OrtArtifact.open(path, ["CPUExecutionProvider"]).new_run(), fold(traced, schedule).new_run()
    for step in range(2):
        inputs = tuple(traced.example_inputs(batch=2, seed=step).values())  # a CFG-sized batch
        with torch.no_grad():
            expected = torch_run(*inputs)
        actual = ort_run(*inputs)
        assert (actual - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())
    assert len(read_manifest(path)["variants"]) == 2


def test_artifact_errors(shipped_artifact, tmp_path):
    _, _, _, path = shipped_artifact
    with pytest.raises(ArtifactError, match="is not a dgo-compile artifact \\(no manifest.json\\)"):
        read_manifest(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / "variant_001.onnx").unlink()
    with pytest.raises(ArtifactError, match="is incomplete: variant_001.onnx is missing; recompile the model"):
        read_manifest(copy)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="has format dgo-compile-artifact v99; this dgo-compile reads "
                                            "dgo-compile-artifact v1: recompile the model"):
        read_manifest(copy)


def test_run_past_the_compiled_steps_is_an_error(shipped_artifact):
    _, traced, _, path = shipped_artifact
    run = OrtArtifact.open(path, ["CPUExecutionProvider"]).new_run()
    run.step = 9
    with pytest.raises(ArtifactError, match="compiled for 9 steps; this is step 10: sample with --steps 9"):
        run(*traced.example_inputs(1).values())


def test_failed_compile_leaves_nothing_behind(shipped_artifact, tmp_path, monkeypatch):
    loaded, traced, schedule, _ = shipped_artifact
    import dgo_compile.artifact as artifact_module

    calls = []

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    original = artifact_module.export_onnx
    monkeypatch.setattr(artifact_module, "export_onnx", disk_full)
    with pytest.raises(OSError, match="No space left"):
        compile_artifact(traced, schedule, loaded.scheduler_config, tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_unless_asked(shipped_artifact):
    loaded, traced, schedule, path = shipped_artifact
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite or choose another -o"):
        compile_artifact(traced, schedule, loaded.scheduler_config, path)
