"""Sizes are checked before anything is allocated: a `config.json` or `dgo_pruning.json` with absurd
numbers is refused in one line instead of allocating gigabytes or running for minutes.

Order: the file's size, then every integer and list in it (cheap), then the model built on the
`meta` device (no memory, milliseconds) for its parameter count and, for a pruning record,
each recorded size against the original module's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dgo_compile.core.errors import ModelLoadError

MAX_JSON_BYTES = 64 << 20
MAX_INT = 1 << 22  # no size in a diffusers config comes near 4 M (SDXL's largest is 2816)
MAX_LIST = 1 << 16
MAX_LAYERS = 512  # layers_per_block, num_layers, ...: each is a python loop building modules
LAYER_KEYS = ("layers_per_block", "num_layers", "transformer_layers_per_block", "reverse_transformer_layers_per_block")
MAX_PARAMS = 20_000_000_000
MAX_SAMPLE_ELEMENTS = 1 << 26  # channels x height x width of one sample


def check_json_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError:
        return  # reading it reports the problem
    if size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{path} is {size / 2**20:.0f} MB; a diffusers config or pruning record is a few KB: "
                             "the file is not one")


def check_numbers(data: Any, where: Path | str, path: str = "") -> None:
    """Every integer at most MAX_INT and every list at most MAX_LIST long, at any depth."""
    if isinstance(data, bool):
        return
    if isinstance(data, int) and data > MAX_INT:
        raise ModelLoadError(f"{where} sets {path or 'a value'} to {data}, far beyond any real model's sizes "
                             f"(at most {MAX_INT:,}); the file is corrupt")
    if isinstance(data, (list, tuple)):
        if len(data) > MAX_LIST:
            raise ModelLoadError(f"{where} has a list of {len(data):,} entries at {path or 'the top'}; the file is "
                                 "corrupt")
        for i, item in enumerate(data):
            check_numbers(item, where, f"{path}[{i}]")
    elif isinstance(data, dict):
        for key, item in data.items():
            check_numbers(item, where, f"{path}.{key}" if path else str(key))


def check_config(config: dict[str, Any], model_class: type, where: Path | str) -> torch.nn.Module | None:
    """Refuse a config whose model would be absurdly large; returns the model built on the meta device
    (None when the config does not build: constructing it for real then reports why)."""
    check_numbers(config, where)
    for key in LAYER_KEYS:
        values = config.get(key)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if isinstance(value, (list, tuple)):
                value = max((v for v in value if isinstance(v, int)), default=None)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_LAYERS:
                raise ModelLoadError(f"{where} sets {key} to {value}; at most {MAX_LAYERS} is accepted")
    try:
        with torch.device("meta"):
            model = model_class.from_config(config)
    except Exception:  # noqa: BLE001 - any config error is reported by the real construction
        return None
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        raise ModelLoadError(f"{where} describes a {model_class.__name__} of {params / 1e9:,.0f} B parameters; "
                             f"dgo-compile accepts at most {MAX_PARAMS / 1e9:.0f} B (is the config corrupt?)")
    size = config.get("sample_size") or 0
    sides = size if isinstance(size, (list, tuple)) else [size, size]
    elements = int(config.get("in_channels") or 1)
    for side in sides:
        elements *= int(side) if isinstance(side, int) else 1
    if elements > MAX_SAMPLE_ELEMENTS:
        raise ModelLoadError(f"{where} describes samples of {elements:,} values each; dgo-compile accepts at most "
                             f"{MAX_SAMPLE_ELEMENTS:,} (is the config corrupt?)")
    return model


def read_json_object(path: Path) -> dict[str, Any]:
    """A small JSON file holding an object (a config, a pruning record), size-checked before it is read."""
    check_json_file(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data
