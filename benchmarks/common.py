"""What the benchmark scripts share, so that no script imports another.

Every script runs as `python benchmarks/<name>.py`, which puts this folder first on sys.path, and
imports this module as `common`. Imports of torch and dgo_compile stay inside the functions that
need them: `full_size.py` keeps its parent process free of torch (its children are what it measures).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dgo_compile.channels.finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{(time.perf_counter() - STARTED) / 60:5.1f} min] {message}", flush=True)


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text[:240]}"


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def full_size_rows(script: str, models: dict[str, dict], names: list[str], child_args: list[str]):
    """Each named model's config.json, written to a temporary folder, measured by `script --child CONFIG
    *child_args` in a fresh process (so that its peak RSS is its own): yields (name, the JSON row its last
    stdout line holds)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            config_file = Path(folder) / name / "config.json"
            config_file.parent.mkdir()
            config_file.write_text(json.dumps(models[name]))
            done = subprocess.run([sys.executable, script, "--child", str(config_file), *child_args],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            log(f"{name}: {row}")
            yield name, row


def full_size_arguments(description: str, models: dict) -> argparse.ArgumentParser:
    """The options every full-size benchmark takes: --models, --threads, --beside, and the hidden --child."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=list(models), choices=list(models))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--beside", default="", help="what else ran on the machine meanwhile, for the report")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser


def model_configs() -> ModuleType:
    """tests/model_configs.py: the published model configs live beside the tests that check them."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module("model_configs")


def cli(args: list, processes: int = 1) -> float:
    """Run a dgo-compile command (under torchrun with `processes` > 1); its wall seconds."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // processes))}
    started = time.perf_counter()
    log("dgo-compile " + " ".join(map(str, args)) + (f" (torchrun, {processes} processes)" if processes > 1 else ""))
    subprocess.run([sys.executable, *launcher, "-m", "dgo_compile.cli", *map(str, args)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_finetune(model_folder: str, budget: FinetuneConfig, output: Path, processes: int):
    """`dgo-compile finetune` as a user runs it (under torchrun with `processes` > 1); its record."""
    from dgo_compile.channels.finetune import read_finetune

    if output.is_dir() and read_finetune(output).complete:
        return read_finetune(output)
    cli(["finetune", model_folder, "--train-steps", budget.train_steps, "--batch", budget.batch, "-o", output]
        + (["--resume"] if output.is_dir() else []), processes)
    return read_finetune(output)


def quality(images, full, classifier, real_features) -> dict:
    """PSNR / SSIM against the unpruned model's images from the same noise, Frechet distance against real digits."""
    from dgo_compile.core.metrics import classifier_features, frechet_distance, psnr, ssim

    return {"psnr": float(psnr(images, full).clamp(max=100).mean()), "ssim": float(ssim(images, full).mean()),
            "fd": frechet_distance(classifier_features(images, classifier), real_features)}


def digit_conditions(n: int, guidance_scale: float, null_class: int) -> dict:
    """`sample` keywords for n images of the class-conditional model, image i asked to be digit i mod 10:
    classifier-free guidance through the null class, or the conditional model alone at scale 1."""
    import torch

    from dgo_compile.backend.sampling import Guidance

    labels = {"class_labels": torch.arange(n) % 10}
    if guidance_scale == 1.0:
        return {"conditions": labels}
    return {"guidance": Guidance(guidance_scale, labels, {"class_labels": torch.tensor([null_class])})}


def cost_of(model):
    """Params and MACs per call at batch 1 (our cost model on a re-trace)."""
    from dgo_compile import trace
    from dgo_compile.schedules.cost import cost_report

    return cost_report(trace(model, verify=False)).total


def sample_images(model, scheduler_config: dict, noise, steps: int, file: Path | None = None, schedule: str = "full"):
    """DDIM images of `model` (folded for `schedule`) from `noise`; kept in `file` and read back when it exists."""
    import torch

    from dgo_compile import trace
    from dgo_compile.backend.folding import fold
    from dgo_compile.backend.sampling import denoiser_timesteps, sample_ddim
    from dgo_compile.schedules.schedule import builtin_for

    if file is not None and file.is_file():
        return torch.load(file)
    traced = trace(model)
    plan = builtin_for(schedule, steps, traced)
    images = sample_ddim(fold(traced, plan, denoiser_timesteps(scheduler_config, steps)), scheduler_config,
                         noise, steps, 50)
    if file is not None:
        torch.save(images, file)
    return images
