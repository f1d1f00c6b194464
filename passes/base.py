"""The pass contract and the manager that runs passes in order and verifies after each.

A pass is an analysis (in place: it annotates and returns the graph module it was given, graph
unchanged) or a transform (functional: it returns a new graph module and leaves its input as it
was), as onnx-ir's InPlacePass / FunctionalPass. The manager checks the declaration after each
pass, so a pass that breaks it fails by name instead of corrupting a caller's graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import fx

from dgo_compile.core.errors import PassError

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


class Pass:
    """A named graph pass with a typed frozen config; subclass AnalysisPass or TransformPass.

    `requires` names passes whose annotations this one reads; the manager checks they ran.
    `call` returns the (possibly new) graph module and whether anything changed.
    """

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    in_place: ClassVar[bool]

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        raise NotImplementedError


class AnalysisPass(Pass):
    """Annotates node.meta / graph_module.meta in place and returns the same graph module, graph unchanged."""

    in_place = True


class TransformPass(Pass):
    """Returns a new graph module (or its input untouched when there is nothing to do); never edits the input."""

    in_place = False


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
            if not isinstance(p, (AnalysisPass, TransformPass)):
                raise PassError(f"pass '{p.name}' declares neither AnalysisPass nor TransformPass")
            before = _fingerprint(graph_module, p.in_place)
            try:
                result = p.call(graph_module)
                result.graph_module.graph.lint()
            except PassError:
                raise
            except Exception as exc:
                raise PassError(f"pass '{p.name}' failed: {exc}") from exc
            _check_contract(p, graph_module, before, result)
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


def _fingerprint(graph_module: fx.GraphModule, in_place: bool) -> tuple:
    """What a pass of this kind must leave as it was: the graph's code (an analysis), and also every
    node's and the module's annotation keys (a transform, which annotates only its own copy)."""
    code = str(graph_module.graph)
    if in_place:
        return (code,)
    return code, tuple(tuple(n.meta) for n in graph_module.graph.nodes), tuple(graph_module.meta)


def _check_contract(p: Pass, graph_module: fx.GraphModule, before: tuple, result: PassResult) -> None:
    if p.in_place and result.graph_module is not graph_module:
        raise PassError(f"analysis pass '{p.name}' returned a new graph module; an analysis annotates its input")
    if _fingerprint(graph_module, p.in_place) != before:
        what = ("changed the graph" if p.in_place
                else "mutated its input graph; a transform edits a copy (editable_copy)")
        raise PassError(f"{'analysis' if p.in_place else 'transform'} pass '{p.name}' {what}")
