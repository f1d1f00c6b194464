"""Bad inputs, as a user meets them: one line on stderr, exit code 1, and nothing half-written left behind."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgo_compile import load, trace
from dgo_compile.artifact import ArtifactError, compile_artifact, read_manifest
from dgo_compile.errors import DgoError
from dgo_compile.loading import DEFAULT_MODEL
from dgo_compile.runtime import gateable_elements
from dgo_compile.schedule import Schedule, ScheduleError, builtin
from model_configs import TINY_UNET2D

WEIGHTS = "diffusion_pytorch_model.safetensors"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dgo_compile.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def assert_one_line_error(result, *fragments):
    """Exit code 1 and exactly one line on stderr, `error: ...`, holding every fragment."""
    message = result.stderr.strip()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def assert_nothing_left(output: Path):
    """Neither the output nor a staging folder/file named after it (`.<name>.*`) exists beside it."""
    assert not output.exists()
    stray = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert stray == []


SHIPPED_BLOCKS = ["down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
                  "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny UNet (random weights) with the shipped model's sampler: exports in seconds."""
    config = tmp_path_factory.mktemp("tiny") / "config.json"
    config.write_text(json.dumps(TINY_UNET2D))
    return load(config), trace(load(config), verify=False), load().scheduler_config


@pytest.fixture(scope="module")
def artifact(tiny, tmp_path_factory):
    """What `dgo-compile compile --schedule full --steps 2 -o A` writes (for the tiny UNet: the errors under
    test come from the manifest and the files, not from the model)."""
    _, traced, scheduler_config = tiny
    plan = builtin("full", 2, gateable_elements(traced, "block"))
    return compile_artifact(traced, plan, scheduler_config, tmp_path_factory.mktemp("artifact") / "A",
                            model_source=str(DEFAULT_MODEL.resolve()), sampler_steps=2)


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    truncated = root / "truncated"
    shutil.copytree(DEFAULT_MODEL, truncated)
    weights = truncated / "unet" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_weights = root / "no_weights"
    no_weights.mkdir()
    shutil.copy(DEFAULT_MODEL / "unet" / "config.json", no_weights / "config.json")
    unsupported = root / "unet1d"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"_class_name": "UNet1DModel"}))
    return {"truncated": truncated, "no_weights": no_weights, "unsupported": unsupported}


# 1, 2. Models that do not load.

@pytest.mark.parametrize("command", ["inspect", "compile"])
@pytest.mark.parametrize("kind, fragments", [
    ("no_weights", ["has config.json but no weights", "pass ", "config.json itself"]),
    ("truncated", ["could not read the weights in ", "(corrupt or truncated?)"]),
    ("unsupported", ["describes UNet1DModel, which dgo-compile does not compile; supported: UNet2DModel"]),
])
def test_model_that_does_not_load(bad_models, tmp_path, command, kind, fragments):
    output = tmp_path / "out"
    args = [command, bad_models[kind]] + (["--steps", "2", "-o", output] if command == "compile" else [])
    assert_one_line_error(run(*args), *fragments)
    assert_nothing_left(output)


# 3, 4. Artifacts from another format version, or with a file missing.

