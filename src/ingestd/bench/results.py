"""What ``ingestd bench`` reports: one run's :class:`Result`, and the side-by-side table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Result:
    scenario: str
    target: str
    mqtt_version: int
    qos: int
    publishers: int
    subscribers: int
    processes: int
    payload_size: int
    sent: int = 0
    acked: int = 0
    expected: int = 0
    delivered: int = 0  # distinct messages received, summed over subscribers
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    duration_s: float = 0.0  # go -> last message received (or last publish confirmed)
    publish_duration_s: float = 0.0  # go -> last publisher done
    msgs_per_s: float = 0.0  # the headline rate of the scenario (see `rate_of`)
    rate_of: str = ""
    publish_rate: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    latency_kind: str = ""  # "end-to-end" or "publish->ack"
    broker_pid: int | None = None
    broker_cpu_s: float | None = None
    msgs_per_broker_cpu_s: float | None = None
    loadgen_cpu_s: float = 0.0
    # Highest CPU utilisation of any worker over a 0.2 s window (1.0 = one core busy):
    # near 1.0 the load generator itself may be the bottleneck.
    loadgen_peak_util: float = 0.0
    connected: int | None = None
    connect_failed: int | None = None
    connect_rate: float | None = None
    rss_per_connection_bytes: float | None = None
    # The broker's worst event-loop stall over the run, ms (ingestd's
    # ingestd_event_loop_lag_max_seconds, scraped from --metrics at the start and end).
    loop_lag_max_ms: float | None = None
    # Seconds the broker's event loop (its main thread, --pid) was runnable but waiting
    # for a CPU over the run, and the same summed over the load generator's workers
    # (/proc/PID/schedstat): what the other processes on the host cost the run.
    broker_runqueue_wait_s: float | None = None
    loadgen_runqueue_wait_s: float | None = None
    # The host's 1-minute load average when the run started.
    load_average: float | None = None
    # Seconds the publishers waited for a full QoS 1/2 in-flight window, summed over
    # them: a paced run's messages then go out late in a burst (their latency counts
    # from the write, so this is where a slow ack path shows).
    window_wait_s: float = 0.0
    rows: int | None = None
    unique_rows: int | None = None
    # ingest: a plain COPY loop into the same table in the same run, and the
    # scenario's rows/s as a multiple of it
    reference_rows_per_s: float | None = None
    reference_batch: int | None = None
    vs_reference: float | None = None
    # ingest: the run's own rows, pre-encoded as binary COPY by PostgreSQL before the
    # clock starts, reference_batch rows per lone COPY over one connection, and over
    # binary_reference_connections connections at once; the run's rows/s as multiples
    binary_reference_rows_per_s: float | None = None
    vs_binary_reference: float | None = None
    binary_reference_connections: int | None = None
    binary_reference_parallel_rows_per_s: float | None = None
    vs_binary_reference_parallel: float | None = None
    # ingest with pg_pid (a local PostgreSQL): the server's CPU seconds from "go" until
    # the last publisher is done (with after-commit acks every row is committed by
    # then; the counting query is left out); the one-connection binary reference's CPU
    # seconds (PostgreSQL + this process, over its timed COPYs); and that as a
    # multiple of what the run cost in all (broker + PostgreSQL + load generator)
    postgres_cpu_s: float | None = None
    binary_reference_cpu_s: float | None = None
    cpu_vs_binary_reference: float | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table_rows(r: Result) -> list[tuple[str, str]]:
    lat = r.latency_ms
    rows = [
        ("target", r.target),
        ("scenario", f"{r.scenario} (MQTT {'5' if r.mqtt_version == 5 else '3.1.1'}, QoS {r.qos})"),
        ("clients", f"{r.publishers} pub / {r.subscribers} sub, {r.processes} process(es)"),
    ]
    if r.scenario == "connections":
        rows += [
            ("connected", _fmt(r.connected)),
            ("failed", _fmt(r.connect_failed)),
            ("connections/s", _fmt(r.connect_rate)),
            (
                "RSS per connection",
                _fmt(r.rss_per_connection_bytes) + " B"
                if r.rss_per_connection_bytes is not None
                else "-",
            ),
            ("broker CPU s", _fmt(r.broker_cpu_s, 2)),
        ]
        return rows
    rows += [
        ("sent", _fmt(r.sent)),
        ("acked", _fmt(r.acked) if r.qos else "- (QoS 0)"),
        ("delivered", _fmt(r.delivered)),
        ("expected", _fmt(r.expected)),
        ("lost", _fmt(r.lost)),
        ("duplicates", _fmt(r.duplicates)),
        (r.rate_of or "msgs/s", _fmt(r.msgs_per_s)),
        ("publish rate", _fmt(r.publish_rate) + " msgs/s"),
        ("duration", _fmt(r.duration_s, 2) + " s"),
    ]
    if r.rows is not None:
        rows.append(("rows (distinct)", f"{_fmt(r.rows)} ({_fmt(r.unique_rows)})"))
    if r.reference_rows_per_s is not None:
        rows += [
            (
                "reference rows/s",
                _fmt(r.reference_rows_per_s)
                + f" (plain COPY, {_fmt(r.reference_batch)}-row batches)",
            ),
            ("vs reference", "-" if r.vs_reference is None else f"{r.vs_reference:.2f}x"),
        ]
    if r.binary_reference_rows_per_s is not None:
        rows += [
            (
                "binary reference rows/s",
                _fmt(r.binary_reference_rows_per_s)
                + f" (pre-encoded binary COPY, {_fmt(r.reference_batch)}-row COPYs, 1 connection)",
            ),
            ("vs binary reference", _x(r.vs_binary_reference)),
        ]
    if r.binary_reference_parallel_rows_per_s is not None:
        rows += [
            (
                f"binary reference x{r.binary_reference_connections} rows/s",
                _fmt(r.binary_reference_parallel_rows_per_s)
                + f" (the same over {r.binary_reference_connections} connections at once)",
            ),
            (
                f"vs binary reference x{r.binary_reference_connections}",
                _x(r.vs_binary_reference_parallel),
            ),
        ]
    if r.binary_reference_cpu_s is not None:
        rows.append(
            (
                "binary reference CPU s",
                _fmt(r.binary_reference_cpu_s, 2) + " (PostgreSQL + client, 1 connection)",
            )
        )
    if lat:
        kind = f" ({r.latency_kind})" if r.latency_kind else ""
        rows.append(
            (
                "latency ms" + kind,
                " / ".join(_fmt(lat.get(k), 2) for k in ("p50", "p90", "p99", "p99.9", "max"))
                + "  (p50/p90/p99/p99.9/max)",
            )
        )
    if r.loop_lag_max_ms is not None:
        rows.append(("broker loop stall max", _fmt(r.loop_lag_max_ms, 2) + " ms"))
    if r.broker_runqueue_wait_s is not None:
        rows.append(("broker run-queue wait s", _fmt(r.broker_runqueue_wait_s, 2)))
    rows += [
        ("broker CPU s", _fmt(r.broker_cpu_s, 2)),
        ("msgs per broker CPU s", _fmt(r.msgs_per_broker_cpu_s)),
    ]
    if r.postgres_cpu_s is not None:
        rows.append(("PostgreSQL CPU s", _fmt(r.postgres_cpu_s, 2)))
    if r.cpu_vs_binary_reference is not None:
        rows.append(
            (
                "CPU vs binary reference",
                f"{r.cpu_vs_binary_reference:.2f}x (its CPU s / broker + PostgreSQL + loadgen)",
            )
        )
    rows += [
        (
            "loadgen CPU s",
            _fmt(r.loadgen_cpu_s, 2)
            + f" (peak {r.loadgen_peak_util * 100:.0f}% of a core in one process)",
        ),
    ]
    if r.window_wait_s:
        rows.append(("publishers' full-window wait s", _fmt(r.window_wait_s, 2) + " (sum)"))
    if r.loadgen_runqueue_wait_s is not None:
        rows.append(("loadgen run-queue wait s", _fmt(r.loadgen_runqueue_wait_s, 2)))
    if r.load_average is not None:
        rows.append(("host load average", _fmt(r.load_average, 2) + " (1 min, at the start)"))
    return rows


def format_table(results: list[Result], ratio: tuple[str, float] | None = None) -> str:
    """Results side by side, one column per run (rows matched by label)."""
    cols = [dict(table_rows(r)) for r in results]
    labels: list[str] = []
    for c in cols:
        labels += [label for label in c if label not in labels]
    widths = [max(len(label) for label in labels)]
    for c in cols:
        widths.append(max(len(v) for v in c.values()))
    lines = []
    for label in labels:
        cells = [label.ljust(widths[0])]
        for j, c in enumerate(cols):
            cells.append(c.get(label, "").rjust(widths[j + 1]))
        lines.append("  ".join(cells).rstrip())
    for r in results:
        for e in r.errors[:5]:
            lines.append(f"error ({r.target}): {e.strip().splitlines()[-1] if e.strip() else e}")
        for n in r.notes[:5]:
            lines.append(f"note ({r.target}): {n}")
    if ratio is not None:
        lines.append(f"{ratio[0]}: {ratio[1]:.2f}x")
    return "\n".join(lines)
