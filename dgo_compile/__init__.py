"""dgo-compile: make diffusers denoisers cheaper to run, as static ONNX artifacts.

`load`, `trace` and their types come from modules that import torch and diffusers; they are
imported on first use, so `import dgo_compile` (and `dgo-compile --help`) stays light.
"""

from .errors import DgoError, ModelLoadError, PassError, TraceError, UnsupportedModelError

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL", "DgoError", "LoadedModel", "ModelLoadError", "PassError", "TraceError",
    "TracedDenoiser", "UnsupportedModelError", "load", "trace", "__version__",
]
_LAZY = {"DEFAULT_MODEL": "loading", "LoadedModel": "loading", "load": "loading",
         "TracedDenoiser": "tracing", "trace": "tracing"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
