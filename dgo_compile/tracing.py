"""Trace a diffusers denoiser into a verified torch.fx GraphModule.

We use `torch.export(strict=False)` with a dynamic batch dimension: it handles every diffusers
family without tracer hacks (plain `symbolic_trace` fails on len()/iteration of proxies and on
shape-dependent Python), gives ATen-level nodes whose `nn_module_stack` locates each block and
unit, and its ops are the ones the ONNX exporter knows. Shape-dependent Python decisions become
export guards; we keep them as data (`TracedDenoiser.guards`) and, where a guard narrows the
batch range, check the graph against eager outside it before dropping the runtime check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import TraceError
from .families import BlockSpec, Family, family_of
from .finite import check_finite
from .loading import LoadedModel

MODEL_PREFIX = "model."
# Eager vs graph tolerance in float32: the graph runs the same kernels, so differences are
# reordering noise; anything larger means the trace captured a different computation.
ATOL = 1e-5
RTOL = 1e-4


@dataclass
class TracedDenoiser:
    """A denoiser's graph plus what the passes need to know about it."""

    graph_module: fx.GraphModule
    family: Family
    input_names: tuple[str, ...]
    blocks: tuple[BlockSpec, ...]
    model: nn.Module = field(repr=False)  # the source diffusers model, for configs and eager checks
    guards: tuple[str, ...] = ()

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.family.example_inputs(self.model, batch, seed)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.graph_module(*inputs)


def trace(source: LoadedModel | nn.Module, *, batch: int = 2, verify: bool = True) -> TracedDenoiser:
    """Trace `source` at `batch` with a dynamic batch dimension; check it against eager if `verify`.

    The source model is not modified. Verification runs the graph and the eager model on example
    inputs at `batch` and at batch 1 and raises TraceError on any mismatch above tolerance.
    """
    model = source.model if isinstance(source, LoadedModel) else source
    family = family_of(model)
    adapter = family.adapter(model)
    inputs = family.example_inputs(model, batch)
    names = tuple(inputs)
    dynamic = (tuple({0: torch.export.Dim.AUTO} for _ in names),)  # one entry: the adapter's *inputs
    try:
        with torch.no_grad():
            exported = torch.export.export(adapter, tuple(inputs.values()), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TraceError(f"torch.export could not trace {type(model).__name__}: {first_line}") from exc
    guards = tuple(f"{sym} in {rng}" for sym, rng in exported.range_constraints.items())
    graph_module = _plain_graph_module(exported.module(), names)
    traced = TracedDenoiser(graph_module, family, names, family.blocks(model), model, guards)
    if verify:
        batches = {batch, 1}
        upper = max((rng.upper for rng in exported.range_constraints.values()), default=None)
        if upper is not None and upper < batch * 64:  # a guard narrowed the batch range: test past it
            batches.add(int(upper) + 1)
        for b in sorted(batches):
            check_against_eager(traced, batch=b)
    return traced


def check_against_eager(traced: TracedDenoiser, *, batch: int, seed: int = 1) -> float:
    """Run graph and eager model on the same inputs; raise TraceError if they differ. Returns max |diff|."""
    inputs = tuple(traced.example_inputs(batch, seed).values())
    with torch.no_grad():
        expected = traced.family.adapter(traced.model)(*inputs)
        actual = traced.graph_module(*inputs)
    check_finite(expected, f"the eager model itself ({type(traced.model).__name__}) produced an output that",
                 "its weights or config are broken; this is not a tracing problem")
    diff = (actual - expected).abs().max().item()
    bound = ATOL + RTOL * expected.abs().max().item()
    if not diff <= bound:
        raise TraceError(
            f"traced graph of {type(traced.model).__name__} differs from eager at batch {batch}: "
            f"max |diff| {diff:.3g} > {bound:.3g}"
        )
    return diff


def module_path(node: fx.Node) -> str | None:
    """The diffusers module path a node was traced from ("down_blocks.0.resnets.1.conv1"), or None."""
    if node.op == "get_attr":
        path = str(node.target).rsplit(".", 1)[0]
    else:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        path = next(reversed(stack.values()))[0]
    path = _normalise(path)
    if path == "model":
        return ""
    return path[len(MODEL_PREFIX):] if path.startswith(MODEL_PREFIX) else None


def _normalise(path: str) -> str:
    # export may record ModuleList members as "model.down_blocks[0]" or "model.down_blocks.0"
    return re.sub(r"\[(\d+)\]", r".\1", path)


def _plain_graph_module(exported: fx.GraphModule, names: tuple[str, ...]) -> fx.GraphModule:
    """Strip export's pytree calling convention and runtime guard checks; name inputs after the family."""
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise TraceError(f"export produced {len(placeholders)} inputs, expected {len(names)} ({', '.join(names)})")
    for node, name in zip(placeholders, names):
        node.target = name
        node.name = name
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    while isinstance(result, (tuple, list)):
        result = result[0]
    output.args = (result,)
    graph._codegen = fx.graph.CodeGen()
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    root = nn.Module()
    for name, child in exported.named_children():
        if not name.startswith("_guards"):
            root.add_module(name, child)
    graph_module = fx.GraphModule(root, graph, class_name="DenoiserGraph")
    graph_module.graph.lint()
    return graph_module
