"""The package's one-way data flow (docs/design.md section 3), checked on the import statements themselves.

Every ``import dits.x`` / ``from dits.x import ...`` in ``src/dits`` (module level or inside a function) is
an arrow; the graph must have no cycle, and nothing outside ``stages``, ``pipeline`` and ``cli`` may import
a stage runner, the pipeline or the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

SRC = REPO / "src"
TOP = ("dits.stages", "dits.pipeline", "dits.cli")


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, known: set[str]) -> str:
    """The module an imported name lives in (``dits.records.PreferencePair`` -> ``dits.records``)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    known = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t.startswith("dits"):
                    dep = _resolve(t, known)
                    if dep != mod and not mod.startswith(dep + "."):  # a package's own __init__ is no arrow
                        graph[mod].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        colour[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = 2
                stack.pop()
                continue
            nxt = todo.pop()
            if colour.get(nxt) == 1:
                path = [n for n, _ in stack]
                return [*path[path.index(nxt) :], nxt]
            if colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 50  # the scan sees the real package
    assert find_cycle(graph) is None


def test_nothing_below_the_stages_imports_a_stage_the_pipeline_or_the_cli():
    offenders = [
        (mod, dep)
        for mod, deps in import_graph().items()
        if not mod.startswith(TOP)
        for dep in deps
        if dep.startswith(TOP)
    ]
    assert offenders == []
