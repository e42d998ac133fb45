"""`ingestd tune`: /proc parsing with a fake /proc, recommendations, --apply, real COPY."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from ingestd.tune import (
    CopyMeasurement,
    _nice,
    apply_to_toml,
    recommend,
    system_checks,
    tune,
)


def fake_proc(tmp_path: Path, **values: str) -> Path:
    """A /proc with sys/<dotted name> files."""
    root = tmp_path / "proc"
    for name, value in values.items():
        p = root.joinpath("sys", *name.split("."))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(value + "\n")
    return root


GOOD = {
    "net.core.somaxconn": "4096",
    "net.ipv4.tcp_max_syn_backlog": "8192",
    "net.ipv4.tcp_rmem": "4096\t131072\t6291456",
    "net.ipv4.tcp_wmem": "4096 16384 4194304",
    "net.core.rmem_max": "8388608",
    "net.core.wmem_max": "8388608",
    "net.ipv4.tcp_mem": "1000000 2000000 3000000",
    "fs.nr_open": "1048576",
}


def by_check(findings: list) -> dict:
    return {f.check: f for f in findings}


def test_everything_fine(tmp_path: Path) -> None:
    f = by_check(system_checks(1000, fake_proc(tmp_path, **GOOD), nofile=(65536, 65536)))
    assert all(x.ok for x in f.values()), [x for x in f.values() if not x.ok]
    assert f["open files (soft limit)"].current == "65536"
    assert f["open files (soft limit)"].recommended == "ok"
    assert f["net.core.somaxconn"].current == "4096"
    assert f["net.ipv4.tcp_rmem"].current == "4096 131072 6291456"
    assert f["net.core.wmem_max"].current == "8388608"
    assert "TCP memory for 1000 connections" in f


def test_limits_too_low(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        **{
            **GOOD,
            "net.core.somaxconn": "128",
            "net.ipv4.tcp_max_syn_backlog": "256",
            "net.ipv4.tcp_wmem": "4096 16384 1048576",
            "net.core.rmem_max": "212992",
            "net.ipv4.tcp_mem": "10 20 30",
            "fs.nr_open": "5000",
        },
    )
    f = by_check(system_checks(10_000, proc, nofile=(1024, 4096)))
    soft = f["open files (soft limit)"]
    assert (soft.ok, soft.current, soft.recommended) == (False, "1024", "11024")
    hard = f["open files (hard limit)"]
    assert (hard.ok, hard.current, hard.recommended) == (False, "4096", "11024")
    assert "fs.nr_open is 5000" in hard.why
    s = f["net.core.somaxconn"]
    assert (s.ok, s.current, s.recommended) == (False, "128", "4096")
    assert f["net.ipv4.tcp_max_syn_backlog"].recommended == "4096"
    w = f["net.ipv4.tcp_wmem"]
    assert (w.ok, w.recommended) == (False, "4096 16384 4194304")
    assert f["net.ipv4.tcp_rmem"].ok
    assert (f["net.core.rmem_max"].ok, f["net.core.rmem_max"].recommended) == (False, "4194304")
    mem = f["TCP memory for 10000 connections"]
    assert not mem.ok
    assert mem.recommended.startswith("net.ipv4.tcp_mem pressure >= ")


def test_unlimited_and_missing_entries(tmp_path: Path) -> None:
    import resource

    inf = resource.RLIM_INFINITY
    f = by_check(system_checks(10, tmp_path / "empty", nofile=(inf, inf)))
    assert f["open files (soft limit)"].current == "unlimited"
    assert f["open files (soft limit)"].ok
    assert f["net.core.somaxconn"].current == "unreadable"
    assert f["net.ipv4.tcp_rmem"].current == "unreadable"
    assert "net.core.rmem_max" not in f
    # Garbage in a /proc file is "unreadable", not a crash.
    f = by_check(system_checks(10, fake_proc(tmp_path, **{"net.core.somaxconn": "abc"})))
    assert f["net.core.somaxconn"].current == "unreadable"


def test_cli_without_database(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, **GOOD)
    r = CliRunner().invoke(
        tune, ["--no-db", "--proc-dir", str(proc), "--json", "--connections", "5"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    checks = {f["check"]: f for f in data["findings"]}
    assert checks["net.core.somaxconn"]["current"] == "4096"
    assert data["copy"] == [] and data["batch_rows"] is None
    r = CliRunner().invoke(tune, ["--no-db", "--proc-dir", str(proc)])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split() == ["check", "current", "recommended", "why"]
    assert any(line.startswith("net.core.somaxconn") for line in lines)
    # --apply without a measurement is an error, and writes nothing.
    target = tmp_path / "x.toml"
    r = CliRunner().invoke(tune, ["--no-db", "--proc-dir", str(proc), "--apply", str(target)])
    assert r.exit_code != 0 and "nothing to apply" in r.output
    assert not target.exists()


def test_recommendation() -> None:
    ms = [
        CopyMeasurement(100, 50, 50_000, 2.0, 3.0),
        CopyMeasurement(1000, 20, 150_000, 6.7, 9.0),
        CopyMeasurement(5000, 10, 170_000, 29.0, 40.0),
        CopyMeasurement(20000, 3, 180_000, 110.0, 130.0),
    ]
    batch, flush, reasons = recommend(ms)
    assert batch == 5000  # smallest within 10% of 180k
    assert flush == 50  # 2 x 29 ms -> 58 -> nearest of 1-2-5: 50
    assert "5000-row batches" in reasons[0]
    _, _, reasons = recommend(ms, expected_rate=160_000)
    assert any("max_concurrent_copies" in r for r in reasons)
    # A flat curve picks the smallest batch; the flush interval has a floor of 10 ms.
    flat = [CopyMeasurement(n, 10, 100_000, 0.5, 1.0) for n in (100, 1000)]
    assert recommend(flat)[:2] == (100, 10)
    assert [_nice(x) for x in (3, 14, 16, 57, 75, 700)] == [2, 10, 20, 50, 100, 500]


VALUES = {"batch_rows": 2000, "flush_interval_ms": 20.0}


def test_apply_creates_a_file(tmp_path: Path) -> None:
    p = tmp_path / "new.toml"
    apply_to_toml(p, VALUES)
    assert p.read_text() == "[ingest]\nbatch_rows = 2000\nflush_interval_ms = 20.0\n"


def test_apply_updates_only_those_keys(tmp_path: Path) -> None:
    original = """# ingestd config
