"""Shared fixtures: tiny models built from config dicts, and the shipped trained model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from model_configs import TINY

# Under pytest-xdist every core has its own worker: one thread each (and in the commands tests start),
# so workers do not fight for cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))


def pytest_configure(config):
    """One compile cache (dgo_compile.core.cache) for the whole run: the tests trace and compile the same
    models many times (every schedule's `full` variant, fp32 beside fp16), and an export costs 4-25 s.
    Made by the first process (pytest-xdist's controller, before its workers start) and inherited by
    the workers and the commands they run; removed by that process at the end. A run with
    DGO_COMPILE_EXPORT_CACHE already set uses that folder and leaves it."""
    from dgo_compile.core.cache import ENV

    if ENV not in os.environ:
        os.environ[ENV] = config._dgo_export_cache = tempfile.mkdtemp(prefix="dgo-export-cache.")


def pytest_unconfigure(config):
    from dgo_compile.core.cache import ENV

    made = getattr(config, "_dgo_export_cache", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
        os.environ.pop(ENV, None)


@pytest.fixture(scope="session")
def config_dir(tmp_path_factory) -> Path:
    """A folder with one config.json per tiny family: `<name>/config.json`."""
    root = tmp_path_factory.mktemp("configs")
    for name, config in TINY.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def pytest_collection_modifyitems(config, items):
    """The longest test files are handed out first: pytest-xdist gives each worker whole files
    (`--dist loadfile`) in collection order, and a long file started last leaves the other core idle at
    the end. A file's length is its recorded total (tests/durations.json, written by tests/durations.py),
    else 30 s per `slow` test. Tests marked gpu run only where CUDA and onnxruntime's CUDA
    provider are both present; tests marked cuda need only a CUDA GPU torch can use."""
    slow_per_file: dict[str, int] = {}
    for item in items:
        slow_per_file[item.nodeid.split("::")[0]] = slow_per_file.get(item.nodeid.split("::")[0], 0) + \
            ("slow" in item.keywords)
    recorded = json.loads((Path(__file__).with_name("durations.json")).read_text())
    length = {file: recorded.get(file, 30 * slow) for file, slow in slow_per_file.items()}
    items.sort(key=lambda item: -length[item.nodeid.split("::")[0]])  # stable: file order kept within
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


# The reliability suite's shared models (tests/test_reliability*.py): built once per session.

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny UNet (random weights) with the shipped model's sampler: exports in seconds."""
    from dgo_compile import load, trace
    from model_configs import TINY_UNET2D

    config = tmp_path_factory.mktemp("tiny") / "config.json"
    config.write_text(json.dumps(TINY_UNET2D))
    return load(config), trace(load(config), verify=False), load().scheduler_config


@pytest.fixture(scope="session")
def artifact(tiny, tmp_path_factory):
    """What `dgo-compile compile --schedule full --steps 2 -o A` writes (for the tiny UNet: the errors under
    test come from the manifest and the files, not from the model). Tests copy it before changing it."""
    from dgo_compile.backend.artifact import compile_artifact
    from dgo_compile.frontend.loading import DEFAULT_MODEL
    from dgo_compile.schedules.schedule import builtin
    from dgo_compile.schedules.supernet import gateable_elements

    _, traced, scheduler_config = tiny
    plan = builtin("full", 2, gateable_elements(traced, "block"))
    return compile_artifact(traced, plan, scheduler_config, tmp_path_factory.mktemp("artifact") / "A",
                            model_source=str(DEFAULT_MODEL.resolve()), sampler_steps=2)
