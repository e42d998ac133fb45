"""Imports point down and do not form cycles (docs/architecture.md, "Modules").

Read from the source with ast: a module's runtime imports are its module-level
``import``/``from`` statements and those inside functions; imports under
``if TYPE_CHECKING:`` are for types only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "ingestd"

# Packages/modules checked here, and what each may not import at runtime.
UPWARD = ("ingestd.broker", "ingestd.http", "ingestd.app", "ingestd.cli", "ingestd.transport")
CHECKED = ("ingestd.ingest", "ingestd.config", "ingestd.metrics", "ingestd.build_info")
# Leaf modules that layers below the broker may still use.
ALLOWED = ("ingestd.transport.addr",)


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                out.add(base)
                # `from pkg import submodule`
                out.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(tree)
    return {m for m in out if m == "ingestd" or m.startswith("ingestd.")}


def _graph() -> dict[str, set[str]]:
    mods = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        graph[name] = {m for m in _imports(path, name) if m in mods and m != name}
    return graph


def _checked(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in CHECKED)


@pytest.mark.parametrize("name", sorted(n for n in _graph() if _checked(n)))
def test_no_upward_imports(name: str) -> None:
    bad = [
        m
        for m in _graph()[name]
        if m not in ALLOWED and any(m == u or m.startswith(u + ".") for u in UPWARD)
    ]
    assert not bad, f"{name} imports {bad} at runtime"


def test_no_import_cycles_below_the_broker() -> None:
    graph = _graph()
    # A module's package __init__ runs first: count that edge too.
    for name in list(graph):
        parent = name.rpartition(".")[0]
        if parent and parent in graph and parent != "ingestd":
            graph[name] = graph[name] | {parent}
    seen: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def walk(n: str) -> None:
        seen[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if not _checked(m):
                continue
            if seen.get(m) == 1:
                cycle = [*stack[stack.index(m) :], m]
                # A package importing its own submodules (re-exports) is not a cycle
                # a reader has to untangle; anything else is.
                if not all(c.startswith(cycle[0] + ".") or c == cycle[0] for c in cycle):
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
            elif m not in seen:
                walk(m)
        stack.pop()
        seen[n] = 2

    for n in sorted(graph):
        if _checked(n) and n not in seen:
            walk(n)
