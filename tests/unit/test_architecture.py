"""The shape of the code: modules fit in a sitting, and no import cycle (function-local
imports included: they hide a cycle, they do not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "flows", "cluster", "infra")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            # the module itself, or the closest enclosing module of the project
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def test_no_module_is_over_400_lines() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert not {n: k for n, k in long.items() if k > 400}


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # a package imports its __init__'s names; importing tasks.types.model from tasks.types
    # is the package's own re-export, not a cycle through another module
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    cycles, state = [], dict.fromkeys(graph, 0)

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif state[nxt] == 0:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if state[name] == 0:
            visit(name, [name])
    assert not cycles, cycles


def test_cluster_and_infra_meet_only_on_the_floor() -> None:
    """cluster/ may use infra's floor modules (settings, process helpers), nothing else of
    it; infra never imports cluster."""
    modules = _modules()
    for name, path in modules.items():
        used = _imports(path, modules)
        if name.startswith("infra"):
            assert not {m for m in used if m.startswith("cluster")}, name
        if name.startswith("cluster"):
            assert {m for m in used if m.startswith("infra")} <= {"infra.settings",
                                                                  "infra.process"}, name
