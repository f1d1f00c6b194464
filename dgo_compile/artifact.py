"""The compiled artifact: one ONNX file per distinct step pattern plus a manifest saying how to run them.

    artifact/
      manifest.json      format version, model, scheduler config and step count, the schedule,
                         per-step MACs, and for each step which variant runs and its cache wiring
      variant_000.onnx   ...

Written into a temporary folder beside the target and renamed into place, so a failed compile
never leaves a half-written artifact. `OrtArtifact` runs it on onnxruntime.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from . import __version__
from .cost import cost_report
from .errors import DgoError
from .export import ExportError, export_onnx
from .finite import check_finite
from .outputs import check_output, make_staging, publish
from .passes import cost_of, variant_signature
from .runtime import StepRun, fold
from .sampling import SCHEDULERS, denoiser_timesteps
from .schedule import Schedule
from .tracing import TracedDenoiser

FORMAT = "dgo-compile-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CONSTANTS_FILE = "timestep_constants.safetensors"


class ArtifactError(DgoError):
    """An artifact folder is missing, incomplete, or from another format version."""


def compile_artifact(traced: TracedDenoiser, schedule: Schedule, scheduler_config: dict, output: str | Path,
                     overwrite: bool = False, model_source: str | None = None, *, scheduler: str | None = None,
                     sampler_steps: int | None = None, guidance_scale: float | None = None,
                     dump_dir: str | Path | None = None) -> Path:
    """Fold `schedule`, export each variant to ONNX and write the artifact folder at `output`.

    The schedule has one row per denoiser call of `scheduler` at `sampler_steps` (default: as
    many steps as the schedule has rows); each call's timestep is folded into constants.
    """
    output = check_output(output, "artifact", overwrite=overwrite, error=ArtifactError)
    sampler_steps = sampler_steps or schedule.steps
    timesteps = denoiser_timesteps(scheduler_config, sampler_steps, scheduler)
    folded = fold(traced, schedule, timesteps, dump_dir)
    full_macs = cost_report(traced, batch=1).total.macs
    # Exact per-variant MACs: what is left in each folded graph (the stem of a fully reused step is gone too).
    variant_macs = {key: sum(cost_of(n).macs for n in gm.graph.nodes if n.op == "call_function")
                    for key, gm in folded.variants.items()}
    step_macs = [variant_macs[key] for key in folded.step_variant]
    example = traced.example_inputs(batch=2)

    try:
        staging = make_staging(output)
    except OSError as exc:
        raise _write_error(output, exc) from exc
    try:
        variants = []
        order = list(dict.fromkeys(folded.step_variant))
        cache_shapes: dict[str, tuple[int, ...]] = {}
        for index, key in enumerate(order):
            graph_module = folded.variants[key]
            signature = variant_signature(graph_module)
            first_call = folded.step_variant.index(key)
            feeds = {name: example[name] for name in signature.inputs}
            feeds.update({name: folded.constants[first_call][name].expand(2, *folded.constants[first_call][name].shape[1:])
                          for name in signature.constant_inputs})
            feeds.update({name: torch.zeros((2, *cache_shapes[name])) for name in signature.cache_inputs})
            file = f"variant_{index:03d}.onnx"
            written = export_onnx(graph_module, feeds, staging / file, ("prediction", *signature.cache_outputs))
            with torch.no_grad():
                outputs = graph_module(*feeds.values())
            cache_shapes.update({n: tuple(t.shape[1:]) for n, t in zip(signature.cache_outputs, outputs[1:])})
            variants.append({"file": file, "external_data": [w.name for w in written[1:]], "reused": sorted(key[0]), "inputs": list(signature.inputs),
                             "constant_inputs": list(signature.constant_inputs),
                             "cache_inputs": list(signature.cache_inputs),
                             "cache_outputs": list(signature.cache_outputs)})
        if any(folded.constants):
            save_file({f"{call}/{name}": value.contiguous().numpy() for call, values in enumerate(folded.constants)
                       for name, value in values.items()}, str(staging / CONSTANTS_FILE))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dgo_compile": __version__,
            "model": {"class": type(traced.model).__name__, "family": traced.family.name, "source": model_source,
                      "null_class_label": traced.family.null_class_label(traced.model)},
            "inputs": [{"name": k, "shape": ["batch", *v.shape[1:]], "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in example.items()],
            "scheduler": {"name": _scheduler_name(scheduler_config, scheduler), "steps": sampler_steps,
                          "calls": len(timesteps), "timesteps": list(folded.timesteps), "config": dict(scheduler_config)},
            "guidance": None if guidance_scale is None else {"scale": guidance_scale, "batch": "uncond, cond"},
            "schedule": folded.schedule.to_json(),
            "macs": {"per_call": step_macs, "total": sum(step_macs), "full_total": full_macs * len(timesteps)},
            "constants_file": CONSTANTS_FILE if any(folded.constants) else None,
            "variants": variants,
            "call_variants": [order.index(key) for key in folded.step_variant],
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        publish(staging, output, "artifact", overwrite=overwrite)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        cause = exc.__cause__ if isinstance(exc, ExportError) else exc  # export_onnx wraps its write errors
        if isinstance(cause, OSError):
            raise _write_error(output, cause) from exc
        raise
    return output


def _write_error(output: Path, exc: OSError) -> ArtifactError:
    reason = exc.strerror or str(exc)
    hint = "free some disk space or choose another -o" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "check the folder is writable or choose another -o"
    return ArtifactError(f"could not write the artifact {output}: {reason}; {hint}, then compile again")


def _scheduler_name(scheduler_config: dict, name: str | None) -> str:
    """The sampler an artifact is folded for: the one asked for, else the pipeline's own."""
    if name is not None:
        return name
    own = scheduler_config.get("_class_name")
    return next((key for key, cls in SCHEDULERS.items() if cls.__name__ == own), "ddim")


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} is not a dgo-compile artifact (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        raise ArtifactError(f"{path / MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path / MANIFEST} must hold a JSON object; recompile the model")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format {manifest.get('format')} v{manifest.get('format_version')}; "
                            f"this dgo-compile reads {FORMAT} v{FORMAT_VERSION}: recompile the model")
    problem = _manifest_problem(manifest)
    if problem:
        raise ArtifactError(f"{path / MANIFEST} is malformed ({problem}); recompile the model")
    files = [f for v in manifest["variants"] for f in (v["file"], *v["external_data"])]
    files += [manifest["constants_file"]] if manifest["constants_file"] else []
    for file in files:
        if not (path / file).is_file():
            raise ArtifactError(f"{path} is incomplete: {file} is missing; recompile the model")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the structure the runtime relies on, or None."""
    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    model, scheduler, variants = manifest.get("model"), manifest.get("scheduler"), manifest.get("variants")
    if not isinstance(model, dict):
        return "'model' must be an object"
    inputs = manifest.get("inputs")
    if not (isinstance(inputs, list) and inputs and all(
            isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("dtype"), str)
            and isinstance(i.get("shape"), list) for i in inputs)):
        return "'inputs' must list objects with name, shape and dtype"
    if "sample" not in [i["name"] for i in inputs]:
        return "'inputs' has no 'sample'"
    if not (isinstance(scheduler, dict) and isinstance(scheduler.get("name"), str)
            and isinstance(scheduler.get("steps"), int) and not isinstance(scheduler.get("steps"), bool)
            and isinstance(scheduler.get("config"), dict) and isinstance(scheduler.get("timesteps"), list)
            and all(number(t) for t in scheduler["timesteps"])):
        return "'scheduler' must hold name, steps, timesteps and config"
    if manifest.get("guidance") is not None and not isinstance(manifest["guidance"], dict):
        return "'guidance' must be an object or null"
    if not isinstance(manifest.get("schedule"), dict) or not isinstance(manifest.get("macs"), dict):
        return "'schedule' and 'macs' must be objects"
    if "constants_file" not in manifest or not (manifest["constants_file"] is None
                                                or isinstance(manifest["constants_file"], str)):
        return "'constants_file' must be a file name or null"
    if not (isinstance(variants, list) and variants):
        return "'variants' must be a non-empty list"
    keys = ("external_data", "inputs", "constant_inputs", "cache_inputs", "cache_outputs")
    if not all(isinstance(v, dict) and isinstance(v.get("file"), str) and all(strings(v.get(k)) for k in keys)
               for v in variants):
        return "each variant needs a file and lists of external_data, inputs, constant_inputs, cache_inputs and " \
               "cache_outputs"
    calls = manifest.get("call_variants")
    if not (isinstance(calls, list) and calls and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(variants) for c in calls)):
        return "'call_variants' must list a variant index for each denoiser call"
    if len(scheduler["timesteps"]) != len(calls):
        return f"{len(scheduler['timesteps'])} timesteps for {len(calls)} calls"
    return None


@dataclass
class OrtArtifact:
    """An artifact loaded into onnxruntime sessions (CUDA provider when available, else CPU)."""

    path: Path
    manifest: dict
    sessions: list
    constants: list[dict[str, np.ndarray]]  # per call, batch 1

    @classmethod
    def open(cls, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> OrtArtifact:
        import onnxruntime as ort

        manifest = read_manifest(path)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if len(manifest["variants"]) > 1:
            # Variants take turns: a session that spins after its call steals the cores of the next one.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = [ort.InferenceSession(str(Path(path) / v["file"]), options, providers=providers)
                    for v in manifest["variants"]]
        constants: list[dict[str, np.ndarray]] = [{} for _ in manifest["call_variants"]]
        if manifest["constants_file"]:
            for key, value in load_file(str(Path(path) / manifest["constants_file"])).items():
                call, name = key.split("/")
                constants[int(call)][name] = value
                check_finite(value, f"timestep constant {key} of {path}", "the artifact is damaged: recompile the model")
        return cls(Path(path), manifest, sessions, constants)

    @property
    def steps(self) -> int:
        """Sampler steps the artifact was compiled for."""
        return self.manifest["scheduler"]["steps"]

    @property
    def device(self) -> str:
        return "cuda" if self.sessions[0].get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def new_run(self) -> "OrtRun":
        return OrtRun(self)


class OrtRun(StepRun):
    """One sampling run over an artifact. Caches stay on the provider's device between calls
    (IO binding), so on CUDA only the sample and the prediction cross the bus."""

    def __init__(self, artifact: OrtArtifact):
        manifest = artifact.manifest
        super().__init__(len(manifest["call_variants"]), tuple(i["name"] for i in manifest["inputs"]),
                         tuple(manifest["scheduler"]["timesteps"]))
        self.artifact = artifact
        self.cache: dict = {}  # name -> onnxruntime OrtValue on the artifact's device

    def _run(self, step: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
        artifact, device = self.artifact, self.artifact.device
        index = artifact.manifest["call_variants"][step]
        variant, session = artifact.manifest["variants"][index], artifact.sessions[index]
        dtypes = {i["name"]: i["dtype"] for i in artifact.manifest["inputs"]}
        batch = named["sample"].shape[0]
        binding = session.io_binding()
        for name in variant["inputs"]:
            binding.bind_cpu_input(name, np.ascontiguousarray(named[name].detach().cpu().numpy().astype(dtypes[name])))
        for name in variant["constant_inputs"]:
            value = artifact.constants[step][name]
            binding.bind_cpu_input(name, np.ascontiguousarray(np.broadcast_to(value, (batch, *value.shape[1:]))))
        for name in variant["cache_inputs"]:
            binding.bind_ortvalue_input(name, self.cache[name])
        binding.bind_output("prediction", "cpu")
        for name in variant["cache_outputs"]:
            binding.bind_output(name, device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.cache.update(zip(variant["cache_outputs"], outputs[1:]))
        return torch.from_numpy(outputs[0].numpy())
