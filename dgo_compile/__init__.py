"""dgo-compile: make diffusers denoisers cheaper to run, as static ONNX artifacts.

The public compile API, in pipeline order: `load` -> `trace` -> a `Schedule` (`builtin`, or learned:
`optimize` then `extract_schedule`) -> `fold` -> `compile_artifact` -> `OrtArtifact` and `sample`; or the
whole pipeline from a config (`read_config`, `run_pipeline`, `compile_schedule`). Every name but the
errors comes from a module that imports torch, diffusers or onnxruntime; each is imported on first use,
so `import dgo_compile` (and `dgo-compile --help`) stays light.
"""

from .core.errors import DgoError, ModelLoadError, PassError, TraceError, UnsupportedModelError

__version__ = "0.1.0"
_LAZY = {
    "CLASS_CONDITIONAL_MODEL": "frontend.loading", "DEFAULT_MODEL": "frontend.loading",
    "LoadedModel": "frontend.loading", "load": "frontend.loading",
    "TracedDenoiser": "frontend.tracing", "trace": "frontend.tracing",
    "Schedule": "schedules.schedule", "builtin": "schedules.schedule",
    "ScheduleCost": "schedules.schedule_cost", "extract_schedule": "schedules.schedule_cost",
    "OptimizeConfig": "core.configs", "PruneConfig": "core.configs", "FinetuneConfig": "core.configs",
    "optimize": "search.pruner", "load_pruner": "search.pruner", "prune": "channels.channel_pruning",
    "fold": "backend.folding", "FoldedSchedule": "backend.folding",
    "compile_artifact": "backend.artifact", "OrtArtifact": "backend.ort_runner",
    "sample": "backend.sampling", "denoiser_timesteps": "backend.sampling", "initial_noise": "backend.sampling",
    "CompileConfig": "driver.pipeline", "read_config": "driver.pipeline", "run_pipeline": "driver.pipeline",
    "compile_schedule": "driver.pipeline",
}
__all__ = [  # the errors, then the lazily imported names of _LAZY
    "CLASS_CONDITIONAL_MODEL", "CompileConfig", "DEFAULT_MODEL", "DgoError", "FinetuneConfig", "FoldedSchedule",
    "LoadedModel", "ModelLoadError", "OptimizeConfig", "OrtArtifact", "PassError", "PruneConfig", "Schedule",
    "ScheduleCost", "TraceError", "TracedDenoiser", "UnsupportedModelError", "__version__", "builtin",
    "compile_artifact", "compile_schedule", "denoiser_timesteps", "extract_schedule", "fold", "initial_noise",
    "load", "load_pruner", "optimize", "prune", "read_config", "run_pipeline", "sample", "trace",
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
