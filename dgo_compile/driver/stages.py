"""The intermediate models of `compile --config` (`<output>.work/`), reused only when they are what the
config asks for.

Each stage folder (`pruned/`, `finetuned/`, `pruner/`, and `original/`: the bench stage's baseline, the
original model's `full` artifact) holds `stage.json`: the stage's full resolved
settings and a digest of its inputs (the original model's files, or the previous stage's stamp). A
folder is reused only when its stamp matches exactly; otherwise it is rebuilt, with one notice saying
why. A rebuilt model is published atomically (`outputs.publish`), and a training stage's old folder is
first moved into a staging folder, which the next run removes if this one is killed, so no run ever
resumes from, or reports on, a model built with other settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from dgo_compile.core.files import file_digest
from dgo_compile.core.outputs import make_staging, staged

log = logging.getLogger("dgo_compile.driver.stages")
STAMP_FILE = "stage.json"
STAMP_FORMAT = "dgo-compile-stage"


def model_digest(path: str | Path) -> str:
    """What a stage's input model is: a previous stage's stamp when it has one, else its files."""
    stamp = read_stamp(path)
    if stamp is not None:
        return "stage:" + hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()
    return "files:" + file_digest(path)


def make_stamp(stage: str, settings: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    settings = asdict(settings) if hasattr(settings, "__dataclass_fields__") else dict(settings)
    # a JSON round trip, so a stamp compares equal to itself read back (tuples become lists)
    return json.loads(json.dumps({"format": STAMP_FORMAT, "stage": stage, "settings": settings, "inputs": inputs},
                                 sort_keys=True, default=str))


def read_stamp(folder: str | Path) -> dict[str, Any] | None:
    file = Path(folder) / STAMP_FILE
    try:
        data = json.loads(file.read_text()) if file.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == STAMP_FORMAT else None


def write_stamp(folder: str | Path, stamp: dict[str, Any]) -> None:
    from dgo_compile.core.files import write_atomic

    write_atomic(Path(folder) / STAMP_FILE, lambda tmp: Path(tmp).write_text(json.dumps(stamp, indent=1)))


def stale_reason(folder: str | Path, expected: dict[str, Any]) -> str | None:
    """None when `folder` holds what `expected` describes; else why not, in a few words."""
    folder = Path(folder)
    if not folder.exists():
        return "not built yet"
    stored = read_stamp(folder)
    if stored is None:
        return f"it has no {STAMP_FILE} saying how it was built"
    if stored == expected:
        return None
    table = f"[{expected['stage']}]"
    old, new = stored.get("settings", {}), expected["settings"]
    changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    if changed:
        return f"{table} settings changed: " + ", ".join(changed)
    old_inputs, new_inputs = stored.get("inputs", {}), expected["inputs"]
    changed_inputs = [k for k in sorted(set(old_inputs) | set(new_inputs)) if old_inputs.get(k) != new_inputs.get(k)]
    return f"its input changed ({', '.join(changed_inputs)})"


def discard(folder: Path, reason: str) -> None:
    """Remove a stale stage folder crash-safely: it is moved into a staging folder first (removed by the
    next run if this one dies), so the folder is never seen half-deleted."""
    log.warning(f"rebuilding {folder}: {reason}")
    trash = make_staging(folder)
    os.rename(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def pruned(original, config, folder: Path, traced=None):
    """The `[prune]` stage: `folder` holds `original` pruned with `config`, built now unless it already did.

    Returns the PrunedModel when it was built now (its model is what `folder` holds, its graph traced at
    `traced`'s size, so the caller need not trace it again), None when `folder` was reused. `traced`: the
    caller's trace of `original`, which pruning then need not redo."""
    from dgo_compile.channels.channel_pruning import calibration_images, prune
    from dgo_compile.frontend.loading import save_denoiser

    expected = make_stamp("prune", config, {"model": model_digest(original.source)})
    reason = stale_reason(folder, expected)
    if reason is None:
        return None
    if folder.exists():
        log.warning(f"rebuilding {folder}: {reason}")
    images = calibration_images(original) if config.importance == "taylor" else None
    result = prune(original, config, images, traced=traced)
    with staged(folder, "model", overwrite=True, fresh_path=True) as path:
        write_stamp(save_denoiser(original, result.model, path, result.pruning), expected)
    return result


def finetuned(model_path: str | Path, config, folder: Path, teacher: str | Path | None = None,
              on_step: Callable[[dict], None] | None = None) -> Path:
    """The `[finetune]` stage: a complete run with these settings on this input (and teacher, the unpruned
    model, for `distill` or `distill_only`) is reused, an interrupted one resumed, anything else rebuilt.
    `on_step` gets each step's history record (see `finetune`)."""
    from dgo_compile.channels.finetune import finetune, read_finetune

    inputs = {"model": model_digest(model_path), "teacher": model_digest(teacher) if teacher is not None else None}
    if getattr(config, "data", None) is not None:  # a run on other files is another run
        inputs["data"] = file_digest(config.data)
    expected = make_stamp("finetune", config, inputs)
    reason = stale_reason(folder, expected)
    if reason is None and read_finetune(folder).complete:
        return folder
    if reason is not None and folder.exists():
        discard(folder, reason)

    def stamp(entry) -> None:  # the stamp goes in with the run's first checkpoint, so a resume is checked too
        if folder.is_dir() and read_stamp(folder) != expected:
            write_stamp(folder, expected)
        if entry is not None and on_step is not None:
            on_step(entry)

    finetune(model_path, config, folder, teacher=teacher, resume=folder.exists(), on_step=stamp)
    stamp(None)
    return folder


def pruner_stamp(config, model_path: str | Path, latent: tuple[int, int]) -> dict[str, Any]:
    return make_stamp("optimize", config, {"model": model_digest(model_path), "latent_size": list(latent)})


def prepare_pruner(folder: Path, expected: dict[str, Any]) -> bool:
    """Whether the pruner in `folder` may be reused or resumed; a stale one is discarded first."""
    reason = stale_reason(folder, expected)
    if reason is not None and folder.exists():
        discard(folder, reason)
    return reason is None


def describe(folder: Path) -> dict[str, Any] | None:
    """The settings a stage folder was built with (for the report), from its stamp."""
    stamp = read_stamp(folder)
    return None if stamp is None else stamp["settings"]


def original_full(traced, scheduler_config: dict, settings: dict[str, Any], model: str | Path, folder: Path) -> Path:
    """The bench stage's baseline: the original model's `full` artifact, compiled with `settings` (scheduler,
    steps, precision, denoiser calls, latent size) into `folder/artifact`. Reused while `folder`'s stamp
    matches (the same model files and settings) and its files pass their checksums; rebuilt otherwise.
    Compiling it again on every rerun took minutes on SD-1.5."""
    from dgo_compile import __version__
    from dgo_compile.backend.artifact import compile_artifact, read_manifest
    from dgo_compile.core.errors import DgoError
    from dgo_compile.schedules.schedule import builtin
    from dgo_compile.schedules.supernet import gateable_elements

    artifact = folder / "artifact"
    expected = make_stamp("original_full", settings, {"model": model_digest(model), "dgo_compile": __version__})
    reason = stale_reason(folder, expected)
    if reason is None:
        try:
            read_manifest(artifact, checksums=True)
            return artifact
        except DgoError as exc:
            reason = f"its artifact does not check: {exc}"
    if folder.exists():
        discard(folder, reason)
    folder.mkdir(parents=True)
    compile_artifact(traced, builtin("full", settings["calls"], gateable_elements(traced)), scheduler_config,
                     artifact, scheduler=settings["scheduler"], sampler_steps=settings["steps"],
                     precision=settings["precision"])
    write_stamp(folder, expected)  # last: a run killed before this leaves a folder without a stamp, rebuilt
    return artifact
