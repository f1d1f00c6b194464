"""The files of an artifact, trusted only after checking: an artifact may come from anywhere.

A manifest names its files; each name must be a plain file name (no folders, no `..`, not hidden),
each file a regular file inside the artifact folder (not a symlink), of the size and SHA-256 the
manifest records. Every ONNX graph's external data must point into the artifact's own weights
file, within its bounds, before onnxruntime opens anything.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from dgo_compile.core.errors import DgoError

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CHUNK = 1 << 24


class ArtifactError(DgoError):
    """An artifact folder is missing, incomplete, tampered with, or from another format version."""


def plain_file(folder: Path, name: object) -> Path:
    """`folder/name` when `name` is a plain file name of a regular file inside `folder`; else ArtifactError."""
    if not isinstance(name, str) or not _PLAIN.fullmatch(name) or ".." in name:
        raise ArtifactError(f"{folder} names a file {name!r}; an artifact names only plain files in its own folder: "
                            "recompile the model")
    path = folder / name
    if path.is_symlink():
        raise ArtifactError(f"{path} is a symbolic link; an artifact holds its own files: recompile the model")
    if not path.is_file():
        raise ArtifactError(f"{folder} is incomplete: {name} is missing; recompile the model")
    return path


def file_record(path: Path) -> dict:
    """Size and SHA-256 of a file, as the manifest records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_files(folder: Path, names: list[str], records: object, *, checksums: bool = True) -> None:
    """Every file named is plain, present and (with `checksums`) the one the manifest recorded."""
    if not isinstance(records, dict):
        raise ArtifactError(f"{folder}/manifest.json has no 'files' record; recompile the model")
    for name in names:
        path = plain_file(folder, name)
        record = records.get(name)
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int) and isinstance(record.get("sha256"),
                                                                                                 str)):
            raise ArtifactError(f"{folder}/manifest.json records no size and checksum for {name}; recompile the model")
        if path.stat().st_size != record["bytes"]:
            raise ArtifactError(f"{path} has {path.stat().st_size} bytes, the manifest says {record['bytes']}: "
                                "the artifact is truncated or changed; recompile or copy it again")
        if checksums and file_record(path)["sha256"] != record["sha256"]:
            raise ArtifactError(f"{path} does not match its SHA-256 in the manifest: the artifact is corrupt or "
                                "changed; recompile or copy it again")


def load_graph(path: Path, weights_file: str, weights_bytes: int) -> "onnx.ModelProto":  # noqa: F821
    """A variant's graph without its weights, after checking every external reference stays in the
    artifact's weights file and inside its size."""
    import onnx  # here, so that ArtifactError stays importable without onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others for a file that is not ONNX
        raise ArtifactError(f"{path} is not a readable ONNX graph; recompile the model") from exc
    tensors = list(model.graph.initializer)
    tensors += [a.t for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", -1))
            bad = info.get("location") != weights_file or int(info.get("offset", 0)) < 0 or not 0 < end <= weights_bytes
        except ValueError:
            bad = True
        if bad:
            raise ArtifactError(f"{path.name}: tensor {tensor.name} points outside {weights_file} "
                                f"({info.get('location')!r}); recompile the model")
    return model
