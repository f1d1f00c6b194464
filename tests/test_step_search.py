"""`steps-searched:K`: the searched K-step schedule, never worse than `steps:K` on its calibration noise."""

import json

import pytest
import torch

from dgo_compile import load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.core.configs import OptimizeConfig
from dgo_compile.schedules.schedule import Schedule, ScheduleError, builtin
from dgo_compile.search.prefix_replay import PrefixReplay
from dgo_compile.search.selection import calibration_error
from dgo_compile.search.step_search import StepSubsets, search_steps, searched_steps, step_subset
from reliability import cli, run


def test_the_search_finds_a_planted_subset_from_uniform_and_never_loses_to_it():
    target = (0, 1, 3, 6, 12, 25)
    seen = []

    def score(chosen):
        seen.append(chosen)
        return float(sum(abs(a - b) for a, b in zip(chosen, target)))

    chosen, best, uniform, evaluations = search_steps(score, 30, 6, max_evaluations=500)
    assert seen[0] == (0, 5, 10, 15, 20, 25)  # steps:6 over 30 calls is where it starts
    assert uniform == score(seen[0]) and best <= uniform
    assert chosen == target and best == 0 and evaluations == len(seen) - 1
    assert all(c[0] == 0 and len(set(c)) == 6 and list(c) == sorted(c) for c in seen)


def test_the_search_stops_at_its_evaluation_budget_and_keeps_uniform_when_nothing_is_better():
    calls = []
    chosen, best, uniform, evaluations = search_steps(lambda c: calls.append(c) or 1.0, 50, 10, max_evaluations=7)
    assert evaluations == len(calls) == 7 and chosen == (0, 5, 10, 15, 20, 25, 30, 35, 40, 45) and best == uniform
    assert search_steps(lambda c: 0.0, 50, 1)[0] == (0,)  # nothing to move
    with pytest.raises(ScheduleError) as caught:
        search_steps(lambda c: 0.0, 10, 11)
    assert caught.value.fields == ("k",)


def test_step_subset_structure():
    plan = step_subset("steps-searched:3", ("a", "b"), 6, (0, 2, 5))
    assert plan.compute == ((True, True), (False, False), (True, True), (False, False), (False, False), (True, True))
    with pytest.raises(ScheduleError):
        step_subset("x", ("a",), 6, (1, 2))  # call 0 must run


@pytest.fixture(scope="module")
def shipped():
    loaded = load()
    return loaded, trace(loaded, verify=False)


def test_shared_fold_runs_what_fold_builds_and_the_search_beats_uniform_on_its_noise(shipped):
    loaded, traced = shipped
    torch.set_num_threads(1)
    config = OptimizeConfig(steps=10, calibration=2, seed=30_000)
    error = calibration_error(traced, loaded.scheduler_config, config, None)
    subsets = StepSubsets(traced, 10)
    chosen = (0, 1, 4, 8)
    assert error(subsets.folded(chosen).new_run()) == error(fold(traced, step_subset("x", subsets.elements, 10,
                                                                                     chosen)).new_run())
    found = searched_steps(traced, 10, 4, error, max_evaluations=12)
    assert found.schedule.name == "steps-searched:4" and found.chosen[0] == 0 and len(found.chosen) == 4
    assert found.uniform_score == error(fold(traced, builtin("steps:4", 10, subsets.elements)).new_run())
    assert found.score <= found.uniform_score
    assert found.score == error(fold(traced, found.schedule).new_run())
    fresh = search_steps(lambda c: error(subsets.folded(c).new_run()), 10, 4, max_evaluations=12)
    assert (found.chosen, found.score, found.uniform_score, found.evaluations) == fresh  # replay changes nothing


def test_a_replayed_run_ends_bit_equal_and_runs_the_denoiser_only_from_its_first_differing_call(shipped):
    loaded, traced = shipped
    torch.set_num_threads(1)
    error = calibration_error(traced, loaded.scheduler_config, OptimizeConfig(steps=10, calibration=2, seed=30_000),
                              None)
    subsets = StepSubsets(traced, 10)
    replay = PrefixReplay()
    incumbent = replay.run(subsets.folded((0, 3, 6, 8)))
    assert error(incumbent) == error(subsets.folded((0, 3, 6, 8)).new_run())
    assert replay.denoiser_calls == 10 and len(replay.kept) == 0
    replay.keep(incumbent)
    assert len(replay.kept) == 10
    assert error(replay.run(subsets.folded((0, 3, 7, 8)))) == error(subsets.folded((0, 3, 7, 8)).new_run())
    assert replay.denoiser_calls == 10 + 4  # calls 0-5 replayed, 6-9 run
    assert error(replay.run(subsets.folded((0, 2, 6, 8)))) == error(subsets.folded((0, 2, 6, 8)).new_run())
    assert replay.denoiser_calls == 14 + 8  # differs from call 2 on
    one_call = replay.run(subsets.folded((0, 3, 6, 8)))  # the incumbent again: nothing runs
    error(one_call)
    assert replay.denoiser_calls == 22 and one_call.recorded.keys() == replay.kept.keys()
    capped = PrefixReplay(max_bytes=0)
    run_capped = capped.run(subsets.folded((0, 3, 6, 8)))
    assert error(run_capped) == error(subsets.folded((0, 3, 6, 8)).new_run()) and run_capped.recorded == {}



def test_cli_writes_a_schedule_json_and_refuses_a_bad_k(tmp_path):
    result = run("search-steps", "--k", "3", "--steps", "8", "--calibration-samples", "1", "-o", tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    plan = Schedule.load(tmp_path / "s.json")
    assert plan.name == "steps-searched:3" and plan.calls == 8
    full_rows = [i for i, row in enumerate(plan.compute) if all(row)]
    assert len(full_rows) == 3 and full_rows[0] == 0 and all(all(r) or not any(r) for r in plan.compute)
    text = " ".join(result.stdout.split())
    assert text.startswith(f"wrote {tmp_path / 's.json'}: steps-searched:3 runs calls "
                           f"{' '.join(map(str, full_rows))} in full; ")
    assert "dB over steps:3 on 1 calibration samples" in text and "--steps 8" in text
    assert json.loads((tmp_path / "s.json").read_text())["granularity"] == "block"
    bad = cli("search-steps", "--k", "0", "-o", tmp_path / "t.json")  # the refusal in this process
    assert bad.returncode != 0 and "--k must be at least 1" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
