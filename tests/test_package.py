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
    code = "import importlib.util, json; print(json.dumps([importlib.util.find_spec(n) is not None for n in ('passes', 'cli')]))"
    found = json.loads(subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                                      check=True).stdout)
    assert found == [False, False]


def test_editable_install_records_the_folder_mapping():
    dist = metadata.distribution("dgo-compile")
    assert dist.entry_points.select(group="console_scripts", name="dgo-compile")
    direct_url = json.loads(dist.read_text("direct_url.json"))
    assert direct_url.get("dir_info", {}).get("editable") is True


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "dgo_compile.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "inspect" in result.stdout and "sample" in result.stdout
