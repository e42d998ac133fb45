"""The load generator's parent process: starts workers, runs the phases, sums the results.

Accounting is exact: each subscriber marks every (publisher, sequence) it
receives, publishers report how many they sent, and every subscriber
matches every publisher's topic, so for each subscriber

    expected = sum of sent,   lost = expected - unique,   duplicates = received - unique.

Times are ``time.monotonic_ns()`` (one clock for all processes on the host):
the run starts when the parent sends "go"; the delivery rate is the number of
distinct messages delivered divided by the time from "go" to the last
message received by any subscriber.

The ingest scenario counts the run's rows in PostgreSQL instead (``--dsn``):
its rate is the number of distinct rows stored divided by the time from "go"
to the row-count query that first saw them all. Unless disabled it then
measures same-run references into the same table (see
:mod:`ingestd.bench.database`): a plain asyncpg ``copy_records_to_table``
loop, and the run's own rows pre-encoded by PostgreSQL as binary COPY streams
sent over one connection and over ``reference_connections`` connections.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

from ingestd.bench import procstat
from ingestd.bench.accounting import merge_samples, percentiles
from ingestd.bench.database import (
    BinaryReference,
    ReferenceSkipped,
    RowCount,
    count_rows,
    measure_binary_reference,
    measure_reference,
)
from ingestd.bench.results import Result, format_table, table_rows
from ingestd.bench.worker import Plan, worker_main

__all__ = [
    "SCENARIOS",
    "BenchFailed",
    "Result",
    "compare",
    "default_processes",
    "format_table",
    "median",
    "run",
    "stderr_progress",
    "table_rows",
]

SCENARIOS = ("fan-in", "fan-out", "publish-only", "ingest", "connections", "latency")


class BenchFailed(Exception):
    """A worker failed or a phase did not complete."""


class _Database:
    """One asyncpg connection, driven from the (synchronous) runner on its own event loop."""

    def __init__(self, dsn: str) -> None:
        import asyncpg

        self.loop = asyncio.new_event_loop()
        try:
            self.conn = self.loop.run_until_complete(asyncpg.connect(dsn))
        except Exception as e:
            self.loop.close()
            raise BenchFailed(f"cannot connect to PostgreSQL: {type(e).__name__}: {e}") from None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def count_rows(self, table: str, run_id: str, expected: int, idle_timeout: float) -> RowCount:
        import asyncpg

        try:
            counted: RowCount = self.run(
                count_rows(self.conn, table, run_id, expected, idle_timeout)
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            raise BenchFailed(f"counting the rows in {table}: {type(e).__name__}: {e}") from None
        return counted

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.conn.close(timeout=5))
        except Exception:
            self.conn.terminate()
        finally:
            self.loop.close()


@dataclass
class _Proc:
    proc: Any
    conn: Connection
    index: int
    last: tuple[str, Any] | None = None


def run(
    plan: Plan,
    *,
    pid: int | None = None,
    dsn: str | None = None,
    table: str = "bench_telemetry",
    progress: TextIO | None = None,
    phase_timeout: float | None = None,
    reference: bool | None = None,
    reference_batch: int = 5000,
    reference_connections: int = 2,
    pg_pid: int | None = None,
    metrics_url: str | None = None,
) -> Result:
    """Run one scenario once; raises :class:`BenchFailed` when a worker fails.

    ``reference`` (ingest scenario with a ``dsn`` only; default: on there)
    measures the references after the rows are verified: the plain-COPY loop,
    then the pre-encoded binary COPYs over one connection and over
    ``reference_connections`` (if more than one). ``pg_pid`` (the postmaster
    of a local PostgreSQL) adds its CPU seconds to the accounting.
    ``metrics_url``: the broker's Prometheus page (ingestd's /metrics); its
    worst event-loop stall over the run becomes ``loop_lag_max_ms``.
    """
    if reference_connections < 1:
        raise ValueError("reference_connections must be at least 1")
    if not plan.run_id:
        plan.run_id = uuid.uuid4().hex[:8]
    if plan.messages is None and plan.duration is None:
        raise ValueError("give a message count or a duration")
    ctx = multiprocessing.get_context("spawn")
    shared = ctx.Array("q", plan.processes * 3, lock=False)
    procs: list[_Proc] = []
    res = Result(
        scenario=plan.scenario,
        target=f"{plan.host}:{plan.port}",
        mqtt_version=plan.version,
        qos=plan.qos,
        publishers=plan.publishers,
        subscribers=plan.subscribers,
        processes=plan.processes,
        payload_size=plan.payload_size,
        broker_pid=pid,
    )
    # Generous bounds on each phase so that a stuck broker cannot hang the run.
    limit = phase_timeout or (
        plan.connect_timeout + 60 + (plan.duration or 0) + (plan.messages or 0) / 1000
    )
    rss0 = procstat.tree_rss_bytes(pid) if pid and plan.scenario == "connections" else None
    verify = plan.scenario == "ingest" and dsn is not None
    if reference is None:
        reference = verify
    elif reference and not verify:
        raise ValueError("the reference needs the ingest scenario and a DSN")
    # Connected before the run, so that counting can start as soon as the
    # publishers are done.
    db = _Database(dsn) if verify and dsn is not None else None
    counted: RowCount | None = None
    try:
        for w in range(plan.processes):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker_main,
                args=(plan, w, child, shared),
                name=f"bench-worker-{w}",
                daemon=True,
            )
            p.start()
            child.close()
            procs.append(_Proc(p, parent, w))
        _collect(procs, "ready", limit)
        if metrics_url:
            _loop_lag_ms(metrics_url)  # the stall window starts now
        cpu0 = procstat.cpu_seconds(pid) if pid else None
        wait0 = procstat.runqueue_wait_seconds(pid) if pid else None
        res.load_average = os.getloadavg()[0]
        pg0 = procstat.tree_cpu_seconds(pg_pid) if pg_pid and verify else None
        t0 = time.monotonic_ns()
        deadline = t0 + int(plan.duration * 1e9) if plan.duration else None
        for pr in procs:
            pr.conn.send(("go", {"deadline_ns": deadline}))
        status = _Status(progress, shared, t0, plan) if progress else None
        published = _collect(procs, "published", limit, status)
        t_pub_done = max(info["t_done_ns"] for info in published)
        res.publish_duration_s = (t_pub_done - t0) / 1e9
        if plan.scenario == "connections":
            res.connected = sum(i["connected"] for i in published)
            res.connect_failed = sum(i["failed"] for i in published)
            for i in published:
                res.errors.extend(i["errors"])
            res.connect_rate = res.connected / max(res.publish_duration_s, 1e-9)
            if pid and rss0 is not None and res.connected:
                # Let the broker finish its bookkeeping for the last CONNACKs.
                time.sleep(0.2)
                res.rss_per_connection_bytes = (procstat.tree_rss_bytes(pid) - rss0) / res.connected
            if plan.hold:
                time.sleep(plan.hold)
            res.msgs_per_s = res.connect_rate
            res.rate_of = "connections/s"
            res.duration_s = res.publish_duration_s
            expected_per_sub = 0
        else:
            sent_by_pub: dict[int, int] = {}
            for info in published:
                sent_by_pub.update(info["sent"])
            res.sent = sum(sent_by_pub.values())
            expected_per_sub = res.sent
            if pg_pid and pg0 is not None:
                # Before counting: a count(*) over a big table costs more than the run.
                res.postgres_cpu_s = procstat.tree_cpu_seconds(pg_pid) - pg0
            if db is not None:
                # While the workers wait (idle): their teardown is not in the rows/s.
                counted = db.count_rows(table, plan.run_id, res.sent, plan.drain_timeout)
        for pr in procs:
            pr.conn.send(("drain", {"expected": expected_per_sub}))
        results = _collect(procs, "result", limit + plan.drain_timeout, status)
        if status:
            status.done()
        cpu1 = procstat.cpu_seconds(pid) if pid else None
        wait1 = procstat.runqueue_wait_seconds(pid) if pid else None
        if wait0 is not None and wait1 is not None:
            res.broker_runqueue_wait_s = wait1 - wait0
        if metrics_url:
            res.loop_lag_max_ms = _loop_lag_ms(metrics_url)
        for pr in procs:
            pr.proc.join(10)
        _summarize(res, plan, results, t0, t_pub_done, expected_per_sub)
        if cpu0 is not None and cpu1 is not None:
            res.broker_cpu_s = cpu1 - cpu0
            if res.broker_cpu_s > 0 and plan.scenario != "connections":
                res.msgs_per_broker_cpu_s = (
                    res.delivered or res.acked or res.sent
                ) / res.broker_cpu_s
        if plan.scenario == "ingest":
            if counted is None:
                res.errors.append("no --dsn: rows not verified")
            else:
                _apply_row_count(res, counted, t0)
        if reference and db is not None:
            # After the workers have exited, so that they take no CPU from it.
            _reference(res, plan, db, table, reference_batch)
            _binary_reference(
                res, plan, db, dsn, table, reference_batch, reference_connections, pg_pid
            )
        return res
    finally:
        for pr in procs:
            if pr.proc.is_alive():
                pr.proc.terminate()
                pr.proc.join(5)
            pr.conn.close()
        if db is not None:
            db.close()


def _collect(
    procs: list[_Proc], kind: str, timeout: float, status: _Status | None = None
) -> list[Any]:
    """Wait for message ``kind`` from every worker; raise on an error message or timeout."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    by_conn = {id(pr.conn): pr for pr in procs}
    while len(got) < len(procs):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchFailed(f"timed out after {timeout:g} s waiting for workers to be {kind!r}")
        pending = [pr.conn for pr in procs if pr.index not in got]
        ready = wait(pending, timeout=min(left, 0.25))
        if status:
            status.tick()
        for c in ready:
            assert isinstance(c, Connection)
            pr = by_conn[id(c)]
            try:
                msg_kind, info = c.recv()
            except EOFError:
                raise BenchFailed(
                    f"worker {pr.index} exited (code {pr.proc.exitcode}) before {kind!r}"
                ) from None
            if msg_kind == "error":
                raise BenchFailed(str(info))
            if msg_kind != kind:
                raise BenchFailed(f"worker {pr.index}: expected {kind!r}, got {msg_kind!r}")
            got[pr.index] = info
    return [got[i] for i in sorted(got)]


