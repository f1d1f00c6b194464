"""Trace a diffusers denoiser into a verified torch.fx GraphModule.

We use `torch.export(strict=False)` with a dynamic batch dimension: it handles every diffusers
family without tracer hacks (plain `symbolic_trace` fails on len()/iteration of proxies and on
shape-dependent Python), gives ATen-level nodes whose `nn_module_stack` locates each block and
unit, and its ops are the ones the ONNX exporter knows. Shape-dependent Python decisions become
export guards; we keep them as data (`TracedDenoiser.guards`).

Verification stays cheap at any model size. The graph is checked against eager at batch 1 only:
export assumes a dynamic dim is at least 2, so batch 1 is the one batch it does not cover. Batches
from 2 up to the guarded bound are covered by export's own soundness (the range constraints). Where
a guard narrows the batch (diffusers' Upsample2D branches on `batch >= 64` for a layout-only
`contiguous()`), the model is exported a second time just past the bound, on fake tensors (no
arithmetic), and the two graphs must match op for op once layout-only ops are set aside; then the
bound is dropped. If they differ, the bound stays as `TracedDenoiser.max_batch` and artifacts refuse
larger batches. Earlier versions ran 2 x 64 full forwards here: ~50 TMACs on SD-1.5. The answer is
kept in the compile cache (`dgo_compile.core.cache`) under a digest of the traced graph, the model's
class and the versions, so a model traced before is exported once.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import diffusers
import torch
from torch import fx, nn

from dgo_compile import __version__
from dgo_compile.core.cache import cache_root, digest, read_verdict, write_verdict
from dgo_compile.core.errors import TraceError
from dgo_compile.core.finite import check_finite
from dgo_compile.frontend.families import BlockSpec, Family, config_size, family_of
from dgo_compile.frontend.loading import LoadedModel
from dgo_compile.frontend.resolution import check_size

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
    max_batch: int | None = None  # the largest batch the graph is known to be right at; None: any
    sample_size: tuple[int, int] | None = None  # the latent (h, w) traced at; None: the config's
    # cost.analyse's cache, batch -> (the graph module analysed, its annotated copy): one analysis per model.
    analyses: dict[int, tuple[fx.GraphModule, fx.GraphModule]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.family.example_inputs(self.model, batch, seed, self.sample_size)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.graph_module(*inputs)


def trace(source: LoadedModel | nn.Module, *, batch: int = 2, verify: bool = True,
          size: tuple[int, int] | None = None) -> TracedDenoiser:
    """Trace `source` at `batch` with a dynamic batch dimension; check it against eager if `verify`.

    `size` is the latent (h, w) the graph is static at (default: the config's sample_size); a size
    the architecture cannot run at is a ResolutionError.

    The source model is not modified. Verification runs the graph and the eager model once, at
    batch 1, and raises TraceError on a mismatch above tolerance (see the module docstring for why
    that covers every batch).
    """
    model = source.model if isinstance(source, LoadedModel) else source
    family = family_of(model)
    size = _checked_size(model, size)
    adapter = family.adapter(model)
    inputs = family.example_inputs(model, batch, size=size)
    names = tuple(inputs)
    exported = _export(adapter, inputs, type(model).__name__)
    guards = tuple(f"{sym} in {rng}" for sym, rng in exported.range_constraints.items())
    graph_module = _plain_graph_module(exported.module(), names)
    max_batch = batch_bound(exported)
    if max_batch is not None and _same_past_the_guard(model, family, adapter, graph_module, names, guards, max_batch,
                                                      size):
        max_batch = None
    traced = TracedDenoiser(graph_module, family, names, family.blocks(model), model, guards,
                            max_batch=max_batch, sample_size=size)
    if verify:
        check_against_eager(traced, batch=1)
    return traced


def _same_past_the_guard(model: nn.Module, family: Family, adapter: nn.Module, graph_module: fx.GraphModule,
                         names: tuple[str, ...], guards: tuple[str, ...], max_batch: int,
                         size: tuple[int, int]) -> bool:
    """Whether `model` exported just past its batch bound computes what `graph_module` does. The answer
    depends only on the model's code and the traced graph, so the compile cache keeps it (`core.cache`):
    the second export is as costly as the first."""
    key = cache_root() and digest(__version__, torch.__version__, diffusers.__version__, type(model).__module__,
                                  type(model).__qualname__, guards, max_batch, size, _canonical(graph_module))
    known = read_verdict("trace", key) if key else None
    if known is not None and isinstance(known.get("same_computation"), bool):
        return known["same_computation"]
    past = family.example_inputs(model, max_batch + 1, size=size)
    beyond = _plain_graph_module(_export(adapter, past, type(model).__name__).module(), names)
    same = same_computation(graph_module, beyond)
    if key:
        write_verdict("trace", key, {"same_computation": same})
    return same


def _export(adapter: nn.Module, inputs: dict[str, torch.Tensor], label: str) -> torch.export.ExportedProgram:
    dynamic = (tuple({0: torch.export.Dim.AUTO} for _ in inputs),)  # one entry: the adapter's *inputs
    try:
        with torch.no_grad():
            return torch.export.export(adapter, tuple(inputs.values()), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TraceError(f"torch.export could not trace {label}: {first_line}") from exc


def batch_bound(exported: torch.export.ExportedProgram) -> int | None:
    """The upper bound a guard put on the batch symbol, or None when the batch is unbounded."""
    bounds = [int(rng.upper) for rng in exported.range_constraints.values() if rng.upper < sys.maxsize // 2]
    return min(bounds) if bounds else None


# Ops that change memory layout or assert, never values: a guarded branch made only of these is the same computation.
LAYOUT_OPS = frozenset({torch.ops.aten.contiguous.default, torch.ops.aten.clone.default,
                        torch.ops.aten._assert_tensor_metadata.default})


def same_computation(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    """Whether two traces of one model compute the same thing: equal op sequences with equal constant
    arguments and the same dataflow, once layout-only ops are passed through."""
    return _canonical(a) == _canonical(b)


def _canonical(graph_module: fx.GraphModule) -> list[tuple]:
    index: dict[fx.Node, object] = {}
    canon = []
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in LAYOUT_OPS:
            index[node] = index[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
            continue
        def ref(value):
            return ("%", index[value]) if isinstance(value, fx.Node) else value
        args = fx.node.map_aggregate(node.args, ref)
        kwargs = fx.node.map_aggregate(dict(node.kwargs), ref)
        index[node] = len(canon)
        canon.append((node.op, str(node.target), _hashable(args), _hashable(kwargs)))
    return canon


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym",)
    return repr(value)


def _checked_size(model: nn.Module, size: tuple[int, int] | None) -> tuple[int, int]:
    if size is None:
        return config_size(model)  # the size the model was built for, as it always traced
    check_size(model, *size, names=("latent height", "latent width"))
    return tuple(size)


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
