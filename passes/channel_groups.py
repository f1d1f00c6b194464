"""Analysis: which channels must be pruned together (Diff-Pruning's dependency groups), as a plan.

Every tensor in the graph carries a channel axis: the tensor dims that index its channels, and
which channels those are, as a sequence of *spaces*. A space is a set of channels that must be cut
identically wherever it appears. A conv or linear output starts a space; element-wise ops, norms,
residual adds and samplers pass it on (an add unifies both branches' spaces); `cat` along channels
concatenates spaces (the skip connection's offsets); `chunk` splits one; a reshape that splits the
channel axis (attention heads) constrains it like a GroupNorm does. The time-embedding projection
added into a resnet's features joins that resnet's space through the add.

Spaces live in a union-find where a class can later be refined into sub-spaces (a `chunk`
or a `cat` meeting a single space splits it). After the walk, every leaf space is one group: the
weight slices that read or write it, and the GroupNorm / head constraints over it. Spaces that
reach the model's input or output, or start at an embedding table (class labels), are fixed.

Every ATen op must have a channel rule; an op without one raises `ChannelRuleError` naming the
node and how to register a rule. Nothing unknown is silently treated as element-wise.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, ClassVar

import networkx as nx
import torch
from torch import fx

from dgo_compile.errors import DgoError
from dgo_compile.tracing import MODEL_PREFIX, module_path

from .base import Pass, PassResult

META_KEY = "dgo.channel_plan"  # graph_module.meta
NORMALIZED_SHAPE = "normalized_shape"  # ParamSlice.param leaf of a LayerNorm without weights
aten = torch.ops.aten


class ChannelRuleError(DgoError):
    """An op whose channel semantics the analysis does not know, or uses it cannot follow."""


@dataclass(frozen=True)
class ParamSlice:
    """Channels [offset, offset + size) of a group are indices [start, start + size) of `param`'s `axis`."""

    param: str  # the model's parameter name, e.g. "down_blocks.0.resnets.0.conv1.weight"
    axis: int
    start: int


@dataclass(frozen=True)
class ChannelGroup:
    """One leaf space: channels that must be removed together from every slice listed."""

    id: int
    size: int
    slices: tuple[ParamSlice, ...]
    atoms: tuple[int, ...]  # sizes of the stretches that must each lose the same share (GroupNorm, heads)
    fixed: str | None  # why it cannot be pruned, or None
    constraints: tuple[str, ...]  # human-readable: "GroupNorm(16) down_blocks.0.resnets.0.norm1", "8 heads ..."
    share: int  # groups with the same share id sit under one GroupNorm / head split: they lose the same share
    steps: int  # the share is cut in this many equal steps; each removes atom/steps channels of every atom
    norm_group: int = 0  # channels per group of the finest GroupNorm over these channels (0: none)

    @property
    def prunable(self) -> bool:
        return self.fixed is None

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.param.rsplit(".", 1)[0] for s in self.slices))


@dataclass(frozen=True)
class AttentionSite:
    """An SDPA call whose scale follows the head size: pruning must keep its original scale."""

    node: str
    query_weight: str  # parameter producing the queries (scaled to keep the original 1/sqrt(d))
    query_bias: str | None
    head_dim: int
    explicit_scale: bool
    group: int  # the group holding the query/key channels


@dataclass(frozen=True)
class ChannelPlan:
    groups: tuple[ChannelGroup, ...]
    attention: tuple[AttentionSite, ...]

    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def shares(self) -> dict[int, tuple[ChannelGroup, ...]]:
        """Prunable groups by share: the unit that `select` cuts."""
        out: dict[int, list[ChannelGroup]] = {}
        for g in self.prunable():
            out.setdefault(g.share, []).append(g)
        return {k: tuple(v) for k, v in out.items()}

    def coupling_graph(self) -> nx.Graph:
        """Modules as nodes, an edge per group they share: the dependency structure to inspect."""
        graph = nx.Graph()
        for group in self.groups:
            modules = group.modules
            graph.add_nodes_from(modules)
            graph.add_edges_from((a, b, {"group": group.id}) for a in modules for b in modules if a < b)
        return graph


@dataclass(frozen=True)
class ChannelGroupsConfig:
    # Pairs of modules whose output channel counts the model's code ties through a shape (PixArt views its
    # caption embeddings with the hidden width); export bakes such shapes into constants, so the graph cannot
    # show the tie. Each pair loses the same share, so their sizes stay equal.
    equal_sizes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Axis:
    dims: tuple[int, ...]  # tensor dims indexing channels, major to minor
    parts: tuple[int, ...]  # space ids, concatenated


