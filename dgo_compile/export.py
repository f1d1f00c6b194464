"""ONNX export of a traced graph with a dynamic batch dimension, written atomically."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import fx

from .errors import DgoError


class ExportError(DgoError):
    """torch.onnx could not export a graph, or the file could not be written."""


def export_onnx(graph_module: fx.GraphModule, inputs: dict[str, torch.Tensor], path: str | Path,
                output_names: tuple[str, ...] = ("prediction",), opset: int = 20) -> Path:
    """Export `graph_module` to `path`; every input's dim 0 is the dynamic batch.

    The example batch must be at least 2: export specialises a batch of 1 to a constant.
    """
    path = Path(path)
    if next(iter(inputs.values())).shape[0] < 2:
        raise ExportError("export needs example inputs with batch >= 2 so the batch stays dynamic")
    batch = torch.export.Dim("batch")
    dynamic = (tuple({0: batch} for _ in inputs),)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        wrapper = _Positional(graph_module)
        with warnings.catch_warnings():  # the exporter's deprecation and torchvision chatter
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(wrapper, tuple(inputs.values()), dynamic_shapes=dynamic, dynamo=True,
                                        input_names=list(inputs), output_names=list(output_names),
                                        opset_version=opset, external_data=False, verbose=False)
        program.save(str(tmp / path.name))
        os.replace(tmp / path.name, path)
    except ExportError:
        raise
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"ONNX export to {path} failed: {first_line}") from exc
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return path


class _Positional(torch.nn.Module):
    """Gives the exporter a module whose forward takes the graph's inputs as *args."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *inputs):
        return self.graph_module(*inputs)
