"""Shared fixtures: tiny models built from config dicts, and the shipped trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_configs import TINY

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def config_dir(tmp_path_factory) -> Path:
    """A folder with one config.json per tiny family: `<name>/config.json`."""
    root = tmp_path_factory.mktemp("configs")
    for name, config in TINY.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where CUDA and onnxruntime's CUDA provider are both present; tests
    marked cuda need only a CUDA GPU torch can use."""
    try:
        import onnxruntime

        has_ort_gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_ort_gpu = False
    for marker, present, reason in (("gpu", has_ort_gpu, "needs a CUDA GPU with onnxruntime-gpu"),
                                    ("cuda", torch.cuda.is_available(), "needs a CUDA GPU")):
        if present:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
