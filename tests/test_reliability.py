"""Reliability, "gets stuck, or answers with a traceback": bad inputs as a user meets them give one line on
stderr and exit code 1 with nothing half-written left behind, and an interrupted run can always be rerun.

The other classes of the issue live beside this file: test_reliability_outputs.py (destroys user data),
test_reliability_inputs.py (trusts what it loads, typed options), test_reliability_finite.py (NaN)."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dgo_compile.backend.artifact import ArtifactError, compile_artifact, read_manifest
from dgo_compile.core.errors import DgoError
from dgo_compile.frontend.loading import DEFAULT_MODEL
from dgo_compile.schedules.schedule import Schedule, ScheduleError, builtin
from dgo_compile.schedules.supernet import gateable_elements
from reliability import assert_nothing_left, assert_one_line_error, cli, run

WEIGHTS = "diffusion_pytorch_model.safetensors"
SHIPPED_BLOCKS = ["down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
                  "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"]


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
                       ["schedule JSON needs 'name', 'blocks' and 'compute' (calls x elements of 0/1)"]),
        "ragged": (json.dumps({**good, "compute": [[1] * len(good["blocks"]), [1]]}).encode(),
                   ["call 1 has 1 entries for ", " blocks"]),
        "value_2": (json.dumps(two).encode(), ["entry 2 is not 0 or 1"]),
        "unknown_block": (json.dumps(unknown).encode(), ["schedule 'full' is for blocks ", "down_blocks.9",
                                                         "this model has ['down_blocks.0'"]),
    }


ITERS = 12  # a few more than needed, so the kill lands before the run ends even on a fast machine


@pytest.fixture(scope="module")


def resumed_pruner(tmp_path_factory):
    """`optimize` killed (SIGKILL) once a checkpoint shows an iteration done, then `--resume`d to the end."""
    from dgo_compile.search.pruner import load_pruner

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


def _fail_on_call(real, fail_at: int):
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return write


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
schedule_like = st.fixed_dictionaries(
    {"name": json_values, "blocks": st.lists(st.sampled_from(["a", "b", "c"]) | json_values, max_size=3),
     "compute": st.lists(st.lists(st.sampled_from([0, 1, True, 2, "1", None, 1.0]), max_size=3), max_size=3)},
    optional={"granularity": st.sampled_from(["block", "unit", "step", "layer"]) | json_values})


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


class TestOneLineErrors:
    """Models that do not load, artifacts of another version or missing a file, schedule files that are not
    schedules, ratios out of range, a malformed command line: one line, nothing written. (Run in this
    process by `cli`: the same entry point as `dgo-compile`, without 7 s of imports per call.)"""

    @pytest.mark.parametrize("command", ["inspect", "compile"])
    @pytest.mark.parametrize("kind, fragments", [
        ("no_weights", ["has config.json but no weights", "pass ", "config.json itself"]),
        ("truncated", ["could not read the weights in ", "(corrupt or truncated?)"]),
        ("unsupported", ["describes UNet1DModel, which dgo-compile does not compile; supported: UNet2DModel"]),
    ])
    def test_model_that_does_not_load(self, bad_models, tmp_path, command, kind, fragments):
        output = tmp_path / "out"
        args = [command, bad_models[kind]] + (["--steps", "2", "-o", output] if command == "compile" else [])
        assert_one_line_error(cli(*args), *fragments)
        assert_nothing_left(output)

    @pytest.mark.parametrize("command", ["sample", "bench"])
    def test_artifact_of_another_format_version(self, artifact, tmp_path, command):
        copy = tmp_path / "old"
        shutil.copytree(artifact, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["format_version"] = 1
        (copy / "manifest.json").write_text(json.dumps(manifest))
        args = [command, copy] + (["-o", tmp_path / "grid.png"] if command == "sample" else ["--repeats", "1"])
        assert_one_line_error(cli(*args), f"{copy} has format dgo-compile-artifact v1; this dgo-compile reads "
                                          "dgo-compile-artifact v3: recompile the model")
        assert not (tmp_path / "grid.png").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]

    @pytest.mark.parametrize("command, removed", [
        ("sample", "variant_000.onnx"),
        ("bench", "timestep_constants.safetensors"),
    ])
    def test_artifact_with_a_file_removed(self, artifact, tmp_path, command, removed):
        copy = tmp_path / "broken"
        shutil.copytree(artifact, copy)
        (copy / removed).unlink()
        args = [command, copy] + (["-o", tmp_path / "grid.png"] if command == "sample" else ["--repeats", "1"])
        assert_one_line_error(cli(*args), f"{copy} is incomplete: {removed} is missing; recompile the model")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]

    @pytest.mark.parametrize("case", ["not_json", "not_utf8", "a_list", "no_compute", "ragged", "value_2",
                                      "unknown_block"])
    def test_compile_with_an_invalid_schedule_file(self, tmp_path, case):
        content, fragments = _schedule_files()[case]
        (tmp_path / "bad.json").write_bytes(content)
        output = tmp_path / "out"
        assert_one_line_error(cli("compile", "--schedule", tmp_path / "bad.json", "--steps", "2", "-o", output),
                              *fragments)
        assert_nothing_left(output)

    def test_compile_with_a_missing_schedule_file(self, tmp_path):
        output = tmp_path / "out"
        assert_one_line_error(cli("compile", "--schedule", tmp_path / "none.json", "-o", output),
                              "cannot read schedule ", "No such file or directory")
        assert_nothing_left(output)

    def test_optimize_ratio_zero(self, tmp_path):
        output = tmp_path / "P"
        assert_one_line_error(cli("optimize", "--keep-macs", "0", "-o", output),
                              "--keep-macs must be in (0, 1] (the kept share of the full model's MACs), got 0.0")
        assert_nothing_left(output)

    def test_prune_ratio_one(self, tmp_path):
        output = tmp_path / "pruned"
        assert_one_line_error(cli("prune", "--channel-ratio", "1", "-o", output),
                              "--channel-ratio must be in [0, 1) (the share of channels removed), got 1.0")
        assert_nothing_left(output)

    @pytest.mark.slow
    def test_schedule_ratio_above_one(self, resumed_pruner, tmp_path):
        output = tmp_path / "s.json"
        assert_one_line_error(cli("schedule", resumed_pruner["path"], "--keep-macs", "1.5", "-o", output),
                              "--keep-macs must be in (0, 1] (the kept share of the full model's MACs), got 1.5")
        assert list(tmp_path.iterdir()) == []


    @pytest.mark.parametrize("args, message", [
        (["compile", "--steps", "abc"], "error: Invalid value for '--steps': "),
        (["sample", "--bogus"], "error: No such option: --bogus (see `dgo-compile sample --help`)"),
        (["schedule"], "error: Missing argument 'pruner'."),
    ])
    def test_a_malformed_command_line_is_one_line_too(self, args, message):
        result = cli(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(message), result.stderr


class TestLoadersRaiseOnlyTheirOwnError:
    """Property tests: whatever a schedule or manifest file holds, its loader raises only its own one-line error."""

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(document=json_values | schedule_like | st.binary(max_size=16))
    def test_schedule_load_raises_only_schedule_error(self, tmp_path, document):
        path = tmp_path / "s.json"
        path.write_bytes(document if isinstance(document, bytes) else json.dumps(document).encode())
        try:
            plan = Schedule.load(path)
        except ScheduleError as exc:
            assert len(str(exc).splitlines()) == 1
            return
        assert plan.calls >= 1 and all(plan.compute[0]) and all(len(row) == len(plan.elements) for row in plan.compute)

    def test_read_manifest_raises_only_artifact_error(self, artifact, tmp_path_factory):
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

    def test_manifest_without_its_constants_key_is_malformed_not_a_key_error(self, artifact, tmp_path):
        """Found by the property test above: a missing 'constants_file' passed the checks, then raised KeyError."""
        copy = tmp_path / "copy"
        shutil.copytree(artifact, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest.pop("constants_file")
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match=r"malformed \('constants_file' is missing\)"):
            read_manifest(copy)

    def test_manifest_with_a_broken_structure_names_the_problem(self, artifact, tmp_path):
        copy = tmp_path / "copy"
        shutil.copytree(artifact, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["variants"][0].pop("cache_inputs")
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match=r"manifest.json is malformed \(each variant needs a file and lists of "
                                                r"reused, .*\); recompile the model$"):
            read_manifest(copy)
        (copy / "manifest.json").write_text("[]")
        with pytest.raises(ArtifactError, match="manifest.json must hold a JSON object; recompile the model"):
            read_manifest(copy)
        assert issubclass(ArtifactError, DgoError)


class TestNeverStuck:
    """Kills and full disks leave a folder that a rerun or `--resume` accepts, or nothing at all."""

    @pytest.mark.slow
    def test_interrupted_optimize_resumes_and_yields_a_schedule(self, resumed_pruner, tmp_path):
        from dgo_compile.search.pruner import load_pruner

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
        assert state.setup_seconds > killed.setup_seconds > 0  # the resumed run's own setup is added
        assert "s finding the start and the full model's targets)" in " ".join(resumed.stdout.split())
        # 3 denoiser calls, call 0 always full: kept shares come near thirds, so 0.5 has no schedule within 1.25 points.
        result = cli("schedule", resumed_pruner["path"], "--keep-macs", "0.667", "-o", tmp_path / "s.json")
        assert result.returncode == 0, result.stderr
        plan = Schedule.load(tmp_path / "s.json")
        assert plan.calls == 3 and (tmp_path / "s.png").is_file()

    @pytest.mark.parametrize("where", ["onnx_save", "constants_write"])
    def test_full_disk_during_export(self, tiny, tmp_path, monkeypatch, where):
        import torch

        import dgo_compile.backend.artifact as artifact_module

        _, traced, scheduler_config = tiny
        monkeypatch.delenv("DGO_COMPILE_EXPORT_CACHE", raising=False)  # the graph is exported, not copied
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
                           "choose another `output`, then compile again")
        assert len(message.splitlines()) == 1
        assert list(tmp_path.iterdir()) == []

    @pytest.mark.parametrize("resume", [False, True])
    def test_optimize_after_a_kill_during_its_first_checkpoint(self, tmp_path, resume):
        """An older version wrote the first checkpoint in place: a kill left a folder with a temp file and an
        empty checkpoint, which neither a rerun ("already exists") nor --resume ("cannot read") accepted."""
        from dgo_compile.search.pruner import load_pruner

        output = tmp_path / "P"
        output.mkdir()
        (output / "checkpoint.pt").write_bytes(b"")
        (output / ".pruner.json.k1x2").write_text('{"format": "dgo-')
        args = ["optimize", "--steps", "2", "--iters", "1", "--batch", "1", "--calibration", "1", "-o", output]
        result = cli(*args, *(["--resume"] if resume else []))
        assert result.returncode == 0, result.stderr
        assert "holds no complete checkpoint (an interrupted first one); starting it again" in result.stderr
        assert load_pruner(output).state.iterations_done == 1

    def test_a_folder_of_the_users_is_never_taken_for_a_half_written_one(self, tmp_path):
        output = tmp_path / "P"
        output.mkdir()
        (output / "checkpoint.pt").write_bytes(b"")
        (output / "results.csv").write_text("mine")
        assert_one_line_error(cli("optimize", "--iters", "1", "-o", output), "already exists; pass --resume")
        assert (output / "results.csv").read_text() == "mine"


    def test_a_full_disk_at_the_first_optimize_checkpoint_leaves_nothing_to_trip_over(self, tmp_path, monkeypatch):
        """The first checkpoint is staged and renamed in whole: a failure leaves no folder, so a rerun just runs."""
        import dgo_compile.search.pruner as pruner_module
        from dgo_compile import load, trace
        from dgo_compile.core.outputs import OutputError
        from dgo_compile.search.pruner import OptimizeConfig, optimize

        real = pruner_module.write_atomic

        def full_disk(path, write):
            def fail(tmp):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, fail)

        monkeypatch.setattr(pruner_module, "write_atomic", full_disk)
        loaded = load()
        output = tmp_path / "P"
        config = OptimizeConfig(steps=2, iters=1, batch=1, calibration=1)
        with pytest.raises(OutputError, match="could not write .*checkpoint.pt: No space left on device; free some"):
            optimize(trace(loaded, verify=False), loaded.scheduler_config, config, output)
        assert_nothing_left(output)