def _summarize(
    res: Result,
    plan: Plan,
    results: list[dict[str, Any]],
    t0: int,
    t_pub_done: int,
    expected_per_sub: int,
) -> None:
    last_rx = 0
    subs = [s for r in results for s in r["subscribers"]]
    for s in subs:
        res.delivered += s["unique"]
        res.received += s["received"]
        res.duplicates += s["duplicates"]
        last_rx = max(last_rx, s["last_rx_ns"])
    res.expected = expected_per_sub * len(subs)
    res.lost = res.expected - res.delivered
    res.acked = sum(sum(r["acked"].values()) for r in results)
    for r in results:
        res.errors.extend(r["errors"])
        if r.get("rejected"):
            res.errors.append(f"{r['rejected']} publishes rejected")
    res.loadgen_cpu_s = sum(r["cpu_s"] for r in results)
    res.window_wait_s = sum(r.get("window_wait_s", 0.0) for r in results)
    waits = [r.get("runqueue_wait_s") for r in results]
    if waits and all(w is not None for w in waits):
        res.loadgen_runqueue_wait_s = sum(w for w in waits if w is not None)
    res.loadgen_peak_util = max(r.get("peak_util", 0.0) for r in results)
    if plan.scenario == "connections":
        return
    res.publish_rate = res.sent / max(res.publish_duration_s, 1e-9)
    if subs:
        res.duration_s = (max(last_rx, t0) - t0) / 1e9
        res.msgs_per_s = res.delivered / max(res.duration_s, 1e-9)
        res.rate_of = "delivered msgs/s"
        lat = merge_samples(p for r in results for p in r["latency"])
        mx = max(r["latency_max_us"] for r in results)
        res.latency_kind = "end-to-end"
    else:
        res.duration_s = res.publish_duration_s
        confirmed = res.acked if plan.qos else res.sent
        res.msgs_per_s = confirmed / max(res.duration_s, 1e-9)
        res.rate_of = "acked msgs/s" if plan.qos else "sent msgs/s"
        lat = merge_samples(p for r in results for p in r["ack_latency"])
        mx = max(r["ack_latency_max_us"] for r in results)
        res.latency_kind = "publish->ack" if plan.qos else ""
    pct = percentiles(lat, (50, 90, 99, 99.9))
    if pct["max"] is not None:
        pct["max"] = float(mx)
    res.latency_ms = {k: (v / 1000 if v is not None else None) for k, v in pct.items()}


