"""The compiled artifact: one ONNX file per distinct step pattern plus a manifest saying how to run them.

    artifact/
      manifest.json      format version, model, precision, scheduler config and step count, the
                         schedule, per-step MACs, and for each step which variant runs and its cache wiring
      variant_000.onnx   one graph per distinct step pattern, weights not included
      weights.bin        every weight any variant uses, once (ONNX external data; see onnx_weights)
      timestep_constants.safetensors

Written into a temporary folder beside the target and renamed into place, so a failed compile
never leaves a half-written artifact. `dgo_compile.backend.manifest` describes the manifest,
`dgo_compile.backend.ort_runner` runs an artifact on onnxruntime.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file

from dgo_compile import __version__
from dgo_compile.backend.artifact_files import ArtifactError, check_files, file_record
from dgo_compile.backend.export import ExportError, export_onnx
from dgo_compile.backend.folding import FoldedSchedule, fold
from dgo_compile.backend.manifest import (
    InputSpec,
    Macs,
    Manifest,
    ModelInfo,
    Resolution,
    SamplerInfo,
    Variant,
    WeightsInfo,
)
from dgo_compile.backend.onnx_weights import WEIGHTS_FILE, SharedWeightsWriter
from dgo_compile.backend.precision import KEEP_FLOAT_INPUTS, check_precision, to_fp16
from dgo_compile.backend.sampling import SCHEDULERS, denoiser_timesteps
from dgo_compile.core.outputs import check_output, make_staging, staged, write_error
from dgo_compile.frontend.resolution import artifact_resolution
from dgo_compile.frontend.tracing import TracedDenoiser
from dgo_compile.passes import cost_of, variant_signature
from dgo_compile.schedules.cost import cost_report
from dgo_compile.schedules.schedule import Schedule

MANIFEST = "manifest.json"
CONSTANTS_FILE = "timestep_constants.safetensors"


def compile_artifact(traced: TracedDenoiser, schedule: Schedule, scheduler_config: dict, output: str | Path,
                     overwrite: bool = False, model_source: str | None = None, *, scheduler: str | None = None,
                     sampler_steps: int | None = None, guidance_scale: float | None = None,
                     dump_dir: str | Path | None = None, precision: str = "fp32",
                     on_variant: Callable[[int, int], None] | None = None) -> Path:
    """Fold `schedule`, export each variant to ONNX and write the artifact folder at `output`.

    The schedule has one row per denoiser call of `scheduler` at `sampler_steps` (default: as
    many steps as the schedule has rows); each call's timestep is folded into constants. Every
    variant references one shared `weights.bin`; `precision` "fp16" halves weights, caches and
    constants (see dgo_compile.backend.precision for what stays float32). `on_variant(done, total)` is
    called once the variants are known (done 0) and after each variant is exported.
    """
    output = check_output(output, "artifact", overwrite=overwrite, error=ArtifactError)
    check_precision(precision)
    sampler_steps = sampler_steps or schedule.calls
    timesteps = denoiser_timesteps(scheduler_config, sampler_steps, scheduler)
    folded = fold(traced, schedule, timesteps, dump_dir)
    sampler = SamplerInfo(_scheduler_name(scheduler_config, scheduler), sampler_steps, len(timesteps),
                          tuple(folded.timesteps), dict(scheduler_config))
    try:
        with staged(output, "artifact", overwrite=overwrite) as staging:
            _write_artifact(traced, folded, staging, sampler, guidance_scale, precision, model_source, on_variant)
    except BaseException as exc:
        cause = exc.__cause__ if isinstance(exc, ExportError) else exc  # export_onnx wraps its write errors
        if isinstance(cause, OSError):
            raise write_error(output, cause, ArtifactError, "the artifact ", ", then compile again") from exc
        raise
    return output


def _write_artifact(traced: TracedDenoiser, folded: FoldedSchedule, staging: Path, sampler: SamplerInfo,
                    guidance_scale: float | None, precision: str, model_source: str | None,
                    on_variant: Callable[[int, int], None] | None) -> None:
    """Fill the staging folder: one ONNX graph per variant, the shared weights, constants, manifest."""
    full_macs = cost_report(traced, batch=1).total.macs
    # Exact per-variant MACs: what is left in each folded graph (the stem of a fully reused step is gone too).
    variant_macs = {key: sum(cost_of(n).macs for n in gm.graph.nodes if n.op == "call_function")
                    for key, gm in folded.variants.items()}
    step_macs = [variant_macs[key] for key in folded.step_variant]
    example = traced.example_inputs(batch=2)
    upcast_attention = bool(getattr(traced.model.config, "upcast_attention", False))
    weights = SharedWeightsWriter(staging)
    variants = []
    order = list(dict.fromkeys(folded.step_variant))
    if on_variant is not None:
        on_variant(0, len(order))
    for index, key in enumerate(order):
        graph_module = folded.variants[key]
        signature = variant_signature(graph_module)
        first_call = folded.step_variant.index(key)
        constants = folded.constants[first_call]
        feeds = {name: example[name] for name in signature.inputs}
        feeds.update({name: constants[name].expand(2, *constants[name].shape[1:])
                      for name in signature.constant_inputs})
        feeds.update({name: torch.zeros((2, *folded.cache_shapes[name])) for name in signature.cache_inputs})
        file = f"variant_{index:03d}.onnx"
        _export_variant(graph_module, feeds, ("prediction", *signature.cache_outputs), staging, file, weights,
                        precision, upcast_attention, traced.max_batch)
        variants.append(Variant(file, tuple(sorted(key[0])), tuple(signature.inputs),
                                tuple(signature.constant_inputs), tuple(signature.cache_inputs),
                                tuple(signature.cache_outputs)))
        if on_variant is not None:
            on_variant(index + 1, len(order))
    weights_bytes = weights.close()
    for variant in variants:
        onnx.checker.check_model(str(staging / variant.file))  # by path: resolves weights.bin
    constant_dtype = np.float16 if precision == "fp16" else np.float32
    if any(folded.constants):
        save_file({f"{call}/{name}": value.contiguous().numpy().astype(constant_dtype)
                   for call, values in enumerate(folded.constants) for name, value in values.items()},
                  str(staging / CONSTANTS_FILE))
    float_dtype = "float16" if precision == "fp16" else "float32"
    manifest = Manifest(
        dgo_compile=__version__,
        model=ModelInfo(type(traced.model).__name__, traced.family.name, model_source,
                        traced.family.null_class_label(traced.model)),
        precision=precision, max_batch=traced.max_batch,
        inputs=tuple(InputSpec(k, ("batch", *v.shape[1:]), float_dtype if v.is_floating_point()
                               and k not in KEEP_FLOAT_INPUTS else str(v.dtype).removeprefix("torch."))
                     for k, v in example.items()),
        resolution=Resolution(**artifact_resolution(tuple(example["sample"].shape[-2:]), model_source)),
        scheduler=sampler,
        guidance_scale=guidance_scale, schedule=folded.schedule.to_json(),
        macs=Macs(tuple(step_macs), sum(step_macs), full_macs * sampler.calls),
        constants_file=CONSTANTS_FILE if any(folded.constants) else None,
        weights=WeightsInfo(WEIGHTS_FILE, weights_bytes, weights.bytes_referenced),
        variants=tuple(variants), call_variants=tuple(order.index(key) for key in folded.step_variant),
        files={p.name: file_record(p) for p in sorted(staging.iterdir())})
    (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1, default=str, allow_nan=False))


def _export_variant(graph_module, feeds: dict[str, torch.Tensor], output_names: tuple[str, ...], staging: Path,
                    file: str, weights: SharedWeightsWriter, precision: str, upcast_attention: bool,
                    max_batch: int | None) -> None:
    """Export one variant to a scratch folder, convert its precision, move its weights into the shared
    file and write the graph alone as `staging/file`. Memory: one graph proto and one tensor at a time."""
    scratch = make_staging(staging / file)
    try:
        export_onnx(graph_module, feeds, scratch / file, output_names, external_data_bytes=0, max_batch=max_batch)
        model = onnx.load(str(scratch / file), load_external_data=False)
        source_types = {t.name: t.data_type for t in model.graph.initializer}
        if precision == "fp16":
            model = to_fp16(model, upcast_attention)
        weights.add(model, scratch, source_types)
        onnx.save(model, str(staging / file))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scheduler_name(scheduler_config: dict, name: str | None) -> str:
    """The sampler an artifact is folded for: the one asked for, else the pipeline's own."""
    if name is not None:
        return name
    own = scheduler_config.get("_class_name")
    return next((key for key, cls in SCHEDULERS.items() if cls.__name__ == own), "ddim")


def read_manifest(path: str | Path, *, checksums: bool = False) -> Manifest:
    """The checked manifest of the artifact at `path`: every field, file names and sizes (and, with
    `checksums`, the SHA-256 of every file: `OrtArtifact.open` does so before loading anything)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} is not a dgo-compile artifact (no {MANIFEST})")
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        raise ArtifactError(f"{path / MANIFEST} is not valid JSON: {exc}") from exc
    manifest = Manifest.from_json(data, str(path / MANIFEST))
    check_files(path, manifest.file_names(), manifest.files, checksums=checksums)
    return manifest