[server]
listen = ["0.0.0.0:1883"]   # all interfaces

[ingest]
ack = "after-commit"
batch_rows = 5000  # rows per COPY
# a comment inside
max_pending_rows = 100000

[[routes]]
name = "t"
topic = "company/{c}/machine/{m}/telemetry"
table = "telemetry"
[routes.columns]
batch_rows = "payload.batch_rows"
"""
    p = tmp_path / "ingestd.toml"
    p.write_text(original)
    new = apply_to_toml(p, VALUES)
    expected = original.replace(
        "batch_rows = 5000  # rows per COPY", "batch_rows = 2000  # rows per COPY"
    ).replace(
        "max_pending_rows = 100000\n", "max_pending_rows = 100000\nflush_interval_ms = 20.0\n"
    )
    assert new == expected
    assert p.read_text() == expected
    data = tomllib.loads(new)
    assert data["ingest"]["batch_rows"] == 2000
    assert data["routes"][0]["columns"]["batch_rows"] == "payload.batch_rows"  # untouched
    # Applying again is a no-op on the text.
    assert apply_to_toml(p, VALUES) == expected


def test_apply_appends_a_missing_section_and_keeps_crlf(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(b'[server]\r\nlog_level = "debug"')  # no final newline
    apply_to_toml(p, VALUES)
    assert p.read_bytes() == (
        b'[server]\r\nlog_level = "debug"\r\n\r\n[ingest]\r\nbatch_rows = 2000\r\n'
        b"flush_interval_ms = 20.0\r\n"
    )


def test_apply_to_top_level_dotted_keys_and_empty_section(tmp_path: Path) -> None:
    p = tmp_path / "d.toml"
    p.write_text('ingest.batch_rows = 1\n\n[server]\ndata_dir = "x"\n')
    apply_to_toml(p, VALUES)
    data = tomllib.loads(p.read_text())
    assert data["ingest"] == VALUES
    assert p.read_text().startswith("ingest.batch_rows = 2000\n")
    p = tmp_path / "e.toml"
    p.write_text('[ingest]\n\n[server]\ndata_dir = "x"\n')
    apply_to_toml(p, VALUES)
    assert p.read_text() == (
        '[ingest]\nbatch_rows = 2000\nflush_interval_ms = 20.0\n\n[server]\ndata_dir = "x"\n'
    )


def test_apply_refuses_what_it_cannot_edit_safely(tmp_path: Path) -> None:
    p = tmp_path / "f.toml"
    text = "ingest = { batch_rows = 1 }\n"
    p.write_text(text)
    with pytest.raises(ValueError, match="edit it by hand"):
        apply_to_toml(p, VALUES)
    assert p.read_text() == text
    p.write_text("ingest = 3\n")
    with pytest.raises(ValueError, match="not a table"):
        apply_to_toml(p, VALUES)
    p.write_text("[ingest\n")
    with pytest.raises(tomllib.TOMLDecodeError):
        apply_to_toml(p, VALUES)


# -- against PostgreSQL -------------------------------------------------------------


@pytest.mark.pg
def test_copy_measurement_and_apply(tmp_path: Path) -> None:
    import asyncio
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import pg  # the suite's PostgreSQL (embedded unless INGESTD_TEST_DSN)

    try:
        dsn = pg.create_database()
    except Exception as e:  # pragma: no cover - no PostgreSQL available
        pytest.skip(f"no PostgreSQL: {e}")
    try:
        cfg = tmp_path / "ingestd.toml"
        cfg.write_text('[server]\nlog_level = "info"\n')
        r = CliRunner().invoke(
            tune,
            [
                "--dsn",
                dsn,
                "--seconds",
                "0",
                "--batch-sizes",
                "10,200",
                "--json",
                "--apply",
                str(cfg),
                "--config",
                str(cfg),
            ],
        )
        assert r.exit_code == 0, r.output
        data = json.loads(r.output)
        assert [m["batch_rows"] for m in data["copy"]] == [10, 200]
        assert all(m["batches"] == 3 and m["rows_per_s"] > 0 for m in data["copy"])
        assert data["batch_rows"] in (10, 200)
        written = tomllib.loads(cfg.read_text())
        assert written["server"] == {"log_level": "info"}
        assert written["ingest"] == {
            "batch_rows": data["batch_rows"],
            "flush_interval_ms": float(data["flush_interval_ms"]),
        }
        # The written file is a valid ingestd configuration.
        from ingestd.config import load_config

        loaded = load_config(str(cfg), env={})
        assert loaded.ingest.batch_rows == data["batch_rows"]

        async def leftovers() -> int:
            import asyncpg

            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval(
                    "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'ingestd_tune_%'"
                )
            finally:
                await conn.close()

        assert asyncio.run(leftovers()) == 0  # the scratch table is dropped
    finally:
        pg.drop_database(dsn)


def test_tune_without_a_database_leaves_no_data_directory_behind(tmp_path: Path) -> None:
    """No --dsn and no ingestd data directory here: measure on a throw-away cluster."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ingestd", "tune", "--seconds", "0", "--batch-sizes", "10",
         "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [m["batch_rows"] for m in data["copy"]] == [10]
    assert "temporary" in data["database"]
    assert list(tmp_path.iterdir()) == []  # no ./ingestd-data
