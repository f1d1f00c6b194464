"""fold_schedule: reused blocks become cache inputs, dead blocks vanish, numbers stay the same."""

import pytest
import torch
from dgo_compile.passes import PassManager
from dgo_compile.passes.annotations import variant_signature
from dgo_compile.passes.fold_schedule import FoldSchedule, FoldScheduleConfig

from dgo_compile import load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import initial_noise, sample_ddim
from dgo_compile.schedules.cost import analyse
from dgo_compile.schedules.schedule import builtin
from dgo_compile.schedules.supernet import block_units, build_supernet

CONV = torch.ops.aten.conv2d.default


@pytest.fixture(scope="module")
def shipped():
    loaded = load()
    return loaded, trace(loaded, verify=False)


def names(traced):
    return tuple(b.name for b in traced.blocks)


def test_full_schedule_is_bit_identical(shipped):
    loaded, traced = shipped
    noise = initial_noise(2, (1, 32, 32), 0)
    folded = fold(traced, builtin("full", 8, names(traced)))
    assert len(folded.variants) == 1
    assert torch.equal(sample_ddim(folded, loaded.scheduler_config, noise, 8),
                       sample_ddim(traced, loaded.scheduler_config, noise, 8))


def test_whole_network_reuse_is_ddim_with_fewer_steps(shipped):
    # Reusing every block repeats the last noise prediction; with eta 0 and trailing spacing
    # five DDIM steps on one prediction are one DDIM step five times as large.
    loaded, traced = shipped
    noise = initial_noise(3, (1, 32, 32), 1)
    folded = fold(traced, builtin("steps:10", 50, names(traced)))
    ddim10 = sample_ddim(traced, loaded.scheduler_config, noise, 10)
    ours = sample_ddim(folded, loaded.scheduler_config, noise, 50)
    assert (ours - ddim10).abs().max().item() < 1e-4
    assert (ours - sample_ddim(traced, loaded.scheduler_config, noise, 50)).abs().max().item() > 1e-2


def test_deepcache_shallow_variant_structure(shipped):
    _, traced = shipped
    folded = fold(traced, builtin("deepcache:5", 10, names(traced), block_units(traced)))
    full_key, shallow_key = folded.step_variant[0], folded.step_variant[1]
    shallow = folded.variants[shallow_key]
    signature = variant_signature(shallow)
    # Branch 0: the only cached value the shallow path reads is the one entering up_blocks.3's last resnet.
    assert signature.cache_inputs == ("cache__up_blocks_3_resnets_1__0",)
    assert signature.cache_outputs == ()
    assert variant_signature(folded.variants[full_key]).cache_outputs == ("cache__up_blocks_3_resnets_1__0",)
    convs = [n for n in shallow.graph.nodes if n.target is CONV]
    modules = [list(n.meta["nn_module_stack"].values())[-1][0] for n in convs]
    # conv_in (its output is the last resnet's skip input), that resnet's 2 convs and skip-concat shortcut, conv_out
    assert modules == ["model.conv_in", "model.up_blocks.3.resnets.2.conv1", "model.up_blocks.3.resnets.2.conv2",
                       "model.up_blocks.3.resnets.2.conv_shortcut", "model.conv_out"]
    used = {n.target for n in shallow.graph.nodes if n.op == "get_attr"}
    assert not any(t.startswith(("model.down_blocks", "model.mid_block", "model.up_blocks.3.resnets.1")) for t in used)
    total = sum(p.numel() for p in traced.graph_module.parameters())
    assert sum(p.numel() for p in shallow.parameters()) < 0.05 * total


@pytest.mark.parametrize("family, reused", [
    ("unet2d", {"down_blocks.1", "mid_block", "up_blocks.0"}),
    ("sd", {"mid_block", "up_blocks.0"}),
    ("sdxl", {"mid_block"}),
    ("dit", {"transformer_blocks.1"}),
])
def test_fed_its_own_fresh_cache_a_folded_variant_equals_the_full_graph(config_dir, family, reused):
    traced = trace(load(config_dir / family / "config.json"), verify=False)
    graph_module = analyse(traced)
    supernet = build_supernet(traced)
    inputs = tuple(traced.example_inputs(batch=2, seed=3).values())  # batch 2: both halves of a CFG batch
    exposing = PassManager([FoldSchedule(FoldScheduleConfig(frozenset(), frozenset(reused)))]).run(supernet)
    reusing = PassManager([FoldSchedule(FoldScheduleConfig(frozenset(reused), frozenset()))]).run(supernet)
    with torch.no_grad():
        expected = graph_module(*inputs)
        full_outputs = exposing.graph_module(*inputs)
        caches = dict(zip(variant_signature(exposing.graph_module).cache_outputs, full_outputs[1:]))
        signature = variant_signature(reusing.graph_module)
        actual = reusing.graph_module(*inputs, *(caches[name] for name in signature.cache_inputs))[0]
    assert signature.cache_inputs
    assert torch.equal(full_outputs[0], expected)
    assert (actual - expected).abs().max().item() <= 1e-6
    assert len(reusing.graph_module.graph.nodes) < len(graph_module.graph.nodes)


def test_fold_never_edits_its_input(shipped):
    _, traced = shipped
    supernet = build_supernet(traced)
    code = supernet.code
    result = PassManager([FoldSchedule(FoldScheduleConfig(frozenset({"mid_block"}), frozenset()))]).run(supernet)
    assert result.modified and supernet.code == code
    nothing = FoldSchedule(FoldScheduleConfig(frozenset(), frozenset())).call(supernet)
    signature = variant_signature(nothing.graph_module)
    assert signature.cache_inputs == () and signature.inputs == ("sample", "timestep")
    assert not any(n.op == "placeholder" and n.name.startswith("gate__") for n in nothing.graph_module.graph.nodes)


def test_reused_and_exposed_overlap_is_refused(shipped):
    from dgo_compile import PassError

    _, traced = shipped
    with pytest.raises(PassError,
                       match="pass 'fold_schedule' failed: element mid_block cannot be both reused and exposed"):
        PassManager([FoldSchedule(FoldScheduleConfig(frozenset({"mid_block"}), frozenset({"mid_block"})))]).run(
            build_supernet(traced))


def test_two_runs_never_share_a_cache(shipped):
    loaded, traced = shipped
    folded = fold(traced, builtin("deepcache:3", 6, names(traced), block_units(traced)))
    a, b = folded.new_run(), folded.new_run()
    inputs = tuple(traced.example_inputs(1).values())
    a(*inputs)
    assert a.cache and not b.cache
    with pytest.raises(KeyError):
        b.step = 1  # a run that skipped its full step has no cache to read
        b(*inputs)


def test_steps_with_the_same_reuse_share_one_graph(shipped):
    _, traced = shipped
    folded = fold(traced, builtin("deepcache:3", 10, names(traced), block_units(traced)))
    # Step 9 computes everything like steps 0, 3 and 6, but nothing reads its caches: it still
    # runs the exposing graph (extra outputs cost no compute; a third graph would copy the weights).
    assert len(folded.variants) == 2
    assert folded.step_variant[9] == folded.step_variant[0]
