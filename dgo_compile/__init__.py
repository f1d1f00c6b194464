"""dgo-compile: make diffusers denoisers cheaper to run, as static ONNX artifacts."""

from .errors import DgoError, ModelLoadError, PassError, TraceError, UnsupportedModelError
from .loading import DEFAULT_MODEL, LoadedModel, load
from .tracing import TracedDenoiser, trace

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL", "DgoError", "LoadedModel", "ModelLoadError", "PassError", "TraceError",
    "TracedDenoiser", "UnsupportedModelError", "load", "trace", "__version__",
]
