"""The pass contract and the manager that runs passes in order and verifies after each."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import fx

from dgo_compile.errors import AnnotationMissingError, PassError


PASSES_RUN = "dgo.passes_run"  # graph_module.meta: names of the passes already run, in order


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool  # measured by the pass, never assumed


def editable_copy(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph a transform may edit, sharing the weights: passes never change a weight, and
    a deepcopy per pass held several copies of every parameter (3.4 GB each on SD-1.5)."""
    copied = fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph), class_name=type(graph_module).__name__)
    copied.meta = dict(graph_module.meta)
    return copied


def annotate(node: fx.Node, key: str, value: object) -> bool:
    """Write an analysis result into node.meta; returns whether it changed (for `modified`)."""
    if node.meta.get(key) == value:
        return False
    node.meta[key] = value
    return True


def annotation(node: fx.Node, key: str, pass_name: str):
    """Read an analysis result, or say which pass must run first."""
    try:
        return node.meta[key]
    except KeyError:
        raise AnnotationMissingError(f"node {node.name} has no '{key}' annotation: run pass '{pass_name}' first") from None


class Pass:
    """A named graph pass with a typed frozen config.

    `requires` names passes whose annotations this one reads; the manager checks they ran.
    `call` returns the (possibly new) graph module and whether anything changed.
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        raise NotImplementedError


class PassManager:
    """Runs passes in the given order, linting the graph after each; errors name the failing pass.

    With `dump_dir`, the graph after each pass is written to `NN_<pass>.txt` there, so a user
    can see what each pass did.
    """

    def __init__(self, passes: list[Pass], dump_dir: str | Path | None = None):
        self.passes = list(passes)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None

    def run(self, graph_module: fx.GraphModule) -> PassResult:
        done: list[str] = list(graph_module.meta.get(PASSES_RUN, []))  # earlier runs on this graph count
        modified = False
        for index, p in enumerate(self.passes, 1):
            missing = [r for r in p.requires if r not in done]
            if missing:
                raise PassError(f"pass '{p.name}' requires {', '.join(missing)} to run before it")
            try:
                result = p.call(graph_module)
                result.graph_module.graph.lint()
            except PassError:
                raise
            except Exception as exc:
                raise PassError(f"pass '{p.name}' failed: {exc}") from exc
            graph_module, modified = result.graph_module, modified or result.modified
            done.append(p.name)
            graph_module.meta[PASSES_RUN] = list(done)
            if self.dump_dir is not None:
                self._dump(graph_module, index, p.name, result.modified)
        return PassResult(graph_module, modified)

    def _dump(self, graph_module: fx.GraphModule, index: int, name: str, modified: bool) -> None:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        header = f"# after pass {index} '{name}' (modified: {modified}); {len(graph_module.graph.nodes)} nodes\n"
        text = header + graph_module.print_readable(print_output=False, include_stride=False, include_device=False)
        (self.dump_dir / f"{index:02d}_{name}.txt").write_text(text)
