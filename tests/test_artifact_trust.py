"""An artifact from elsewhere is untrusted input: hostile names, links, edits and graphs are refused in one line."""

import json
import os
import shutil

import onnx
import pytest

from dgo_compile import load, trace
from dgo_compile.backend.artifact import ArtifactError, compile_artifact, read_manifest
from dgo_compile.backend.artifact_files import file_record
from dgo_compile.backend.ort_runner import OrtArtifact
from dgo_compile.schedules.schedule import builtin_for

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}


@pytest.fixture(scope="module")
def artifact(config_dir, tmp_path_factory):
    traced = trace(load(config_dir / "unet2d" / "config.json"), verify=False)
    schedule = builtin_for("deepcache:2", 4, traced)
    return compile_artifact(traced, schedule, SCHEDULER, tmp_path_factory.mktemp("trust") / "artifact")


@pytest.fixture
def copy(artifact, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact, target)
    return target


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _rerecord(folder, name):
    """Update a file's size and checksum in the manifest, as an attacker who edits both would."""
    _edit_manifest(folder, lambda m: m["files"].__setitem__(name, file_record(folder / name)))


def test_the_untouched_artifact_opens(artifact):
    assert len(OrtArtifact.open(artifact, ["CPUExecutionProvider"]).sessions) == 2


@pytest.mark.parametrize("name", ["../variant_000.onnx", "/etc/hostname", "sub/variant_000.onnx", ".hidden.onnx", ""])
def test_file_names_outside_the_folder_are_refused(copy, name):
    _edit_manifest(copy, lambda m: m["variants"][0].__setitem__("file", name))
    with pytest.raises(ArtifactError, match="an artifact names only plain files in its own folder"):
        read_manifest(copy)


def test_a_symlinked_file_is_refused(copy):
    target = copy.parent / "elsewhere.onnx"
    shutil.move(copy / "variant_001.onnx", target)
    os.symlink(target, copy / "variant_001.onnx")
    with pytest.raises(ArtifactError, match="variant_001.onnx is a symbolic link"):
        read_manifest(copy)


def test_a_truncated_weights_file_is_refused(copy):
    with open(copy / "weights.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ArtifactError, match="weights.bin has 100 bytes, the manifest says"):
        read_manifest(copy)


def test_a_changed_byte_is_caught_by_the_checksum_before_loading(copy):
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(300)
        byte = f.read(1)
        f.seek(300)
        f.write(bytes([byte[0] ^ 0xFF]))
    read_manifest(copy)  # sizes only: cheap checks pass
    with pytest.raises(ArtifactError, match="weights.bin does not match its SHA-256 in the manifest"):
        OrtArtifact.open(copy, ["CPUExecutionProvider"])


def test_external_data_pointing_outside_the_weights_file_is_refused(copy):
    (copy.parent / "secret.bin").write_bytes(b"\0" * 4096)
    graph = onnx.load(str(copy / "variant_000.onnx"), load_external_data=False)
    initializers = graph.graph.initializer
    tensor = next(t for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = "../secret.bin"
    onnx.save(graph, str(copy / "variant_000.onnx"))
    _rerecord(copy, "variant_000.onnx")
    with pytest.raises(ArtifactError, match=f"tensor {tensor.name} points outside weights.bin"):
        OrtArtifact.open(copy, ["CPUExecutionProvider"])


def test_a_graph_that_is_not_onnx_is_refused(copy):
    (copy / "variant_001.onnx").write_bytes(b"not a protobuf \xff\xfe")
    _rerecord(copy, "variant_001.onnx")
    with pytest.raises(ArtifactError, match="variant_001.onnx is not a readable ONNX graph"):
        OrtArtifact.open(copy, ["CPUExecutionProvider"])


def test_the_previous_format_is_refused_in_one_line(copy):
    _edit_manifest(copy, lambda m: m.__setitem__("format_version", 2))
    with pytest.raises(ArtifactError, match="has format dgo-compile-artifact v2; this dgo-compile reads "
                                            "dgo-compile-artifact v3: recompile the model"):
        read_manifest(copy)
