"""The op rules of the channel analysis: one per ATen op, each returning the node's channel axis.

A registry rather than a match in the walk so that a model with an op the analysis does not know
can teach it one (`register_channel_rule`) instead of being silently treated as element-wise.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
from torch import fx

from dgo_compile.frontend.tracing import module_path

from .channel_plan import NORMALIZED_SHAPE
from .channel_spaces import Axis, Walk, aligned_chunks, int_shape_of, ndim_of, shape_of

aten = torch.ops.aten


Rule = Callable[[Walk, fx.Node], object]
RULES: dict[object, Rule] = {}


def register_channel_rule(target, rule: Rule) -> None:
    """Teach the analysis an op: `rule(walk, node)` returns the node's channel axis (or None)."""
    RULES[target] = rule


def _rule(*targets):
    def register(fn):
        for t in targets:
            RULES[t] = fn
        return fn
    return register



@_rule(aten.conv2d.default)
def _conv(walk: Walk, node: fx.Node):
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if groups != 1:
        walk.refuse(node, f"is a grouped convolution (groups={groups}); channel pruning supports groups=1")
    return _layer(walk, node, x, weight, bias, channel_dim=1)


@_rule(aten.linear.default)
def _linear(walk: Walk, node: fx.Node):
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return _layer(walk, node, node.args[0], node.args[1], bias, channel_dim=ndim_of(node) - 1)


def _layer(walk: Walk, node, x, weight, bias, channel_dim: int) -> Axis:
    weight_name = walk.param(weight, node)
    incoming = walk.axis(x)
    if incoming is not None:
        if incoming.dims != (channel_dim,):
            walk.refuse(node, f"reads channels on dims {incoming.dims}, not on its input channel dim {channel_dim}")
        walk.uses.append((weight_name, 1, incoming.parts))
    out = walk.spaces.new(walk.tensor(weight).shape[0])
    walk.uses.append((weight_name, 0, (out,)))
    if bias is not None:
        walk.uses.append((walk.param(bias, node), 0, (out,)))
    return Axis((channel_dim,), (out,))


@_rule(aten.group_norm.default)
def _group_norm(walk: Walk, node: fx.Node):
    x, groups = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else None
    bias = node.args[3] if len(node.args) > 3 else None
    incoming = walk.axis(x)
    if incoming is None or incoming.dims != (1,):
        walk.refuse(node, "normalizes a tensor whose channels are not on dim 1")
    label = (walk.param(weight, node).rsplit(".", 1)[0] if weight is not None else node.name)
    walk.constraints.append((f"GroupNorm({groups}) {label}", int(groups), incoming.parts))
    walk.norms.append((int(groups), incoming.parts))
    for p in (weight, bias):
        if p is not None:
            walk.uses.append((walk.param(p, node), 0, incoming.parts))
    return incoming


@_rule(aten.layer_norm.default)
def _layer_norm(walk: Walk, node: fx.Node):
    x, shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else None
    bias = node.args[3] if len(node.args) > 3 else None
    incoming = walk.axis(x)
    if incoming is None:
        return None
    if len(shape) != 1 or incoming.dims != (ndim_of(x) - 1,):
        walk.refuse(node, "normalizes over more than the channel dim")
    for p in (weight, bias):
        if p is not None:
            walk.uses.append((walk.param(p, node), 0, incoming.parts))
    if weight is None:  # no affine parameters: the module's normalized_shape still follows the cut
        path = module_path(node)
        if path is None:
            walk.refuse(node, "is a LayerNorm without weights outside any module")
        walk.uses.append((f"{path}.{NORMALIZED_SHAPE}" if path else NORMALIZED_SHAPE, 0, incoming.parts))
    return incoming


@_rule(aten.embedding.default)
def _embedding(walk: Walk, node: fx.Node):
    return Axis((ndim_of(node) - 1,), (walk.spaces.new(shape_of(node)[-1], "an embedding table (class labels)"),))


_SAME = (aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
         aten.dropout.default, aten.to.dtype, aten._to_copy.default, aten.contiguous.default, aten.clone.default,
         aten.alias.default, aten.detach.default, aten.neg.default, aten.upsample_nearest2d.vec,
         aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.default, aten.avg_pool2d.default,
         aten.to.dtype_layout, aten.to.device, aten.expand.default)


