"""`ingestd db url | shell | init`: finding and opening the database ingestd writes to."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pg import RestartablePostgres, create_database, drop_database

pytestmark = pytest.mark.pg


def ingestd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingestd", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def dsn():
    d = create_database()
    yield d
    drop_database(d)


def test_db_url_prints_a_configured_dsn(dsn):
    out = ingestd("db", "url", "--dsn", dsn)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == dsn


def test_db_url_on_a_data_dir_without_a_running_server_says_so(tmp_path):
    out = ingestd("db", "url", "--data-dir", str(tmp_path))
    assert out.returncode == 1
    assert str(tmp_path / "pg") in out.stderr
    assert "not running" in out.stderr
    # Asking for the URL creates nothing.
    assert not (tmp_path / "pg").exists()


def test_db_url_finds_the_running_embedded_server_and_psql_reaches_it(tmp_path):
    pg = RestartablePostgres(tmp_path / "pg")
    started = pg.start()
    try:
        out = ingestd("db", "url", "--data-dir", str(tmp_path))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == started
        shell = ingestd("db", "shell", "--data-dir", str(tmp_path), "--", "-tAc", "SELECT 6 * 7")
        assert shell.returncode == 0, shell.stderr
        assert shell.stdout.strip() == "42"
    finally:
        pg.close()


def test_db_shell_runs_psql_with_its_arguments_and_exit_code(dsn):
    table = "t_" + uuid.uuid4().hex[:8]
    ok = ingestd("db", "shell", "--dsn", dsn, "--", "-tAc", f"CREATE TABLE {table} (x int)")
    assert ok.returncode == 0, ok.stderr
    seen = ingestd("db", "shell", "--dsn", dsn, "--", "-tAc", f"SELECT count(*) FROM {table}")
    assert seen.stdout.strip() == "0"
    bad = ingestd("db", "shell", "--dsn", dsn, "--", "-v", "ON_ERROR_STOP=1", "-c", "SELEC 1")
    assert bad.returncode != 0
    assert "syntax error" in bad.stderr


def test_db_init_says_which_database_it_touched(dsn, tmp_path: Path):
    cfg = tmp_path / "ingestd.toml"
    cfg.write_text(
        '[[routes]]\nname = "t"\ntopic = "a/{id}"\ntable = "init_probe"\n'
        '[routes.columns]\nid = "topic.id"\n'
    )
    out = ingestd("db", "init", "--config", str(cfg), "--dsn", dsn)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("database: ")
    assert dsn.split("@")[-1] in first
    rows = ingestd("db", "shell", "--dsn", dsn, "--", "-tAc", "SELECT to_regclass('init_probe')")
    assert rows.stdout.strip() == "init_probe"
