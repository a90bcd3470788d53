"""The package's shape: no import cycle between its parts, and the step's data path in one place."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "episodic"


def part_of(module: str) -> str:
    """``episodic.heads.variants.base`` -> ``heads``; ``episodic.engine`` -> ``engine``."""
    return module.split(".")[1]


def import_graph() -> dict[str, set[str]]:
    """Part -> the parts its modules import (every import statement, in functions and TYPE_CHECKING too)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        here = part_of(".".join(rel.parts)) if len(rel.parts) > 1 else "episodic"
        targets = graph.setdefault(here, set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "episodic":  # from episodic import x
                names = [f"episodic.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("episodic.") and part_of(name) != here:
                    targets.add(part_of(name))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once per back edge)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_between_parts() -> None:
    graph = import_graph()
    assert {"engine", "eval", "tasks", "heads", "methods", "model"} <= set(graph)
    assert cycles(graph) == []
    assert "eval" not in graph["engine"] and "engine" not in graph["eval"]
    assert "heads" not in graph["tasks"] and "methods" not in graph["heads"]


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_side_channels_or_class_tests() -> None:
    """No proxy head, no labels handed back through an attribute, no isinstance on a concrete head
    class outside the heads' own modules."""
    heads = ("ContrastiveHead", "ProtoNetHead", "R2D2Head", "SVMHead", "KernelHead")
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "last_query_labels" not in text and "ScopedHead" not in text, path
        if "heads" not in path.relative_to(PACKAGE).parts[:1]:
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                    assert not any(h in ast.unparse(node) for h in heads), (path, ast.unparse(node))
