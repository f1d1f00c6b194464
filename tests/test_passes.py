"""The pass contract: honest `modified`, idempotence, required passes, failing pass named, accessors
that name the pass to run, and analyses / transforms held to their declared kind."""

import copy

import pytest
import torch
from dgo_compile.passes import (
    AnalysisPass,
    AnnotateBlocks,
    AnnotateBlocksConfig,
    AttachGates,
    ChannelGroups,
    CountCosts,
    CountCostsConfig,
    FoldSchedule,
    FoldTimestep,
    InsertBackupEdges,
    Pass,
    PassManager,
    PassResult,
    TransformPass,
    annotations,
)
from dgo_compile.passes.base import editable_copy

from dgo_compile import PassError, load, trace
from dgo_compile.core.errors import AnnotationMissingError


@pytest.fixture(scope="module")
def traced(config_dir):
    return trace(load(config_dir / "unet2d" / "config.json"), verify=False)


def count_costs(traced):
    inputs = traced.example_inputs(1)
    return CountCosts(CountCostsConfig(tuple(tuple(t.shape) for t in inputs.values()),
                                       tuple(t.dtype for t in inputs.values())))


def test_analyses_report_modified_once_then_no_op(traced):
    annotate = AnnotateBlocks(AnnotateBlocksConfig(traced.blocks))
    code_before = traced.graph_module.code
    assert annotate.call(traced.graph_module).modified is True
    assert annotate.call(traced.graph_module).modified is False
    assert count_costs(traced).call(traced.graph_module).modified is True
    assert count_costs(traced).call(traced.graph_module).modified is False
    assert traced.graph_module.code == code_before  # analyses annotate, never rewrite


def test_manager_names_the_failing_pass(traced):
    class Exploding(AnalysisPass):
        name = "exploding"

        def call(self, graph_module):
            raise RuntimeError("boom")

    with pytest.raises(PassError, match="^pass 'exploding' failed: boom$"):
        PassManager([Exploding()]).run(traced.graph_module)


def test_manager_checks_required_passes(traced):
    class NeedsBlocks(AnalysisPass):
        name = "needs_blocks"
        requires = ("annotate_blocks",)

    with pytest.raises(PassError, match="pass 'needs_blocks' requires annotate_blocks to run before it"):
        PassManager([NeedsBlocks()]).run(traced.graph_module)


def test_manager_lints_after_each_pass(traced):
    class Breaks(TransformPass):
        name = "breaks"

        def call(self, graph_module):
            gm = copy.deepcopy(graph_module)
            first = next(n for n in gm.graph.nodes if n.op == "call_function")
            last = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            first.args = (last, *first.args[1:])  # uses a value before it is defined
            return PassResult(gm, True)

    with pytest.raises(PassError, match="^pass 'breaks' failed: .*used before it has been defined"):
        PassManager([Breaks()]).run(traced.graph_module)


def _add_unused_relu(graph_module):
    first = next(n for n in graph_module.graph.nodes if n.op == "call_function")
    with graph_module.graph.inserting_after(first):
        graph_module.graph.call_function(torch.ops.aten.relu.default, (first,))


@pytest.mark.parametrize("accessor, producer, on_node", [
    (annotations.block_of, AnnotateBlocks, True),
    (annotations.cost_of, CountCosts, True),
    (annotations.timestep_embedder, FoldTimestep, False),
    (annotations.backup_edges, InsertBackupEdges, False),
    (annotations.gates_of, AttachGates, False),
    (annotations.variant_signature, FoldSchedule, False),
    (annotations.channel_plan, ChannelGroups, False),
])
def test_an_accessor_before_its_pass_says_which_pass_to_run(traced, accessor, producer, on_node):
    bare = editable_copy(traced.graph_module)  # no pass has run on it
    for node in bare.graph.nodes:
        node.meta.pop(annotations.BLOCK_KEY, None)
        node.meta.pop(annotations.COST_KEY, None)
    target = next(iter(bare.graph.nodes)) if on_node else bare
    with pytest.raises(AnnotationMissingError, match=f"run pass '{producer.name}' first$") as caught:
        accessor(target)
    assert isinstance(caught.value, PassError)


def test_passes_declare_their_kind():
    assert all(issubclass(p, AnalysisPass) for p in (AnnotateBlocks, CountCosts, ChannelGroups))
    assert all(issubclass(p, TransformPass) for p in (FoldTimestep, InsertBackupEdges, AttachGates, FoldSchedule))


def test_manager_refuses_a_transform_that_mutates_its_input(traced):
    class EditsInPlace(TransformPass):
        name = "edits_in_place"

        def call(self, graph_module):
            _add_unused_relu(graph_module)
            return PassResult(graph_module, True)

    class AnnotatesInput(TransformPass):
        name = "annotates_input"

        def call(self, graph_module):
            next(iter(graph_module.graph.nodes)).meta["scribble"] = 1
            return PassResult(editable_copy(graph_module), True)

    for transform in (EditsInPlace(), AnnotatesInput()):
        victim = editable_copy(traced.graph_module)
        with pytest.raises(PassError, match=f"^transform pass '{transform.name}' mutated its input graph"):
            PassManager([transform]).run(victim)


def test_manager_refuses_an_analysis_that_changes_the_graph(traced):
    class Rewrites(AnalysisPass):
        name = "rewrites"

        def call(self, graph_module):
            _add_unused_relu(graph_module)
            return PassResult(graph_module, True)

    class Copies(AnalysisPass):
        name = "copies"

        def call(self, graph_module):
            return PassResult(editable_copy(graph_module), False)

    with pytest.raises(PassError, match="^analysis pass 'rewrites' changed the graph$"):
        PassManager([Rewrites()]).run(editable_copy(traced.graph_module))
    with pytest.raises(PassError, match="^analysis pass 'copies' returned a new graph module"):
        PassManager([Copies()]).run(editable_copy(traced.graph_module))


def test_manager_refuses_a_pass_of_no_declared_kind(traced):
    class Undeclared(Pass):
        name = "undeclared"

        def call(self, graph_module):
            return PassResult(graph_module, False)

    with pytest.raises(PassError, match="^pass 'undeclared' declares neither AnalysisPass nor TransformPass$"):
        PassManager([Undeclared()]).run(editable_copy(traced.graph_module))
