"""Where gateable elements meet the rest of the graph: the values a backup edge caches.

Shared by insert_backup_edges (what to cache), fold_schedule (what a reused element hands on)
and the schedule closure (who consumes whom). Not a pass: pure queries over annotated graphs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import fx

from .annotations import block_of

Granularity = Literal["block", "unit"]
GRANULARITIES: tuple[str, ...] = ("block", "unit")
OUTPUT = "(output)"  # consumer name for the graph output (through the head)
SAMPLE_INPUT = "sample"
SHAPE_QUERIES = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int}


def element_of(node: fx.Node, granularity: Granularity) -> str | None:
    """The gateable element (block, or unit inside a block) a node belongs to; None for glue."""
    annotation = block_of(node)
    return annotation.block if granularity == "block" else annotation.unit


def sample_dependent(graph_module: fx.GraphModule, sample: str = SAMPLE_INPUT) -> set[fx.Node]:
    """Nodes whose value depends on the noisy sample. The rest depend only on the timestep,
    conditions and weights: they are never cached, since a stale copy would carry an old timestep
    (DiT's final layer reads block 0's timestep embedding)."""
    found: set[fx.Node] = set()
    for node in graph_module.graph.nodes:
        if (node.op == "placeholder" and node.name == sample) or any(a in found for a in data_inputs(node)):
            found.add(node)
    return found


def input_dependencies(graph_module: fx.GraphModule) -> dict[fx.Node, frozenset[fx.Node]]:
    """Per node, the graph inputs (placeholders) its value depends on, through data edges only."""
    deps: dict[fx.Node, frozenset[fx.Node]] = {}
    for node in graph_module.graph.nodes:
        deps[node] = frozenset({node}) if node.op == "placeholder" else frozenset().union(
            *(deps[a] for a in data_inputs(node)))
    return deps


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs whose values (not just shapes) a node reads: a batch-size query reads no data."""
    return [] if node.target in SHAPE_QUERIES else node.all_input_nodes


def boundary_values(graph_module: fx.GraphModule, granularity: Granularity = "block") -> dict[str, list[fx.Node]]:
    """Per gateable element, in graph order: its sample-dependent nodes read from outside it."""
    dependent = sample_dependent(graph_module)
    found: dict[str, list[fx.Node]] = {}
    for node in graph_module.graph.nodes:
        element = element_of(node, granularity)
        if element is None or node.op == "get_attr" or node not in dependent:
            continue
        if any(user.op == "output" or element_of(user, granularity) != element for user in node.users):
            found.setdefault(element, []).append(node)
    return found


def element_consumers(graph_module: fx.GraphModule, elements: tuple[str, ...],
                      granularity: Granularity = "block") -> dict[str, set[str]]:
    """For each element, the elements (or OUTPUT) that read its cacheable outputs, looking through
    the glue between them (skip tuples, stem and head ops)."""
    dependent = sample_dependent(graph_module)
    owner = {n: element_of(n, granularity) if n in dependent else None for n in graph_module.graph.nodes}
    reaches: dict[fx.Node, set[str]] = {}
    for node in reversed(list(graph_module.graph.nodes)):
        found: set[str] = set()
        for user in node.users:
            if user.op == "output":
                found.add(OUTPUT)
            elif owner[user] is not None and owner[user] != owner[node]:
                found.add(owner[user])
            else:
                found |= reaches[user]
        reaches[node] = found
    consumers: dict[str, set[str]] = {e: set() for e in elements}
    for node, element in owner.items():
        if element is not None and element in consumers:
            consumers[element] |= {c for c in reaches[node] if c != element}
    return consumers


def elements(graph_module: fx.GraphModule, granularity: Granularity = "block") -> tuple[str, ...]:
    """Gateable elements in execution order."""
    return tuple(dict.fromkeys(e for n in graph_module.graph.nodes if (e := element_of(n, granularity)) is not None))


def cache_name(element: str, index: int) -> str:
    return f"cache__{element.replace('.', '_')}__{index}"


def gate_name(element: str) -> str:
    return f"gate__{element.replace('.', '_')}"
