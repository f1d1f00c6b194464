"""The pass contract: honest `modified`, idempotence, required passes, failing pass named."""

import pytest

from dgo_compile import PassError, load, trace
from dgo_compile.passes import (
    AnnotateBlocks, AnnotateBlocksConfig, CountCosts, CountCostsConfig, Pass, PassManager, PassResult,
)


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
    class Exploding(Pass):
        name = "exploding"

        def call(self, graph_module):
            raise RuntimeError("boom")

    with pytest.raises(PassError, match="^pass 'exploding' failed: boom$"):
        PassManager([Exploding()]).run(traced.graph_module)


def test_manager_checks_required_passes(traced):
    class NeedsBlocks(Pass):
        name = "needs_blocks"
        requires = ("annotate_blocks",)

    with pytest.raises(PassError, match="pass 'needs_blocks' requires annotate_blocks to run before it"):
        PassManager([NeedsBlocks()]).run(traced.graph_module)


def test_manager_lints_after_each_pass(traced):
    import copy

    class Breaks(Pass):
        name = "breaks"

        def call(self, graph_module):
            gm = copy.deepcopy(graph_module)
            first = next(n for n in gm.graph.nodes if n.op == "call_function")
            last = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            first.args = (last, *first.args[1:])  # uses a value before it is defined
            return PassResult(gm, True)

    with pytest.raises(PassError, match="^pass 'breaks' failed: .*used before it has been defined"):
        PassManager([Breaks()]).run(traced.graph_module)