@_rule(*_SAME)
def _same(walk: Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is not None and node.target is aten.expand.default:
        shape = shape_of(node.args[0])
        if any(shape[d] != shape_of(node)[d] for d in incoming.dims):
            walk.refuse(node, "expands a channel dim")
    return incoming


_NO_CHANNELS = (aten.arange.start, aten.arange.default, aten.arange.start_step, aten.ones.default,
                aten.zeros.default, aten.full.default, aten.sym_size.int, aten.exp.default, aten.sin.default,
                aten.cos.default, aten.scalar_tensor.default)


@_rule(*_NO_CHANNELS)
def _no_channels(walk: Walk, node: fx.Node):
    # Positional / sinusoidal timestep features: computed by the graph, never a layer's channels.
    if any(walk.axis(a) is not None for a in node.args):
        walk.refuse(node, "applies a value-generating op to channels")
    return None


@_rule(aten._assert_tensor_metadata.default, aten._assert_scalar.default)
def _assertion(walk: Walk, node: fx.Node):
    return None  # export's runtime checks: no value flows on


@_rule(aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.mul.Scalar,
       aten.div.Scalar, aten.sub.Scalar, aten.pow.Tensor_Scalar, aten.rsub.Scalar)
def _broadcast(walk: Walk, node: fx.Node):
    out_ndim = ndim_of(node)
    found: list[Axis] = []
    for arg in node.args:
        if not isinstance(arg, fx.Node):
            continue
        incoming = walk.axis(arg)
        shift = out_ndim - ndim_of(arg)
        if incoming is None:
            continue
        found.append(Axis(tuple(d + shift for d in incoming.dims), incoming.parts))
    if not found:
        return None
    dims = found[0].dims
    if any(a.dims != dims for a in found):
        walk.refuse(node, "combines tensors whose channels lie on different dims")
    for other in found[1:]:
        walk.spaces.unify(found[0].parts, other.parts)
    for arg in node.args:  # a tensor without channel meaning must broadcast over the channel dims
        if isinstance(arg, fx.Node) and walk.axis(arg) is None and ndim_of(arg):
            shift = out_ndim - ndim_of(arg)
            shape = shape_of(arg)
            spanned = [d - shift for d in dims if 0 <= d - shift < len(shape) and shape[d - shift] != 1]
            if not spanned:
                continue
            constant = _model_constant(arg)
            if constant is not None and _cut_constant(walk, node, constant, spanned, found[0]):
                continue
            walk.fix(found[0].parts, f"combined with the computed tensor {arg.name} at {node.name}")
    return found[0]


def _model_constant(arg: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """A model parameter or buffer seen through `unsqueeze`s (PixArt's `scale_shift_table[None]`): the
    get_attr node and, for each dim of `arg`, the parameter's dim (None where unsqueeze added it)."""
    added: list[int] = []
    while arg.op == "call_function" and arg.target is aten.unsqueeze.default:
        added.append(arg.args[1] % ndim_of(arg))
        arg = arg.args[0]
    if arg.op != "get_attr":
        return None
    dims: list[int | None] = list(range(ndim_of(arg)))
    for d in reversed(added):
        dims.insert(d, None)
    return arg, dims


def _cut_constant(walk: Walk, node: fx.Node, constant: tuple[fx.Node, list[int]], spanned: list[int],
                  axis: Axis) -> bool:
    """A model constant meeting channels element-wise is cut with them (DiT's position table). When the
    channels span two dims (PixArt's adaLN rows x hidden), each row of the table meets one stretch of
    channels, and the table can only lose whole columns: the rows must be the same channels."""
    source, param_dims = constant
    param = walk.param(source, node)
    if len(spanned) == 1 and len(axis.dims) == 1:
        walk.uses.append((param, param_dims[spanned[0]], axis.parts))
        return True
    if len(spanned) != 2 or len(axis.dims) != 2:
        return False
    rows = shape_of(source)[param_dims[spanned[0]]]
    width = walk.size(axis.parts) // rows
    pieces = walk.spaces.cut(axis.parts, [width * k for k in range(1, rows)])
    for piece in pieces[1:]:
        walk.spaces.unify(pieces[0], piece)
    walk.uses.append((param, param_dims[spanned[1]], tuple(pieces[0])))
    return True


@_rule(aten.pad.default, aten.constant_pad_nd.default)
def _pad(walk: Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    padded = {ndim_of(node) - 1 - k // 2 for k in range(len(node.args[1]))}  # F.pad lists pads from the last dim
    if padded & set(incoming.dims):
        walk.refuse(node, "pads a channel dim")
    return incoming


@_rule(aten.unsqueeze.default)
def _unsqueeze(walk: Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    d = node.args[1] % ndim_of(node)
    return Axis(tuple(c + (c >= d) for c in incoming.dims), incoming.parts)


@_rule(aten.squeeze.dim)
def _squeeze(walk: Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    d = node.args[1] % ndim_of(node.args[0])
    if d in incoming.dims:
        walk.refuse(node, "squeezes a channel dim")
    return Axis(tuple(c - (c > d) for c in incoming.dims), incoming.parts)


@_rule(aten.slice.Tensor)
def _slice(walk: Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    dim = (node.args[1] if len(node.args) > 1 else 0) % ndim_of(node)
    if dim in incoming.dims and shape_of(node)[dim] != shape_of(node.args[0])[dim]:
        walk.refuse(node, "slices part of a channel dim")
    return incoming


@_rule(aten.permute.default)
def _permute(walk: Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    perm = [p % ndim_of(node) for p in node.args[1]]
    return Axis(tuple(perm.index(c) for c in incoming.dims), incoming.parts)


@_rule(aten.transpose.int)
def _transpose(walk: Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    a, b = node.args[1] % ndim_of(node), node.args[2] % ndim_of(node)
    return Axis(tuple(b if c == a else a if c == b else c for c in incoming.dims), incoming.parts)


@_rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)
def _reshape(walk: Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    before, after = int_shape_of(node.args[0]), int_shape_of(node)
    chunks = aligned_chunks(before, after)
    dims = set(incoming.dims)
    for in_dims, out_dims in chunks:
        if dims & set(in_dims):
            if {d for d in in_dims if before[d] != 1} != dims or sorted(incoming.dims) != list(incoming.dims):
                walk.fix(incoming.parts, f"reshaped together with other dims at {node.name}")
                return None
            out = tuple(d for d in out_dims if after[d] != 1) or out_dims[:1]
            if len(out) > 1:  # channels split over several dims (attention heads): the last dim varies fastest
                groups = math.prod(after[d] for d in out[:-1])
                walk.constraints.append((f"{groups} heads ({node.name})", groups, incoming.parts))
            return Axis(out, incoming.parts)
    walk.refuse(node, "loses track of the channel dims")


@_rule(aten.cat.default, aten.concat.default)
def _cat(walk: Walk, node: fx.Node):
    tensors = list(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % ndim_of(node)
    axes = [walk.axis(t) for t in tensors]
    if all(a is None for a in axes):
        return None
    if any(a is None for a in axes):
        walk.refuse(node, "concatenates channels with a tensor whose channels the analysis cannot follow")
    if all(a.dims == (dim,) for a in axes):  # a skip connection: the spaces follow each other
        return Axis((dim,), tuple(p for a in axes for p in a.parts))
    if any(dim in a.dims for a in axes) or any(a.dims != axes[0].dims for a in axes):
        walk.refuse(node, "concatenates along a dim that mixes channel layouts")
    for a in axes[1:]:
        walk.spaces.unify(axes[0].parts, a.parts)
    return axes[0]


@_rule(aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)
def _chunk(walk: Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    pieces = node.meta["val"]
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % ndim_of(node.args[0])
    if incoming is None:
        return [None] * len(pieces)
    if dim not in incoming.dims:
        return [incoming] * len(pieces)
    if incoming.dims[0] != dim:
        walk.refuse(node, "splits a channel dim that spans several tensor dims along one of its minor dims")
    # Along the major channel dim (PixArt's adaLN: [B, 6, D] chunked into six [B, 1, D]) each piece holds
    # whole rows of the minor dims; a piece with a single row keeps only the minor dims.
    row = math.prod(shape_of(node.args[0])[d] for d in incoming.dims[1:])
    sizes = [p.shape[dim] for p in pieces]
    bounds = [row * sum(sizes[:k + 1]) for k in range(len(sizes) - 1)]
    return [Axis(incoming.dims[1:] if size == 1 and len(incoming.dims) > 1 else incoming.dims, tuple(piece))
            for size, piece in zip(sizes, walk.spaces.cut(incoming.parts, bounds))]


@_rule(operator.getitem)
def _getitem(walk: Walk, node: fx.Node):
    source, index = node.args
    value = walk.axes.get(source)
    if isinstance(value, list):
        return value[index]
    if value is None and not isinstance(source.meta.get("val"), torch.Tensor):
        return None
    walk.refuse(node, "indexes a tensor; only the pieces of chunk/split are understood")


@_rule(aten.scaled_dot_product_attention.default)
def _attention(walk: Walk, node: fx.Node):
    q, k, v = (walk.axis(a) for a in node.args[:3])
    if q is None or k is None or v is None or not q.dims == k.dims == v.dims or not set(q.dims) <= {1, 3}:
        walk.refuse(node, "attends over tensors whose heads the analysis could not follow")
    walk.spaces.unify(q.parts, k.parts)  # q.k contracts the head channels: one cut for both
    walk.tied.append((q.parts, v.parts))  # diffusers reshapes the output with the keys' head size
    walk.attention.append((node, node.args[0]))
    return v


@_rule(aten.einsum.default)
def _einsum(walk: Walk, node: fx.Node):
    equation, operands = node.args[0], node.args[1]
    inputs, output = equation.replace(" ", "").split("->")
    if len(operands) != 1 or sorted(inputs) != sorted(output):
        walk.refuse(node, "is an einsum other than a permutation")
    incoming = walk.axis(operands[0])
    if incoming is None:
        return None
    return Axis(tuple(output.index(inputs[d]) for d in incoming.dims), incoming.parts)


