"""Exported ONNX graphs in the compile cache (`dgo_compile.core.cache`): `onnx/<key>/` per graph.

The key is a SHA-256 of everything the export reads: the versions of dgo-compile, torch, onnx and
onnxscript; the graph's code; every weight and constant it uses (name, dtype, shape, bytes); the
example inputs' names, shapes and dtypes; and the export's options and file name. An entry holds
the exported files and `entry.json` (their sizes and SHA-256s); it is used only when every file
matches its record and its graphs keep weights only in the entry's own files, else it is removed
and the graph exported afresh.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx
import onnxscript
import torch
from torch import fx

from dgo_compile import __version__
from dgo_compile.backend.artifact_files import file_record
from dgo_compile.core.cache import cache_root

ENTRY = "entry.json"
log = logging.getLogger("dgo_compile.backend.export_cache")


class ExportCache:
    """Graphs under `root`; `ExportCache.from_env()` is the compile cache's, the one the exporter uses."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def from_env(cls) -> ExportCache | None:
        root = cache_root()
        return cls(root / "onnx") if root else None

    def fetch(self, key: str, folder: Path) -> list[Path] | None:
        """Copy entry `key`'s files into `folder` and return them; None when there is no valid entry."""
        entry = self.root / key
        try:
            record = json.loads((entry / ENTRY).read_text())
            files = record["files"]
            if not isinstance(files, dict) or not files or any(
                    not isinstance(name, str) or Path(name).name != name or name == ENTRY for name in files):
                raise ValueError("bad file list")
            for name, expected in files.items():
                if (entry / name).is_symlink() or file_record(entry / name) != expected:
                    raise ValueError(f"{name} does not match its record")
            for name in files:
                if name.endswith(".onnx") and not _external_data(entry / name) <= set(files):
                    raise ValueError(f"{name} names weights outside the entry")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("export cache entry %s is damaged (%s); exporting afresh", entry, exc)
            _remove(entry)
            return None
        copied = []
        for name in sorted(files):
            shutil.copyfile(entry / name, folder / name)
            copied.append(folder / name)
        return copied

    def store(self, key: str, files: Iterable[Path]) -> None:
        """Add entry `key` holding `files`; a failure to write it (a full disk) only costs the next export."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        except OSError as exc:
            log.warning("export cache %s cannot be written (%s); going on without it", self.root, exc)
            return
        try:
            records = {}
            for file in files:
                shutil.copyfile(file, staging / file.name)
                records[file.name] = file_record(staging / file.name)
            (staging / ENTRY).write_text(json.dumps({"files": records}))
            os.rename(staging, self.root / key)  # fails when another process stored the same key first
        except OSError as exc:
            if not (self.root / key).is_dir():
                log.warning("export cache entry %s could not be written (%s)", self.root / key, exc)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def export_key(graph_module: fx.GraphModule, inputs: dict[str, torch.Tensor], options: dict) -> str:
    """The SHA-256 naming what exporting `graph_module` on `inputs` with `options` writes."""
    digest = hashlib.sha256()

    def add(*parts: object) -> None:
        digest.update(repr(parts).encode())

    add(__version__, torch.__version__, onnx.__version__, onnxscript.__version__, sorted(options.items()))
    add(graph_module.code)
    add([(name, tuple(value.shape), str(value.dtype)) for name, value in inputs.items()])
    tensors = dict(graph_module.state_dict(keep_vars=False))
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            tensors[node.target] = functools.reduce(getattr, node.target.split("."), graph_module)
        elif node.op == "call_module":
            add(node.target, repr(graph_module.get_submodule(node.target)))
    for name in sorted(tensors):
        value = tensors[name]
        if isinstance(value, torch.Tensor):
            value = value.detach()
            add(name, str(value.dtype), tuple(value.shape), value.layout)
            if value.numel():
                digest.update(value.contiguous().reshape(-1).view(torch.uint8).cpu().numpy())
        else:
            add(name, repr(value))
    return digest.hexdigest()


def _external_data(path: Path) -> set[str]:
    """The file names `path`'s initializers keep their data in."""
    model = onnx.load(str(path), load_external_data=False)
    return {entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def _remove(entry: Path) -> None:
    """Move a damaged entry aside first, so a concurrent reader never sees it half removed."""
    aside = entry.with_name(f".{entry.name}.removed.{os.getpid()}")
    try:
        os.rename(entry, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)