def _apply_row_count(res: Result, counted: RowCount, t0: int) -> None:
    """The ingest scenario's accounting: rows of the run stored in PostgreSQL."""
    res.rows, res.unique_rows = counted.rows, counted.unique
    res.delivered = res.unique_rows
    res.expected = res.sent
    res.lost = res.sent - res.unique_rows
    res.duplicates = res.rows - res.unique_rows
    res.duration_s = (counted.t_seen_ns - t0) / 1e9
    res.msgs_per_s = res.unique_rows / max(res.duration_s, 1e-9)
    res.rate_of = "rows/s"


def _measured(res: Result, db: _Database, what: str, coro: Any) -> Any:
    """Run one reference measurement; a skip or a database error becomes a note
    (and None)."""
    import asyncpg

    try:
        return db.run(coro)
    except ReferenceSkipped as e:
        res.notes.append(f"{what} skipped: {e}")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
        res.notes.append(f"{what} failed: {type(e).__name__}: {e}")
    return None


def _reference(res: Result, plan: Plan, db: _Database, table: str, batch: int) -> None:
    """Measure the plain-COPY reference (as many rows as the run stored) into ``res``."""
    rate = _measured(
        res,
        db,
        "reference",
        measure_reference(
            db.conn, table, res.rows or 0, f"{plan.run_id}-ref", plan.publishers, batch
        ),
    )
    if rate is None:
        return
    res.reference_rows_per_s = rate
    res.reference_batch = batch
    res.vs_reference = res.msgs_per_s / rate if rate > 0 else None


