"""Imports point down only, and there are no import cycles (DESIGN.md, "Layout").

Reads the package's sources with ``ast`` (nothing is imported): an import
counts when it runs at import time, so imports under ``if TYPE_CHECKING:`` and
inside functions (deliberately lazy, as in ``ingestd.app``) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "ingestd"

pytestmark = pytest.mark.skipif(not SRC.is_dir(), reason="needs the source tree (src/)")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(path: Path) -> set[str]:
    """The ingestd modules ``path`` imports at import time."""
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("ingestd"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("ingestd"):
                    found.add(node.module)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(path.read_text()).body)
    return found


GRAPH = {module_name(p): runtime_imports(p) for p in sorted(SRC.rglob("*.py"))}


def imports_of(prefix: str) -> dict[str, set[str]]:
    return {m: deps for m, deps in GRAPH.items() if m == prefix or m.startswith(prefix + ".")}


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_mqtt_constants_import_nothing_of_ingestd():
    for m, deps in imports_of("ingestd.mqtt").items():
        assert not deps, m


def test_transport_does_not_import_the_broker():
    for m, deps in imports_of("ingestd.transport").items():
        bad = {d for d in deps if under(d, "ingestd.broker", "ingestd.ingest", "ingestd.app")}
        assert not bad, f"{m} imports {bad}"


def test_broker_does_not_import_upwards():
    upward = ("ingestd.ingest", "ingestd.http", "ingestd.app", "ingestd.cli", "ingestd.transport")
    for m, deps in imports_of("ingestd.broker").items():
        bad = {d for d in deps if under(d, *upward)}
        assert not bad, f"{m} imports {bad}"


def test_no_import_cycles():
    graph = {m: {d for d in deps if d in GRAPH} for m, deps in GRAPH.items()}
    done: set[str] = set()

    def walk(m: str, path: list[str]) -> None:
        if m in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if m in done:
            return
        for d in sorted(graph[m]):
            walk(d, [*path, m])
        done.add(m)

    for m in sorted(graph):
        walk(m, [])


def test_the_checks_see_what_they_look_for():
    assert "ingestd.broker.router" in GRAPH["ingestd.broker.server"]
    # channel.py names the Broker for mypy only: not an import-time dependency.
    assert "ingestd.broker.server" not in GRAPH["ingestd.broker.channel"]
