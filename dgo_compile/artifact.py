"""The compiled artifact: one ONNX file per distinct step pattern plus a manifest saying how to run them.

    artifact/
      manifest.json      format version, model, precision, scheduler config and step count, the
                         schedule, per-step MACs, and for each step which variant runs and its cache wiring
      variant_000.onnx   one graph per distinct step pattern, weights not included
      weights.bin        every weight any variant uses, once (ONNX external data; see onnx_weights)
      timestep_constants.safetensors

Written into a temporary folder beside the target and renamed into place, so a failed compile
never leaves a half-written artifact. `OrtArtifact` runs it on onnxruntime.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import load_file, save_file

from . import __version__
from .cost import cost_report
from .artifact_files import ArtifactError, check_files, file_record, load_graph
from .export import ExportError, export_onnx
from .onnx_weights import WEIGHTS_FILE, SharedWeights, SharedWeightsWriter
from .passes import cost_of, variant_signature
from .precision import KEEP_FLOAT_INPUTS, check_precision, to_fp16
from .resolution import artifact_resolution
from .runtime import StepRun, fold
from .sampling import SCHEDULERS, denoiser_timesteps
from .schedule import Schedule
from .tracing import TracedDenoiser

FORMAT = "dgo-compile-artifact"
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
CONSTANTS_FILE = "timestep_constants.safetensors"


def compile_artifact(traced: TracedDenoiser, schedule: Schedule, scheduler_config: dict, output: str | Path,
                     overwrite: bool = False, model_source: str | None = None, *, scheduler: str | None = None,
                     sampler_steps: int | None = None, guidance_scale: float | None = None,
                     dump_dir: str | Path | None = None, precision: str = "fp32") -> Path:
    """Fold `schedule`, export each variant to ONNX and write the artifact folder at `output`.

    The schedule has one row per denoiser call of `scheduler` at `sampler_steps` (default: as
    many steps as the schedule has rows); each call's timestep is folded into constants. Every
    variant references one shared `weights.bin`; `precision` "fp16" halves weights, caches and
    constants (see dgo_compile.precision for what stays float32).
    """
    output = Path(output)
    check_precision(precision)
    if output.exists() and not overwrite:
        raise ArtifactError(f"{output} already exists; pass --overwrite or choose another -o")
    sampler_steps = sampler_steps or schedule.steps
    timesteps = denoiser_timesteps(scheduler_config, sampler_steps, scheduler)
    folded = fold(traced, schedule, timesteps, dump_dir)
    full_macs = cost_report(traced, batch=1).total.macs
    # Exact per-variant MACs: what is left in each folded graph (the stem of a fully reused step is gone too).
    variant_macs = {key: sum(cost_of(n).macs for n in gm.graph.nodes if n.op == "call_function")
                    for key, gm in folded.variants.items()}
    step_macs = [variant_macs[key] for key in folded.step_variant]
    example = traced.example_inputs(batch=2)
    upcast_attention = bool(getattr(traced.model.config, "upcast_attention", False))

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as exc:
        raise _write_error(output, exc) from exc
    try:
        weights = SharedWeightsWriter(staging)
        variants = []
        order = list(dict.fromkeys(folded.step_variant))
        for index, key in enumerate(order):
            graph_module = folded.variants[key]
            signature = variant_signature(graph_module)
            first_call = folded.step_variant.index(key)
            constants = folded.constants[first_call]
            feeds = {name: example[name] for name in signature.inputs}
            feeds.update({name: constants[name].expand(2, *constants[name].shape[1:]) for name in signature.constant_inputs})
            feeds.update({name: torch.zeros((2, *folded.cache_shapes[name])) for name in signature.cache_inputs})
            file = f"variant_{index:03d}.onnx"
            _export_variant(graph_module, feeds, ("prediction", *signature.cache_outputs), staging, file, weights,
                            precision, upcast_attention, traced.max_batch)
            variants.append({"file": file, "reused": sorted(key[0]), "inputs": list(signature.inputs),
                             "constant_inputs": list(signature.constant_inputs),
                             "cache_inputs": list(signature.cache_inputs),
                             "cache_outputs": list(signature.cache_outputs)})
        weights_bytes = weights.close()
        for variant in variants:
            onnx.checker.check_model(str(staging / variant["file"]))  # by path: resolves weights.bin
        constant_dtype = np.float16 if precision == "fp16" else np.float32
        if any(folded.constants):
            save_file({f"{call}/{name}": value.contiguous().numpy().astype(constant_dtype)
                       for call, values in enumerate(folded.constants) for name, value in values.items()},
                      str(staging / CONSTANTS_FILE))
        float_dtype = "float16" if precision == "fp16" else "float32"
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dgo_compile": __version__,
            "model": {"class": type(traced.model).__name__, "family": traced.family.name, "source": model_source,
                      "null_class_label": traced.family.null_class_label(traced.model)},
            "precision": precision, "max_batch": traced.max_batch,
            "inputs": [{"name": k, "shape": ["batch", *v.shape[1:]],
                        "dtype": float_dtype if v.is_floating_point() and k not in KEEP_FLOAT_INPUTS
                        else str(v.dtype).removeprefix("torch.")} for k, v in example.items()],
            "resolution": artifact_resolution(tuple(example["sample"].shape[-2:]), model_source),
            "scheduler": {"name": _scheduler_name(scheduler_config, scheduler), "steps": sampler_steps,
                          "calls": len(timesteps), "timesteps": list(folded.timesteps), "config": dict(scheduler_config)},
            "guidance": None if guidance_scale is None else {"scale": guidance_scale, "batch": "uncond, cond"},
            "schedule": folded.schedule.to_json(),
            "macs": {"per_call": step_macs, "total": sum(step_macs), "full_total": full_macs * len(timesteps)},
            "constants_file": CONSTANTS_FILE if any(folded.constants) else None,
            "weights": {"file": WEIGHTS_FILE, "bytes": weights_bytes, "referenced_bytes": weights.bytes_referenced},
            "variants": variants,
            "call_variants": [order.index(key) for key in folded.step_variant],
        }
        manifest["files"] = {p.name: file_record(p) for p in sorted(staging.iterdir())}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str, allow_nan=False))
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        cause = exc.__cause__ if isinstance(exc, ExportError) else exc  # export_onnx wraps its write errors
        if isinstance(cause, OSError):
            raise _write_error(output, cause) from exc
        raise
    return output


def _export_variant(graph_module, feeds: dict[str, torch.Tensor], output_names: tuple[str, ...], staging: Path,
                    file: str, weights: SharedWeightsWriter, precision: str, upcast_attention: bool,
                    max_batch: int | None) -> None:
    """Export one variant to a scratch folder, convert its precision, move its weights into the shared
    file and write the graph alone as `staging/file`. Memory: one graph proto and one tensor at a time."""
    scratch = Path(tempfile.mkdtemp(prefix=".export.", dir=staging))
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


def read_manifest(path: str | Path, *, checksums: bool = False) -> dict:
    """The checked manifest of the artifact at `path`: structure, file names, sizes (and, with
    `checksums`, SHA-256 of every file: `OrtArtifact.open` does so before loading anything)."""
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
    files = [v["file"] for v in manifest["variants"]] + [manifest["weights"]["file"]]
    files += [manifest["constants_file"]] if manifest["constants_file"] else []
    check_files(path, files, manifest.get("files"), checksums=checksums)
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
    keys = ("inputs", "constant_inputs", "cache_inputs", "cache_outputs")
    if not all(isinstance(v, dict) and isinstance(v.get("file"), str) and all(strings(v.get(k)) for k in keys)
               for v in variants):
        return "each variant needs a file and lists of inputs, constant_inputs, cache_inputs and cache_outputs"
    if not (isinstance(manifest.get("weights"), dict) and isinstance(manifest["weights"].get("file"), str)):
        return "'weights' must name the weights file"
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
    weights: SharedWeights | None = None  # the mapped weights file every session's initializers point into

    @classmethod
    def open(cls, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> OrtArtifact:
        import onnxruntime as ort

        manifest = read_manifest(path, checksums=True)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        device = "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
        shared = SharedWeights(Path(path) / manifest["weights"]["file"], device)
        sessions = []
        for variant in manifest["variants"]:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            if len(manifest["variants"]) > 1:
                # Variants take turns: a session that spins after its call steals the cores of the next one.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            file = Path(path) / variant["file"]
            shared.add_to(options, load_graph(file, manifest["weights"]["file"], shared.path.stat().st_size))
            sessions.append(ort.InferenceSession(str(file), options, providers=providers))
        constants: list[dict[str, np.ndarray]] = [{} for _ in manifest["call_variants"]]
        if manifest["constants_file"]:
            for key, value in load_file(str(Path(path) / manifest["constants_file"])).items():
                call, name = key.split("/")
                constants[int(call)][name] = value
        return cls(Path(path), manifest, sessions, constants, shared)

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
        dtypes = _input_dtypes(session)
        batch = named["sample"].shape[0]
        max_batch = artifact.manifest.get("max_batch")
        if max_batch is not None and batch > max_batch:
            raise ArtifactError(f"{artifact.path} runs batches of at most {max_batch} (a guard in the model's code "
                                "takes another path past it); split the batch")
        binding = session.io_binding()
        for name in variant["inputs"]:
            binding.bind_cpu_input(name, np.ascontiguousarray(named[name].detach().cpu().numpy().astype(dtypes[name])))
        for name in variant["constant_inputs"]:
            value = artifact.constants[step][name].astype(dtypes[name], copy=False)
            binding.bind_cpu_input(name, np.ascontiguousarray(np.broadcast_to(value, (batch, *value.shape[1:]))))
        for name in variant["cache_inputs"]:
            binding.bind_ortvalue_input(name, self.cache[name])
        binding.bind_output("prediction", "cpu")
        for name in variant["cache_outputs"]:
            binding.bind_output(name, device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.cache.update(zip(variant["cache_outputs"], outputs[1:]))
        return torch.from_numpy(outputs[0].numpy().astype(np.float32, copy=False))


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _input_dtypes(session) -> dict[str, type]:
    """Each graph input's numpy dtype, as the session declares it (fp16 artifacts take half inputs)."""
    return {i.name: _ORT_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
