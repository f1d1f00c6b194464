"""SuperNet passes: backup edges, gates, timestep folding. Golden structure, parity, no-op, bad input."""

import pytest
import torch
from dgo_compile.passes import (
    AttachGates,
    FoldSchedule,
    FoldScheduleConfig,
    FoldTimestep,
    FoldTimestepConfig,
    InsertBackupEdges,
    InsertBackupEdgesConfig,
    PassManager,
    variant_signature,
)
from dgo_compile.passes.annotations import CONSTANTS_KEY, backup_edges, gates_of
from dgo_compile.passes.attach_gates import gate_mix
from dgo_compile.passes.boundaries import element_consumers
from diffusers import DDIMScheduler

from dgo_compile import PassError, load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import initial_noise, sample_ddim
from dgo_compile.schedules.cost import analyse
from dgo_compile.schedules.schedule import Schedule, ScheduleError, builtin_for
from dgo_compile.schedules.supernet import SuperNetRun, build_supernet, gateable_elements

UNET = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
        "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3")


@pytest.fixture(scope="module")
def shipped():
    loaded = load()
    return loaded, trace(loaded, verify=False)


def placeholders(graph_module):
    return [n.name for n in graph_module.graph.nodes if n.op == "placeholder"]


def test_backup_edges_golden_structure(shipped):
    _, traced = shipped
    graph_module = analyse(traced)
    supernet = PassManager([InsertBackupEdges()]).run(graph_module).graph_module
    edges = backup_edges(supernet)
    assert edges.elements == UNET and edges.inputs == ("sample", "timestep")
    # Each down block hands on its resnet outputs (skips) and its last output; the last has no downsampler.
    per_block = {b: [e.cache for e in edges.edges if e.element == b] for b in UNET}
    assert per_block["down_blocks.0"] == ["cache__down_blocks_0__0", "cache__down_blocks_0__1",
                                          "cache__down_blocks_0__2"]
    assert len(per_block["down_blocks.3"]) == 2
    assert per_block["mid_block"] == ["cache__mid_block__0"] and per_block["up_blocks.3"] == ["cache__up_blocks_3__0"]
    assert placeholders(supernet) == ["sample", "timestep", *(e.cache for e in edges.edges)]
    output = next(n for n in supernet.graph.nodes if n.op == "output").args[0]
    assert [n.name for n in output[1:]] == [e.fresh for e in edges.edges]
    # Nothing reads the caches yet: the prediction is the original one, and the input graph is untouched.
    inputs = tuple(traced.example_inputs(2).values())
    caches = [torch.full(tuple(n.meta["tensor_meta"].shape), 7.0) for n in supernet.graph.nodes
              if n.name.startswith("cache__")]
    with torch.no_grad():
        assert torch.equal(supernet(*inputs, *(c.expand(2, *c.shape[1:]) for c in caches))[0], traced(*inputs))
    assert "cache__" not in graph_module.code


def test_unit_granularity_caches_each_resnet_and_attention(shipped):
    _, traced = shipped
    supernet = PassManager([InsertBackupEdges(InsertBackupEdgesConfig("unit"))]).run(analyse(traced)).graph_module
    edges = backup_edges(supernet)
    assert edges.elements == gateable_elements(traced, "unit")
    assert edges.elements[:3] == ("down_blocks.0.resnets.0", "down_blocks.0.resnets.1", "down_blocks.0.downsamplers.0")
    assert len(edges.edges) == len(edges.elements)  # every unit hands on exactly one tensor


def test_all_compute_gates_are_bit_identical_over_a_trajectory(shipped):
    loaded, traced = shipped
    supernet = build_supernet(traced)
    assert [g for _, g in gates_of(supernet).gates] == [f"gate__{b.replace('.', '_')}" for b in UNET]
    noise = initial_noise(2, (1, 32, 32), 3)
    reference = sample_ddim(traced, loaded.scheduler_config, noise, 6)
    ones = {b: torch.tensor(1.0) for b in UNET}
    run = SuperNetRun(supernet)
    gated = sample_ddim(lambda x, t: run(x, t, gates=ones), loaded.scheduler_config, noise, 6)
    assert torch.equal(gated, reference)


def _schedule(spec: str, traced) -> Schedule:
    if spec == "outer-blocks:3":  # block-granular caching: only the outermost blocks run between full calls
        outer = ("down_blocks.0", "up_blocks.3")
        return Schedule(spec, UNET, tuple(tuple(i % 3 == 0 or n in outer for n in UNET) for i in range(7)))
    return builtin_for(spec, 7, traced)


