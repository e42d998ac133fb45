"""The compiled extensions are the ones in use, and the CLI says so."""

from __future__ import annotations

import subprocess
import sys

import ingestd._codec
import ingestd._copy
import ingestd._inbound
import ingestd._rows
import ingestd._trie

import ingestd._message


def test_compiled_modules_are_loaded():
    for mod in (
        ingestd._codec,
        ingestd._trie,
        ingestd._copy,
        ingestd._inbound,
        ingestd._message,
        ingestd._rows,
    ):
        assert mod.__file__ is not None
        assert mod.__file__.endswith(".so"), mod.__file__


def test_version_command_reports_cython_codec():
    out = subprocess.run(
        [sys.executable, "-m", "ingestd", "version"], capture_output=True, text=True, check=True
    ).stdout
    assert "codec: cython" in out


def test_the_installed_package_is_this_tree():
    """No module of an older build lingers in the installed package: a stale
    ``ingestd/protocol.py`` left by setuptools' ``build/`` cache once let tests import
    a module this tree had deleted (CI's fresh clone would then fail)."""
    from pathlib import Path

    installed = Path(ingestd._codec.__file__).parent
    src = Path(__file__).resolve().parent.parent / "src" / "ingestd"
    if not src.is_dir():  # pragma: no cover - running against an installed wheel alone
        return
    ours = {p.relative_to(src) for p in src.rglob("*.py")}
    theirs = {p.relative_to(installed) for p in installed.rglob("*.py")}
    assert sorted(map(str, theirs - ours)) == []
