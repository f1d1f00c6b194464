"""The installed layout: passes/ and cli/ resolve as dgo_compile.passes and dgo_compile.cli."""

import importlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_passes_and_cli_import_from_their_folders():
    passes = importlib.import_module("dgo_compile.passes")
    cli = importlib.import_module("dgo_compile.cli.app")
    assert Path(passes.__file__).resolve() == REPO / "passes" / "__init__.py"
    assert Path(cli.__file__).resolve() == REPO / "cli" / "app.py"


def test_no_top_level_passes_or_cli_package_is_installed():
    # Generic names must not leak into site-packages as top-level packages.
    code = ("import importlib.util, json; "
            "print(json.dumps([importlib.util.find_spec(n) is not None for n in ('passes', 'cli')]))")
    found = json.loads(subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                                      check=True).stdout)
    assert found == [False, False]


def test_installed_editable_with_the_console_script():
    # A source checkout may also expose an egg-info; the installed record is the one pip wrote.
    installed = [d for d in metadata.distributions()
                 if d.metadata["Name"] == "dgo-compile" and d.read_text("direct_url.json")]
    assert installed, "dgo-compile is not pip-installed"
    assert json.loads(installed[0].read_text("direct_url.json")).get("dir_info", {}).get("editable") is True
    assert installed[0].entry_points.select(group="console_scripts", name="dgo-compile")


def test_console_script_runs():
    # The installed script, run from outside the checkout: no top-level `cli` or `passes` to fall back on.
    for command in ([str(Path(sys.executable).parent / "dgo-compile"), "--help"],
                    [sys.executable, "-m", "dgo_compile.cli", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, cwd="/")
        assert result.returncode == 0, result.stderr
        assert "inspect" in result.stdout and "sample" in result.stdout