class _Spaces:
    """Union-find over channel spaces, with refinement of a class into consecutive sub-spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.children: dict[int, list[int]] = {}
        self.fixed: dict[int, str] = {}

    def new(self, size: int, fixed: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        if fixed:
            self.fixed[len(self.parent) - 1] = fixed
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def leaves(self, parts) -> list[int]:
        out = []
        for s in parts:
            r = self.find(s)
            out.extend(self.leaves(self.children[r]) if r in self.children else [r])
        return out

    def split(self, s: int, first: int) -> None:
        r = self.find(s)
        reason = self.fixed.get(r)
        self.children[r] = [self.new(first, reason), self.new(self.size[r] - first, reason)]

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise ChannelRuleError(f"internal: joining spaces of {self.size[ra]} and {self.size[rb]} channels")
        self.parent[rb] = ra
        reason = self.fixed.get(ra) or self.fixed.get(rb)
        if reason:
            self.fixed[ra] = reason

    def unify(self, a, b) -> None:
        """Make two concatenations of spaces the same channels, refining where boundaries differ."""
        la, lb = self.leaves(a), self.leaves(b)
        if sum(self.size[x] for x in la) != sum(self.size[x] for x in lb):
            raise ChannelRuleError("internal: unifying channel axes of different sizes")
        i = j = 0
        while i < len(la):
            x, y = la[i], lb[j]
            if self.size[x] == self.size[y]:
                self.union(x, y)
                i, j = i + 1, j + 1
            elif self.size[x] > self.size[y]:
                self.split(x, self.size[y])
                la[i:i + 1] = self.children[self.find(x)]
            else:
                self.split(y, self.size[x])
                lb[j:j + 1] = self.children[self.find(y)]

    def cut(self, parts, boundaries: list[int]) -> list[list[int]]:
        """Split a concatenation at channel offsets; returns the leaves of each piece."""
        leaves = self.leaves(parts)
        pieces, current, offset = [], [], 0
        targets = list(boundaries)
        k = 0
        while k < len(leaves):
            leaf = leaves[k]
            end = offset + self.size[leaf]
            if targets and offset < targets[0] < end:
                self.split(leaf, targets[0] - offset)
                leaves[k:k + 1] = self.children[self.find(leaf)]
                continue
            current.append(leaf)
            offset = end
            k += 1
            if targets and offset == targets[0]:
                pieces.append(current)
                current = []
                targets.pop(0)
        pieces.append(current)
        return pieces


Rule = Callable[["_Walk", fx.Node], object]
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


class _Walk:
    """State of one analysis: spaces, each node's axis, parameter uses and constraints."""

    def __init__(self, graph_module: fx.GraphModule):
        self.gm = graph_module
        self.spaces = _Spaces()
        self.axes: dict[fx.Node, object] = {}
        self.uses: list[tuple[str, int, tuple[int, ...]]] = []  # (param, axis, parts)
        self.constraints: list[tuple[str, int, tuple[int, ...]]] = []  # (label, groups, parts)
        self.norms: list[tuple[int, tuple[int, ...]]] = []  # (GroupNorm groups, parts)
        self.attention: list[tuple[fx.Node, fx.Node]] = []  # (sdpa node, query producer)
        self.tied: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # must lose the same share

    # helpers for rules
    def axis(self, arg) -> _Axis | None:
        return self.axes.get(arg) if isinstance(arg, fx.Node) else None

    def param(self, node, what: fx.Node) -> str:
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            raise ChannelRuleError(f"node {what.name} ({what.target}) takes a weight that is not a model "
                                   "parameter; channel pruning needs the layer's own weights")
        name = str(node.target)
        return name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name

    def tensor(self, node: fx.Node) -> torch.Tensor:
        value = self.gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value

    def size(self, parts) -> int:
        return sum(self.spaces.size[x] for x in self.spaces.leaves(parts))

    def fix(self, parts, reason: str) -> None:
        """Keep these channels whole: used in a way that a cut could not follow."""
        for leaf in self.spaces.leaves(parts):
            self.spaces.fixed.setdefault(self.spaces.find(leaf), reason)

    def refuse(self, node: fx.Node, why: str):
        raise ChannelRuleError(f"node {node.name} ({node.target}) {why}")


def _ndim(node) -> int:
    return len(_shape(node))


