"""Attention is exported as onnxruntime's fused MultiHeadAttention (one node per layer on every family:
tests/test_artifact_weights.py), with the same numbers as torch.onnx's own decomposition; what the
fused op cannot express keeps the decomposition; SD-2.x's `upcast_attention` keeps it in float32 in fp16."""

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dgo_compile import load, trace
from dgo_compile.backend.export import export_onnx
from dgo_compile.backend.precision import to_fp16
from model_configs import TINY_SD
from test_artifact_weights import FP16_CALL_BOUND

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _run(path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: v.numpy() for i, v in zip(session.get_inputs(), inputs.values())})[0]


def _ops(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_unfused_export_is_torch_onnx_decomposition_with_the_same_numbers(config_dir, tmp_path):
    traced = trace(load(config_dir / "sd" / "config.json"), verify=False)
    inputs = traced.example_inputs(2, seed=5)
    export_onnx(traced.graph_module, inputs, tmp_path / "fused.onnx")
    export_onnx(traced.graph_module, inputs, tmp_path / "plain.onnx", fused_attention=False)
    layers = sum(node.target is SDPA for node in traced.graph_module.graph.nodes)
    plain_ops = _ops(tmp_path / "plain.onnx")
    assert plain_ops["Softmax"] == layers and plain_ops["MultiHeadAttention"] == 0
    fused, plain = _run(tmp_path / "fused.onnx", inputs), _run(tmp_path / "plain.onnx", inputs)
    assert np.abs(fused - plain).max() <= 1e-5 * np.abs(plain).max()


class _MaskedAttention(torch.nn.Module):
    def forward(self, query, key, value, bias):
        plain = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        masked = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        causal = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
        return plain + masked + causal


def test_attention_the_fused_op_cannot_express_keeps_the_decomposition(tmp_path):
    torch.manual_seed(0)
    inputs = {name: torch.randn(2, 3, 6, 4) for name in ("query", "key", "value")}
    inputs["bias"] = torch.randn(2, 1, 6, 6)
    program = torch.export.export(_MaskedAttention(), tuple(inputs.values()),
                                  dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in inputs))
    export_onnx(program.module(), inputs, tmp_path / "m.onnx")
    ops = _ops(tmp_path / "m.onnx")
    assert ops["MultiHeadAttention"] == 1 and ops["Softmax"] == 2  # the mask and the causal one are not fused
    reference = _MaskedAttention()(*inputs.values()).numpy()
    assert np.abs(_run(tmp_path / "m.onnx", inputs) - reference).max() <= 1e-5 * np.abs(reference).max()


def _float_inputs(model: onnx.ModelProto) -> list[bool]:
    """For each fused attention node: are all its inputs casts to float32?"""
    casts = {out: node for node in model.graph.node if node.op_type == "Cast" for out in node.output}
    to_float = lambda name: name in casts and casts[name].attribute[0].i == onnx.TensorProto.FLOAT
    return [all(map(to_float, node.input)) for node in model.graph.node if node.op_type == "MultiHeadAttention"]


def test_fp16_keeps_fused_attention_in_float32_only_where_the_model_upcasts(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_SD, "upcast_attention": True}))
    traced = trace(load(config), verify=False)
    export_onnx(traced.graph_module, traced.example_inputs(2), tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    upcast, plain = to_fp16(model, upcast_attention=True), to_fp16(model)
    assert len(_float_inputs(upcast)) == len(_float_inputs(plain)) > 0
    assert all(_float_inputs(upcast)) and not any(_float_inputs(plain))
    # both open in onnxruntime and compute the model (the upcast one used to hand its float32 attention output
    # to fp16 nodes without a cast, which onnxruntime refused: SD-2.1's fp16 artifact did not load)
    inputs = traced.example_inputs(2, seed=4)
    with torch.no_grad():
        expected = traced.graph_module(*inputs.values()).numpy()
    for converted in (upcast, plain):
        session = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {i.name: v.numpy().astype(np.float16 if i.type == "tensor(float16)" else v.numpy().dtype)
                 for i, v in zip(session.get_inputs(), inputs.values())}
        actual = session.run(None, feeds)[0].astype(np.float32)
        assert np.abs(actual - expected).max() / np.abs(expected).max() < FP16_CALL_BOUND
