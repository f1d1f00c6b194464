"""Compiled artifacts: onnxruntime matches the PyTorch schedule, the manifest is checked, writes are atomic."""

import json
import shutil

import pytest
import torch

from dgo_compile import load, trace
from dgo_compile.backend.artifact import ArtifactError, compile_artifact, read_manifest
from dgo_compile.backend.export import export_onnx
from dgo_compile.backend.folding import fold
from dgo_compile.backend.ort_runner import OrtArtifact
from dgo_compile.backend.sampling import Guidance, denoiser_timesteps, initial_noise, sample, sample_ddim
from dgo_compile.schedules.schedule import Schedule, ScheduleError
from dgo_compile.schedules.supernet import gateable_elements


@pytest.fixture(scope="module")
def shipped_artifact(tmp_path_factory):
    loaded = load()
    traced = trace(loaded, verify=False)
    names = tuple(b.name for b in traced.blocks)
    # Every third call in full, the others only the outermost blocks (block-granular caching)
    shallow = ("down_blocks.0", "up_blocks.3")
    schedule = Schedule("shallow", names, tuple(tuple(i % 3 == 0 or n in shallow for n in names) for i in range(9)))
    path = compile_artifact(traced, schedule, loaded.scheduler_config, tmp_path_factory.mktemp("a") / "artifact")
    return loaded, traced, schedule, path


@pytest.mark.slow
def test_onnxruntime_run_matches_pytorch_schedule(shipped_artifact):
    loaded, traced, schedule, path = shipped_artifact
    noise = initial_noise(3, (1, 32, 32), 11)
    ours = sample_ddim(OrtArtifact.open(path, ["CPUExecutionProvider"]), loaded.scheduler_config, noise, 9)
    reference = sample_ddim(fold(traced, schedule), loaded.scheduler_config, noise, 9)
    assert (ours - reference).abs().max().item() < 1e-4
    assert (ours - sample_ddim(traced, loaded.scheduler_config, noise, 9)).abs().max().item() > 1e-3


def test_manifest_describes_how_to_run(shipped_artifact):
    _, traced, _, path = shipped_artifact
    manifest = read_manifest(path).to_json()
    assert manifest["call_variants"] == [0, 1, 1, 0, 1, 1, 0, 1, 1]
    assert [v["file"] for v in manifest["variants"]] == ["variant_000.onnx", "variant_001.onnx"]
    assert manifest["variants"][1]["cache_inputs"] == ["cache__up_blocks_2__0"]
    assert manifest["variants"][0]["cache_outputs"] == ["cache__up_blocks_2__0"]
    assert manifest["variants"][1]["reused"] == ["down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
                                                 "up_blocks.0", "up_blocks.1", "up_blocks.2"]
    # The sampler passes sample and timestep; the graphs take per-call timestep constants instead.
    assert [i["name"] for i in manifest["inputs"]] == ["sample", "timestep"]
    assert manifest["variants"][0]["inputs"] == ["sample"]
    assert len(manifest["variants"][0]["constant_inputs"]) == 22 > len(manifest["variants"][1]["constant_inputs"])
    scheduler = manifest["scheduler"]
    assert scheduler["name"] == "ddim" and scheduler["steps"] == scheduler["calls"] == 9
    assert scheduler["timesteps"] == denoiser_timesteps(scheduler["config"], 9)
    per_call = manifest["macs"]["per_call"]
    assert per_call[0] == per_call[3] > per_call[1] == per_call[2]
    assert manifest["macs"]["total"] == sum(per_call) < manifest["macs"]["full_total"]
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "timestep_constants.safetensors",
                                                      "variant_000.onnx", "variant_001.onnx", "weights.bin"]


def test_ort_run_refuses_another_sampler(shipped_artifact):
    loaded, _, _, path = shipped_artifact
    with pytest.raises(ScheduleError,
                       match="call 2 was compiled for timestep 888, got 979: sample with the scheduler and step count"):
        sample_ddim(OrtArtifact.open(path), loaded.scheduler_config, initial_noise(1, (1, 32, 32), 0), 50)


@pytest.mark.parametrize("family, reuse, scheduler", [("sd", "mid_block", "ddim"),
                                                      ("dit", "transformer_blocks.0", "heun"),
                                                      ("pixart", "transformer_blocks.1", "ddim")])
