"""The artifact's manifest: one typed description of what an artifact was compiled for and how to run it.

Written by `compile_artifact`, read (and checked field by field) by `read_manifest`, and used by
the onnxruntime runner, `bench`, `sample`, the report and `attach`. `manifest.json` is its JSON
form; `FORMAT_VERSION` changes whenever a field does, and other versions are refused in one line.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from dgo_compile.backend.artifact_files import ArtifactError

FORMAT = "dgo-compile-artifact"
FORMAT_VERSION = 3
GUIDANCE_BATCH = "uncond, cond"  # row order of a guided batch


@dataclass(frozen=True)
class ModelInfo:
    class_name: str  # the diffusers class compiled
    family: str
    source: str | None  # the model folder it was compiled from
    null_class_label: int | None  # the "no class" label for guidance, where the model has one


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | str, ...]  # "batch" first
    dtype: str  # numpy name: float32, float16, int64


@dataclass(frozen=True)
class SamplerInfo:
    name: str  # dgo-compile's name for the scheduler ("ddim", "heun", ...)
    steps: int  # sampler steps
    calls: int  # denoiser calls per run (Heun and PNDM make more calls than steps)
    timesteps: tuple[float, ...]  # each call's timestep
    config: dict[str, Any]  # the diffusers scheduler config


@dataclass(frozen=True)
class Resolution:
    height: int
    width: int
    unit: str  # "pixels" (a pipeline with a VAE) or "latent"


@dataclass(frozen=True)
class Macs:
    per_call: tuple[int, ...]
    total: int  # per run
    full_total: int  # the unscheduled model's, per run


@dataclass(frozen=True)
class WeightsInfo:
    file: str
    bytes: int  # on disk, every distinct tensor once
    referenced_bytes: int  # what the variants use, counted per variant


@dataclass(frozen=True)
class Variant:
    file: str
    reused: tuple[str, ...]  # elements this graph reuses from the cache
    inputs: tuple[str, ...]  # the sampler's inputs it takes
    constant_inputs: tuple[str, ...]  # folded timestep values, fed per call
    cache_inputs: tuple[str, ...]
    cache_outputs: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    dgo_compile: str  # the version that wrote it
    model: ModelInfo
    precision: str
    max_batch: int | None  # None: any batch
    inputs: tuple[InputSpec, ...]
    resolution: Resolution | None
    scheduler: SamplerInfo
    guidance_scale: float | None  # the scale `sample` applies and a learned schedule was calibrated at
    schedule: dict[str, Any]  # the closed schedule, Schedule.to_json()
    macs: Macs
    constants_file: str | None
    weights: WeightsInfo
    variants: tuple[Variant, ...]
    call_variants: tuple[int, ...]  # per denoiser call, the index of the variant that runs
    files: dict[str, dict[str, Any]]  # file name -> {"bytes", "sha256"}

    @property
    def input(self) -> dict[str, InputSpec]:
        return {i.name: i for i in self.inputs}

    @property
    def latent_size(self) -> tuple[int, int]:
        shape = self.input["sample"].shape
        return int(shape[-2]), int(shape[-1])

    def file_names(self) -> list[str]:
        names = [v.file for v in self.variants] + [self.weights.file]
        return names + ([self.constants_file] if self.constants_file else [])

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"]["class"] = data["model"].pop("class_name")
        guidance = data.pop("guidance_scale")
        data["guidance"] = None if guidance is None else {"scale": guidance, "batch": GUIDANCE_BATCH}
        return json.loads(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **data}))  # lists, not tuples

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """Check every field the runtime relies on; ArtifactError naming the first problem."""
        if not isinstance(data, dict):
            raise ArtifactError(f"{where} must hold a JSON object; recompile the model")
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{where.rsplit('/', 1)[0]} has format {data.get('format')} "
                                f"v{data.get('format_version')}; this dgo-compile reads {FORMAT} v{FORMAT_VERSION}: "
                                "recompile the model")
        try:
            return _parse(data)
        except _Malformed as exc:
            raise ArtifactError(f"{where} is malformed ({exc}); recompile the model") from None


class _Malformed(Exception):
    pass


def _get(data: dict, key: str, kind, what: str, optional: bool = False):
    if key not in data:
        raise _Malformed(f"'{key}' is missing")
    value = data[key]
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        raise _Malformed(f"'{key}' must be {what}")
    return value


def _strings(data: dict, key: str) -> tuple[str, ...]:
    value = _get(data, key, list, "a list of strings")
    if not all(isinstance(v, str) for v in value):
        raise _Malformed(f"'{key}' must be a list of strings")
    return tuple(value)


def _parse(data: dict) -> Manifest:
    model = _get(data, "model", dict, "an object")
    inputs = _get(data, "inputs", list, "a list of inputs")
    if not inputs or not all(isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("dtype"), str)
                             and isinstance(i.get("shape"), list) for i in inputs):
        raise _Malformed("'inputs' must list objects with name, shape and dtype")
    if "sample" not in [i["name"] for i in inputs]:
        raise _Malformed("'inputs' has no 'sample'")
    sampler = _get(data, "scheduler", dict, "an object")
    if not (isinstance(sampler.get("name"), str) and isinstance(sampler.get("steps"), int)
            and not isinstance(sampler.get("steps"), bool) and isinstance(sampler.get("config"), dict)
            and isinstance(sampler.get("timesteps"), list)
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in sampler["timesteps"])):
        raise _Malformed("'scheduler' must hold name, steps, timesteps and config")
    guidance = _get(data, "guidance", dict, "an object or null", optional=True)
    scale = None if guidance is None else _get(guidance, "scale", (int, float), "a finite number")
    schedule = _get(data, "schedule", dict, "an object")
    macs = _get(data, "macs", dict, "an object")
    constants_file = _get(data, "constants_file", str, "a file name or null", optional=True)
    weights = _get(data, "weights", dict, "an object naming the weights file")
    variants = _get(data, "variants", list, "a non-empty list")
    if not variants or not all(isinstance(v, dict) and isinstance(v.get("file"), str) for v in variants):
        raise _Malformed("'variants' must be a non-empty list of objects with a file")
    try:
        parsed_variants = tuple(Variant(v["file"], *(_strings(v, k) for k in (
            "reused", "inputs", "constant_inputs", "cache_inputs", "cache_outputs"))) for v in variants)
    except _Malformed:
        raise _Malformed("each variant needs a file and lists of reused, inputs, constant_inputs, cache_inputs and "
                         "cache_outputs") from None
    calls = _get(data, "call_variants", list, "a list")
    if not calls or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(variants) for c in calls):
        raise _Malformed("'call_variants' must list a variant index for each denoiser call")
    if len(sampler["timesteps"]) != len(calls):
        raise _Malformed(f"{len(sampler['timesteps'])} timesteps for {len(calls)} calls")
    if sampler.get("calls", len(calls)) != len(calls) or isinstance(sampler.get("calls"), bool):
        raise _Malformed(f"'scheduler' says {sampler['calls']!r} calls; 'call_variants' lists {len(calls)}")
    resolution = _get(data, "resolution", dict, "an object or null", optional=True)
    max_batch = _get(data, "max_batch", int, "an integer or null", optional=True)
    return Manifest(
        dgo_compile=str(data.get("dgo_compile")),
        model=ModelInfo(str(model.get("class")), str(model.get("family")), model.get("source"),
                        model.get("null_class_label")),
        precision=_get(data, "precision", str, "fp32 or fp16"),
        max_batch=max_batch,
        inputs=tuple(InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in inputs),
        resolution=None if resolution is None else Resolution(
            _get(resolution, "height", int, "an integer"), _get(resolution, "width", int, "an integer"),
            _get(resolution, "unit", str, "pixels or latent")),
        scheduler=SamplerInfo(sampler["name"], sampler["steps"], len(calls),
                              tuple(float(t) for t in sampler["timesteps"]), sampler["config"]),
        guidance_scale=None if scale is None else float(scale),
        schedule=schedule,
        macs=Macs(tuple(_get(macs, "per_call", list, "a list")), _get(macs, "total", int, "an integer"),
                  _get(macs, "full_total", int, "an integer")),
        constants_file=constants_file,
        weights=WeightsInfo(_get(weights, "file", str, "a file name"), _get(weights, "bytes", int, "an integer"),
                            _get(weights, "referenced_bytes", int, "an integer")),
        variants=parsed_variants,
        call_variants=tuple(calls),
        files=_get(data, "files", dict, "an object of file records"),
    )
