"""The compile cache: a folder named by `DGO_COMPILE_EXPORT_CACHE`, off when it is unset.

torch.export and torch.onnx's export are most of the time of every command (seconds per tiny
graph, minutes at full size), and the same work comes back: every command traces the model, every
schedule's artifact holds its `full` variant. Two kinds of entry live here, each under a SHA-256 of
everything its work reads, so nothing is ever found by a name alone:

- `onnx/<key>/`: exported ONNX graphs (`dgo_compile.backend.export_cache`);
- `trace/<key>.json`: whether a traced model computes the same past its batch guard
  (`dgo_compile.frontend.tracing`), which costs a second torch.export to find out.

Entries are written to a temporary name and renamed into place, so concurrent commands (two shells,
pytest-xdist workers) can share the folder and never see half an entry. Damage (a truncated copy, a
disk error) is detected and the work redone; the folder must be one only you write to, like any
build cache: its entries become part of the artifacts you compile. Nothing is evicted: delete the
folder to clear it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

ENV = "DGO_COMPILE_EXPORT_CACHE"
log = logging.getLogger("dgo_compile.core.cache")


def cache_root() -> Path | None:
    """The cache folder, or None when caching is off."""
    root = os.environ.get(ENV)
    return Path(root) if root else None


def digest(*parts: object) -> str:
    """A SHA-256 of the parts' reprs: the key of work whose result depends on exactly these."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def read_verdict(kind: str, key: str) -> dict | None:
    """The small JSON record `kind/<key>.json`, or None (caching off, no entry, or a damaged one)."""
    root = cache_root()
    if root is None:
        return None
    path = root / kind / f"{key}.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("compile cache entry %s is damaged (%s); working it out again", path, exc)
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def write_verdict(kind: str, key: str, record: dict) -> None:
    """Record `kind/<key>.json`; a cache that cannot be written only costs the work next time."""
    root = cache_root()
    if root is None:
        return
    folder = root / kind
    temporary = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{key}.", dir=folder)
        with os.fdopen(handle, "w") as file:
            json.dump({**record, "key": key}, file)
        os.replace(temporary, folder / f"{key}.json")
    except OSError as exc:
        log.warning("compile cache %s cannot be written (%s); going on without it", root, exc)
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