@pytest.mark.parametrize("granularity, spec",
                         [("block", "outer-blocks:3"), ("block", "steps:3"), ("unit", "deepcache:2:1")])
def test_folded_variants_equal_the_supernet_with_binary_gates(shipped, granularity, spec):
    loaded, traced = shipped
    schedule = _schedule(spec, traced)
    if granularity == "unit":
        if schedule.granularity != "unit":
            schedule = schedule.for_units({b.name: b.units for b in traced.blocks})
        # Make it properly unit-level: also reuse one resnet of the otherwise computed first block.
        rows = [list(r) for r in schedule.compute]
        rows[2][schedule.elements.index("down_blocks.0.resnets.1")] = False
        schedule = Schedule("units", schedule.elements, tuple(map(tuple, rows)), "unit")
    noise = initial_noise(2, (1, 32, 32), 5)
    run = SuperNetRun(build_supernet(traced, granularity))
    step = iter(range(schedule.calls))

    def gated(x, t):
        row = schedule.compute[next(step)]
        return run(x, t, gates={e: torch.tensor(float(c)) for e, c in zip(schedule.elements, row)})

    expected = sample_ddim(gated, loaded.scheduler_config, noise, 7)
    folded = fold(traced, schedule)
    assert (sample_ddim(folded, loaded.scheduler_config, noise, 7) - expected).abs().max().item() < 1e-5
    assert (expected - sample_ddim(traced, loaded.scheduler_config, noise, 7)).abs().max().item() > 1e-3


def test_gates_carry_gradients(shipped):
    _, traced = shipped
    run = SuperNetRun(build_supernet(traced))
    gate = torch.tensor(1.0, requires_grad=True)
    run(*traced.example_inputs(1, seed=1).values())  # the cache differs from the next step's fresh value
    run(*traced.example_inputs(1, seed=2).values(), gates={"mid_block": gate}).square().mean().backward()
    assert gate.grad is not None and gate.grad.abs().item() > 0


def test_first_step_cannot_reuse(shipped):
    _, traced = shipped
    run = SuperNetRun(build_supernet(traced))
    with pytest.raises(ScheduleError, match="the first step has no cache to reuse: every gate must be 1"):
        run(*traced.example_inputs(1).values(), gates={"mid_block": torch.tensor(0.0)})


def test_gate_passes_are_no_ops_the_second_time_and_need_their_inputs(shipped):
    _, traced = shipped
    graph_module = analyse(traced)
    supernet = PassManager([InsertBackupEdges(), AttachGates()]).run(graph_module).graph_module
    assert InsertBackupEdges().call(supernet).modified is False
    assert AttachGates().call(supernet).modified is False
    with pytest.raises(PassError, match="pass 'attach_gates' requires insert_backup_edges to run before it"):
        PassManager([AttachGates()]).run(graph_module)
    with pytest.raises(PassError, match="pass 'fold_schedule' failed: no gateable element 'mid' at block granularity"):
        PassManager([FoldSchedule(FoldScheduleConfig(frozenset({"mid"}), frozenset()))]).run(supernet)
    with pytest.raises(ValueError, match="granularity must be one of block, unit, got 'layer'"):
        InsertBackupEdges(InsertBackupEdgesConfig("layer"))