@pytest.mark.slow
def test_conditional_families_with_guidance_match_pytorch(config_dir, tmp_path, family, reuse, scheduler):
    # Text CFG on a tiny SD UNet (DDIM) and class CFG on a tiny DiT under Heun, whose repeated
    # timesteps are told apart by call index; PixArt's caption CFG (its output squeeze(1) is a no-op
    # torch allows and ONNX does not).
    traced = trace(load(config_dir / family / "config.json"), verify=False)
    names = gateable_elements(traced)
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}
    calls = len(denoiser_timesteps(config, 3, scheduler))
    rows = (tuple(True for _ in names), *(tuple(n != reuse or i % 2 == 0 for n in names) for i in range(1, calls)))
    schedule = Schedule("manual", names, rows)
    path = compile_artifact(traced, schedule, config, tmp_path / "a", scheduler=scheduler, sampler_steps=3,
                            guidance_scale=4.0)
    example = traced.example_inputs(1, seed=5)
    conditions = [n for n in traced.input_names if n not in ("sample", "timestep")]
    uncond = {n: torch.zeros_like(example[n]) if n != "class_labels" else torch.tensor([10]) for n in conditions}
    guidance = Guidance(4.0, {n: example[n] for n in conditions}, uncond)
    noise = initial_noise(2, tuple(example["sample"].shape[1:]), 3)
    run = lambda denoiser: sample(denoiser, config, noise, 3, scheduler=scheduler, guidance=guidance)
    ours, reference = run(OrtArtifact.open(path, ["CPUExecutionProvider"])), run(fold(traced, schedule))
    assert (ours - reference).abs().max().item() < 1e-4
    manifest = read_manifest(path).to_json()
    assert manifest["guidance"] == {"scale": 4.0, "batch": "uncond, cond"}
    assert manifest["scheduler"]["calls"] == calls == (5 if scheduler == "heun" else 3)
    assert len(manifest["variants"]) == 2


def test_big_graphs_keep_weights_in_external_data(shipped_artifact, tmp_path):
    import onnx

    _, traced, _, _ = shipped_artifact
    written = export_onnx(traced.graph_module, traced.example_inputs(2), tmp_path / "m.onnx", external_data_bytes=1)
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"] and sorted(p.name for p in tmp_path.iterdir()) == \
        ["m.onnx", "m.onnx.data"]
    assert written[0].stat().st_size < written[1].stat().st_size / 5  # the big weights moved out
    onnx.checker.check_model(str(written[0]))
    import onnxruntime as ort

    inputs = traced.example_inputs(2)
    session = ort.InferenceSession(str(written[0]), providers=["CPUExecutionProvider"])
    actual = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    assert abs(actual - traced(*inputs.values()).detach().numpy()).max() < 1e-4


def test_artifact_errors(shipped_artifact, tmp_path):
    _, _, _, path = shipped_artifact
    with pytest.raises(ArtifactError, match="is not a dgo-compile artifact \\(no manifest.json\\)"):
        read_manifest(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / "variant_001.onnx").unlink()
    with pytest.raises(ArtifactError, match="is incomplete: variant_001.onnx is missing; recompile the model"):
        read_manifest(copy)
    shutil.copy(path / "variant_001.onnx", copy)
    (copy / "timestep_constants.safetensors").unlink()
    with pytest.raises(ArtifactError, match="is incomplete: timestep_constants.safetensors is missing"):
        read_manifest(copy)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="has format dgo-compile-artifact v99; this dgo-compile reads "
                                            "dgo-compile-artifact v3: recompile the model"):
        read_manifest(copy)


def test_run_past_the_compiled_steps_is_an_error(shipped_artifact):
    _, traced, _, path = shipped_artifact
    run = OrtArtifact.open(path, ["CPUExecutionProvider"]).new_run()
    run.step = 9
    with pytest.raises(ScheduleError, match="compiled for 9 denoiser calls; this is call 10: sample with the "
                                            "scheduler and step count it was compiled for"):
        run(*traced.example_inputs(1).values())


def test_failed_compile_leaves_nothing_behind(shipped_artifact, tmp_path, monkeypatch):
    loaded, traced, schedule, _ = shipped_artifact
    import dgo_compile.backend.artifact as artifact_module

    calls = []

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    original = artifact_module.export_onnx
    monkeypatch.setattr(artifact_module, "export_onnx", disk_full)
    with pytest.raises(ArtifactError, match="could not write the artifact .*artifact: No space left on device; free "
                                            "some disk space or choose another `output`"):
        compile_artifact(traced, schedule, loaded.scheduler_config, tmp_path / "artifact")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_unless_asked(shipped_artifact):
    loaded, traced, schedule, path = shipped_artifact
    with pytest.raises(ArtifactError, match="already exists; pass `overwrite` or choose another `output`"):
        compile_artifact(traced, schedule, loaded.scheduler_config, path)


@pytest.mark.gpu
def test_cuda_provider_keeps_caches_on_the_device_and_matches_cpu(shipped_artifact):
    loaded, _, _, path = shipped_artifact
    noise = initial_noise(2, (1, 32, 32), 4)
    cuda = OrtArtifact.open(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cuda.device == "cuda"
    run = cuda.new_run()
    images = sample_ddim(lambda *inputs: run(*inputs), loaded.scheduler_config, noise, 9)
    assert all(value.device_name() == "cuda" for value in run.cache.values())
    cpu = sample_ddim(OrtArtifact.open(path, ["CPUExecutionProvider"]), loaded.scheduler_config, noise, 9)
    assert (images - cpu).abs().max().item() < 1e-3
