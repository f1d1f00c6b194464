"""Analysis: MACs of every node at a given input shape, split into weight and attention MACs.

Weight MACs come from convolutions and linear layers (the figure papers quote for UNets);
attention MACs from the score and value products (QK^T and AV), which DiT papers include.
Shapes come from propagating fake tensors, so counting costs no compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from . import annotations as ann
from .annotations import COST_KEY, NodeCost
from .base import AnalysisPass, PassResult, annotate

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default, aten.baddbmm.default}


@dataclass(frozen=True)
class CountCostsConfig:
    input_shapes: tuple[tuple[int, ...], ...]  # one per graph input, in order
    input_dtypes: tuple[torch.dtype, ...]
    device: str = "cpu"


class CountCosts(AnalysisPass):
    name = ann.COUNT_COSTS
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: CountCostsConfig):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fakes = [torch.empty(shape, dtype=dtype, device=self.config.device)
                     for shape, dtype in zip(self.config.input_shapes, self.config.input_dtypes)]
        ShapeProp(graph_module, fake_mode=mode).propagate(*fakes)
        params = {name for name, _ in graph_module.named_parameters()}
        modified = False
        for node in graph_module.graph.nodes:
            weight, attention = _macs(node, params)
            modified |= annotate(node, COST_KEY, NodeCost(weight, attention, _shape(node)))
        return PassResult(graph_module, modified)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata):
        meta = meta[0] if meta else None  # multi-output op: the first output
    return tuple(int(d) for d in meta.shape) if isinstance(meta, TensorMetadata) else None


def _macs(node: fx.Node, params: set[str]) -> tuple[int, int]:
    if node.op != "call_function":
        return 0, 0
    target = node.target
    out = _shape(node)
    if target in (aten.conv2d.default, aten.conv1d.default, aten.convolution.default):
        w = _shape(node.args[1])
        return math.prod(out) * math.prod(w[1:]), 0
    if target in (aten.conv_transpose2d.input,):
        w, x = _shape(node.args[1]), _shape(node.args[0])
        return math.prod(x) * math.prod(w[1:]), 0
    if target is aten.linear.default:
        return math.prod(out) * _shape(node.args[1])[1], 0
    if target is aten.scaled_dot_product_attention.default:
        q, k, v = (_shape(a) for a in node.args[:3])
        scores = math.prod(q[:-1]) * k[-2] * q[-1]
        values = math.prod(q[:-1]) * k[-2] * v[-1]
        return 0, scores + values
    if target in MATMULS:
        a, b = (node.args[1], node.args[2]) if target in (aten.addmm.default, aten.baddbmm.default) else node.args[:2]
        inner = _shape(a)[-1]
        macs = math.prod(out) * inner
        on_weights = any(isinstance(x, fx.Node) and x.op == "get_attr" and x.target in params for x in (a, b))
        return (macs, 0) if on_weights else (0, macs)
    return 0, 0
