"""Transform: a gate input per gateable element choosing its fresh or its cached outputs.

Every value an element hands on becomes `gate * fresh + (1 - gate) * cache`, with one 0-d
`gate__<element>` input per element. A gate of exactly 1.0 gives the fresh value bit for bit
(x * 1 + c * 0 == x for finite c), so the all-compute SuperNet is the original model; a gate of
0.0 gives the cache. The same form takes straight-through gates (hard forward, soft backward),
which is how the pruner learns them. Outputs 1.. now carry the mixed values: the next cache.
The mix is one node (`gate_mix`) whose backward skips the side a gate shuts (see `_GateMix`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from . import annotations as ann
from .annotations import GATES_KEY, GatedEdge, Gates, backup_edges, mark_glue
from .base import PassResult, TransformPass, editable_copy
from .boundaries import element_of, gate_name


class _GateMix(torch.autograd.Function):
    """`gate * fresh + (1 - gate) * cache`, with the same forward arithmetic as those three aten ops.
    Its backward gives no gradient to the fresh value at gate 0 and none to the cache at gate 1, where
    autograd would back-propagate exact zeros through the element's whole computation: a hard-gated
    trajectory skips the backward of every element it reuses. The gate's own gradient is unchanged."""

    @staticmethod
    def forward(ctx, fresh: torch.Tensor, cache: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(fresh, cache, gate)
        return fresh * gate + cache * (1.0 - gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        fresh, cache, gate = ctx.saved_tensors
        value = float(gate)
        grad_fresh = grad * gate if ctx.needs_input_grad[0] and value != 0.0 else None
        grad_cache = grad * (1.0 - gate) if ctx.needs_input_grad[1] and value != 1.0 else None
        grad_gate = ((grad * fresh).sum().to(gate.dtype) - (grad * cache).sum().to(gate.dtype)
                     if ctx.needs_input_grad[2] else None)
        return grad_fresh, grad_cache, grad_gate


def gate_mix(fresh: torch.Tensor, cache: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The gated value of one backup edge (a graph node: fold_schedule replaces it by one side)."""
    return _GateMix.apply(fresh, cache, gate)


@dataclass(frozen=True)
class AttachGatesConfig:
    pass


class AttachGates(TransformPass):
    name = ann.ATTACH_GATES
    requires: ClassVar[tuple[str, ...]] = (ann.INSERT_BACKUP_EDGES,)

    def __init__(self, config: AttachGatesConfig = AttachGatesConfig()):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if GATES_KEY in graph_module.meta:
            return PassResult(graph_module, False)
        supernet = editable_copy(graph_module)
        graph = supernet.graph
        edges = backup_edges(supernet)
        nodes = {n.name: n for n in graph.nodes}
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        gates = {}
        for element in edges.elements:
            with graph.inserting_after(last):
                last = gates[element] = graph.placeholder(gate_name(element))
            last.meta["val"] = torch.empty(())
            mark_glue(last)
        gated = []
        for edge in edges.edges:
            fresh, cache, gate = nodes[edge.fresh], nodes[edge.cache], gates[edge.element]
            with graph.inserting_after(fresh):
                mixed = graph.call_function(gate_mix, (fresh, cache, gate))
            mark_glue(mixed, fresh)
            fresh.replace_all_uses_with(
                mixed, delete_user_cb=lambda user, e=edge.element, m=mixed: user is not m and (
                    user.op == "output" or element_of(user, edges.granularity) != e))
            gated.append(GatedEdge(edge.element, fresh.name, cache.name, mixed.name))
        supernet.recompile()
        supernet.meta[GATES_KEY] = Gates(tuple((e, g.name) for e, g in gates.items()), tuple(gated))
        return PassResult(supernet, True)

