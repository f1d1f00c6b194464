"""Block schedules: validation, JSON round trip, built-ins, the dependency closure, MACs."""

import json
import re

import pytest
from dgo_compile.passes.boundaries import OUTPUT, element_consumers
from hypothesis import given, settings
from hypothesis import strategies as st

from dgo_compile import load, trace
from dgo_compile.schedules.cost import analyse
from dgo_compile.schedules.schedule import Schedule, ScheduleError, builtin
from dgo_compile.schedules.schedule_cost import ScheduleCost
from dgo_compile.schedules.supernet import gateable_elements

UNET = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
        "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3")


@pytest.fixture(scope="module")
def shipped():
    traced = trace(load(), verify=False)
    graph_module = analyse(traced)
    names = tuple(b.name for b in traced.blocks)
    return traced, names, element_consumers(graph_module, names)


def test_unet_consumers_follow_skip_connections(shipped):
    _, names, consumers = shipped
    assert names == UNET
    assert consumers["down_blocks.0"] == {"down_blocks.1", "up_blocks.2", "up_blocks.3"}
    assert consumers["down_blocks.3"] == {"mid_block", "up_blocks.0"}
    assert consumers["mid_block"] == {"up_blocks.0"}
    assert consumers["up_blocks.3"] == {OUTPUT}


def test_reusing_the_last_up_block_kills_the_whole_network(shipped):
    _, names, consumers = shipped
    row = tuple(n != "up_blocks.3" for n in names)
    closed = Schedule("x", names, (tuple(True for _ in names), row)).with_closure(consumers)
    assert closed.compute[1] == tuple(False for _ in names)


def test_reusing_mid_block_kills_only_the_deepest_down_block(shipped):
    _, names, consumers = shipped
    row = tuple(n not in ("mid_block", "up_blocks.0") for n in names)
    closed = Schedule("x", names, (tuple(True for _ in names), row)).with_closure(consumers)
    dead = {n for n, c in zip(names, closed.compute[1]) if not c}
    assert dead == {"mid_block", "up_blocks.0", "down_blocks.3"}


def test_deepcache_schedule_is_the_shallow_path(shipped):
    traced, names, _ = shipped
    units = {b.name: b.units for b in traced.blocks}
    consumers = element_consumers(analyse(traced), gateable_elements(traced, "unit"), "unit")
    schedule = builtin("deepcache:3", 7, names, units).with_closure(consumers)
    running = [[n for n, c in zip(schedule.elements, row) if c] for row in schedule.compute]
    assert running[0] == running[3] == running[6] == list(schedule.elements)
    # branch 0: the last resnet of the last up block, fed conv_in's fresh output through the skip
    assert running[1] == running[2] == ["up_blocks.3.resnets.2"]
    branch1 = builtin("deepcache:2:1", 2, names, units).with_closure(consumers)
    assert [n for n, c in zip(branch1.elements, branch1.compute[1]) if c] == \
        ["down_blocks.0.resnets.0", "up_blocks.3.resnets.1", "up_blocks.3.resnets.2"]


@pytest.mark.parametrize("depth", range(4))
def test_block_granular_caching_is_deepcache_at_the_last_layer_of_a_block(shipped, depth):
    """Running the outermost depth+1 down and up blocks between full calls (what `deepcache:N:b` meant
    before it followed the package) is DeepCache's branch 3b+2 on this UNet (2 resnets per down block)."""
    traced, names, _ = shipped
    units = {b.name: b.units for b in traced.blocks}
    consumers = element_consumers(analyse(traced), gateable_elements(traced, "unit"), "unit")
    downs, ups = names[:4], names[5:]
    shallow = set(downs[:depth + 1]) | set(ups[len(ups) - depth - 1:])
    blocks = Schedule("x", names, tuple(tuple(i % 3 == 0 or n in shallow for n in names) for i in range(7)))
    deepcache = builtin(f"deepcache:3:{3 * depth + 2}", 7, names, units)
    assert blocks.for_units(units).with_closure(consumers).compute == deepcache.with_closure(consumers).compute


def test_steps_k_computes_k_evenly_spaced_steps():
    schedule = builtin("steps:10", 50, UNET)
    computed = [i for i, row in enumerate(schedule.compute) if all(row)]
    assert computed == list(range(0, 50, 5))
    assert all(not any(row) for i, row in enumerate(schedule.compute) if i not in computed)


