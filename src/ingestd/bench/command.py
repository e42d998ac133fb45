"""``ingestd bench``: an MQTT load generator for ingestd or any other broker."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ingestd.bench.runner import (
    SCENARIOS,
    BenchFailed,
    compare,
    default_processes,
    format_table,
    run,
    stderr_progress,
)
from ingestd.bench.worker import Plan

# scenario -> (publishers, subscribers, qos)
_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "fan-in": (10, 1, 0),
    "fan-out": (1, 10, 0),
    "publish-only": (10, 0, 0),
    "ingest": (10, 0, 1),
    "connections": (0, 0, 0),
    "latency": (1, 1, 0),
}


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise click.BadParameter(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    p = int(port)
    if not 0 < p < 65536:
        raise click.BadParameter(f"port out of range in {text!r}")
    return host, p


@click.command("bench")
@click.option("--host", default="127.0.0.1", show_default=True, help="Broker host.")
@click.option("--port", default=1883, show_default=True, type=int, help="Broker MQTT port.")
@click.option(
    "--scenario",
    type=click.Choice(SCENARIOS),
    default="fan-in",
    show_default=True,
    help="fan-in: N publishers -> 1 subscriber on company/+/machine/+/telemetry; fan-out: 1 -> N; "
    "publish-only; ingest: JSON telemetry, rows verified in PostgreSQL (--dsn); connections: N idle "
    "connections; latency: fixed rate, percentiles.",
)
@click.option(
    "--publishers", type=click.IntRange(0), help="Publishing clients (default by scenario)."
)
@click.option(
    "--subscribers", type=click.IntRange(0), help="Subscribing clients (default by scenario)."
)
@click.option("--messages", type=click.IntRange(1), help="Messages per publisher.")
@click.option(
    "--duration",
    type=click.FloatRange(0, min_open=True),
    help="Seconds of publishing (instead of --messages).",
)
@click.option(
    "--payload-size",
    default=100,
    show_default=True,
    type=click.IntRange(16),
    help="Payload bytes (the first 16 carry publisher, sequence and send time).",
)
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    help="Messages/s over all publishers (default: as fast as the broker takes them).",
)
@click.option("--qos", type=click.IntRange(0, 2), help="QoS of publishes and subscriptions.")
@click.option(
    "--mqtt-version",
    type=click.Choice(["4", "5"]),
    default="4",
    show_default=True,
    help="4 = MQTT 3.1.1, 5 = MQTT 5.0.",
)
@click.option(
    "--inflight",
    default=64,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Unacknowledged QoS 1/2 publishes per publisher (capped by the server's Receive Maximum).",
)
@click.option("--processes", type=click.IntRange(1), help="Worker processes (one event loop each).")
@click.option(
    "--connections",
    default=1000,
    show_default=True,
    type=click.IntRange(1),
    help="Connections to open (connections scenario).",
)
@click.option(
    "--source-addresses",
    default=1,
    show_default=True,
    type=click.IntRange(1, 254),
    help="Connections scenario against a loopback broker: connect from 127.0.0.1 .. 127.0.0.N"
    " in turn (one address has about 28,000 ephemeral ports; 100k connections need 4).",
)
@click.option(
    "--hold",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds to keep the connections open (connections scenario).",
)
@click.option(
    "--keepalive",
    default=60,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="MQTT keepalive seconds (the clients ping at half of it).",
)
@click.option(
    "--pid",
    type=int,
    help="Broker PID, for its CPU seconds (and RSS: with its workers) from /proc.",
)
@click.option(
    "--compare",
    "compare_with",
    metavar="HOST:PORT",
    help="Also run against this broker, alternately, and print the ratio.",
)
@click.option("--compare-pid", type=int, help="PID of the --compare broker.")
@click.option(
    "--metrics",
    "metrics_url",
    metavar="URL",
    help="The broker's Prometheus page (ingestd: http://HOST:PORT/metrics): its worst "
    "event-loop stall over the run (ingestd_event_loop_lag_max_seconds, read at the start "
    "and the end) is reported beside the latency.",
)
@click.option("--compare-metrics", metavar="URL", help="--metrics of the --compare broker.")
@click.option(
    "--rounds",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Rounds per broker with --compare.",
)
@click.option("--dsn", help="PostgreSQL DSN to verify rows (ingest scenario).")
@click.option(
    "--table",
    default="bench_telemetry",
    show_default=True,
    help="Table the ingest route writes (columns run, pub, seq).",
)
@click.option(
    "--reference/--no-reference",
    default=None,
    help="After the ingest run, measure into the same table a plain asyncpg "
    "copy_records_to_table loop (one connection, --reference-batch rows per transaction, as many "
    "rows as the run stored), then the run's own rows pre-encoded by PostgreSQL as binary COPY "
    "(--reference-batch rows per lone COPY) over one connection and over "
    "--reference-connections, and print the run's rows/s as a multiple of each "
    "(default: on with --dsn).",
)
@click.option(
    "--reference-batch",
    default=5000,
    show_default=True,
    type=click.IntRange(1),
    help="Rows per COPY of the references.",
)
@click.option(
    "--reference-connections",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Connections the parallel binary reference spreads its COPYs over (ingestd's "
    "ingest.max_concurrent_copies, 2 by default, is a fair match).",
)
@click.option(
    "--pg-pid",
    type=int,
    help="PID of a local PostgreSQL's postmaster (ingest scenario): its CPU seconds (all its "
    "backends) during the run and the binary reference, and the run's total CPU (broker + "
    "PostgreSQL + load generator) against the reference's.",
)
@click.option(
    "--drain-timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds without a new message after which subscribers stop waiting.",
)
@click.option(
    "--batch",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="PUBLISH packets per write.",
)
@click.option(
    "--persistent-sessions",
    is_flag=True,
    help="Subscribers keep a persistent session (clean session 0 / session expiry 1 h),"
    " removed again after the run.",
)
@click.option(
    "--stall-subscriber",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="Each subscriber stops reading its socket for SECONDS once it has half of the"
    " messages, then resumes (a consumer that falls behind mid-run; needs --messages)."
    " The drain timeout counts from the end of the stall.",
)
@click.option(
    "--usernames",
    is_flag=True,
    help="Log in with user names: publisher i as c{i} (the tenant of its topic"
    " company/c{i}/...), subscribers as 'reader' (to measure an mqtt.acl_file with per-user"
    " rules; no password is sent).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Status line on stderr (default: when stderr is a terminal).",
)
def bench(
    host: str,
    port: int,
    scenario: str,
    publishers: int | None,
    subscribers: int | None,
    messages: int | None,
    duration: float | None,
    payload_size: int,
    rate: float | None,
    qos: int | None,
    mqtt_version: str,
    inflight: int,
    processes: int | None,
    connections: int,
    hold: float,
    source_addresses: int,
    keepalive: int,
    pid: int | None,
    compare_with: str | None,
    compare_pid: int | None,
    metrics_url: str | None,
    compare_metrics: str | None,
    rounds: int,
    dsn: str | None,
    table: str,
    reference: bool | None,
    reference_batch: int,
    reference_connections: int,
    pg_pid: int | None,
    drain_timeout: float,
    persistent_sessions: bool,
    stall_subscriber: float,
    batch: int,
    usernames: bool,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Generate MQTT load and account for every message (loss, duplicates, latency).

    Each payload carries its publisher's index and sequence number, so lost
    and duplicated messages are exact counts. Targets any MQTT broker.
    """
    d_pub, d_sub, d_qos = _DEFAULTS[scenario]
    if messages is not None and duration is not None:
        raise click.UsageError("give --messages or --duration, not both")
    if messages is None and duration is None:
        if scenario == "latency":
            duration = 10.0
        elif scenario == "connections":
            messages = 1
        else:
            messages = 10_000
    if scenario == "latency" and rate is None:
        rate = 1000.0
    n_pub = d_pub if publishers is None else publishers
    n_sub = d_sub if subscribers is None else subscribers
    if scenario != "connections" and n_pub < 1:
        raise click.UsageError("at least one publisher is needed")
    if scenario == "ingest" and n_sub:
        raise click.UsageError("the ingest scenario has no subscribers")
    if stall_subscriber and (messages is None or not n_sub):
        raise click.UsageError("--stall-subscriber needs --messages and subscribers")
    if reference and (scenario != "ingest" or not dsn):
        raise click.UsageError("--reference needs --scenario ingest and --dsn")
    procs = processes or default_processes()
    if scenario == "connections":
        procs = min(procs, connections)
    else:
        procs = max(1, min(procs, n_pub + n_sub))

    def make_plan(h: str, p: int) -> Plan:
        return Plan(
            scenario=scenario,
            host=h,
            port=p,
            version=int(mqtt_version),
            qos=d_qos if qos is None else qos,
            payload_size=payload_size,
            publishers=n_pub if scenario != "connections" else 0,
            subscribers=n_sub if scenario != "connections" else 0,
            messages=messages if scenario != "connections" else 1,
            duration=duration if scenario != "connections" else None,
            rate=rate,
            inflight=inflight,
            processes=procs,
            keepalive=keepalive,
            connections=connections if scenario == "connections" else 0,
            hold=hold,
            source_addresses=source_addresses,
            drain_timeout=drain_timeout,
            batch=batch,
            persistent_subscribers=persistent_sessions,
            stall_subscriber=stall_subscriber,
            usernames=usernames,
        )

    show = stderr_progress(bool(progress)) if progress is not False else None
    try:
        # Row verification and the same-run COPY reference (ingest scenario).
        rows_kw: dict[str, Any] = {
            "dsn": dsn,
            "table": table,
            "reference": reference,
            "reference_batch": reference_batch,
            "reference_connections": reference_connections,
            "pg_pid": pg_pid,
        }
        if compare_with:
            other = parse_target(compare_with)
            echo = (lambda s: click.echo(s, err=True)) if not as_json else None
            out = compare(
                make_plan,
                (host, port, pid),
                (other[0], other[1], compare_pid),
                rounds,
                progress=show,
                echo=echo,
                metrics=(metrics_url, compare_metrics),
                **rows_kw,
            )
            if as_json:
                click.echo(json.dumps(out, indent=2))
            else:
                from ingestd.bench.runner import Result

                ra = [Result(**r) for r in out["a"]]
                rb = [Result(**r) for r in out["b"]]
                best = [_median_result(ra), _median_result(rb)]
                click.echo(format_table(best))
                click.echo(
                    f"{out['rate_of']}: median {out['median_a']:,.0f} vs {out['median_b']:,.0f}"
                    f" over {rounds} round(s); ratio {host}:{port} / {compare_with} ="
                    f" {_x(out['ratio_of_medians'])} (per round: "
                    + ", ".join(_x(r) for r in out["ratios"])
                    + ")"
                )
                if "cpu_efficiency_ratio" in out:
                    click.echo(
                        f"msgs per broker CPU second, ratio: {_x(out['cpu_efficiency_ratio'])}"
                    )
        else:
            res = run(
                make_plan(host, port), pid=pid, progress=show, metrics_url=metrics_url, **rows_kw
            )
            if as_json:
                click.echo(json.dumps(res.to_dict(), indent=2))
            else:
                click.echo(format_table([res]))
    except BenchFailed as e:
        raise click.ClickException(f"benchmark failed: {e}") from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _median_result(rs: list[Any]) -> Any:
    """The run whose headline rate is the median of the rounds (lower median)."""
    s = sorted(rs, key=lambda r: r.msgs_per_s)
    return s[(len(s) - 1) // 2]


if __name__ == "__main__":  # python -m ingestd.bench.command
    bench.main(sys.argv[1:], prog_name="ingestd bench")
