"""Progress a person can follow: the library's stages, drawn live on a terminal or one timed line each
without one; the schedule heatmap's call axis; the report's warnings about untrustworthy timings."""

import io
import re

import pytest
from dgo_compile.cli.progress import ConsoleStages
from rich.console import Console

from dgo_compile.backend.bench import BenchResult
from dgo_compile.core.progress import Stages
from dgo_compile.driver.report import _warnings
from dgo_compile.schedules.schedule import builtin


def _run(stages: Stages) -> None:
    with stages.stage("load", "loading the model"):
        pass
    with stages.stage("verify", "sampling 4 images", total=4) as step:
        for _ in range(4):
            step.advance(1)
        step.update(note="ok")


def test_the_library_default_shows_nothing_and_keeps_stage_times():
    stages = Stages()
    _run(stages)
    assert list(stages.seconds) == ["load", "verify"] and all(s >= 0 for s in stages.seconds.values())


def test_without_a_terminal_each_finished_stage_is_one_line_with_its_time():
    file = io.StringIO()
    with ConsoleStages(Console(file=file, width=200), live=False) as stages:
        _run(stages)
    lines = file.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"load: \d+\.\d s, loading the model", lines[0])
    assert re.fullmatch(r"verify: \d+\.\d s, sampling 4 images \(ok\)", lines[1])


def test_a_failed_stage_leaves_no_line_so_the_error_stays_one_line():
    file = io.StringIO()
    with pytest.raises(RuntimeError), ConsoleStages(Console(file=file, width=200), live=False) as stages:
        with stages.stage("compile", "exporting"):
            raise RuntimeError("boom")
    assert file.getvalue() == "" and "compile" not in stages.seconds


def test_on_a_terminal_stages_are_drawn_live_with_bars_and_counts(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())  # stdout piped: no live display even on a terminal
    assert not ConsoleStages(Console(file=io.StringIO(), force_terminal=True)).live
    file = io.StringIO()
    console = Console(file=file, width=120, force_terminal=True, color_system=None)
    with ConsoleStages(console, live=True) as stages:
        _run(stages)
    text = file.getvalue()
    assert "load loading the model" in text and "verify sampling 4 images" in text and "4/4" in text


def test_disabled_stages_show_nothing():
    file = io.StringIO()
    with ConsoleStages(Console(file=file), live=False, enabled=False) as stages:
        _run(stages)
    assert file.getvalue() == "" and list(stages.seconds) == ["load", "verify"]


def test_the_schedule_heatmap_has_whole_call_ticks():
    from matplotlib import pyplot as plt

    from dgo_compile.driver.report import heatmap_figure

    schedule = builtin("steps:21", 50, ("down_blocks.0", "mid_block", "up_blocks.0"))
    fig = heatmap_figure(None, schedule, "steps:21")
    try:
        axes = [ax for ax in fig.axes if ax.get_xlabel() == "denoiser call"]
        assert len(axes) == 1
        fig.canvas.draw()
        ticks = [t for t in axes[0].get_xticks() if -0.5 <= t <= 49.5]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)


def test_report_warns_on_wide_spread_and_on_a_speedup_above_the_macs_ratio():
    calm = BenchResult({"full": (1.0, 1.02, 0.99), "compiled": (0.6, 0.61, 0.59)}, {"full": 100, "compiled": 50})
    assert _warnings(calm) == []
    busy = BenchResult({"full": (1.0, 1.0, 1.0), "compiled": (0.5, 0.6, 1.2)}, {"full": 100, "compiled": 50})
    text = " ".join(_warnings(busy))
    assert "`compiled` artifact's run times spread 0.50-1.20 s" in text and "per-round speedups" in text
    fast = BenchResult({"full": (1.0, 1.0, 1.0), "compiled": (0.3, 0.3, 0.3)}, {"full": 100, "compiled": 50})
    assert "measurement noise" in " ".join(_warnings(fast))