def test_per_call_macs_of_a_closed_schedule(shipped):
    """A full call costs the whole model; a deepcache call costs only the shallow blocks it runs plus what
    lies outside the blocks, and never more than a full call."""
    traced, names, consumers = shipped
    cost = ScheduleCost(traced)
    assert cost.per_call(builtin("full", 4, names)) == [cost.full_macs] * 4
    shallow = Schedule("x", names, (tuple(True for _ in names),
                                    tuple(n in ("down_blocks.0", "up_blocks.3") for n in names)))
    cached = cost.per_call(shallow.with_closure(consumers))
    assert cached[0] == cost.full_macs and 0 < cached[1] < cost.full_macs
    assert cached[1] == cost.step_macs(frozenset(n for n in names if n not in ("down_blocks.0", "up_blocks.3")))


@pytest.mark.parametrize("spec, steps, message", [
    ("fast", 50, "unknown schedule 'fast'; use full, deepcache:N[:branch] or steps:K"),
    ("steps:60", 50, "steps:K needs 1 <= K <= 50, got 60"),
    ("full", 0, "calls must be at least 1, got 0"),
])
def test_bad_specs(spec, steps, message):
    with pytest.raises(ScheduleError, match=f"^{re.escape(message)}$"):
        builtin(spec, steps, UNET)


def test_step_zero_must_compute():
    with pytest.raises(ScheduleError, match="reuses mid_block at call 0, where no cache exists yet"):
        Schedule("x", UNET, (tuple(n != "mid_block" for n in UNET),))


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "blocks": ["a"]}, "needs 'name', 'blocks' and 'compute'"),
    ({"name": "x", "blocks": ["a"], "compute": [[2]]}, "entry 2 is not 0 or 1"),
    ({"name": "x", "blocks": ["a", "b"], "compute": [[1]]}, "call 0 has 1 entries for 2 blocks"),
    ({"name": "x", "blocks": ["a"], "compute": []}, "has no calls"),
])
def test_invalid_schedule_json(data, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule.from_json(data)


def test_unreadable_schedule_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("{")
    with pytest.raises(ScheduleError, match="cannot read schedule .*s.json"):
        Schedule.load(path)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=12))
def test_json_round_trip_and_closure_properties(rows):
    blocks = ("a", "b", "c", "d")
    rows = [[True] * 4] + rows
    schedule = Schedule("p", blocks, tuple(map(tuple, rows)))
    assert Schedule.from_json(json.loads(json.dumps(schedule.to_json()))) == schedule
    chain = {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {OUTPUT}}
    closed = schedule.with_closure(chain)
    for before, after in zip(schedule.compute, closed.compute):
        assert all(b or not a for a, b in zip(after, before))  # closure only ever removes work
    assert simulate_chain(closed) == simulate_chain(schedule)  # ... and never changes a result
    assert closed.with_closure(chain) == closed  # idempotent


def simulate_chain(schedule):
    """Symbolic outputs of a chain a -> b -> c -> d -> output run with block caches."""
    cache, outputs = {}, []
    for step, row in enumerate(schedule.compute):
        value = ("input", step)
        for block, computed in zip(schedule.elements, row):
            value = cache[block] = (block, step, value) if computed else cache[block]
        outputs.append(value)
    return outputs


def test_closure_keeps_a_block_whose_cache_a_later_step_reads():
    chain = {"a": {"b"}, "b": {OUTPUT}}
    # Step 1 runs a but reuses b; step 2 reuses a and runs b, reading a's cache from step 1.
    schedule = Schedule("x", ("a", "b"), ((True, True), (True, False), (False, True)))
    assert schedule.with_closure(chain) == schedule
    # Without step 2's read, a's work at step 1 is dead.
    shorter = Schedule("x", ("a", "b"), ((True, True), (True, False)))
    assert shorter.with_closure(chain).compute[1] == (False, False)


def test_unit_schedule_follows_blocks_and_round_trips():
    blocks = Schedule("s", ("a", "b"), ((True, True), (False, True)))
    units = blocks.for_units({"a": ("a.0", "a.1"), "b": ("b.0",)})
    assert units.elements == ("a.0", "a.1", "b.0") and units.compute[1] == (False, False, True)
    assert Schedule.from_json(units.to_json()) == units and units.granularity == "unit"
    with pytest.raises(ScheduleError, match="has granularity 'layer'; use one of block, unit"):
        Schedule.from_json({**units.to_json(), "granularity": "layer"})
