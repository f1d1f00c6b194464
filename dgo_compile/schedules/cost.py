"""Per-block and per-unit parameters and MACs of a traced denoiser, for `inspect` and schedules."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import fx

from dgo_compile.frontend.tracing import TracedDenoiser
from dgo_compile.passes import (
    AnnotateBlocks,
    AnnotateBlocksConfig,
    CountCosts,
    CountCostsConfig,
    PassManager,
    block_of,
    cost_of,
)
from dgo_compile.passes.base import editable_copy


@dataclass
class Cost:
    params: int = 0
    weight_macs: int = 0
    attention_macs: int = 0

    @property
    def macs(self) -> int:
        return self.weight_macs + self.attention_macs

    def add(self, params: int = 0, weight_macs: int = 0, attention_macs: int = 0) -> None:
        self.params += params
        self.weight_macs += weight_macs
        self.attention_macs += attention_macs


@dataclass
class BlockCost:
    """One row of the inspect table. Rows with gateable=False are the stem, embeddings and head."""

    name: str
    kind: str
    gateable: bool
    cost: Cost = field(default_factory=Cost)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    units: dict[str, Cost] = field(default_factory=dict)


@dataclass
class CostReport:
    model: str
    batch: int
    input_shapes: dict[str, tuple[int, ...]]
    rows: list[BlockCost]

    @property
    def total(self) -> Cost:
        total = Cost()
        for row in self.rows:
            total.add(row.cost.params, row.cost.weight_macs, row.cost.attention_macs)
        return total

    def share(self, row: BlockCost) -> float:
        return row.cost.macs / max(self.total.macs, 1)

    def to_json(self) -> dict:
        total = self.total
        return {
            "model": self.model,
            "batch": self.batch,
            "inputs": {k: list(v) for k, v in self.input_shapes.items()},
            "total": {**asdict(total), "macs": total.macs},
            "blocks": [
                {
                    "name": r.name, "kind": r.kind, "gateable": r.gateable,
                    "input_shapes": [list(s) for s in r.input_shapes],
                    "output_shapes": [list(s) for s in r.output_shapes],
                    **asdict(r.cost), "macs": r.cost.macs, "share": self.share(r),
                    "units": {u: {**asdict(c), "macs": c.macs} for u, c in r.units.items()},
                }
                for r in self.rows
            ],
        }


def analyse(traced: TracedDenoiser, batch: int = 1) -> fx.GraphModule:
    """The traced graph annotated by the block and cost analyses (node.meta), once per model and batch.

    The analyses annotate a copy (graph copied, weights shared), so the caller's traced graph stays as
    traced, and the copy is kept on `traced`: a compile's readers (SuperNet, schedule closure, cost
    report) share one shape propagation. Read it only; transforms copy before they edit.
    """
    cached = traced.analyses.get(batch)
    if cached is not None and cached[0] is traced.graph_module:
        return cached[1]
    inputs = traced.example_inputs(batch)
    annotated = PassManager([
        AnnotateBlocks(AnnotateBlocksConfig(traced.blocks)),
        CountCosts(CountCostsConfig(tuple(tuple(t.shape) for t in inputs.values()),
                                    tuple(t.dtype for t in inputs.values()),
                                    str(next(iter(inputs.values())).device))),
    ]).run(editable_copy(traced.graph_module)).graph_module
    traced.analyses[batch] = (traced.graph_module, annotated)
    return annotated


def cost_report(traced: TracedDenoiser, batch: int = 1) -> CostReport:
    """Params and MACs per block (and per unit inside it) for one denoiser call at `batch`."""
    graph_module = analyse(traced, batch)
    kinds = {b.name: b.kind for b in traced.blocks}
    rows: dict[str, BlockCost] = {}
    order = [b.name for b in traced.blocks]

    def row_for(node: fx.Node) -> BlockCost:
        name = _row_name(node)
        if name not in rows:
            rows[name] = BlockCost(name, kinds.get(name, _kind(traced, name)), name in kinds)
        return rows[name]

    param_numel = {name: p.numel() for name, p in graph_module.named_parameters()}
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        row = row_for(node)
        cost = cost_of(node)
        params = param_numel.get(str(node.target), 0) if node.op == "get_attr" else 0
        row.cost.add(params, cost.weight_macs, cost.attention_macs)
        unit = block_of(node).unit
        if unit is not None:
            row.units.setdefault(unit, Cost()).add(params, cost.weight_macs, cost.attention_macs)
    _boundaries(graph_module, rows)
    for spec in traced.blocks:  # units in call order, not in parameter-registration order
        if spec.name in rows:
            found = rows[spec.name].units
            rows[spec.name].units = {u: found[u] for u in spec.units if u in found}

    # Gateable blocks in execution order, the rest where they first appear around them.
    stem = [r for r in rows.values() if not r.gateable]
    first_block = _first_index(graph_module, order[0]) if order else math.inf
    pre = [r for r in stem if _first_index(graph_module, r.name) < first_block]
    ordered = pre + [rows[n] for n in order if n in rows] + [r for r in stem if r not in pre]
    shapes = {name: tuple(t.shape) for name, t in traced.example_inputs(batch).items()}
    return CostReport(type(traced.model).__name__, batch, shapes, ordered)


def _row_name(node: fx.Node) -> str:
    """Gateable block name, else the top-level module (stem, embeddings, head), else "(graph)"."""
    ann = block_of(node)
    if ann.block is not None:
        return ann.block
    return ann.module.split(".")[0] if ann.module else "(graph)"


def _boundaries(graph_module: fx.GraphModule, rows: dict[str, BlockCost]) -> None:
    """Activation shapes entering and leaving each gateable block (what a backup edge caches)."""
    for node in graph_module.graph.nodes:
        if node.op in ("get_attr", "placeholder", "output"):
            continue
        name = _row_name(node)
        row = rows.get(name)
        if row is None or not row.gateable:
            continue
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" and _row_name(arg) != name:
                shape = cost_of(arg).shape
                if shape and shape not in row.input_shapes:
                    row.input_shapes.append(shape)
        if any(_row_name(user) != name for user in node.users):
            shape = cost_of(node).shape
            if shape and shape not in row.output_shapes:
                row.output_shapes.append(shape)


def _first_index(graph_module: fx.GraphModule, name: str) -> int:
    for i, node in enumerate(graph_module.graph.nodes):
        if node.op not in ("get_attr", "placeholder") and _row_name(node) == name:
            return i
    return math.inf


def _kind(traced: TracedDenoiser, name: str) -> str:
    module = dict(traced.model.named_modules()).get(name)
    return type(module).__name__ if module is not None else "-"