def _shape(node) -> tuple:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return ()
    return tuple(value.shape)


def _int_shape(node) -> list[int]:
    # Symbolic sizes (the dynamic batch) become a marker that cannot collide with channel counts.
    return [int(s) if isinstance(s, int) else -(10 ** 9 + 7) for s in _shape(node)]


@_rule(aten.conv2d.default)
def _conv(walk: _Walk, node: fx.Node):
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if groups != 1:
        walk.refuse(node, f"is a grouped convolution (groups={groups}); channel pruning supports groups=1")
    return _layer(walk, node, x, weight, bias, channel_dim=1)


@_rule(aten.linear.default)
def _linear(walk: _Walk, node: fx.Node):
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return _layer(walk, node, node.args[0], node.args[1], bias, channel_dim=_ndim(node) - 1)


def _layer(walk: _Walk, node, x, weight, bias, channel_dim: int) -> _Axis:
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
    return _Axis((channel_dim,), (out,))


@_rule(aten.group_norm.default)
def _group_norm(walk: _Walk, node: fx.Node):
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
def _layer_norm(walk: _Walk, node: fx.Node):
    x, shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else None
    bias = node.args[3] if len(node.args) > 3 else None
    incoming = walk.axis(x)
    if incoming is None:
        return None
    if len(shape) != 1 or incoming.dims != (_ndim(x) - 1,):
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
def _embedding(walk: _Walk, node: fx.Node):
    return _Axis((_ndim(node) - 1,), (walk.spaces.new(_shape(node)[-1], "an embedding table (class labels)"),))


_SAME = (aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
         aten.dropout.default, aten.to.dtype, aten._to_copy.default, aten.contiguous.default, aten.clone.default,
         aten.alias.default, aten.detach.default, aten.neg.default, aten.upsample_nearest2d.vec,
         aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.default, aten.avg_pool2d.default,
         aten.to.dtype_layout, aten.to.device, aten.expand.default)


