"""The state the channel rules edit: channel axes, the refinable union-find of spaces, the walk.

Kept apart from the rules so that a rule registered from outside (`register_channel_rule`) sees the
same small API the built-in rules use: `walk.axis`, `walk.param`, `walk.spaces`, `walk.refuse`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from dgo_compile.frontend.tracing import MODEL_PREFIX

from .channel_plan import ChannelRuleError


def param_name(get_attr: fx.Node) -> str:
    """The model's own name of the parameter a get_attr node reads."""
    name = str(get_attr.target)
    return name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name


@dataclass(frozen=True)
class Axis:
    """A tensor's channels: which dims index them and which spaces they are."""

    dims: tuple[int, ...]  # tensor dims indexing channels, major to minor
    parts: tuple[int, ...]  # space ids, concatenated


class Spaces:
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



class Walk:
    """State of one analysis: spaces, each node's axis, parameter uses and constraints."""

    def __init__(self, graph_module: fx.GraphModule):
        self.gm = graph_module
        self.spaces = Spaces()
        self.axes: dict[fx.Node, object] = {}
        self.uses: list[tuple[str, int, tuple[int, ...]]] = []  # (param, axis, parts)
        self.constraints: list[tuple[str, int, tuple[int, ...]]] = []  # (label, groups, parts)
        self.norms: list[tuple[int, tuple[int, ...]]] = []  # (GroupNorm groups, parts)
        self.attention: list[tuple[fx.Node, fx.Node]] = []  # (sdpa node, query producer)
        self.tied: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # must lose the same share

    # helpers for rules
    def axis(self, arg) -> Axis | None:
        return self.axes.get(arg) if isinstance(arg, fx.Node) else None

    def param(self, node, what: fx.Node) -> str:
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            raise ChannelRuleError(f"node {what.name} ({what.target}) takes a weight that is not a model "
                                   "parameter; channel pruning needs the layer's own weights")
        return param_name(node)

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



def ndim_of(node) -> int:
    return len(shape_of(node))


def shape_of(node) -> tuple:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return ()
    return tuple(value.shape)


def int_shape_of(node) -> list[int]:
    # Symbolic sizes (the dynamic batch) become a marker that cannot collide with channel counts.
    return [int(s) if isinstance(s, int) else -(10 ** 9 + 7) for s in shape_of(node)]


def aligned_chunks(before: list[int], after: list[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
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
