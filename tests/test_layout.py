"""The shape of the house, checked over the source (AST): arrows point down, no circles.

Layers, top to bottom: the CLI (``engine.cli``, with ``bench`` beside it as a tool) imports
the edges (``engine.http``, ``terminals``), which import the domain (the rest of ``engine``),
which imports the pure ``ledger``. Every import counts, also one inside a function: an arrow
no checker sees is still an arrow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parent.parent
PACKAGES: Final = ("engine", "ledger", "terminals", "bench")
EDGES: Final = ("engine.http", "engine.web", "engine.cli")
TOOLS_FOR_OPERATORS: Final = ("argparse", "rich")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES: Final = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module ``name`` imports (absolute names; project modules resolved to the module,
    not the package, when ``from pkg import module`` names one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    yield f"{base}.{a.name}"


def _graph() -> dict[str, set[str]]:
    return {
        name: {m for m in _imports(name, path) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }


GRAPH: Final = _graph()


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _arrows(source: str, target: str) -> list[str]:
    return sorted(
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        if _under(a, source)
        for b in targets
        if _under(b, target)
    )


def test_the_walk_finds_the_house() -> None:
    # A walker that found nothing would pass every rule below.
    assert {"engine.cli", "engine.http.app", "engine.store", "ledger.apply"} <= set(MODULES)
    assert "engine.store" in GRAPH["engine.batcher"]
    assert "ledger.apply" in GRAPH["engine.store"]


def test_ledger_imports_nothing_of_the_project() -> None:
    for pkg in ("engine", "terminals", "bench"):
        assert _arrows("ledger", pkg) == []


def test_the_domain_never_imports_an_edge() -> None:
    domain = [m for m in MODULES if _under(m, "engine") and not any(_under(m, e) for e in EDGES)]
    assert domain, "no domain modules found"
    up = [f"{m} -> {t}" for m in domain for t in GRAPH[m] if any(_under(t, e) for e in EDGES)]
    assert up == []


def test_only_the_cli_imports_the_terminals_and_the_bench() -> None:
    allowed = {"terminals": ("terminals", "engine.cli", "bench"), "bench": ("bench", "engine.cli")}
    for target, importers in allowed.items():
        wrong = [
            f"{m} -> {t}"
            for m, targets in GRAPH.items()
            if not any(_under(m, i) for i in importers)
            for t in targets
            if _under(t, target)
        ]
        assert wrong == [], target


def test_the_edges_and_the_cli_stay_apart() -> None:
    # HTTP and terminals are siblings: neither reaches into the other or up into the CLI.
    assert _arrows("engine.http", "engine.cli") == []
    assert _arrows("engine.http", "terminals") == []
    assert _arrows("terminals", "engine.http") == []
    assert _arrows("terminals", "engine.cli") == []
    # the web pages are an edge beside the API: the API includes them, never the other way
    assert _arrows("engine.web", "engine.http") == []
    assert _arrows("engine.web", "engine.cli") == []
    assert _arrows("engine.web", "terminals") == []


def test_domain_modules_leave_the_console_to_the_cli() -> None:
    # argparse and rich are how an operator talks to a command: only the CLI (and the tools
    # beside it, the bench and the terminal simulator) use them.
    tools = ("engine.cli", "bench", "terminals.simulator")
    wrong = [
        f"{name} imports {top}"
        for name, path in MODULES.items()
        if not any(_under(name, t) for t in tools)
        for imported in _imports(name, path)
        for top in TOOLS_FOR_OPERATORS
        if _under(imported, top)
    ]
    assert wrong == []


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    assert _cycles() == []


def test_the_circle_finder_finds_a_circle() -> None:
    GRAPH["engine.limits"].add("engine.config")
    GRAPH["engine.config"].add("engine.limits")
    try:
        assert ["engine.config", "engine.limits"] in _cycles()
    finally:
        GRAPH["engine.limits"].discard("engine.config")
        GRAPH["engine.config"].discard("engine.limits")
