"""``ingestd tune``: check the host's limits and measure PostgreSQL's COPY rate.

(Over 600 lines on purpose: one command whose parts, host checks, the COPY
measurement, the recommendation and the TOML edit, are each a short pipeline
stage read top to bottom and used nowhere else; split, they would be four
modules with one caller.)

System checks (read from ``/proc/sys`` and ``getrlimit``):

* open-file limit (``RLIMIT_NOFILE``) against the connections wanted: every
  MQTT connection is a file descriptor;
* ``net.core.somaxconn`` and ``net.ipv4.tcp_max_syn_backlog``: the kernel caps
  ingestd's listen backlog (4096) at these, and a reconnect storm overflows a
  short accept queue;
* TCP buffer limits (``net.ipv4.tcp_rmem``/``tcp_wmem``, ``net.core.rmem_max``/
  ``wmem_max``, ``net.ipv4.tcp_mem``): throughput to fast subscribers, and the
  socket memory of many connections.

Database measurement (``--dsn``, or the embedded server of ``--config``'s
data directory): COPY batches of 100, 1000, 5000 and 20000 telemetry-shaped
rows, one binary COPY (its own transaction) each, encoded as the ingest writer
encodes them, into a scratch table that is dropped afterwards;
recommends ``ingest.batch_rows`` (the smallest batch within 10 % of the best
rate: larger batches only add latency and memory) and
``ingest.flush_interval_ms`` (about two COPY durations of that batch).

``--apply PATH`` writes the two recommended ``[ingest]`` keys into a TOML
file, creating it if needed and leaving the rest of its text unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import re
import resource
import statistics
import tempfile
import time
import tomllib
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from ingestd._copy import CopyEncoder

BATCH_SIZES = (100, 1000, 5000, 20000)
LISTEN_BACKLOG = 4096  # what ingestd.app passes to create_server
FD_MARGIN = 1024  # listeners, database pool, spool, logs, HTTP, headroom
GOOD_BUFFER_MAX = 4 * 1024 * 1024


@dataclass
class Finding:
    check: str
    current: str
    recommended: str
    why: str
    ok: bool = True


@dataclass
class CopyMeasurement:
    batch_rows: int
    batches: int
    rows_per_s: float
    median_ms: float
    max_ms: float


@dataclass
class TuneReport:
    findings: list[Finding] = field(default_factory=list)
    copy: list[CopyMeasurement] = field(default_factory=list)
    batch_rows: int | None = None
    flush_interval_ms: int | None = None
    database: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- system checks --------------------------------------------------------------------


def read_sysctl(name: str, proc_dir: str | Path = "/proc") -> str | None:
    """The value of ``name`` (dotted, e.g. net.core.somaxconn) or None when absent."""
    path = Path(proc_dir, "sys", *name.split("."))
    try:
        return " ".join(path.read_text().split())
    except OSError:
        return None


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split()]
    except ValueError:
        return None


def _mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB" if n < 1024**3 else f"{n / 1024**3:.1f} GiB"


def system_checks(
    connections: int,
    proc_dir: str | Path = "/proc",
    nofile: tuple[int, int] | None = None,
) -> list[Finding]:
    out: list[Finding] = []
    soft, hard = nofile if nofile is not None else resource.getrlimit(resource.RLIMIT_NOFILE)
    need = connections + FD_MARGIN
    inf = resource.RLIM_INFINITY

    def lim(v: int) -> str:
        return "unlimited" if v == inf or v < 0 else str(v)

    soft_ok = soft == inf or soft >= need
    out.append(
        Finding(
            "open files (soft limit)",
            lim(soft),
            "ok" if soft_ok else str(need),
            f"{connections} connections + {FD_MARGIN} for listeners, database and files"
            + ("" if soft_ok else "; raise with `ulimit -n` or LimitNOFILE= in the systemd unit"),
            soft_ok,
        )
    )
    hard_ok = hard == inf or hard >= need
    nr_open = _ints(read_sysctl("fs.nr_open", proc_dir))
    out.append(
        Finding(
            "open files (hard limit)",
            lim(hard),
            "ok" if hard_ok else str(need),
            "the soft limit cannot exceed it"
            + ("" if hard_ok else "; raising it needs root (limits.conf or LimitNOFILE=)")
            + (
                f"; fs.nr_open is {nr_open[0]}, the kernel's ceiling"
                if nr_open and nr_open[0] < need
                else ""
            ),
            hard_ok,
        )
    )

    somax = _ints(read_sysctl("net.core.somaxconn", proc_dir))
    if somax is None:
        out.append(
            Finding("net.core.somaxconn", "unreadable", "-", "not Linux, or /proc/sys hidden")
        )
    else:
        ok = somax[0] >= LISTEN_BACKLOG
        out.append(
            Finding(
                "net.core.somaxconn",
                str(somax[0]),
                "ok" if ok else str(LISTEN_BACKLOG),
                f"caps ingestd's listen backlog ({LISTEN_BACKLOG}); a short accept queue drops "
                "connections when a fleet reconnects at once",
                ok,
            )
        )
    syn = _ints(read_sysctl("net.ipv4.tcp_max_syn_backlog", proc_dir))
    if syn is not None:
        ok = syn[0] >= LISTEN_BACKLOG
        out.append(
            Finding(
                "net.ipv4.tcp_max_syn_backlog",
                str(syn[0]),
                "ok" if ok else str(LISTEN_BACKLOG),
                "half-open connections kept during a connect storm",
                ok,
            )
        )

    rmem = _ints(read_sysctl("net.ipv4.tcp_rmem", proc_dir))
    wmem = _ints(read_sysctl("net.ipv4.tcp_wmem", proc_dir))
    for name, triple in (("net.ipv4.tcp_rmem", rmem), ("net.ipv4.tcp_wmem", wmem)):
        if triple is None or len(triple) != 3:
            out.append(Finding(name, "unreadable", "-", "not Linux, or /proc/sys hidden"))
            continue
        ok = triple[2] >= GOOD_BUFFER_MAX
        rec = f"{triple[0]} {triple[1]} {GOOD_BUFFER_MAX}"
        out.append(
            Finding(
                name,
                " ".join(map(str, triple)),
                "ok" if ok else rec,
                "min/default/max per socket; autotuning grows a busy subscriber's buffer up to "
                f"max ({_mib(triple[2])})"
                + (
                    ""
                    if ok
                    else f"; below {_mib(GOOD_BUFFER_MAX)} limits throughput to fast consumers"
                ),
                ok,
            )
        )
    for name in ("net.core.rmem_max", "net.core.wmem_max"):
        v = _ints(read_sysctl(name, proc_dir))
        if v is None:
            continue
        ok = v[0] >= GOOD_BUFFER_MAX
        out.append(
            Finding(
                name,
                str(v[0]),
                "ok" if ok else str(GOOD_BUFFER_MAX),
                "ceiling for buffers set with SO_RCVBUF/SO_SNDBUF (PostgreSQL client, proxies)",
                ok,
            )
        )
    tcp_mem = _ints(read_sysctl("net.ipv4.tcp_mem", proc_dir))
    if tcp_mem and len(tcp_mem) == 3 and rmem and wmem and len(rmem) == 3 and len(wmem) == 3:
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        # An idle connection holds about its minimum buffers; default sizes are what
        # a connection with traffic in both directions starts with.
        idle = connections * (rmem[0] + wmem[0])
        busy = connections * (rmem[1] + wmem[1])
        pressure = tcp_mem[1] * page
        hard_cap = tcp_mem[2] * page
        ok = idle <= pressure
        out.append(
            Finding(
                f"TCP memory for {connections} connections",
                f"{_mib(idle)} idle",
                "ok" if ok else f"net.ipv4.tcp_mem pressure >= {-(-idle // page)} pages",
                f"tcp_mem pressure threshold {_mib(pressure)}, limit {_mib(hard_cap)}; past the "
                "threshold the kernel shrinks every socket's buffers. Idle connections hold about "
                f"their minimum buffers; all busy at default sizes would need {_mib(busy)}",
                ok,
            )
        )
    return out


# -- COPY measurement -----------------------------------------------------------------


def _rows(n: int, start: int = 0) -> list[tuple[Any, ...]]:
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return [
        (
            base + dt.timedelta(milliseconds=start + i),
            f"c{(start + i) % 50}",
            f"m{(start + i) % 1000}",
            20.0 + ((start + i) % 100) / 10,
            1000.0 + (start + i) % 7,
            '{"fw":"1.2.3","status":"ok"}',
        )
        for i in range(n)
    ]


COLUMNS = ("ts", "company", "machine", "temperature", "pressure", "extra")
COLUMN_TYPES = ("timestamptz", "text", "text", "double precision", "double precision", "jsonb")


async def measure_copy(
    conn: Any,
    sizes: tuple[int, ...] = BATCH_SIZES,
    seconds: float = 1.0,
    min_batches: int = 3,
    max_batches: int = 200,
) -> list[CopyMeasurement]:
    """COPY each batch size for about ``seconds`` (at least ``min_batches``), one COPY per batch.

    ``conn`` is an asyncpg connection. The scratch table is logged like a real
    ingest table (not TEMP: temporary tables skip the WAL and would flatter
    the figures) and is dropped at the end.
    """
    table = f"ingestd_tune_{uuid.uuid4().hex[:10]}"
    await conn.execute(
        f"CREATE TABLE {table} (ts timestamptz NOT NULL, company text, machine text, "
        "temperature double precision, pressure double precision, extra jsonb)"
    )
    try:
        await conn.execute(f"CREATE INDEX ON {table} (machine, ts)")
        from ingestd.db import copy_binary

        out = []
        encoder = CopyEncoder(COLUMN_TYPES)
        for size in sizes:
            rows = _rows(size)
            lat: list[float] = []
            t_end = time.perf_counter() + seconds
            while len(lat) < min_batches or (
                time.perf_counter() < t_end and len(lat) < max_batches
            ):
                t0 = time.perf_counter()
                # As the ingest writer does it: rows encoded by CopyEncoder, one binary
                # COPY per batch (a lone statement commits on its own).
                await copy_binary(conn, table, encoder.encode(rows), COLUMNS)
                lat.append(time.perf_counter() - t0)
            total = sum(lat)
            out.append(
                CopyMeasurement(
                    batch_rows=size,
                    batches=len(lat),
                    rows_per_s=size * len(lat) / total if total > 0 else 0.0,
                    median_ms=statistics.median(lat) * 1000,
                    max_ms=max(lat) * 1000,
                )
            )
            await conn.execute(f"TRUNCATE {table}")
        return out
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")


def _nice(ms: float) -> int:
    """The nearest (in ratio) of 1, 2, 5 times a power of ten: 10, 20, 50, 100, ..."""
    ms = max(ms, 1.0)
    mag = 10 ** int(f"{ms:e}".split("e")[1])
    return int(min((m * mag for m in (1, 2, 5, 10)), key=lambda c: abs(math.log(c / ms))))


def recommend(
    copy: list[CopyMeasurement], expected_rate: float | None = None
) -> tuple[int, int, list[str]]:
    """(batch_rows, flush_interval_ms, reasons) from COPY measurements."""
    best = max(m.rows_per_s for m in copy)
    chosen = min((m for m in copy if m.rows_per_s >= 0.9 * best), key=lambda m: m.batch_rows)
    reasons = [
        f"{chosen.batch_rows}-row batches reach {chosen.rows_per_s:,.0f} rows/s, within 10% of "
        f"the best measured ({best:,.0f} rows/s); larger batches add latency and memory only"
    ]
    flush = min(1000, max(10, _nice(2 * chosen.median_ms)))
    why = (
        f"about two COPY durations of a {chosen.batch_rows}-row batch "
        f"({chosen.median_ms:.1f} ms): flushing more often than a COPY takes only makes smaller "
        "batches that wait behind it"
    )
    if expected_rate:
        fill_ms = chosen.batch_rows / expected_rate * 1000
        if fill_ms < flush:
            why += f"; at {expected_rate:,.0f} rows/s a batch fills by size in {fill_ms:.0f} ms"
        if expected_rate > 0.8 * chosen.rows_per_s:
            reasons.append(
                f"expected {expected_rate:,.0f} rows/s is above 80% of what one COPY stream does; "
                "raise ingest.max_concurrent_copies or the database's capacity"
            )
    reasons.append(why)
    return chosen.batch_rows, flush, reasons


# -- applying to a TOML file ----------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_ARRAY_HEADER = re.compile(r"^\s*\[\[")


def apply_to_toml(path: str | Path, values: dict[str, int | float | str]) -> str:
    """Set ``[ingest]`` keys in the TOML file at ``path`` (created if missing).

    Only the lines of those keys change (or are added at the end of the
    ``[ingest]`` table, which is appended if absent); every other byte of the
    file is kept. The result is parsed back and must equal the original with
    just these keys changed, else nothing is written (ValueError).
    Returns the new text.
    """
    p = Path(path)
    # Bytes, not read_text(): universal newlines would turn CRLF files into LF ones.
    text = p.read_bytes().decode("utf-8") if p.exists() else ""
    before = tomllib.loads(text) if text else {}
    ing = before.get("ingest")
    if ing is not None and not isinstance(ing, dict):
        raise ValueError(f"{p}: 'ingest' is not a table")
    new = _edit(text, values)
    unsafe = ValueError(
        f"{p}: cannot update [ingest] safely (inline table or unusual layout); "
        "edit it by hand: " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in values.items())
    )
    try:
        after = tomllib.loads(new)
    except tomllib.TOMLDecodeError:
        raise unsafe from None
    expected = json.loads(json.dumps(before, default=str))
    expected.setdefault("ingest", {}).update(values)
    if json.loads(json.dumps(after, default=str)) != expected:
        raise unsafe
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(new.encode("utf-8"))
    os.replace(tmp, p)
    return new


def _toml_value(v: int | float | str) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def _edit(text: str, values: dict[str, int | float | str]) -> str:
    lines = text.splitlines(keepends=True)
    nl = "\r\n" if "\r\n" in text else "\n"
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += nl
    todo = dict(values)
    # Where the [ingest] table is: its header line and the end of its body.
    start = end = None
    dotted_last = None  # last top-level "ingest.<key> = ..." line
    section: str | None = None
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m and not _ARRAY_HEADER.match(line):
            section = m.group(1).strip()
            if start is not None and end is None:
                end = i
            if section == "ingest":
                start = i
            continue
        if _ARRAY_HEADER.match(line):
            section = None
            if start is not None and end is None:
                end = i
            continue
        # key lines: in [ingest], or top-level dotted "ingest.key = ..."
        if section is None and re.match(r"^\s*ingest\s*\.", line):
            dotted_last = i
        for key in list(todo):
            if section == "ingest":
                pat = rf"^(\s*){re.escape(key)}(\s*=\s*)"
            elif section is None:
                pat = rf"^(\s*)ingest\s*\.\s*{re.escape(key)}(\s*=\s*)"
            else:
                continue
            km = re.match(pat, line)
            if km:
                comment = ""
                cm = re.search(r"\s+#[^\"']*$", line.rstrip("\r\n"))
                if cm:
                    comment = cm.group(0)
                head = line[: km.end()]
                lines[i] = head + _toml_value(todo.pop(key)) + comment + nl
    if start is not None and end is None:
        end = len(lines)
    if todo:
        add = [f"{k} = {_toml_value(v)}{nl}" for k, v in todo.items()]
        if start is not None and end is not None:
            # after the last non-blank line of the table
            pos = end
            while pos > start + 1 and not lines[pos - 1].strip():
                pos -= 1
            lines[pos:pos] = add
        elif dotted_last is not None:
            # The table is defined by dotted keys: a [ingest] header would redefine it.
            lines[dotted_last + 1 : dotted_last + 1] = [f"ingest.{a}" for a in add]
        else:
            if lines and lines[-1].strip():
                lines.append(nl)
            lines.append(f"[ingest]{nl}")
            lines.extend(add)
    return "".join(lines)


# -- the command -----------------------------------------------------------------------


async def _copy_report(
    dsn: str | None, config_path: str | None, seconds: float, sizes: tuple[int, ...]
) -> tuple[list[CopyMeasurement], str]:
    """Measure against ``dsn``, or the embedded database of the configuration."""
    import asyncpg

    if dsn:
        conn = await asyncpg.connect(dsn)
        try:
            return await measure_copy(conn, sizes, seconds), _redact(dsn)
        finally:
            await conn.close()
    try:
        from ingestd.config import load_config
        from ingestd.db import Database
    except ImportError as e:
        raise _Skip(f"embedded database unavailable ({e}); give --dsn") from None
    cfg = load_config(config_path)
    if cfg.database.dsn:
        dsn = cfg.database.dsn
        conn = await asyncpg.connect(dsn)
        try:
            return await measure_copy(conn, sizes, seconds), _redact(dsn)
        finally:
            await conn.close()
    from ingestd.db import embedded_pgdata

    where = f"embedded ({cfg.server.data_dir})"
    scratch: tempfile.TemporaryDirectory[str] | None = None
    if not (embedded_pgdata(cfg.server.data_dir) / "PG_VERSION").exists():
        # No ingestd database here yet: measure on a throw-away cluster rather than
        # leave a new data directory (about 70 MB) wherever tune happened to run.
        scratch = tempfile.TemporaryDirectory(prefix="ingestd-tune-")
        cfg.server.data_dir = scratch.name
        where = "embedded (temporary, removed afterwards)"
    try:
        db = await Database.start(cfg, connect=False)
        try:
            conn = await asyncpg.connect(db.dsn)
            try:
                return await measure_copy(conn, sizes, seconds), where
            finally:
                await conn.close()
        finally:
            await db.close()
    finally:
        if scratch is not None:
            scratch.cleanup()


class _Skip(Exception):
    pass


def _redact(dsn: str) -> str:
    try:
        from ingestd.db import redact_dsn

        return redact_dsn(dsn)
    except ImportError:  # pragma: no cover
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def _current_ingest(config_path: str | None) -> dict[str, Any]:
    cur: dict[str, Any] = {"batch_rows": 5000, "flush_interval_ms": 50.0}
    with contextlib.suppress(Exception):
        from ingestd.config import IngestConfig

        d = IngestConfig()
        cur = {"batch_rows": d.batch_rows, "flush_interval_ms": d.flush_interval_ms}
    if config_path and Path(config_path).exists():
        with contextlib.suppress(Exception):
            data = tomllib.loads(Path(config_path).read_text())
            cur.update({k: v for k, v in data.get("ingest", {}).items() if k in cur})
    return cur


def format_findings(findings: list[Finding]) -> str:
    head = ("check", "current", "recommended", "why")
    rows = [head] + [(f.check, f.current, f.recommended, f.why) for f in findings]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    out = []
    for r in rows:
        out.append(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip())
        if r is head:
            out.append("-" * (sum(w) + 6 + 3))
    return "\n".join(out)


@click.command("tune")
@click.option(
    "--connections",
    default=10_000,
    show_default=True,
    type=click.IntRange(1),
    help="MQTT connections the host should carry.",
)
@click.option("--dsn", help="PostgreSQL to measure COPY against (default: the configuration's).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="ingestd TOML config (current [ingest] values; embedded database location).",
)
@click.option("--no-db", is_flag=True, help="Skip the COPY measurement.")
@click.option(
    "--seconds",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds of COPY per batch size.",
)
@click.option(
    "--rows-per-second",
    type=click.FloatRange(0, min_open=True),
    help="Expected ingest rate, to check against the measured COPY rate.",
)
@click.option(
    "--apply",
    "apply_path",
    type=click.Path(dir_okay=False),
    help="Write the recommended [ingest] keys into this TOML file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--proc-dir", default="/proc", hidden=True, help="Root of /proc (tests).")
@click.option("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), hidden=True)
def tune(
    connections: int,
    dsn: str | None,
    config_path: str | None,
    no_db: bool,
    seconds: float,
    rows_per_second: float | None,
    apply_path: str | None,
    as_json: bool,
    proc_dir: str,
    batch_sizes: str,
) -> None:
    """Check OS limits for N connections and measure PostgreSQL COPY to size ingest batches."""
    report = TuneReport(findings=system_checks(connections, proc_dir))
    current = _current_ingest(config_path)
    if not no_db:
        sizes = tuple(int(x) for x in batch_sizes.split(",") if x.strip())
        try:
            report.copy, report.database = asyncio.run(
                _copy_report(dsn, config_path, seconds, sizes)
            )
        except _Skip as e:
            report.findings.append(Finding("COPY rate", "skipped", "-", str(e)))
        except Exception as e:
            report.findings.append(
                Finding("COPY rate", "failed", "-", f"{type(e).__name__}: {e}", ok=False)
            )
    if report.copy:
        report.findings.append(
            Finding(
                "COPY target",
                report.database,
                "",
                "scratch table shaped like telemetry rows (index on machine, ts), one "
                "binary COPY (a transaction) per batch as ingest writes them, dropped afterwards",
            )
        )
        for m in report.copy:
            report.findings.append(
                Finding(
                    f"COPY {m.batch_rows} rows",
                    f"{m.rows_per_s:,.0f} rows/s",
                    "",
                    f"median {m.median_ms:.1f} ms, max {m.max_ms:.1f} ms per batch "
                    f"({m.batches} batches)",
                )
            )
        batch, flush, reasons = recommend(report.copy, rows_per_second)
        report.batch_rows, report.flush_interval_ms = batch, flush
        report.findings.append(
            Finding(
                "ingest.batch_rows",
                str(current["batch_rows"]),
                str(batch),
                reasons[0],
                ok=current["batch_rows"] == batch,
            )
        )
        for extra in reasons[1:-1]:
            report.findings.append(
                Finding("ingest rate", f"{rows_per_second:,.0f} rows/s", "-", extra, ok=False)
            )
        report.findings.append(
            Finding(
                "ingest.flush_interval_ms",
                f"{current['flush_interval_ms']:g}",
                str(flush),
                reasons[-1],
                ok=float(current["flush_interval_ms"]) == flush,
            )
        )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_findings(report.findings))
    if apply_path:
        if report.batch_rows is None or report.flush_interval_ms is None:
            raise click.ClickException("nothing to apply: the COPY measurement did not run")
        try:
            apply_to_toml(
                apply_path,
                # flush_interval_ms is a float in IngestConfig
                {
                    "batch_rows": report.batch_rows,
                    "flush_interval_ms": float(report.flush_interval_ms),
                },
            )
        except (ValueError, OSError, tomllib.TOMLDecodeError) as e:
            raise click.ClickException(str(e)) from None
        if not as_json:
            click.echo(
                f"wrote ingest.batch_rows = {report.batch_rows}, ingest.flush_interval_ms = "
                f"{report.flush_interval_ms} to {apply_path}"
            )
