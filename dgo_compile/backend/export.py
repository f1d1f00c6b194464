"""ONNX export of a traced graph with a dynamic batch dimension, written atomically."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import warnings
from pathlib import Path

import onnx
import onnx_ir
import torch
from torch import fx

from dgo_compile.backend.attention import translation_table
from dgo_compile.backend.export_cache import ExportCache, export_key
from dgo_compile.core.errors import DgoError
from dgo_compile.core.outputs import make_staging


class ExportError(DgoError):
    """torch.onnx could not export a graph, or the file could not be written."""


# torch.onnx records each node's Python stack: this machine's paths and a per-process counter. Dropped, so an
# artifact names nothing of the machine that built it and one graph always exports to the same bytes.
STACK_TRACE = "pkg.torch.onnx.stack_trace"
EXTERNAL_DATA_BYTES = 1 << 31  # protobuf's 2 GB limit: bigger graphs keep their weights beside the file


def export_onnx(graph_module: fx.GraphModule, inputs: dict[str, torch.Tensor], path: str | Path,
                output_names: tuple[str, ...] = ("prediction",), opset: int = 20,
                external_data_bytes: int = EXTERNAL_DATA_BYTES, max_batch: int | None = None,
                fused_attention: bool = True) -> list[Path]:
    """Export `graph_module` to `path`; every input's dim 0 is the dynamic batch. Returns the files
    written: the graph, plus `<name>.data` when its weights reach `external_data_bytes`.

    The example batch must be at least 2: export specialises a batch of 1 to a constant. The
    graph passes onnx.checker before it is moved into place. `max_batch` bounds the batch dim where
    tracing could not prove the graph right past a guard (TracedDenoiser.max_batch).
    `fused_attention` writes attention as onnxruntime's fused kernel (`backend.attention`).
    With `DGO_COMPILE_EXPORT_CACHE` set, a graph exported before is copied from the cache instead
    (`backend.export_cache`).
    """
    path = Path(path)
    if next(iter(inputs.values())).shape[0] < 2:
        raise ExportError("export needs example inputs with batch >= 2 so the batch stays dynamic")
    batch = torch.export.Dim("batch", max=max_batch) if max_batch else torch.export.Dim("batch")
    dynamic = (tuple({0: batch} for _ in inputs),)
    weight_bytes = sum(t.numel() * t.element_size() for t in graph_module.state_dict().values())
    external = weight_bytes >= external_data_bytes
    cache = ExportCache.from_env()
    tmp = make_staging(path)  # beside `path`: each file is then renamed into place
    try:
        key = cache and export_key(graph_module, inputs, {
            "file": path.name, "outputs": tuple(output_names), "opset": opset, "external": external,
            "max_batch": max_batch, "fused_attention": fused_attention})
        cached = cache is not None and cache.fetch(key, tmp) is not None
        if not cached:
            _export(graph_module, inputs, dynamic, tmp / path.name, output_names, opset, external, fused_attention)
        onnx.checker.check_model(str(tmp / path.name))  # by path: works past 2 GB too
        if cache is not None and not cached:
            cache.store(key, sorted(tmp.iterdir()))
        written = []
        for file in sorted(tmp.iterdir()):
            os.replace(file, path.parent / file.name)
            written.append(path.parent / file.name)
    except ExportError:
        raise
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"ONNX export to {path} failed: {first_line}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _export(graph_module: fx.GraphModule, inputs: dict[str, torch.Tensor], dynamic: tuple, file: Path,
            output_names: tuple[str, ...], opset: int, external: bool, fused_attention: bool) -> None:
    wrapper = _Positional(_without_noop_squeezes(graph_module))
    with warnings.catch_warnings():  # the exporter's deprecation and torchvision chatter
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(wrapper, tuple(inputs.values()), dynamic_shapes=dynamic, dynamo=True,
                                    input_names=list(inputs), output_names=list(output_names),
                                    opset_version=opset, external_data=False, verbose=False,
                                    custom_translation_table=translation_table() if fused_attention else None)
    for function in (program.model.graph, *program.model.functions.values()):
        for node in onnx_ir.traversal.RecursiveGraphIterator(function):
            node.metadata_props.pop(STACK_TRACE, None)
    program.save(str(file), external_data=external)


def _without_noop_squeezes(graph_module: fx.GraphModule) -> fx.GraphModule:
    """torch's `squeeze(d)` of a dim whose size is not 1 returns the input; ONNX's Squeeze rejects it
    (PixArt's output `squeeze(1)` over its tokens). A graph without them, sharing the weights."""
    squeezes = {node.name for node in graph_module.graph.nodes
                if node.op == "call_function" and node.target in (torch.ops.aten.squeeze.dim,
                                                                  torch.ops.aten.squeeze.dims)
                and _keeps_shape(node)}
    if not squeezes:
        return graph_module
    graph = copy.deepcopy(graph_module.graph)
    for node in list(graph.nodes):
        if node.name in squeezes:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return fx.GraphModule(graph_module, graph)


def _keeps_shape(node: fx.Node) -> bool:
    source, result = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor) or source.dim() != result.dim():
        return False
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    return all(isinstance(source.shape[d], int) and source.shape[d] != 1 for d in dims)


class _Positional(torch.nn.Module):
    """Gives the exporter a module whose forward takes the graph's inputs as *args."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *inputs):
        return self.graph_module(*inputs)
