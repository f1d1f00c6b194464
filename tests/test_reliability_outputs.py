"""Reliability, "destroys user data": `-o` and `--overwrite` never delete what is not this tool's own
output, a folder that appears meanwhile is kept, replacement is crash-safe, leftovers of killed runs
are cleaned, outputs are checked before any work, and permissions follow the umask."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgo_compile.backend.artifact import ArtifactError, compile_artifact
from dgo_compile.core import outputs
from dgo_compile.core.files import write_atomic
from dgo_compile.core.outputs import (
    OutputError,
    check_output,
    clean_leftovers,
    exclusive,
    make_staging,
    publish,
)
from dgo_compile.driver.pipeline import read_config, run_pipeline
from dgo_compile.frontend.loading import DEFAULT_MODEL
from dgo_compile.schedules.schedule import builtin
from dgo_compile.schedules.supernet import gateable_elements
from reliability import assert_nothing_left, assert_one_line_error, cli, tree

MANIFEST = {"format": "dgo-compile-artifact", "format_version": 2}


def user_folder(path: Path) -> Path:
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("three years of work")
    (path / "notes" / "todo.txt").write_text("back up")
    return path


def own_artifact(path: Path, marker: str = "old") -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(MANIFEST))
    (path / "variant_000.onnx").write_text(marker)
    return path


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory):
    """A copy of the shipped pipeline folder, compiled from and written near by the tests."""
    return Path(shutil.copytree(DEFAULT_MODEL, tmp_path_factory.mktemp("model") / "mnist"))


class TestOverwriteNeverDestroys:
    def test_overwrite_of_the_working_directory_is_refused_and_keeps_every_file(self, tmp_path, monkeypatch):
        home = user_folder(tmp_path / "home")
        before = tree(home)
        monkeypatch.chdir(home / "notes")
        for target in (".", "..", str(home)):
            assert_one_line_error(cli("compile", "--steps", "2", "-o", target, "--overwrite"),
                                  "is the working directory or one of its parents")
        assert tree(home) == before

    def test_overwrite_of_the_input_model_is_refused(self, shipped_copy):
        before = tree(shipped_copy)
        for target in (shipped_copy, shipped_copy / "unet", shipped_copy.parent):
            relation = "is" if target == shipped_copy else "is inside" if target.parent == shipped_copy else "contains"
            assert_one_line_error(cli("compile", shipped_copy, "--steps", "2", "-o", target, "--overwrite"),
                                  f"{relation} the input {shipped_copy}")
        assert tree(shipped_copy) == before

    def test_overwrite_replaces_only_this_tools_output_of_the_same_kind(self, tmp_path):
        folders = {"user": user_folder(tmp_path / "user"), "pruner": tmp_path / "pruner"}
        folders["pruner"].mkdir()
        (folders["pruner"] / "pruner.json").write_text(json.dumps({"format": "dgo-compile-pruner"}))
        (tmp_path / "file").write_text("data")
        folders["file"] = tmp_path / "file"
        before = {name: path.read_bytes() if path.is_file() else tree(path) for name, path in folders.items()}
        for path in folders.values():
            assert_one_line_error(cli("compile", "--steps", "2", "-o", path, "--overwrite"),
                                  f"{path} is not a dgo-compile artifact; --overwrite only replaces one")
        assert before == {name: path.read_bytes() if path.is_file() else tree(path) for name, path in folders.items()}

    def test_toml_overwrite_false_as_a_string_is_an_error_not_true(self, tmp_path):
        artifact = own_artifact(tmp_path / "a")
        config = tmp_path / "dgo.toml"
        config.write_text('overwrite = "false"\n')
        assert_one_line_error(cli("compile", "--config", config, "-o", artifact),
                              'overwrite must be true or false, got "false"')
        assert (artifact / "variant_000.onnx").read_text() == "old"


class TestNothingIsReplacedUnasked:
    def test_a_folder_that_appears_during_compile_is_kept(self, tiny, tmp_path, monkeypatch):
        """The existence check passes, then another process writes -o while the graphs export."""
        import dgo_compile.backend.artifact as artifact_module

        _, traced, scheduler_config = tiny
        output = tmp_path / "out"
        real_fold = artifact_module.fold

        def fold_then_race(*args, **kwargs):
            own_artifact(output, "the other compile's")
            return real_fold(*args, **kwargs)

        monkeypatch.setattr(artifact_module, "fold", fold_then_race)
        with pytest.raises(OutputError, match="appeared while this command ran; kept it and wrote nothing"):
            compile_artifact(traced, builtin("full", 2, gateable_elements(traced, "block")), scheduler_config,
                             output, sampler_steps=2)
        assert (output / "variant_000.onnx").read_text() == "the other compile's"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    def test_the_publishing_rename_never_replaces(self, tmp_path):
        for existing in ("empty", "full", "file"):
            target = tmp_path / existing
            if existing == "file":
                target.write_text("x")
            else:
                target.mkdir()
                if existing == "full":
                    (target / "keep").write_text("x")
            staging = make_staging(target)
            with pytest.raises(OutputError, match="appeared while this command ran"):
                publish(staging, target, "artifact")
            assert staging.is_dir() and (target.is_file() or target.is_dir())
            shutil.rmtree(staging)

    def test_overwrite_at_publish_time_rechecks_what_is_there(self, tmp_path):
        target = user_folder(tmp_path / "a")  # appeared after an --overwrite check that found nothing
        staging = make_staging(target)
        with pytest.raises(OutputError, match="no longer a dgo-compile artifact; kept it"):
            publish(staging, target, "artifact", overwrite=True)
        assert (target / "thesis.tex").is_file()

    def test_concurrent_config_runs_on_one_output_stop_the_second_at_once(self, tmp_path):
        config = read_config(None, {"output": str(tmp_path / "a"), "steps": 2})
        with exclusive(tmp_path / "a.work"), \
                pytest.raises(OutputError, match=r"another dgo-compile run is using .*a\.work; wait for it"):
            run_pipeline(config)
        assert not (tmp_path / "a").exists()

    def test_staging_folders_are_unique(self, tmp_path):
        names = {make_staging(tmp_path / "a").name for _ in range(3)}
        assert len(names) == 3 and all(f".a.dgo-staging.{os.getpid()}." in n for n in names)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


class TestCrashSafeReplacement:
    @pytest.mark.parametrize("exchange", [True, False])
    def test_overwrite_keeps_the_old_output_until_the_new_one_is_in(self, tmp_path, monkeypatch, exchange):
        if not exchange:  # a filesystem without renameat2: rename the old one aside first
            monkeypatch.setattr(outputs, "_LIBC", [None])
        target = own_artifact(tmp_path / "a")
        staging = make_staging(target)
        (staging / "manifest.json").write_text(json.dumps(MANIFEST))
        (staging / "variant_000.onnx").write_text("new")
        publish(staging, target, "artifact", overwrite=True)
        assert (target / "variant_000.onnx").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]

    def test_a_failed_move_puts_the_old_output_back(self, tmp_path, monkeypatch):
        monkeypatch.setattr(outputs, "_LIBC", [None])
        target = own_artifact(tmp_path / "a")
        staging = make_staging(target)
        real_rename = os.rename

        def rename(source, destination):
            if Path(source) == staging:
                raise OSError(28, "No space left on device")
            return real_rename(source, destination)

        monkeypatch.setattr(os, "rename", rename)
        with pytest.raises(OutputError, match="could not write .*No space left on device; free some disk space"):
            publish(staging, target, "artifact", overwrite=True)
        assert (target / "variant_000.onnx").read_text() == "old"

    def test_leftovers_of_a_killed_run_are_cleaned_and_an_aside_output_restored(self, tmp_path):
        pid = dead_pid()
        aside = own_artifact(tmp_path / f".a.{outputs.ASIDE}.{pid}.x1")  # killed between the two renames
        staging = tmp_path / f".a.{outputs.STAGING}.{pid}.x2"
        (staging / "part").mkdir(parents=True)
        alive = tmp_path / f".a.{outputs.STAGING}.{os.getpid()}.x3"  # a run still going: left alone
        alive.mkdir()
        user = user_folder(tmp_path / ".a.mine")  # not ours by name
        notices = clean_leftovers(tmp_path / "a")
        assert (tmp_path / "a" / "variant_000.onnx").read_text() == "old" and not aside.exists()
        assert not staging.exists() and alive.is_dir() and (user / "thesis.tex").is_file()
        assert any("restored" in n for n in notices) and any(f"left by a killed run (pid {pid})" in n for n in notices)

    def test_the_cli_reports_a_cleaned_leftover_in_one_notice(self, tmp_path):
        pid = dead_pid()
        (tmp_path / f".a.{outputs.STAGING}.{pid}.x").mkdir()
        result = cli("compile", "--schedule", tmp_path / "none.json", "-o", tmp_path / "a")
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("note: removed ") and "left by a killed run" in lines[0], lines
        assert lines[1].startswith("error: cannot read schedule"), lines
        assert sorted(p.name for p in tmp_path.iterdir()) == []


class TestOutputsCheckedBeforeWork:
    """Each command refuses an -o it cannot write at once: nothing loaded, nothing computed."""

    @pytest.mark.parametrize("args, fragment", [
        (["prune", "--importance", "magnitude", "-o", "/proc/dgo-out"], "cannot write -o /proc/dgo-out: /proc is not"),
        (["finetune", "--train-steps", "1", "-o", "/proc/dgo-out"], "/proc is not writable"),
        (["optimize", "--iters", "1", "-o", "/proc/dgo-out"], "/proc is not writable"),
        (["sample", "-n", "1", "-o", "{dir}"], "is a folder; give a file path"),
        (["sample", "-n", "1", "-o", "{file}/grid.png"], "is not a folder"),
        (["schedule", "{tmp}/p", "--keep-macs", "0.5", "-o", "{dir}"], "-o {dir} is a folder"),
        (["compile", "--steps", "2", "--dump-dir", "{file}", "-o", "{tmp}/a"], "--dump-dir {file} is not a folder"),
        (["encode-prompts", "{tmp}/pipe", "--prompts", "{file}", "-o", "{dir}"], "-o {dir} is a folder"),
    ])
    def test_unwritable_output(self, tmp_path, args, fragment):
        (tmp_path / "d").mkdir()
        (tmp_path / "f").write_text("keep")
        names = {"dir": tmp_path / "d", "file": tmp_path / "f", "tmp": tmp_path}
        args = [a.format(**names) for a in args]
        assert_one_line_error(cli(*args), fragment.format(**names))
        assert (tmp_path / "f").read_text() == "keep" and list((tmp_path / "d").iterdir()) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]

    def test_prune_refuses_an_existing_output_before_pruning(self, tmp_path):
        output = user_folder(tmp_path / "pruned")
        before = tree(output)
        assert_one_line_error(cli("prune", "-o", output), f"{output} already exists; choose another -o")
        assert tree(output) == before

    def test_a_full_disk_while_saving_a_grid_is_one_line(self, tmp_path, monkeypatch):
        def full(path):
            raise OSError(28, "No space left on device")

        with pytest.raises(OutputError, match="could not write .*grid.png: No space left on device"):
            write_atomic(tmp_path / "grid.png", full)
        assert_nothing_left(tmp_path / "grid.png")


class TestPermissionsFollowTheUmask:
    def test_artifact_folder_and_files(self, artifact):
        umask = outputs.umask()
        assert artifact.stat().st_mode & 0o777 == 0o777 & ~umask
        for file in artifact.iterdir():
            assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file

    def test_atomically_written_files(self, tmp_path):
        path = write_atomic(tmp_path / "s.json", lambda p: p.write_text("{}"))
        assert path.stat().st_mode & 0o777 == 0o666 & ~outputs.umask()


def test_check_output_accepts_a_new_path_and_its_own_output(tmp_path, artifact):
    assert check_output(tmp_path / "new" / "a", "artifact") == tmp_path / "new" / "a"
    assert check_output(artifact, "artifact", overwrite=True) == artifact
    with pytest.raises(ArtifactError, match="already exists; pass `overwrite`"):
        check_output(artifact, "artifact", error=ArtifactError)


def test_output_refusals_name_fields_that_the_command_line_renders_as_options(tmp_path, artifact):
    """A Python or TOML caller reads `output`/`overwrite`; the command line reads -o/--overwrite."""
    from dgo_compile.cli.flags import render

    with pytest.raises(ArtifactError) as info:
        check_output(artifact, "artifact", error=ArtifactError)
    assert info.value.fields == ("overwrite", "output")
    assert render(info.value) == f"{artifact} already exists; pass --overwrite or choose another -o"
    with pytest.raises(outputs.OutputError) as info:
        check_output(tmp_path / "g.png", None, field="heatmap", protected=[tmp_path])
    inside = tmp_path / "g.png"
    assert render(info.value) == f"--heatmap {inside} is inside the input {tmp_path}; choose another --heatmap"
