"""`schedule --keep-macs R` is never worse on calibration noise than the closed-form schedules at R."""


import pytest

from dgo_compile import load, trace
from dgo_compile.backend.folding import fold
from dgo_compile.backend.sampling import initial_noise, sample
from dgo_compile.core.metrics import psnr
from dgo_compile.schedules.schedule import Schedule, builtin_for
from dgo_compile.schedules.schedule_cost import ScheduleCost
from dgo_compile.search.selection import CANDIDATE_TOLERANCE as TOLERANCE
from dgo_compile.search.selection import SELECTION_SEED, closed_form_candidates
from reliability import cli, run


@pytest.fixture(scope="module")
def shipped():
    return trace(load(), verify=False)


def test_candidates_are_the_most_compute_that_fits_the_budget(shipped):
    cost = ScheduleCost(shipped, "unit")
    candidates = closed_form_candidates(shipped, 10, 0.5, cost)
    names = [s.name for s in candidates]
    assert names[0] == "steps:5" and cost.kept_ratio(builtin_for("steps:6", 10, shipped)) > 0.5 + TOLERANCE
    for schedule in candidates:
        assert cost.kept_ratio(schedule) <= 0.5 + TOLERANCE
        if schedule.name.startswith("deepcache:"):
            interval, branch = map(int, schedule.name.split(":")[1:])
            tighter = builtin_for(f"deepcache:{interval - 1}:{branch}", 10, shipped)
            assert interval == 2 or cost.kept_ratio(tighter) > 0.5 + TOLERANCE
    # 4 down blocks x 3 layers: only branches within down_blocks.0 fit half the MACs at any interval
    assert names == ["steps:5", "deepcache:3:0", "deepcache:4:1", "deepcache:5:2"]



@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """`optimize` for one iteration on the shipped model from DiP-GO's start (its gates still at every-gate-keeps):
    the pruner folder, shared by this file's tests, which only read it."""
    folder = tmp_path_factory.mktemp("selection") / "pruner"
    result = run("optimize", "--steps", "10", "--iters", "1", "--batch", "1", "--calibration", "1",
                 "--keep-macs", "0.5", "--init", "full", "-o", folder)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.slow
def test_an_untrained_pruner_loses_to_steps_k_and_the_command_says_so(untrained, tmp_path):
    # One iteration: the gates are still at their initialisation, so extraction reuses pairs in (call, block)
    # order: whole early calls, block by block. Every closed-form schedule at the same MACs beats it.
    result = run("schedule", untrained, "--keep-macs", "0.5", "--calibration-samples", "2",
                 "-o", tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    plan = Schedule.load(tmp_path / "s.json")
    # At DDIM 10 and half the MACs a closed-form or the searched K-step schedule wins; the learned one loses.
    assert plan.name in ("steps:5", "steps-searched:5", "deepcache:3:0", "deepcache:4:1", "deepcache:5:2")
    text = " ".join(result.stdout.split())  # the console wraps at 150 columns
    assert text.startswith(f"{plan.name} won on 2 calibration samples (noise seed 30000): mean PSNR ")
    assert "dB over the learned schedule (" in text or "dB over dipgo:0.5 (" in text
    unscored = cli("schedule", untrained, "--keep-macs", "0.5", "--calibration-samples", "0",
                 "-o", tmp_path / "learned.json")
    assert unscored.returncode == 0, unscored.stderr
    assert Schedule.load(tmp_path / "learned.json").name == "dipgo:0.5" and "won" not in unscored.stdout


def test_selection_considers_the_searched_k_step_schedule_and_it_never_loses_to_steps_k(untrained, shipped):
    from dgo_compile.search.pruner import load_pruner
    from dgo_compile.search.selection import schedule_at

    # At 40% of DDIM 10: steps:4 (0 2 5 8); on these 2 samples the search moves its calls earlier (measured).
    selection = schedule_at(shipped, load_pruner(untrained), 0.4, samples=2)
    scored = {s.schedule.name: s for s in selection.scored}
    assert "steps-searched:4" in scored and selection.best.psnr == max(s.psnr for s in selection.scored)
    # the score is the mean per-image PSNR against the full schedule on the samples of seed 30000
    loaded = load()
    noise = initial_noise(2, (1, 32, 32), SELECTION_SEED)
    full = sample(shipped, loaded.scheduler_config, noise, 10)
    uniform = sample(fold(shipped, scored["steps:4"].schedule), loaded.scheduler_config, noise, 10)
    assert scored["steps:4"].psnr == pytest.approx(psnr(uniform, full).mean().item(), rel=1e-5)
    searched = scored["steps-searched:4"].schedule
    assert searched.compute[0] == (True,) * 9 and sum(map(all, searched.compute)) == 4
    assert all(all(row) or not any(row) for row in searched.compute)
    assert scored["steps-searched:4"].kept == scored["steps:4"].kept
