"""Half-precision ONNX graphs, by onnxruntime's own converter (`onnxruntime.transformers.float16`).

Why that converter: it is maintained with onnxruntime, knows which ops must keep float inputs
(Resize scales, GroupNorm's affine), and inserts the casts around the nodes we keep in float32.
Exporting a half-precision torch graph instead is not possible after tracing: the traced graph
has float32 casts baked in (diffusers' timestep embedding), and CPU verification in fp16 is slow.

What stays float32, and why:
- normalisation (InstanceNormalization for GroupNorm, LayerNormalization): their statistics
  (mean of squares over thousands of values) lose digits and can overflow in fp16;
- Softmax, and where the model asks for it (`upcast_attention`, SD-2.x) the whole fused attention
  (or, where attention is not fused, the score MatMul feeding the Softmax): QK^T overflows fp16 at
  768 px on SD-2.1, which is why diffusers upcasts it;
- the `timestep` input, when a graph still takes one: fp16 cannot hold fractional timesteps.
Weights, caches and timestep constants are fp16.

The converter is run on the graph alone (weights stay in their external data file); the weights
are cast to fp16 while they are streamed into the artifact's shared weights file, with the
converter's own clamping (`convert_np_to_float16`), so memory stays at one tensor at a time.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import onnx
from onnx import helper

from dgo_compile.backend.attention import FUSED_OP
from dgo_compile.core.errors import DgoError
from dgo_compile.core.options import check

FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax")
KEEP_FLOAT_INPUTS = ("timestep",)
# Ops between the attention-score MatMul and its Softmax (scale, mask).
_SCORE_PATH_OPS = ("Mul", "Div", "Add", "Cast")


class PrecisionError(DgoError):
    """An unknown precision, or a graph the converter cannot make half precision."""


def check_precision(precision: str) -> str:
    """`compile_artifact`'s own check (the library API), by the option table's rule."""
    check("top level", {"precision": precision}, error=PrecisionError, skip_none=False)
    return precision


def to_fp16(model: onnx.ModelProto, upcast_attention: bool = False) -> onnx.ModelProto:
    """The graph in half precision, keeping FP32_OPS (and attention scores, with `upcast_attention`)
    in float32. External initializers only change their declared type: `cast_weight` casts the bytes."""
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    blocked_nodes = _attention_nodes(model) if upcast_attention else []
    keep_io = [i.name for i in model.graph.input if i.name in KEEP_FLOAT_INPUTS]
    op_block_list = list(float16.DEFAULT_OP_BLOCK_LIST) + list(FP32_OPS)
    # The converter reads each converted initializer's data only for its shape; ours stays on disk,
    # so it gets the shape from the tensor's dims instead of loading it.
    with mock.patch.object(float16, "make_value_info_from_tensor", _value_info_from_dims), \
            mock.patch.object(float16, "infer_shapes", _infer_shapes):
        try:
            converted = float16.convert_float_to_float16(model, keep_io_types=keep_io, op_block_list=op_block_list,
                                                         node_block_list=blocked_nodes)
            # the converter appends its casts at the end; ONNX wants nodes in topological order
            OnnxModel.graph_topological_sort(converted.graph, is_deterministic=True)
            return converted
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PrecisionError(f"onnxruntime's fp16 converter failed on {model.graph.name}: {first_line}") from exc


def cast_weight(raw: bytes, source_type: int, target_type: int) -> bytes:
    """A weight's bytes in the type the converted graph declares for it."""
    if source_type == target_type:
        return raw
    if (source_type, target_type) == (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        from onnxruntime.transformers import float16

        return float16.convert_np_to_float16(np.frombuffer(raw, dtype=np.float32)).tobytes()
    raise PrecisionError(f"cannot cast a weight from ONNX type {source_type} to {target_type}")


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converter's shape inference (on its own copy of the graph), plus a float value_info for every
    fused attention output. ONNX shape inference does not know the com.microsoft op, and the converter
    casts a float32-kept node's output back to fp16 only where the output has one: without it, an upcast
    (SD-2.x) attention fed its fp32 output into fp16 nodes and onnxruntime refused the graph."""
    from onnx.shape_inference import infer_shapes

    inferred = infer_shapes(model)
    graph = inferred.graph
    declared = {v.name for v in (*graph.value_info, *graph.input, *graph.output)}
    for node in graph.node:
        if node.op_type == FUSED_OP.name:
            for name in node.output:
                if name and name not in declared:
                    graph.value_info.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return inferred


def _value_info_from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def _attention_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the fused attention nodes, and of the MatMul nodes that feed a Softmax through
    scale/mask ops only (attention torch.onnx decomposed)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    names = [node.name for node in model.graph.node if node.op_type == FUSED_OP.name]
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        frontier = [node.input[0]]
        while frontier:
            source = producer.get(frontier.pop())
            if source is None:
                continue
            if source.op_type == "MatMul":
                names.append(source.name)
            elif source.op_type in _SCORE_PATH_OPS:
                frontier.extend(source.input)
    return names
