"""The package's shape, checked: imports point down, no cycles, small files, a .pxd per .pyx.

DESIGN.md's rule is that imports point down only (cli -> app -> http / broker /
ingest -> mqtt, config, errors) with no cycles, and that a reader finds a
concern by its folder. These tests read the source with ``ast`` (nothing is
imported), so a new upward or circular import fails here, with the edge named,
before it becomes a start-up order bug.

Counted: every ``import`` of an ``ingestd`` module anywhere in a file, including
imports inside functions (a lazy import is still a dependency). Not counted:
imports under ``if TYPE_CHECKING:`` (annotations only; they never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "ingestd"
EXT = ROOT / "ext" / "ingestd"

# Layers, lowest first. A module may import modules of its own layer or lower.
# Compiled modules (ingestd._codec, ...) are the floor; they are not parsed here.
LAYERS: list[tuple[str, ...]] = [
    ("ingestd", "ingestd.errors", "ingestd.mqtt", "ingestd.build_info", "ingestd.logs"),
    ("ingestd.accumulators",),
    ("ingestd.config", "ingestd.transport.addr"),
    ("ingestd.db", "ingestd.metrics"),
    ("ingestd.transport", "ingestd.broker", "ingestd.ingest", "ingestd.upstream"),
    ("ingestd.http",),
    ("ingestd.app",),
    ("ingestd.workers",),
    ("ingestd.cli", "ingestd.bench", "ingestd.tune", "ingestd.users"),
    ("ingestd.__main__",),
]

# Siblings of one layer that must not know each other (at run time).
FORBIDDEN: list[tuple[str, str, str]] = [
    ("ingestd.transport", "ingestd.broker", "transport carries bytes; app.py wires a channel in"),
    ("ingestd.transport", "ingestd.ingest", "transport carries bytes only"),
    ("ingestd.broker", "ingestd.ingest", "ingest routes plug into the broker through broker.hooks"),
    ("ingestd.ingest", "ingestd.broker", "ingest sees messages, not the broker"),
    ("ingestd.broker", "ingestd.transport", "the broker never sees a socket"),
    ("ingestd.upstream", "ingestd.ingest", "upstream feeds routes through Broker.publish"),
    ("ingestd.upstream", "ingestd.transport", "upstream owns its client sockets"),
    ("ingestd.broker", "ingestd.upstream", "nothing but app imports upstream"),
    ("ingestd.ingest", "ingestd.upstream", "nothing but app imports upstream"),
    ("ingestd.transport", "ingestd.upstream", "nothing but app imports upstream"),
]

MAX_LINES = 600
LONG_FILE_MARK = "over 600 lines"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(imported module or module.name, line) for every run-time import of ingestd."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                for sub in ast.walk(child):
                    skip.add(id(sub))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ingestd":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "ingestd":
                continue
            for alias in node.names:
                yield f"{target}.{alias.name}", node.lineno


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (module or module.attribute) lies in."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None  # a compiled module (ingestd._codec, ...): the floor


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: dict[str, int] = {}
        for name, line in _imports(tree, mod, path.name == "__init__.py"):
            target = _resolve(name, modules)
            if target is not None and target != mod:
                edges.setdefault(target, line)
        graph[mod] = edges
    return graph


def _layer(module: str) -> int:
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in _modules() if _layer(m) < 0]
    assert not unplaced, f"add these to LAYERS in {__file__}: {unplaced}"


def test_imports_point_down() -> None:
    bad = []
    for mod, edges in _graph().items():
        for target, line in edges.items():
            if _layer(target) > _layer(mod):
                bad.append(f"{mod}:{line} imports {target} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_siblings_that_must_not_know_each_other() -> None:
    bad = []
    for mod, edges in _graph().items():
        for target, line in edges.items():
            for a, b, why in FORBIDDEN:
                if _in(mod, a) and _in(target, b) and not _in(target, a):
                    bad.append(f"{mod}:{line} imports {target}: {why}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = _graph()
    # Tarjan's strongly connected components; any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_checker_sees_cycles_and_upward_imports(tmp_path: Path) -> None:
    """The checker itself: a relative import resolves, and TYPE_CHECKING is skipped."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "from .session import Session\n"
        "from ingestd.app import App\n"
        "if TYPE_CHECKING:\n"
        "    from ingestd.cli import main\n"
        "def f():\n"
        "    from ingestd import metrics\n"
    )
    found = [n for n, _ in _imports(ast.parse(src), "ingestd.broker.channel", False)]
    assert found == ["ingestd.broker.session.Session", "ingestd.app.App", "ingestd.metrics"]
    assert _layer("ingestd.app") > _layer("ingestd.broker.channel")


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_long_files_say_why(path: Path) -> None:
    text = path.read_text()
    n = text.count("\n")
    if n > MAX_LINES:
        head = "\n".join(text.splitlines()[:60])
        assert LONG_FILE_MARK in head.lower(), (
            f"{path.relative_to(ROOT)} has {n} lines; split it, or say at its top why it is"
            f" {LONG_FILE_MARK}"
        )


def test_every_pyx_has_a_pxd() -> None:
    missing = [p.name for p in sorted(EXT.glob("*.pyx")) if not p.with_suffix(".pxd").exists()]
    assert not missing, f"declare these modules' cdef classes in a .pxd beside them: {missing}"
