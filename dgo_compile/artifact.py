"""The compiled artifact: one ONNX file per distinct step pattern plus a manifest saying how to run them.

    artifact/
      manifest.json      format version, model, scheduler config and step count, the schedule,
                         per-step MACs, and for each step which variant runs and its cache wiring
      variant_000.onnx   ...

Written into a temporary folder beside the target and renamed into place, so a failed compile
never leaves a half-written artifact. `OrtArtifact` runs it on onnxruntime.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .cost import cost_report
from .passes import cost_of
from .errors import DgoError
from .export import export_onnx
from .runtime import fold
from .schedule import Schedule
from .tracing import TracedDenoiser

FORMAT = "dgo-compile-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(DgoError):
    """An artifact folder is missing, incomplete, or from another format version."""


def compile_artifact(traced: TracedDenoiser, schedule: Schedule, scheduler_config: dict, output: str | Path,
                     overwrite: bool = False, model_source: str | None = None) -> Path:
    """Fold `schedule`, export each variant to ONNX and write the artifact folder at `output`."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise ArtifactError(f"{output} already exists; pass --overwrite or choose another -o")
    folded = fold(traced, schedule)
    full_macs = cost_report(traced, batch=1).total.macs
    # Exact per-variant MACs: what is left in each folded graph (the stem of a fully reused step is gone too).
    variant_macs = {key: sum(cost_of(n).macs for n in gm.graph.nodes if n.op == "call_function")
                    for key, gm in folded.variants.items()}
    step_macs = [variant_macs[key] for key in folded.step_variant]
    example = traced.example_inputs(batch=2)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        variants = []
        order = list(dict.fromkeys(folded.step_variant))
        cache_shapes: dict[str, tuple[int, ...]] = {}
        for index, key in enumerate(order):
            graph_module = folded.variants[key]
            signature = graph_module.meta["dgo.variant"]
            feeds = dict(example)
            feeds.update({name: torch.zeros((2, *cache_shapes[name])) for name in signature.cache_inputs})
            file = f"variant_{index:03d}.onnx"
            export_onnx(graph_module, feeds, staging / file, ("prediction", *signature.cache_outputs))
            with torch.no_grad():
                outputs = graph_module(*feeds.values())
            cache_shapes.update({n: tuple(t.shape[1:]) for n, t in zip(signature.cache_outputs, outputs[1:])})
            variants.append({"file": file, "reused_blocks": sorted(key[0]), "cache_inputs": list(signature.cache_inputs),
                             "cache_outputs": list(signature.cache_outputs)})
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dgo_compile": __version__,
            "model": {"class": type(traced.model).__name__, "family": traced.family.name, "source": model_source},
            "inputs": [{"name": k, "shape": ["batch", *v.shape[1:]], "dtype": str(v.dtype).removeprefix("torch.")}
                       for k, v in example.items()],
            "scheduler": {"steps": schedule.steps, "config": dict(scheduler_config)},
            "schedule": folded.schedule.to_json(),
            "macs": {"per_step": step_macs, "total": sum(step_macs), "full_total": full_macs * schedule.steps},
            "variants": variants,
            "steps": [order.index(key) for key in folded.step_variant],
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} is not a dgo-compile artifact (no {MANIFEST})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path / MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format {manifest.get('format')} v{manifest.get('format_version')}; "
                            f"this dgo-compile reads {FORMAT} v{FORMAT_VERSION}: recompile the model")
    for variant in manifest["variants"]:
        if not (path / variant["file"]).is_file():
            raise ArtifactError(f"{path} is incomplete: {variant['file']} is missing; recompile the model")
    return manifest


@dataclass
class OrtArtifact:
    """An artifact loaded into onnxruntime sessions (CUDA provider when available, else CPU)."""

    path: Path
    manifest: dict
    sessions: list

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
        sessions = [ort.InferenceSession(str(Path(path) / v["file"]), options, providers=providers)
                    for v in manifest["variants"]]
        return cls(Path(path), manifest, sessions)

    @property
    def steps(self) -> int:
        return self.manifest["scheduler"]["steps"]

    def new_run(self) -> "OrtRun":
        return OrtRun(self)


class OrtRun:
    """One sampling run over an artifact; call once per sampler step. Caches belong to this run."""

    def __init__(self, artifact: OrtArtifact):
        self.artifact = artifact
        self.step = 0
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        manifest = self.artifact.manifest
        if self.step >= len(manifest["steps"]):
            raise ArtifactError(f"artifact was compiled for {len(manifest['steps'])} steps; "
                                f"this is step {self.step + 1}: sample with --steps {len(manifest['steps'])}")
        index = manifest["steps"][self.step]
        variant = manifest["variants"][index]
        feeds = {spec["name"]: t.detach().cpu().numpy().astype(spec["dtype"])
                 for spec, t in zip(manifest["inputs"], inputs)}
        feeds.update({name: self.cache[name] for name in variant["cache_inputs"]})
        outputs = self.artifact.sessions[index].run(None, feeds)
        self.cache.update(zip(variant["cache_outputs"], outputs[1:]))
        self.step += 1
        return torch.from_numpy(outputs[0])