def _binary_reference(
    res: Result,
    plan: Plan,
    db: _Database,
    dsn: str | None,
    table: str,
    batch: int,
    connections: int,
    pg_pid: int | None = None,
) -> None:
    """Measure the pre-encoded binary COPY references (one connection, then several)."""
    import asyncpg

    def cpu() -> float:
        assert pg_pid is not None
        return procstat.tree_cpu_seconds(pg_pid) + time.process_time()

    async def measure(n: int) -> BinaryReference:
        extra: list[Any] = []
        try:
            for _ in range(n - 1):
                assert dsn is not None
                extra.append(await asyncpg.connect(dsn))
            return await measure_binary_reference(
                [db.conn, *extra],
                table,
                plan.run_id,
                f"{plan.run_id}-bin{n}",
                batch,
                cpu if pg_pid and n == 1 else None,
            )
        finally:
            for c in extra:
                await c.close(timeout=5)

    if not res.rows:
        return  # the records reference has said so already
    for n in sorted({1, connections}):
        got: BinaryReference | None = _measured(res, db, "binary reference", measure(n))
        if got is None:
            return
        if got.rows != res.rows:
            res.notes.append(
                f"binary reference over {n} connection(s) stored {got.rows:,} of {res.rows:,} rows"
            )
            return
        vs = res.msgs_per_s / got.rows_per_s if got.rows_per_s > 0 else None
        res.reference_batch = batch
        if n == 1:
            res.binary_reference_rows_per_s, res.vs_binary_reference = got.rows_per_s, vs
            res.binary_reference_cpu_s = got.cpu_s
            spent = [res.broker_cpu_s, res.postgres_cpu_s]
            if got.cpu_s is not None and all(x is not None for x in spent):
                total = sum(x for x in spent if x is not None) + res.loadgen_cpu_s
                res.cpu_vs_binary_reference = got.cpu_s / total if total > 0 else None
        else:
            res.binary_reference_connections = n
            res.binary_reference_parallel_rows_per_s = got.rows_per_s
            res.vs_binary_reference_parallel = vs