def test_timestep_path_folds_into_per_step_constants(shipped):
    loaded, traced = shipped
    graph_module = analyse(traced)
    folded = PassManager([FoldTimestep()]).run(graph_module).graph_module
    names = folded.meta[CONSTANTS_KEY]
    # The time MLP is gone; what is left are the 22 per-resnet projections of the embedding.
    assert placeholders(folded) == ["sample", *names] and len(names) == 22
    assert not any("time_embedding" in str(n.meta.get("nn_module_stack", "")) for n in folded.graph.nodes)
    linears = lambda gm: sum(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
    assert linears(folded) == linears(graph_module) - 2 - 22
    assert FoldTimestep().call(folded).modified is False
    with pytest.raises(PassError, match="graph has no input 'time'; inputs are sample, timestep"):
        PassManager([FoldTimestep(FoldTimestepConfig("time"))]).run(graph_module)


def test_timestep_folded_sampling_matches_and_refuses_other_timesteps(shipped):
    loaded, traced = shipped
    scheduler = DDIMScheduler.from_config(loaded.scheduler_config)
    scheduler.set_timesteps(6)
    timesteps = [float(t) for t in scheduler.timesteps]
    schedule = builtin_for("deepcache:2", 6, traced)
    noise = initial_noise(2, (1, 32, 32), 9)
    folded = fold(traced, schedule, timesteps)
    assert all("timestep" not in variant_signature(v).inputs for v in folded.variants.values())
    reference = sample_ddim(fold(traced, schedule), loaded.scheduler_config, noise, 6)
    assert (sample_ddim(folded, loaded.scheduler_config, noise, 6) - reference).abs().max().item() < 1e-4
    with pytest.raises(ScheduleError, match="call 1 was compiled for timestep 999, got 991"):
        folded.new_run()(noise, torch.full((2,), 991.0))
    with pytest.raises(ScheduleError, match="has 6 calls but the sampler makes 5 denoiser calls"):
        fold(traced, schedule, timesteps[:5])


@pytest.mark.parametrize("family, reuse", [("dit", "transformer_blocks.0"), ("sd", "mid_block"),
                                           ("sdxl", "up_blocks.0"), ("unet2d_class_cond", "down_blocks.1")])
def test_reuse_matches_eager_model_with_the_block_output_replayed(config_dir, family, reuse):
    # Independent reference: the eager diffusers model with a hook that replays the block's
    # output from the previous call. DiT's final layer reads block 0's timestep embedding, which
    # must not be cached: a stale copy would carry the previous step's timestep.
    traced = trace(load(config_dir / family / "config.json"), verify=False)
    names = gateable_elements(traced)
    schedule = Schedule("x", names, (tuple(True for _ in names), tuple(n != reuse for n in names)))
    run = fold(traced, schedule).new_run()
    supernet = SuperNetRun(build_supernet(traced))
    block = traced.model.get_submodule(reuse)
    adapter = traced.family.adapter(traced.model)
    first, second = traced.example_inputs(2, seed=1), traced.example_inputs(2, seed=2)
    recorded = {}
    with torch.no_grad():
        hook = block.register_forward_hook(lambda module, args, output: recorded.setdefault("output", output))
        adapter(*first.values())
        hook.remove()
        hook = block.register_forward_hook(lambda module, args, output: recorded["output"])
        expected = adapter(*second.values())
        hook.remove()
        run(*first.values())
        supernet(*first.values())
        assert (run(*second.values()) - expected).abs().max().item() < 1e-5
        gates = {e: torch.tensor(float(e != reuse)) for e in names}
        assert (supernet(*second.values(), gates=gates) - expected).abs().max().item() < 1e-5
        assert (traced(*second.values()) - expected).abs().max().item() > 1e-4  # the reuse did change the output
    if family == "dit":
        assert element_consumers(analyse(traced), names)["transformer_blocks.0"] == {"transformer_blocks.1"}


@pytest.mark.parametrize("value", [0.0, 1.0, 0.3])
def test_gate_mix_matches_the_plain_mix_and_skips_the_side_a_gate_shuts(value):
    """gate * fresh + (1 - gate) * cache, as autograd would differentiate it, except that a gate of
    exactly 0 (1) sends no gradient into the fresh (cached) side's computation at all."""
    torch.manual_seed(0)
    x, c = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True)
    soft = torch.tensor(0.7, requires_grad=True)
    reached = []

    def forward(inputs):
        fresh, cache = (t.sin() for t in inputs)
        fresh.register_hook(lambda g: reached.append("fresh") if g is not None else None)  # None: nothing reached it
        cache.register_hook(lambda g: reached.append("cache") if g is not None else None)
        gate = torch.tensor(value) + (soft - soft.detach())  # straight-through: exactly `value` forward
        return fresh, cache, gate

    weights = torch.randn(2, 3, 4)
    mixed = gate_mix(*forward((x, c)))
    ours = torch.autograd.grad((mixed * weights).sum(), (x, c, soft), allow_unused=True)
    skipped = {0.0: {"fresh"}, 1.0: {"cache"}, 0.3: set()}[value]
    assert {"fresh", "cache"} - set(reached) == skipped
    fresh, cache, gate = forward((x, c))
    plain = torch.autograd.grad(((fresh * gate + cache * (1 - gate)) * weights).sum(), (x, c, soft))
    torch.testing.assert_close(mixed, fresh * gate + cache * (1 - gate), rtol=0, atol=0)
    for name, a, b in zip(("x", "cache", "gate"), ours, plain):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, msg=name)
