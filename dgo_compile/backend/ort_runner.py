"""Running an artifact on onnxruntime: one session per variant over one mapped weights file.

Sessions get the CUDA provider when onnxruntime has it, else the CPU one; every session takes its
weights from `SharedWeights` (one copy however many variants). A run keeps its caches on the
provider's device between calls (IO binding), so on CUDA only the sample and the prediction cross
the bus. Inputs are cast to what each graph declares, so fp16 artifacts take the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file

from dgo_compile.backend.artifact import read_manifest
from dgo_compile.backend.artifact_files import ArtifactError, load_graph
from dgo_compile.backend.manifest import Manifest
from dgo_compile.backend.onnx_weights import SharedWeights
from dgo_compile.backend.torch_runner import StepRun
from dgo_compile.core.finite import check_finite


def session_options(ort, threads: int | None = None, precision: str = "fp32", device: str = "cpu"):
    """The options of every session of every artifact, whatever its variant count, so two artifacts
    are always timed on equal terms. Variants take turns, so no session spins after its call (it
    would steal the cores of the next). Weights stay shared: the CPU provider's NCHWc layout pass and
    prepacking would give each session its own reordered copy of every convolution and matmul weight
    (measured on a 220 M-parameter UNet with 5 variants: 3.2 GB resident instead of 1.6 GB, calls
    no faster).

    Activations are shared too. On the CPU provider every session uses one process-wide arena
    (`share_cpu_arena`): with an arena per session, each variant keeps the peak activations of its
    own calls, and an SD-2.1 UNet at 768 px with 5 fp32 variants passed 22 GB resident during its
    calls (its attention maps alone are 3.4 GB at batch 2). An fp16 artifact on the CPU provider runs
    without an arena: the provider has no fp16 kernels for most ops and casts every weight to fp32
    inside each call, and an arena would keep that cast copy (220 M-parameter UNet, 2 variants,
    4 calls: 2.9 GB resident with arenas, 1.5 GB without)."""
    options = ort.SessionOptions()
    if device == "cpu" and precision == "fp16":
        options.enable_cpu_mem_arena = False
    elif device == "cpu":
        share_cpu_arena(ort)
        options.add_session_config_entry("session.use_env_allocators", "1")
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


_SHARED_ARENA: list = []


def share_cpu_arena(ort) -> None:
    """Register one CPU arena allocator with onnxruntime's environment, once per process; sessions
    opting in (`session.use_env_allocators`) all allocate from it, so an opened artifact holds the
    activations of one call, not one call per variant (onnxruntime's "share allocators between
    sessions")."""
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)
        _SHARED_ARENA.append(info)


def _load_constants(path: Path) -> dict[str, np.ndarray]:
    try:
        values = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file; recompile the model") from exc
    for key, value in values.items():
        if key.count("/") != 1 or not key.split("/")[0].isdigit():
            raise ArtifactError(f"{path} holds an unexpected constant {key!r}; recompile the model")
        check_finite(value, f"timestep constant {key} of {path.parent}", "the artifact is damaged: recompile the model")
    return values


@dataclass
class OrtArtifact:
    """An artifact loaded into onnxruntime sessions (CUDA provider when available, else CPU)."""

    path: Path
    manifest: Manifest
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
        shared = SharedWeights(Path(path) / manifest.weights.file, device)
        sessions = []
        for variant in manifest.variants:
            options = session_options(ort, threads, manifest.precision, device)
            file = Path(path) / variant.file
            shared.add_to(options, load_graph(file, manifest.weights.file, shared.path.stat().st_size))
            sessions.append(ort.InferenceSession(str(file), options, providers=providers))
        constants: list[dict[str, np.ndarray]] = [{} for _ in manifest.call_variants]
        if manifest.constants_file:
            for key, value in _load_constants(Path(path) / manifest.constants_file).items():
                call, name = key.split("/")
                if int(call) >= len(constants):
                    raise ArtifactError(f"{manifest.constants_file} has constants for call {call}; the artifact "
                                        f"makes {len(constants)} calls: recompile the model")
                constants[int(call)][name] = value
        return cls(Path(path), manifest, sessions, constants, shared)

    @property
    def steps(self) -> int:
        """Sampler steps the artifact was compiled for."""
        return self.manifest.scheduler.steps

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
        super().__init__(len(manifest.call_variants), tuple(i.name for i in manifest.inputs),
                         manifest.scheduler.timesteps)
        self.artifact = artifact
        self.cache: dict = {}  # name -> onnxruntime OrtValue on the artifact's device

    def _run(self, step: int, named: dict[str, torch.Tensor]) -> torch.Tensor:
        artifact, device = self.artifact, self.artifact.device
        index = artifact.manifest.call_variants[step]
        variant, session = artifact.manifest.variants[index], artifact.sessions[index]
        dtypes = _input_dtypes(session)
        batch = named["sample"].shape[0]
        max_batch = artifact.manifest.max_batch
        if max_batch is not None and batch > max_batch:
            raise ArtifactError(f"{artifact.path} runs batches of at most {max_batch} (a guard in the model's code "
                                "takes another path past it); split the batch")
        binding = session.io_binding()
        for name in variant.inputs:
            binding.bind_cpu_input(name, np.ascontiguousarray(named[name].detach().cpu().numpy().astype(dtypes[name])))
        for name in variant.constant_inputs:
            value = artifact.constants[step][name].astype(dtypes[name], copy=False)
            binding.bind_cpu_input(name, np.ascontiguousarray(np.broadcast_to(value, (batch, *value.shape[1:]))))
        for name in variant.cache_inputs:
            binding.bind_ortvalue_input(name, self.cache[name])
        binding.bind_output("prediction", "cpu")
        for name in variant.cache_outputs:
            binding.bind_output(name, device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.cache.update(zip(variant.cache_outputs, outputs[1:]))
        return torch.from_numpy(outputs[0].numpy().astype(np.float32, copy=False))


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _input_dtypes(session) -> dict[str, type]:
    """Each graph input's numpy dtype, as the session declares it (fp16 artifacts take half inputs)."""
    return {i.name: _ORT_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