class _Status:
    """The one-line progress display on stderr."""

    def __init__(self, out: TextIO, shared: Any, t0: int, plan: Plan) -> None:
        self.out = out
        self.shared = shared
        self.t0 = t0
        self.plan = plan
        self._last = 0.0
        self._prev = (time.monotonic(), 0)

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last < 0.5:
            return
        self._last = now
        a = list(self.shared)
        sent, acked, recv = sum(a[0::3]), sum(a[1::3]), sum(a[2::3])
        t_prev, n_prev = self._prev
        moving = recv if self.plan.subscribers else sent
        rate = (moving - n_prev) / max(now - t_prev, 1e-9)
        self._prev = (now, moving)
        elapsed = (time.monotonic_ns() - self.t0) / 1e9
        line = f"\r{elapsed:7.1f}s  sent {sent:>11,}  acked {acked:>11,}  received {recv:>11,}  {rate:>11,.0f}/s"
        self.out.write(line)
        self.out.flush()

    def done(self) -> None:
        self._last = 0
        self.tick()
        self.out.write("\n")
        self.out.flush()


def _loop_lag_ms(url: str) -> float:
    try:
        return procstat.scrape_metric(url, procstat.LOOP_LAG_MAX) * 1000
    except (OSError, ValueError) as e:
        raise BenchFailed(f"reading the event-loop lag from {url}: {e}") from None


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return 0.0
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def compare(
    make_plan: Callable[[str, int], Plan],
    a: tuple[str, int, int | None],
    b: tuple[str, int, int | None],
    rounds: int,
    *,
    progress: TextIO | None = None,
    echo: Callable[[str], None] | None = None,
    metrics: tuple[str | None, str | None] = (None, None),
    **kw: Any,
) -> dict[str, Any]:
    """Run the same scenario against two brokers alternately; ratios of the headline rate.

    ``metrics``: each broker's Prometheus page, or None (see :func:`run`)."""
    ra: list[Result] = []
    rb: list[Result] = []
    for i in range(rounds):
        for (host, port, pid), acc, url in ((a, ra, metrics[0]), (b, rb, metrics[1])):
            res = run(make_plan(host, port), pid=pid, progress=progress, metrics_url=url, **kw)
            acc.append(res)
            if echo:
                echo(
                    f"round {i + 1}/{rounds}: {res.target}: {res.msgs_per_s:,.0f} {res.rate_of}"
                    f", lost {res.lost:,}, duplicates {res.duplicates:,}"
                )
    ratios = [
        x.msgs_per_s / y.msgs_per_s if y.msgs_per_s else float("inf")
        for x, y in zip(ra, rb, strict=True)
    ]
    ma = median([r.msgs_per_s for r in ra])
    mb = median([r.msgs_per_s for r in rb])
    out = {
        "a": [r.to_dict() for r in ra],
        "b": [r.to_dict() for r in rb],
        "ratios": ratios,
        "median_a": ma,
        "median_b": mb,
        "ratio_of_medians": ma / mb if mb else None,
        "rate_of": ra[0].rate_of if ra else "",
    }
    cpu_a = [r.msgs_per_broker_cpu_s for r in ra if r.msgs_per_broker_cpu_s]
    cpu_b = [r.msgs_per_broker_cpu_s for r in rb if r.msgs_per_broker_cpu_s]
    if cpu_a and cpu_b:
        out["cpu_efficiency_ratio"] = median(cpu_a) / median(cpu_b)
    return out


def stderr_progress(force: bool) -> TextIO | None:
    return sys.stderr if force or sys.stderr.isatty() else None


def default_processes() -> int:
    return 1 if (os.cpu_count() or 1) <= 2 else min(4, (os.cpu_count() or 2) // 2)
