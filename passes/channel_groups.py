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

This module drives the walk and assembles the plan; the plan's types are in `channel_plan`, the
union-find and walk state in `channel_spaces`, the op rules and their registry in `channel_rules`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx
import torch
from torch import fx

from . import annotations as ann
from .annotations import CHANNEL_PLAN_KEY
from .base import AnalysisPass, PassResult
from .boundaries import input_dependencies
from .channel_plan import AttentionSite, ChannelGroup, ChannelPlan, ChannelRuleError, ParamSlice, Unit
from .channel_rules import RULES
from .channel_spaces import Walk, param_name, shape_of

aten = torch.ops.aten


@dataclass(frozen=True)
class ChannelGroupsConfig:
    # Pairs of modules whose output channel counts the model's code ties through a shape (PixArt views its
    # caption embeddings with the hidden width); export bakes such shapes into constants, so the graph cannot
    # show the tie. Each pair loses the same share, so their sizes stay equal.
    equal_sizes: tuple[tuple[str, str], ...] = ()


class ChannelGroups(AnalysisPass):
    """Analysis: annotate graph_module.meta with the ChannelPlan (no node changes)."""

    name = ann.CHANNEL_GROUPS
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ChannelGroupsConfig = ChannelGroupsConfig()):
        self.config = config

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        plan = analyse_channels(graph_module, self.config.equal_sizes)
        modified = graph_module.meta.get(CHANNEL_PLAN_KEY) != plan
        graph_module.meta[CHANNEL_PLAN_KEY] = plan
        return PassResult(graph_module, modified)


def analyse_channels(graph_module: fx.GraphModule, equal_sizes: tuple[tuple[str, str], ...] = ()) -> ChannelPlan:
    walk = Walk(graph_module)
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
                    f"register a rule with dgo_compile.passes.channel_rules.register_channel_rule({node.target}, "
                    "rule) or leave this model unpruned")
            walk.axes[node] = rule(walk, node)
        else:
            raise ChannelRuleError(f"node {node.name} is a {node.op}; channel analysis runs on ATen graphs from "
                                   f"trace()")
    for first, second in equal_sizes:
        a, b = _output_parts(walk, first), _output_parts(walk, second)
        walk.tied.append((a, b))
        walk.constraints.append((f"same size as {second} (a shape in the model's code)", 1, a))
        walk.constraints.append((f"same size as {first} (a shape in the model's code)", 1, b))
    return _plan(walk, _timestep_only_params(graph_module))


TIMESTEP_ONLY = ("timestep-only (the time MLP: a compiled schedule folds it into per-step constants, so "
                 "pruning it saves no MACs there and starves every block of the timestep)")


def _timestep_only_params(graph_module: fx.GraphModule, timestep: str = "timestep") -> set[str]:
    """Weights that only timestep-only nodes read. Cutting their channels saves next to nothing (a [batch, C]
    MLP per call, and nothing once folded), and global Taylor scores rank them cheapest: the shipped model's
    time MLP went to 1 channel of 128 at a 50% cut, which broke it (benchmarks/results/finetune.md)."""
    placeholder = next((n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name == timestep), None)
    if placeholder is None:
        return set()
    deps = input_dependencies(graph_module)
    return {param_name(node) for node in graph_module.graph.nodes
            if node.op == "get_attr" and node.users and all(deps[u] == {placeholder} for u in node.users)}


def _output_parts(walk: Walk, module: str) -> tuple[int, ...]:
    for param, axis, parts in walk.uses:
        if param == f"{module}.weight" and axis == 0:
            return parts
    raise ChannelRuleError(f"{module} has no weight whose output channels the analysis saw; "
                           "it cannot be tied to another module's size")


def _flat_nodes(args):
    out = []
    fx.node.map_arg(args, out.append)
    return out


def _plan(walk: Walk, timestep_params: set[str]) -> ChannelPlan:
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
    for leaf, found in slices.items():
        if all(s.param in timestep_params for s in found):
            spaces.fixed.setdefault(spaces.find(leaf), TIMESTEP_ONLY)
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
                                       int(shape_of(query)[-1]), "scale" in node.kwargs, leaf_ids.get(leaf, -1)))
    return ChannelPlan(tuple(groups), tuple(attention), _norm_units(walk, spans, cuts, share_of, leaf_ids))


def _norm_units(walk: Walk, spans, cuts: dict[int, set[int]], share_of: dict[int, int],
                leaf_ids: dict[int, int]) -> tuple[tuple[int, tuple[Unit, ...]], ...]:
    """Each share's units: atoms linked when one group of any GroupNorm covers them, so that removing a
    unit leaves every GroupNorm whole groups of its original size (statistics of kept channels unchanged)."""
    sizes = walk.spaces.size
    norm_keys = Counter((groups, parts) for groups, parts in walk.norms)
    other = Counter((groups, parts) for _, groups, parts in walk.constraints) - norm_keys
    excluded = {share_of.get(leaf) for (_, parts) in other for leaf, _ in spans(parts)}  # heads, shape ties
    excluded |= {share_of.get(leaf) for a, b in walk.tied for leaf, _ in (*spans(a), *spans(b))}
    linked = nx.Graph()
    for index, (groups, parts) in enumerate(walk.norms):
        per = walk.size(parts) // groups
        for leaf, offset in spans(parts):
            if leaf not in share_of or share_of[leaf] in excluded:
                continue
            bounds = [0, *sorted(cuts.get(leaf, ())), sizes[leaf]]
            for a, b in zip(bounds, bounds[1:]):
                linked.add_edge((leaf, a, b - a), ("norm", index, (offset + a) // per))
    by_share: dict[int, list[Unit]] = {}
    for component in nx.connected_components(linked):
        atoms = sorted(node for node in component if node[0] != "norm")
        by_share.setdefault(share_of[atoms[0][0]], []).append(tuple((leaf_ids[leaf], a, size)
                                                                     for leaf, a, size in atoms))
    return tuple((share, tuple(sorted(units))) for share, units in sorted(by_share.items()))
