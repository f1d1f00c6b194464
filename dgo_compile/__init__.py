"""dgo-compile: make diffusers denoisers cheaper to run, as static ONNX artifacts.

The public compile API, in pipeline order: `load` -> `trace` -> a `Schedule` (`builtin`, or learned:
`optimize` then `extract_schedule`) -> `fold` -> `compile_artifact` -> `OrtArtifact` and `sample`; or the
whole pipeline from a config (`read_config`, `run_pipeline`, `compile_schedule`). Every name but the
errors comes from a module that imports torch, diffusers or onnxruntime; each is imported on first use,
so `import dgo_compile` (and `dgo-compile --help`) stays light.
"""

from .errors import DgoError, ModelLoadError, PassError, TraceError, UnsupportedModelError

__version__ = "0.1.0"
_LAZY = {
    "DEFAULT_MODEL": "loading", "LoadedModel": "loading", "load": "loading",
    "TracedDenoiser": "tracing", "trace": "tracing",
    "Schedule": "schedule", "builtin": "schedule",
    "ScheduleCost": "schedule_cost", "extract_schedule": "schedule_cost",
    "OptimizeConfig": "configs", "PruneConfig": "configs", "FinetuneConfig": "configs",
    "optimize": "pruner", "load_pruner": "pruner", "prune": "channel_pruning",
    "fold": "folding", "FoldedSchedule": "folding",
    "compile_artifact": "artifact", "OrtArtifact": "ort_runner",
    "sample": "sampling", "denoiser_timesteps": "sampling", "initial_noise": "sampling",
    "CompileConfig": "pipeline", "read_config": "pipeline", "run_pipeline": "pipeline",
    "compile_schedule": "pipeline",
}
__all__ = [  # the errors, then the lazily imported names of _LAZY
    "CompileConfig", "DEFAULT_MODEL", "DgoError", "FinetuneConfig", "FoldedSchedule", "LoadedModel",
    "ModelLoadError", "OptimizeConfig", "OrtArtifact", "PassError", "PruneConfig", "Schedule", "ScheduleCost",
    "TraceError", "TracedDenoiser", "UnsupportedModelError", "__version__", "builtin", "compile_artifact",
    "compile_schedule", "denoiser_timesteps", "extract_schedule", "fold", "initial_noise", "load", "load_pruner",
    "optimize", "prune", "read_config", "run_pipeline", "sample", "trace",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