@pytest.mark.parametrize("command", ["sample", "bench"])
def test_artifact_of_another_format_version(artifact, tmp_path, command):
    copy = tmp_path / "old"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    args = [command, copy] + (["-o", tmp_path / "grid.png"] if command == "sample" else ["--repeats", "1"])
    assert_one_line_error(run(*args), f"{copy} has format dgo-compile-artifact v1; this dgo-compile reads "
                                      "dgo-compile-artifact v2: recompile the model")
    assert not (tmp_path / "grid.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


@pytest.mark.parametrize("command, removed", [
    ("sample", "variant_000.onnx"),
    ("bench", "timestep_constants.safetensors"),
])
def test_artifact_with_a_file_removed(artifact, tmp_path, command, removed):
    copy = tmp_path / "broken"
    shutil.copytree(artifact, copy)
    (copy / removed).unlink()
    args = [command, copy] + (["-o", tmp_path / "grid.png"] if command == "sample" else ["--repeats", "1"])
    assert_one_line_error(run(*args), f"{copy} is incomplete: {removed} is missing; recompile the model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


# 5. Schedule files that are not schedules.

def _schedule_files() -> dict[str, tuple[bytes, list[str]]]:
    good = {"name": "full", "granularity": "block", "blocks": SHIPPED_BLOCKS, "compute": [[1] * 9, [1] * 9]}
    unknown = json.loads(json.dumps(good))
    unknown["blocks"][1] = "down_blocks.9"
    two = json.loads(json.dumps(good))
    two["compute"][1][2] = 2
    return {
        "not_json": (b"full, but not JSON", ["cannot read schedule ", "bad.json: Expecting value"]),
        "not_utf8": (b"\xff\xfe\x00{", ["cannot read schedule ", "bad.json"]),
        "a_list": (b"[[1, 1], [1, 0]]", ["schedule JSON must be an object with 'name', 'blocks' and 'compute'"]),
        "no_compute": (json.dumps({"name": "x", "blocks": good["blocks"]}).encode(),
                       ["schedule JSON needs 'name', 'blocks' and 'compute' (steps x blocks of 0/1)"]),
        "ragged": (json.dumps({**good, "compute": [[1] * len(good["blocks"]), [1]]}).encode(),
                   ["step 1 has 1 entries for ", " blocks"]),
        "value_2": (json.dumps(two).encode(), ["entry 2 is not 0 or 1"]),
        "unknown_block": (json.dumps(unknown).encode(), ["schedule 'full' is for blocks ", "down_blocks.9",
                                                         "this model has ['down_blocks.0'"]),
    }


@pytest.mark.parametrize("case", ["not_json", "not_utf8", "a_list", "no_compute", "ragged", "value_2",
                                  "unknown_block"])
def test_compile_with_an_invalid_schedule_file(tmp_path, case):
    content, fragments = _schedule_files()[case]
    (tmp_path / "bad.json").write_bytes(content)
    output = tmp_path / "out"
    assert_one_line_error(run("compile", "--schedule", tmp_path / "bad.json", "--steps", "2", "-o", output),
                          *fragments)
    assert_nothing_left(output)


def test_compile_with_a_missing_schedule_file(tmp_path):
    output = tmp_path / "out"
    assert_one_line_error(run("compile", "--schedule", tmp_path / "none.json", "-o", output),
                          "cannot read schedule ", "No such file or directory")
    assert_nothing_left(output)


# 6. Ratios out of range.

def test_optimize_ratio_zero(tmp_path):
    output = tmp_path / "P"
    assert_one_line_error(run("optimize", "--ratio", "0", "-o", output),
                          "--ratio must be in (0, 1] (the kept share of the full model's MACs), got 0.0")
    assert_nothing_left(output)


def test_prune_ratio_one(tmp_path):
    output = tmp_path / "pruned"
    assert_one_line_error(run("prune", "--ratio", "1", "-o", output),
                          "--ratio must be in [0, 1) (the share of channels removed), got 1.0")
    assert_nothing_left(output)


def test_schedule_ratio_above_one(resumed_pruner, tmp_path):
    output = tmp_path / "s.json"
    assert_one_line_error(run("schedule", resumed_pruner["path"], "--ratio", "1.5", "-o", output),
                          "--ratio must be in (0, 1] (the kept share of the full model's MACs), got 1.5")
    assert list(tmp_path.iterdir()) == []


# 7. An optimize killed mid-run, then resumed.

ITERS = 12  # a few more than needed, so the kill lands before the run ends even on a fast machine


@pytest.fixture(scope="module")
def resumed_pruner(tmp_path_factory):
    """`optimize` killed (SIGKILL) once a checkpoint shows an iteration done, then `--resume`d to the end."""
    from dgo_compile.pruner import load_pruner

    path = tmp_path_factory.mktemp("pruner") / "P"
    args = ["optimize", "--steps", "3", "--iters", ITERS, "--batch", "1", "--calibration", "2",
            "--checkpoint-every", "1", "-o", path]
    process = subprocess.Popen([sys.executable, "-m", "dgo_compile.cli", *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_at_kill = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                done = json.loads((path / "pruner.json").read_text())["iterations_done"]
            except (OSError, ValueError):  # not written yet (writes are atomic: never half a file)
                done = 0
            if done >= 1:
                process.send_signal(signal.SIGKILL)
                done_at_kill = done
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None and done_at_kill is None:
            process.kill()
        process.wait(timeout=60)
    killed = load_pruner(path, allow_unfinished=True).state  # the folder the kill left is readable
    stray = sorted(p.name for p in path.iterdir() if p.name not in ("pruner.json", "checkpoint.pt"))
    resumed = run("optimize", "--resume", "-o", path)
    return {"path": path, "done_at_kill": done_at_kill, "killed": killed, "stray": stray, "resumed": resumed}


def test_interrupted_optimize_resumes_and_yields_a_schedule(resumed_pruner, tmp_path):
    from dgo_compile.pruner import load_pruner

    assert resumed_pruner["done_at_kill"] is not None, "optimize ended before a checkpoint was seen"
    killed = resumed_pruner["killed"]
    assert 1 <= killed.iterations_done < ITERS and not killed.complete
    # A kill inside write_atomic may leave its temp file (`.checkpoint.pt.*`); never a half-written real file.
    assert all(name.startswith((".pruner.json.", ".checkpoint.pt.")) for name in resumed_pruner["stray"])
    resumed = resumed_pruner["resumed"]
    assert resumed.returncode == 0, resumed.stderr
    assert f"wrote {resumed_pruner['path']}: {ITERS} iterations" in resumed.stdout
    state = load_pruner(resumed_pruner["path"]).state
    assert state.complete and [r["iteration"] for r in state.history] == list(range(1, ITERS + 1))
    # 3 denoiser calls, call 0 always full: kept shares come near thirds, so 0.5 has no schedule within 1.25 points.
    result = run("schedule", resumed_pruner["path"], "--ratio", "0.667", "-o", tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    plan = Schedule.load(tmp_path / "s.json")
    assert plan.steps == 3 and (tmp_path / "s.png").is_file()


# 8. The disk fills up during export.

def _fail_on_call(real, fail_at: int):
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return write


@pytest.mark.parametrize("where", ["onnx_save", "constants_write"])
def test_full_disk_during_export(tiny, tmp_path, monkeypatch, where):
    import torch

    import dgo_compile.artifact as artifact_module

    _, traced, scheduler_config = tiny
    if where == "onnx_save":  # inside export_onnx, after the graph is exported, while the file is written
        monkeypatch.setattr(torch.onnx.ONNXProgram, "save", _fail_on_call(torch.onnx.ONNXProgram.save, 1))
    elif where == "constants_write":  # after every variant is in the staging folder
        monkeypatch.setattr(artifact_module, "save_file", _fail_on_call(artifact_module.save_file, 1))
    output = tmp_path / "artifact"
    plan = builtin("full", 2, gateable_elements(traced, "block"))
    with pytest.raises(ArtifactError) as caught:
        compile_artifact(traced, plan, scheduler_config, output, sampler_steps=2)
    message = str(caught.value)
    assert message == (f"could not write the artifact {output}: No space left on device; free some disk space or "
                       "choose another -o, then compile again")
    assert len(message.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# 9. Loaders never raise anything but their own error.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)

schedule_like = st.fixed_dictionaries(
    {"name": json_values, "blocks": st.lists(st.sampled_from(["a", "b", "c"]) | json_values, max_size=3),
     "compute": st.lists(st.lists(st.sampled_from([0, 1, True, 2, "1", None, 1.0]), max_size=3), max_size=3)},
    optional={"granularity": st.sampled_from(["block", "unit", "step", "layer"]) | json_values})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=json_values | schedule_like | st.binary(max_size=16))
def test_schedule_load_raises_only_schedule_error(tmp_path, document):
    path = tmp_path / "s.json"
    path.write_bytes(document if isinstance(document, bytes) else json.dumps(document).encode())
    try:
        plan = Schedule.load(path)
    except ScheduleError as exc:
        assert len(str(exc).splitlines()) == 1
        return
    assert plan.steps >= 1 and all(plan.compute[0]) and all(len(row) == len(plan.blocks) for row in plan.compute)


def _mutations(manifest: dict):
    """The valid manifest with one field (at any depth) deleted or replaced by an arbitrary JSON value."""
    paths = []

    def walk(value, path):
        paths.append(path)
        if isinstance(value, dict):
            for key, child in value.items():
                walk(child, (*path, key))
        elif isinstance(value, list):
            for index, child in enumerate(value[:3]):
                walk(child, (*path, index))

    walk(manifest, ())

    @st.composite
    def mutate(draw):
        document = json.loads(json.dumps(manifest))
        path = draw(st.sampled_from(paths[1:]))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[path[-1]] = draw(json_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
        return document

    return mutate()


def test_read_manifest_raises_only_artifact_error(artifact, tmp_path_factory):
    manifest = json.loads((artifact / "manifest.json").read_text())
    folder = tmp_path_factory.mktemp("manifests")
    for name in (p.name for p in artifact.iterdir() if p.name != "manifest.json"):
        (folder / name).symlink_to(artifact / name)

    @settings(max_examples=50, deadline=None)
    @given(document=json_values | _mutations(manifest) | st.binary(max_size=16))
    def check(document):
        (folder / "manifest.json").write_bytes(
            document if isinstance(document, bytes) else json.dumps(document).encode())
        try:
            read_manifest(folder)
        except ArtifactError as exc:
            assert len(str(exc).splitlines()) == 1

    check()


def test_manifest_without_its_constants_key_is_malformed_not_a_key_error(artifact, tmp_path):
    """Found by the property test above: a missing 'constants_file' passed the checks, then raised KeyError."""
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("constants_file")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"malformed \('constants_file' must be a file name or null\)"):
        read_manifest(copy)


def test_manifest_with_a_broken_structure_names_the_problem(artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["variants"][0].pop("cache_inputs")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest.json is malformed \(each variant needs a file and lists of "
                                            r"inputs, .*\); recompile the model$"):
        read_manifest(copy)
    (copy / "manifest.json").write_text("[]")
    with pytest.raises(ArtifactError, match="manifest.json must hold a JSON object; recompile the model"):
        read_manifest(copy)
    assert issubclass(ArtifactError, DgoError)
