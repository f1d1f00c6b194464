"""The package layout reads load -> trace -> passes -> schedules -> backend -> search/channels -> driver,
and imports flow one way: a module imports only from its own sub-package or from layers below it
(function-level imports included), and a pass module imports no other pass module, only the IR-layer
helpers beside them (`annotations`, `base`, `boundaries`, ...)."""

import ast
from pathlib import Path

import pytest

import dgo_compile

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {  # sub-package -> its folder in the source tree (passes and cli live at the top level)
    "core": "dgo_compile/core", "frontend": "dgo_compile/frontend", "passes": "passes",
    "schedules": "dgo_compile/schedules", "backend": "dgo_compile/backend", "search": "dgo_compile/search",
    "channels": "dgo_compile/channels", "driver": "dgo_compile/driver",
    "integrations": "dgo_compile/integrations", "cli": "cli",
}
LAYER = {"core": 0, "frontend": 1, "passes": 2, "schedules": 3, "backend": 4, "search": 5, "channels": 5,
         "driver": 6, "integrations": 7, "cli": 8}
PASS_KINDS = {"AnalysisPass", "TransformPass"}


def imported_modules(path: Path, package: str) -> set[str]:
    """Dotted dgo_compile modules `path` imports anywhere in its body; `from dgo_compile import name`
    resolves the name through the lazy public API to the module that defines it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("dgo_compile.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = f"dgo_compile.{package}" + (f".{node.module}" if node.module else "")
                if node.level > 1:
                    base = "dgo_compile" + (f".{node.module}" if node.module else "")
                found |= {f"{base}.{a.name}" for a in node.names} if node.module is None else {base}
            elif node.module == "dgo_compile":
                for alias in node.names:
                    lazy = dgo_compile._LAZY.get(alias.name)
                    found.add(f"dgo_compile.{lazy}" if lazy else "dgo_compile.core.errors")
            elif node.module and node.module.startswith("dgo_compile."):
                found.add(node.module)
    return found


def modules():
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            yield package, path


@pytest.mark.parametrize("package,path", list(modules()), ids=lambda v: v if isinstance(v, str) else v.name)
def test_imports_flow_one_way(package, path):
    for module in imported_modules(path, package):
        target = module.split(".")[1]
        assert target in LAYER, f"{path.relative_to(ROOT)} imports {module}, outside the layered sub-packages"
        if target == package:
            continue
        assert LAYER[target] < LAYER[package], (
            f"{path.relative_to(ROOT)} ({package}) imports {module} ({target}): imports must flow downwards")


def pass_modules() -> set[str]:
    """Modules of passes/ that define a pass (a class deriving from AnalysisPass or TransformPass)."""
    found = set()
    for path in (ROOT / "passes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and {getattr(b, "id", None) for b in node.bases} & PASS_KINDS:
                found.add(path.stem)
    return found


def test_passes_depend_on_the_ir_layer_not_on_each_other():
    passes = pass_modules()
    assert {"annotate_blocks", "count_costs", "fold_schedule", "channel_groups"} <= passes
    for name in sorted(passes):
        imported = {m.split(".")[2] for m in imported_modules(ROOT / "passes" / f"{name}.py", "passes")
                    if m.count(".") >= 2 and m.startswith("dgo_compile.passes.")}
        assert not imported & (passes - {name}), f"passes/{name}.py imports the passes {sorted(imported & passes)}"


def test_the_layout_finds_every_module():
    """A module added outside the sub-packages would escape the layering check."""
    flat = sorted(p.name for p in (ROOT / "dgo_compile").glob("*.py"))
    assert flat == ["__init__.py"]
    assert sorted(p.name for p in (ROOT / "dgo_compile").iterdir() if p.is_dir() and (p / "__init__.py").exists()) \
        == sorted(set(FOLDERS) - {"passes", "cli"})


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from .loading import load\n    from dgo_compile.driver.report import x\n"
                     "from dgo_compile import trace\n")
    assert imported_modules(probe, "frontend") == {
        "dgo_compile.frontend.loading", "dgo_compile.driver.report", "dgo_compile.frontend.tracing"}
