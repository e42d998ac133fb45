"""`ingestd bench`: exact accounting against a real broker (ours in-process, and Mosquitto)."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ingestd.bench.accounting import (
    HEADER,
    LatencySampler,
    SeqTracker,
    merge_samples,
    percentiles,
)
from ingestd.bench.command import bench, parse_target
from ingestd.bench.runner import Result, format_table, run
from ingestd.bench.worker import TOPIC_FILTER, Plan, publisher_topic

# -- accounting (no network) ----------------------------------------------------------


def test_seq_tracker_counts_exactly() -> None:
    t = SeqTracker(2)
    for pub, seq in [(0, 0), (0, 1), (0, 1), (1, 5000), (0, 3), (1, 5000), (1, 0), (3, 2)]:
        t.mark(pub, seq)
    assert t.received == 8
    assert t.unique == 6
    assert t.duplicates == 2
    assert t.unique_by_publisher() == [3, 2, 0, 1]
    assert t.missing(0, 5) == [2, 4]
    assert t.missing(1, 3) == [1, 2]
    assert t.missing(2, 2) == [0, 1]
    assert t.missing(9, 1) == [0]


def test_latency_sampler_thins_uniformly() -> None:
    s = LatencySampler(cap=8)
    for i in range(100):
        s.add(i)
    assert s.count == 100
    assert s.max_us == 99
    assert len(s.samples) < 8
    # Kept samples are evenly spaced over the whole run.
    kept = list(s.samples)
    steps = {b - a for a, b in itertools.pairwise(kept)}
    assert steps == {s.stride}
    assert kept[0] == 0 and kept[-1] >= 100 - s.stride


def test_percentiles_and_merge() -> None:
    p = percentiles(range(1, 101))
    assert p == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "max": None}
    assert percentiles([7]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "max": 7.0}
    assert sorted(merge_samples([([1, 2], 1), ([10], 4)])) == [1, 2, 10, 10, 10, 10]
    assert merge_samples([]) == []


@pytest.mark.parametrize(
    ("processes", "publishers", "subscribers"),
    [(1, 10, 1), (2, 10, 1), (3, 10, 1), (4, 1, 10), (2, 0, 5), (3, 7, 0), (5, 2, 2)],
)
def test_clients_are_split_over_workers_exactly_once(
    processes: int, publishers: int, subscribers: int
) -> None:
    plan = Plan(
        "fan-in", "h", 1, processes=processes, publishers=publishers, subscribers=subscribers
    )
    pubs = [i for w in range(processes) for i in plan.my_publishers(w)]
    subs = [j for w in range(processes) for j in plan.my_subscribers(w)]
    assert sorted(pubs) == list(range(publishers))
    assert sorted(subs) == list(range(subscribers))
    if processes > 1 and publishers and subscribers:
        # Publishers and subscribers never share a worker when there are several.
        for w in range(processes):
            assert not (plan.my_publishers(w) and plan.my_subscribers(w))


def test_parse_target() -> None:
    assert parse_target("127.0.0.1:1883") == ("127.0.0.1", 1883)
    assert parse_target("[::1]:18830") == ("::1", 18830)
    import click

    for bad in ("nohost", "h:0", "h:x", ":1"):
        with pytest.raises(click.BadParameter):
            parse_target(bad)


def test_publish_template_round_trips_through_the_decoder() -> None:
    from ingestd._codec import Decoder, Publish

    from ingestd.bench.client import publish_template

    for version in (4, 5):
        for qos in (0, 1, 2):
            topic = publisher_topic(7)
            tpl, poff, pidoff = publish_template(topic, 100, qos, version)
            buf = bytearray(tpl) * 3
            for k in range(3):
                HEADER.pack_into(buf, k * len(tpl) + poff, 7, 40 + k, 123456789)
                if qos:
                    buf[k * len(tpl) + pidoff : k * len(tpl) + pidoff + 2] = (300 + k).to_bytes(
                        2, "big"
                    )
            d = Decoder(server_side=False)
            d.protocol_version = version
            got = d.feed(bytes(buf))
            assert [type(p) for p in got] == [Publish] * 3
            for k, p in enumerate(got):
                assert p.topic == topic and p.qos == qos and len(p.payload) == 100
                assert HEADER.unpack_from(p.payload) == (7, 40 + k, 123456789)
                assert p.packet_id == (300 + k if qos else 0)
    with pytest.raises(ValueError):
        publish_template("t", 15, 0, 4)


# -- against ingestd -------------------------------------------------------------------


def plan_for(port: int, scenario: str = "fan-in", **kw: Any) -> Plan:
    base: dict[str, Any] = {
        "publishers": 10,
        "subscribers": 1,
        "messages": 300,
        "drain_timeout": 10.0,
    }
    base.update(kw)
    return Plan(scenario, "127.0.0.1", port, **base)


def assert_exact(res: Result, per_sub: int) -> None:
    assert res.errors == []
    assert res.sent == per_sub
    assert res.expected == per_sub * res.subscribers
    assert res.delivered == res.expected
    assert res.received == res.expected
    assert res.lost == 0
    assert res.duplicates == 0


@pytest.mark.parametrize(
    ("qos", "version", "processes"), [(1, 4, 2), (1, 5, 1), (2, 5, 2), (0, 4, 1)]
)
def test_fan_in_accounting_is_exact(server: Any, qos: int, version: int, processes: int) -> None:
    # 10 x 300 messages of 100 bytes stay far below every queue bound, so nothing
    # may be dropped even at QoS 0.
    res = run(plan_for(server.port, qos=qos, version=version, processes=processes))
    assert_exact(res, 3000)
    if qos:
        assert res.acked == res.sent
    assert res.latency_kind == "end-to-end"
    lat = res.latency_ms
    assert lat["p50"] is not None
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    # The broker counted the same messages.
    stats = server.call(lambda: server.app.broker.stats)
    assert stats.messages_received[qos] == 3000
    assert stats.messages_delivered[qos] == 3000


def test_fan_out_accounting_is_exact(server: Any) -> None:
    res = run(
        plan_for(
            server.port,
            scenario="fan-out",
            publishers=1,
            subscribers=5,
            qos=1,
            processes=2,
            messages=400,
        )
    )
    assert_exact(res, 400)
    assert res.delivered == 2000


def test_publish_only_counts_acks(server: Any) -> None:
    res = run(
        plan_for(
            server.port, scenario="publish-only", subscribers=0, qos=1, messages=500, inflight=8
        )
    )
    assert res.errors == []
    assert res.sent == res.acked == 5000
    assert res.rate_of == "acked msgs/s"
    assert res.latency_kind == "publish->ack"
    assert res.latency_ms["p50"] is not None
    assert server.call(lambda: server.app.broker.stats.messages_received[1]) == 5000


def test_loss_is_counted_exactly_when_the_broker_drops(server_factory: Any) -> None:
    """Tiny session queues make the broker drop QoS 1 deliveries; our loss equals its count."""
    srv = server_factory(max_queued_messages=2, max_inflight=2)
    res = run(
        plan_for(srv.port, qos=1, messages=1000, processes=2, inflight=256, drain_timeout=2.0)
    )
    dropped = srv.call(lambda: dict(srv.app.broker.stats.dropped))
    assert res.sent == res.acked == 10_000
    assert res.duplicates == 0
    assert res.lost == dropped.get("session_queue_full", 0)
    assert res.delivered + res.lost == res.expected == 10_000


def test_latency_scenario_with_a_rate(server: Any) -> None:
    res = run(
        plan_for(
            server.port,
            scenario="latency",
            publishers=2,
            subscribers=1,
            messages=None,
            duration=0.5,
            rate=2000.0,
            qos=1,
        )
    )
    assert res.sent > 0
    assert_exact(res, res.sent)
    # A paced run sends no more than the rate allows (plus one batch per publisher).
    assert res.sent <= 2000 * res.publish_duration_s + 2 * 64


def test_connections_scenario(server: Any) -> None:
    res = run(
        Plan("connections", "127.0.0.1", server.port, connections=60, processes=2, messages=1),
        pid=os.getpid(),  # the broker runs in this process
    )
    assert res.errors == []
    assert res.connected == 60 and res.connect_failed == 0
    assert res.connect_rate and res.connect_rate > 0
    assert res.rss_per_connection_bytes is not None
    assert res.broker_cpu_s is not None
    # All closed again.
    deadline = time.monotonic() + 10
    while server.call(lambda: len(server.app.broker.connections)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.call(lambda: len(server.app.broker.connections)) == 0


def test_progress_line_and_table(server: Any) -> None:
    out = io.StringIO()
    res = run(plan_for(server.port, qos=1, messages=100), progress=out, pid=os.getpid())
    assert_exact(res, 1000)
    text = out.getvalue()
    assert text.startswith("\r") and "sent" in text and text.endswith("\n")
    table = format_table([res])
    assert "lost" in table and "delivered msgs/s" in table and "broker CPU s" in table
    # /proc counts CPU in 10 ms ticks: a short run may read 0.0, and then the
    # per-CPU-second rate is undefined (None) rather than a division by zero.
    assert res.broker_cpu_s is not None
    assert (res.msgs_per_broker_cpu_s is None) == (res.broker_cpu_s == 0)


def test_cli_json_and_compare(server_factory: Any) -> None:
    a = server_factory()
    b = server_factory()
    r = CliRunner().invoke(
        bench,
        [
            "--port",
            str(a.port),
            "--scenario",
            "fan-in",
            "--publishers",
            "3",
            "--messages",
            "200",
            "--qos",
            "1",
            "--mqtt-version",
            "5",
            "--processes",
            "1",
            "--json",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert (data["sent"], data["delivered"], data["lost"], data["duplicates"]) == (600, 600, 0, 0)
    assert data["mqtt_version"] == 5 and data["qos"] == 1
    r = CliRunner().invoke(
        bench,
        [
            "--port",
            str(a.port),
            "--compare",
            f"127.0.0.1:{b.port}",
            "--rounds",
            "2",
            "--publishers",
            "2",
            "--messages",
            "100",
            "--qos",
            "1",
            "--processes",
            "1",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert len(data["a"]) == len(data["b"]) == 2 and len(data["ratios"]) == 2
    assert {x["target"] for x in data["a"]} == {f"127.0.0.1:{a.port}"}
    assert {x["target"] for x in data["b"]} == {f"127.0.0.1:{b.port}"}
    assert all(x["lost"] == 0 and x["delivered"] == 200 for x in data["a"] + data["b"])
    assert data["ratio_of_medians"] > 0
    # Human-readable form.
    r = CliRunner().invoke(
        bench,
        [
            "--port",
            str(a.port),
            "--compare",
            f"127.0.0.1:{b.port}",
            "--rounds",
            "1",
            "--publishers",
            "1",
            "--messages",
            "50",
            "--processes",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "ratio" in r.output and "delivered msgs/s" in r.output


def test_cli_errors() -> None:
    r = CliRunner().invoke(bench, ["--messages", "1", "--duration", "1"])
    assert r.exit_code != 0 and "not both" in r.output
    # Nothing listens there: a clean failure, not a hang.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(
        bench, ["--port", str(port), "--messages", "1", "--publishers", "1", "--processes", "1"]
    )
    assert r.exit_code == 1
    assert "benchmark failed" in r.output and "cannot connect" in r.output


# -- the ingest scenario: rows verified in PostgreSQL ------------------------------------


ROUTE = """
[ingest]
ack = "after-commit"
batch_rows = 500
flush_interval_ms = 20
[presence]
enabled = false
[[routes]]
name = "bench"
topic = "company/{company}/machine/{machine}/telemetry"
table = "bench_telemetry"
[routes.columns]
run = "payload.run::text"
pub = "payload.pub::integer"
seq = "payload.seq::bigint"
ts = { source = "payload.ts", type = "timestamptz", unit = "ns" }
temperature = "payload.temperature::double precision"
machine = "topic.machine"
"""


@pytest.mark.pg
def test_ingest_scenario_verifies_rows(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import pg
    from ingestd.config import load_config

    try:
        dsn = pg.create_database()
    except Exception as e:  # pragma: no cover
        pytest.skip(f"no PostgreSQL: {e}")
    try:
        cfg_path = tmp_path / "bench.toml"
        cfg_path.write_text(ROUTE)
        cfg = load_config(
            str(cfg_path),
            env={},
            overrides={
                "server": {
                    "listen": ["127.0.0.1:0"],
                    "http_listen": "",
                    "data_dir": str(tmp_path / "data"),
                },
                "database": {"dsn": dsn},
            },
        )
        from server_thread import ServerThread

        srv = ServerThread(cfg, database=True).start()
        try:
            assert srv.call(lambda: srv.app.broker._sinks)  # the route is in the trie
            res = run(
                Plan(
                    "ingest",
                    "127.0.0.1",
                    srv.port,
                    publishers=4,
                    subscribers=0,
                    messages=250,
                    qos=1,
                    payload_size=120,
                    drain_timeout=10.0,
                ),
                dsn=dsn,
                table="bench_telemetry",
            )
        finally:
            srv.stop()
        assert res.errors == []
        assert res.sent == res.acked == 1000
        assert (res.rows, res.unique_rows, res.lost, res.duplicates) == (1000, 1000, 0, 0)
        assert res.rate_of == "rows/s" and res.msgs_per_s > 0
    finally:
        pg.drop_database(dsn)


# -- against Mosquitto (validates the generator against another broker) ------------------


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[tuple[int, int]]:
    exe = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if exe is None:
        pytest.skip("mosquitto is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_inflight_messages 100\nlog_dest stderr\nlog_type error\n"
    )
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(
                        f"mosquitto did not start: {proc.stderr.read() if proc.stderr else ''}"
                    )
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize(("qos", "version"), [(1, 4), (2, 5)])
def test_against_mosquitto(mosquitto: tuple[int, int], qos: int, version: int) -> None:
    port, pid = mosquitto
    res = run(plan_for(port, qos=qos, version=version, messages=200, processes=2), pid=pid)
    assert_exact(res, 2000)
    assert res.acked == 2000
    assert res.broker_cpu_s is not None
    assert TOPIC_FILTER == "company/+/machine/+/telemetry"
