"""The project's import graph, read with ``ast`` from the source (every import: module level, in functions, under
``TYPE_CHECKING``), as edges between the project's own modules."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("peft_sorlora", "sorlora_gossip", "moe_router", "model_cards", "sorlora")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of the project's packages (a package is its ``__init__``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """(imported module, names imported from it) of one import statement, relative imports resolved."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, []
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        yield target, [alias.name for alias in node.names]


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported project module: line}}`` (``from pkg import sub`` is an edge to ``pkg.sub``)."""
    modules = project_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target, names in _imported(node, name, path.name == "__init__.py"):
                found = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                if len(found) < len(names) or not names:
                    found.append(target)
                for dep in found:
                    while dep and dep not in modules:  # `import a.b.c` of a name inside a module
                        dep = dep.rpartition(".")[0]
                    if dep and dep != name:
                        edges.setdefault(dep, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (each holds at least one import circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan, iterative enough for this graph's depth
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found