@_rule(*_SAME)
def _same(walk: _Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is not None and node.target is aten.expand.default:
        shape = _shape(node.args[0])
        if any(shape[d] != _shape(node)[d] for d in incoming.dims):
            walk.refuse(node, "expands a channel dim")
    return incoming


_NO_CHANNELS = (aten.arange.start, aten.arange.default, aten.arange.start_step, aten.ones.default,
                aten.zeros.default, aten.full.default, aten.sym_size.int, aten.exp.default, aten.sin.default,
                aten.cos.default, aten.scalar_tensor.default)


@_rule(*_NO_CHANNELS)
def _no_channels(walk: _Walk, node: fx.Node):
    # Positional / sinusoidal timestep features: computed by the graph, never a layer's channels.
    if any(walk.axis(a) is not None for a in node.args):
        walk.refuse(node, "applies a value-generating op to channels")
    return None


@_rule(aten._assert_tensor_metadata.default, aten._assert_scalar.default)
def _assertion(walk: _Walk, node: fx.Node):
    return None  # export's runtime checks: no value flows on


@_rule(aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.mul.Scalar,
       aten.div.Scalar, aten.sub.Scalar, aten.pow.Tensor_Scalar, aten.rsub.Scalar)
def _broadcast(walk: _Walk, node: fx.Node):
    out_ndim = _ndim(node)
    found: list[_Axis] = []
    for arg in node.args:
        if not isinstance(arg, fx.Node):
            continue
        incoming = walk.axis(arg)
        shift = out_ndim - _ndim(arg)
        if incoming is None:
            continue
        found.append(_Axis(tuple(d + shift for d in incoming.dims), incoming.parts))
    if not found:
        return None
    dims = found[0].dims
    if any(a.dims != dims for a in found):
        walk.refuse(node, "combines tensors whose channels lie on different dims")
    for other in found[1:]:
        walk.spaces.unify(found[0].parts, other.parts)
    for arg in node.args:  # a tensor without channel meaning must broadcast over the channel dims
        if isinstance(arg, fx.Node) and walk.axis(arg) is None and _ndim(arg):
            shift = out_ndim - _ndim(arg)
            shape = _shape(arg)
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
        added.append(arg.args[1] % _ndim(arg))
        arg = arg.args[0]
    if arg.op != "get_attr":
        return None
    dims: list[int | None] = list(range(_ndim(arg)))
    for d in reversed(added):
        dims.insert(d, None)
    return arg, dims


def _cut_constant(walk: _Walk, node: fx.Node, constant: tuple[fx.Node, list[int]], spanned: list[int],
                  axis: _Axis) -> bool:
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
    rows = _shape(source)[param_dims[spanned[0]]]
    width = walk.size(axis.parts) // rows
    pieces = walk.spaces.cut(axis.parts, [width * k for k in range(1, rows)])
    for piece in pieces[1:]:
        walk.spaces.unify(pieces[0], piece)
    walk.uses.append((param, param_dims[spanned[1]], tuple(pieces[0])))
    return True


@_rule(aten.pad.default, aten.constant_pad_nd.default)
def _pad(walk: _Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    padded = {_ndim(node) - 1 - k // 2 for k in range(len(node.args[1]))}  # F.pad lists pads from the last dim
    if padded & set(incoming.dims):
        walk.refuse(node, "pads a channel dim")
    return incoming


@_rule(aten.unsqueeze.default)
def _unsqueeze(walk: _Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    d = node.args[1] % _ndim(node)
    return _Axis(tuple(c + (c >= d) for c in incoming.dims), incoming.parts)


@_rule(aten.squeeze.dim)
def _squeeze(walk: _Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    d = node.args[1] % _ndim(node.args[0])
    if d in incoming.dims:
        walk.refuse(node, "squeezes a channel dim")
    return _Axis(tuple(c - (c > d) for c in incoming.dims), incoming.parts)


@_rule(aten.slice.Tensor)
def _slice(walk: _Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    dim = (node.args[1] if len(node.args) > 1 else 0) % _ndim(node)
    if dim in incoming.dims and _shape(node)[dim] != _shape(node.args[0])[dim]:
        walk.refuse(node, "slices part of a channel dim")
    return incoming


@_rule(aten.permute.default)
def _permute(walk: _Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    perm = [p % _ndim(node) for p in node.args[1]]
    return _Axis(tuple(perm.index(c) for c in incoming.dims), incoming.parts)


@_rule(aten.transpose.int)
def _transpose(walk: _Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    a, b = node.args[1] % _ndim(node), node.args[2] % _ndim(node)
    return _Axis(tuple(b if c == a else a if c == b else c for c in incoming.dims), incoming.parts)


@_rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)
def _reshape(walk: _Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    if incoming is None:
        return None
    before, after = _int_shape(node.args[0]), _int_shape(node)
    chunks = _aligned_chunks(before, after)
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
            return _Axis(out, incoming.parts)
    walk.refuse(node, "loses track of the channel dims")


def _aligned_chunks(before: list[int], after: list[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Pair runs of dims with equal products (a reshape keeps element order)."""
    chunks, i, j = [], 0, 0
    while i < len(before) or j < len(after):
        in_dims, out_dims = [i], [j]
        p, q = before[i] if i < len(before) else 1, after[j] if j < len(after) else 1
        i, j = i + 1, j + 1
        while p != q:
            if abs(p) < abs(q) and i < len(before):
                p *= before[i]
                in_dims.append(i)
                i += 1
            elif j < len(after):
                q *= after[j]
                out_dims.append(j)
                j += 1
            else:
                break
        while j < len(after) and after[j] == 1 and (i >= len(before) or before[i] != 1):
            out_dims.append(j)
            j += 1
        chunks.append((tuple(d for d in in_dims if d < len(before)), tuple(d for d in out_dims if d < len(after))))
    return chunks


@_rule(aten.cat.default, aten.concat.default)
def _cat(walk: _Walk, node: fx.Node):
    tensors = list(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % _ndim(node)
    axes = [walk.axis(t) for t in tensors]
    if all(a is None for a in axes):
        return None
    if any(a is None for a in axes):
        walk.refuse(node, "concatenates channels with a tensor whose channels the analysis cannot follow")
    if all(a.dims == (dim,) for a in axes):  # a skip connection: the spaces follow each other
        return _Axis((dim,), tuple(p for a in axes for p in a.parts))
    if any(dim in a.dims for a in axes) or any(a.dims != axes[0].dims for a in axes):
        walk.refuse(node, "concatenates along a dim that mixes channel layouts")
    for a in axes[1:]:
        walk.spaces.unify(axes[0].parts, a.parts)
    return axes[0]


@_rule(aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)
def _chunk(walk: _Walk, node: fx.Node):
    incoming = walk.axis(node.args[0])
    pieces = node.meta["val"]
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % _ndim(node.args[0])
    if incoming is None:
        return [None] * len(pieces)
    if dim not in incoming.dims:
        return [incoming] * len(pieces)
    if incoming.dims[0] != dim:
        walk.refuse(node, "splits a channel dim that spans several tensor dims along one of its minor dims")
    # Along the major channel dim (PixArt's adaLN: [B, 6, D] chunked into six [B, 1, D]) each piece holds
    # whole rows of the minor dims; a piece with a single row keeps only the minor dims.
    row = math.prod(_shape(node.args[0])[d] for d in incoming.dims[1:])
    sizes = [p.shape[dim] for p in pieces]
    bounds = [row * sum(sizes[:k + 1]) for k in range(len(sizes) - 1)]
    return [_Axis(incoming.dims[1:] if size == 1 and len(incoming.dims) > 1 else incoming.dims, tuple(piece))
            for size, piece in zip(sizes, walk.spaces.cut(incoming.parts, bounds))]


@_rule(operator.getitem)
def _getitem(walk: _Walk, node: fx.Node):
    source, index = node.args
    value = walk.axes.get(source)
    if isinstance(value, list):
        return value[index]
    if value is None and not isinstance(source.meta.get("val"), torch.Tensor):
        return None
    walk.refuse(node, "indexes a tensor; only the pieces of chunk/split are understood")


@_rule(aten.scaled_dot_product_attention.default)
def _attention(walk: _Walk, node: fx.Node):
    q, k, v = (walk.axis(a) for a in node.args[:3])
    if q is None or k is None or v is None or not q.dims == k.dims == v.dims or not set(q.dims) <= {1, 3}:
        walk.refuse(node, "attends over tensors whose heads the analysis could not follow")
    walk.spaces.unify(q.parts, k.parts)  # q.k contracts the head channels: one cut for both
    walk.tied.append((q.parts, v.parts))  # diffusers reshapes the output with the keys' head size
    walk.attention.append((node, node.args[0]))
    return v


@_rule(aten.einsum.default)
def _einsum(walk: _Walk, node: fx.Node):
    equation, operands = node.args[0], node.args[1]
    inputs, output = equation.replace(" ", "").split("->")
    if len(operands) != 1 or sorted(inputs) != sorted(output):
        walk.refuse(node, "is an einsum other than a permutation")
    incoming = walk.axis(operands[0])
    if incoming is None:
        return None
    return _Axis(tuple(output.index(inputs[d]) for d in incoming.dims), incoming.parts)


class ChannelGroups(Pass):
    """Analysis: annotate graph_module.meta with the ChannelPlan (no node changes)."""

    name = "channel_groups"
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ChannelGroupsConfig = ChannelGroupsConfig()):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        plan = analyse_channels(graph_module, self.config.equal_sizes)
        modified = graph_module.meta.get(META_KEY) != plan
        graph_module.meta[META_KEY] = plan
        return PassResult(graph_module, modified)


def channel_plan(graph_module: fx.GraphModule) -> ChannelPlan:
    from dgo_compile.errors import AnnotationMissingError

    try:
        return graph_module.meta[META_KEY]
    except KeyError:
        raise AnnotationMissingError(f"the graph has no channel plan: run pass '{ChannelGroups.name}' first") from None


def analyse_channels(graph_module: fx.GraphModule, equal_sizes: tuple[tuple[str, str], ...] = ()) -> ChannelPlan:
    walk = _Walk(graph_module)
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            # Inputs and constants carry no prunable channels: a layer reading them keeps its input size,
            # and one meeting pruned channels element-wise is refused by the broadcast rule.
            continue
        if node.op == "output":
            for arg in _flat_nodes(node.args):
                axis = walk.axis(arg)
                if axis is not None:
                    for leaf in walk.spaces.leaves(axis.parts):
                        walk.spaces.fixed[leaf] = "the model output"
        elif node.op == "call_function":
            rule = RULES.get(node.target)
            if rule is None:
                raise ChannelRuleError(
                    f"node {node.name} calls {node.target}, whose channel semantics channel pruning does not know; "
                    f"register a rule with dgo_compile.passes.channel_groups.register_channel_rule({node.target}, "
                    "rule) or leave this model unpruned")
            walk.axes[node] = rule(walk, node)
        else:
            raise ChannelRuleError(f"node {node.name} is a {node.op}; channel analysis runs on ATen graphs from trace()")
    for first, second in equal_sizes:
        a, b = _output_parts(walk, first), _output_parts(walk, second)
        walk.tied.append((a, b))
        walk.constraints.append((f"same size as {second} (a shape in the model's code)", 1, a))
        walk.constraints.append((f"same size as {first} (a shape in the model's code)", 1, b))
    return _plan(walk)


def _output_parts(walk: _Walk, module: str) -> tuple[int, ...]:
    for param, axis, parts in walk.uses:
        if param == f"{module}.weight" and axis == 0:
            return parts
    raise ChannelRuleError(f"{module} has no weight whose output channels the analysis saw; "
                           "it cannot be tied to another module's size")


def _flat_nodes(args):
    out = []
    fx.node.map_arg(args, out.append)
    return out


def _plan(walk: _Walk) -> ChannelPlan:
    spaces = walk.spaces
    leaf_ids: dict[int, int] = {}
    slices: dict[int, list[ParamSlice]] = {}
    cuts: dict[int, set[int]] = {}
    labels: dict[int, list[str]] = {}

    def spans(parts):
        offset = 0
        for leaf in spaces.leaves(parts):
            leaf = spaces.find(leaf)
            yield leaf, offset
            offset += spaces.size[leaf]

    for param, axis, parts in walk.uses:
        for leaf, offset in spans(parts):
            slices.setdefault(leaf, []).append(ParamSlice(param, axis, offset))
    norm_group: dict[int, int] = {}
    for groups, parts in walk.norms:
        per_group = walk.size(parts) // groups
        for leaf, _ in spans(parts):
            norm_group[leaf] = min(norm_group.get(leaf, per_group), per_group)
    for label, groups, parts in walk.constraints:
        total = walk.size(parts)
        step = total // groups
        for leaf, offset in spans(parts):
            size = spaces.size[leaf]
            local = {b - offset for b in range(0, total + 1, step) if offset < b < offset + size}
            cuts.setdefault(leaf, set()).update(local)
            labels.setdefault(leaf, []).append(label)
    # A GroupNorm group or head spanning several leaves keeps its size only if they all lose the same share.
    tied = nx.Graph()
    tied.add_nodes_from(slices)
    for _, _, parts in walk.constraints:
        members = list(dict.fromkeys(leaf for leaf, _ in spans(parts)))
        tied.add_edges_from(zip(members, members[1:]))
    for a, b in walk.tied:
        members = list(dict.fromkeys(leaf for leaf, _ in (*spans(a), *spans(b))))
        tied.add_edges_from(zip(members, members[1:]))
    share_of, share_fixed, share_steps = {}, {}, {}
    for index, component in enumerate(nx.connected_components(tied)):
        atoms_in = []
        for leaf in component:
            share_of[leaf] = index
            bounds = [0, *sorted(cuts.get(leaf, ())), spaces.size[leaf]]
            atoms_in += [b - a for a, b in zip(bounds, bounds[1:])]
        share_steps[index] = math.gcd(*atoms_in)
        reasons = [spaces.fixed.get(spaces.find(leaf)) or
                   ("no weight produces these channels" if not any(x.axis == 0 for x in slices.get(leaf, ()))
                    else None) for leaf in component]
        reason = next((r for r in reasons if r), None)
        if reason and len(component) > 1:
            reason = f"shares GroupNorm groups or heads with channels that are fixed ({reason})"
        share_fixed[index] = reason
    groups = []
    for leaf in sorted(slices):
        size = spaces.size[leaf]
        bounds = [0, *sorted(cuts.get(leaf, ())), size]
        atoms = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        leaf_ids[leaf] = len(groups)
        own = spaces.fixed.get(spaces.find(leaf))
        share = share_of[leaf]
        groups.append(ChannelGroup(len(groups), size, tuple(dict.fromkeys(slices[leaf])), atoms,
                                   own or share_fixed[share], tuple(dict.fromkeys(labels.get(leaf, ()))),
                                   share, share_steps[share], norm_group.get(leaf, 0)))
    attention = []
    for node, query in walk.attention:
        producer = query
        while producer.target is not aten.linear.default:
            producer = producer.args[0]
        weight = walk.param(producer.args[1], producer)
        bias = producer.args[2] if len(producer.args) > 2 else None
        leaf = spaces.find(spaces.leaves(walk.axis(query).parts)[0])
        attention.append(AttentionSite(node.name, weight, walk.param(bias, producer) if bias is not None else None,
                                       int(_shape(query)[-1]), "scale" in node.kwargs, leaf_ids.get(leaf, -1)))
    return ChannelPlan(tuple(groups), tuple(attention))
