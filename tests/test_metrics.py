"""The Prometheus collector: fake objects with known counters, then a real broker."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ingestd import __version__
from ingestd.broker.hooks import BrokerStats
from ingestd.metrics import (
    BATCH_ROWS_BUCKETS,
    Histogram,
    IngestdCollector,
    LoopLagMonitor,
    batch_rows_histogram,
    build_registry,
    copy_seconds_histogram,
)


def scrape(registry: Any) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """family name -> {(sample name, sorted labels): value}, parsed back from the text format."""
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for fam in text_string_to_metric_families(text):
        d = out.setdefault(fam.name, {})
        for s in fam.samples:
            d[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    key = (sample or family, tuple(sorted(labels.items())))
    return metrics[family][key]


class FakeTransport:
    def __init__(self, buffered: int) -> None:
        self.buffered = buffered

    def get_write_buffer_size(self) -> int:
        return self.buffered


class BrokenTransport:
    def get_write_buffer_size(self) -> int:
        raise RuntimeError("closed")


@dataclass(eq=False)
class FakeConn:
    transport: Any
    _out_bytes: int = 0


@dataclass
class FakeSession:
    connection: Any
    inflight: OrderedDict[int, Any] = field(default_factory=OrderedDict)
    queue: deque[Any] = field(default_factory=deque)


class FakeTrie:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@dataclass
class FakeBroker:
    stats: BrokerStats
    sessions: dict[str, FakeSession]
    connections: set[Any]
    retained: list[Any]
    trie: FakeTrie


def fake_broker() -> FakeBroker:
    st = BrokerStats()
    st.connections_current = {3: 0, 4: 2, 5: 3}
    st.connections_total = {3: 1, 4: 7, 5: 11}
    st.messages_received = [100, 20, 3]
    st.messages_delivered = [400, 40, 6]
    st.bytes_received = 123456
    st.bytes_sent = 654321
    st.drop("qos0_queue_full", 5)
    st.drop("session_queue_full")
    st.protocol_errors = 9
    st.messages_fast_path = 77
    st.limits_hit = {"max_connections": 2, "max_connections_per_peer": 1}
    st.credentials_revoked = 6
    c1 = FakeConn(FakeTransport(1000), 24)
    c2 = FakeConn(FakeTransport(50), 0)
    c3 = FakeConn(None, 7)  # closed transport: only its unflushed bytes
    c4 = FakeConn(BrokenTransport(), 3)
    s_online = FakeSession(c1, OrderedDict((i, object()) for i in range(1, 4)), deque([1, 2]))
    s_online2 = FakeSession(c2, OrderedDict({9: object()}))
    s_off = FakeSession(None, OrderedDict((i, object()) for i in range(1, 3)), deque([1]))
    return FakeBroker(
        stats=st,
        sessions={"a": s_online, "b": s_online2, "c": s_off},
        connections={c1, c2, c3, c4},
        retained=[1, 2, 3, 4],
        trie=FakeTrie(17),
    )


@dataclass
class FakeIngestStats:
    rows_by_table: dict[str, int]
    batch_rows: Histogram
    copy_seconds: Histogram
    dead_letters: int = 4
    write_errors: int = 2
    messages_received: int = 1500
    rows_spooled: int = 30
    rows_replayed: int = 20
    rows_skipped: int = 1
    rows_lost: int = 0


@dataclass
class FakeHook:
    name: str
    queued: int = 0
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0
    depth: int = 0


def fake_hooks() -> list[FakeHook]:
    return [FakeHook("radius", 120, 100, 5, 7, 3, 15), FakeHook("audit")]


class FakeEngine:
    def __init__(self) -> None:
        br = batch_rows_histogram()
        for n in (1, 100, 100, 5000, 60000):
            br.observe(n)
        cs = copy_seconds_histogram()
        for s in (0.0004, 0.003, 0.2, 99.0):
            cs.observe(s)
        self.stats = FakeIngestStats({"telemetry": 1400, "events": 42}, br, cs)
        self.pending_rows = 77
        self.spool_bytes = 4096
        self.saturated = True


def test_histogram_buckets_are_cumulative_with_le_semantics() -> None:
    h = Histogram([1, 5, 10])
    for v in (0, 1, 1.0001, 5, 7, 10, 11, 1e9):
        h.observe(v)
    assert h.counts == [2, 2, 2, 2]
    assert h.buckets() == [("1.0", 2), ("5.0", 4), ("10.0", 6), ("+Inf", 8)]
    assert h.count == 8
    assert h.sum == pytest.approx(0 + 1 + 1.0001 + 5 + 7 + 10 + 11 + 1e9)
    h.reset()
    assert h.count == 0 and h.counts == [0, 0, 0, 0] and h.sum == 0


def test_histogram_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        Histogram([])
    with pytest.raises(ValueError):
        Histogram([1, 1])
    assert Histogram([1, float("inf")]).bounds == (1.0,)


def test_broker_metrics_from_fake_broker() -> None:
    registry, _ = build_registry(fake_broker(), process_metrics=False)
    m = scrape(registry)
    assert value(m, "ingestd_build_info", version=__version__, codec=_codec()) == 1
    assert value(m, "ingestd_connections", protocol="4") == 2
    assert value(m, "ingestd_connections", protocol="5") == 3
    assert value(m, "ingestd_connections", protocol="3") == 0
    acc = "ingestd_connections_accepted"
    assert value(m, acc, acc + "_total", protocol="5") == 11
    assert value(m, acc, acc + "_total", protocol="4") == 7
    rx = "ingestd_messages_received"
    tx = "ingestd_messages_delivered"
    assert [value(m, rx, rx + "_total", qos=str(q)) for q in range(3)] == [100, 20, 3]
    assert [value(m, tx, tx + "_total", qos=str(q)) for q in range(3)] == [400, 40, 6]
    assert value(m, "ingestd_received_bytes", "ingestd_received_bytes_total") == 123456
    assert value(m, "ingestd_sent_bytes", "ingestd_sent_bytes_total") == 654321
    fp = "ingestd_messages_fast_path"
    assert value(m, fp, fp + "_total") == 77
    d = "ingestd_dropped_messages"
    assert value(m, d, d + "_total", reason="qos0_queue_full") == 5
    assert value(m, d, d + "_total", reason="session_queue_full") == 1
    assert value(m, "ingestd_protocol_errors", "ingestd_protocol_errors_total") == 9
    lim = "ingestd_limits_hit"
    assert value(m, lim, lim + "_total", limit="max_connections") == 2
    assert value(m, lim, lim + "_total", limit="max_connections_per_peer") == 1
    rev = "ingestd_credentials_revoked"
    assert value(m, rev, rev + "_total") == 6
    assert value(m, "ingestd_open_sockets") == 4
    assert value(m, "ingestd_outbound_queue_bytes") == 1024 + 50 + 7 + 3
    assert value(m, "ingestd_outbound_queue_max_bytes") == 1024
    assert value(m, "ingestd_sessions", state="online") == 2
    assert value(m, "ingestd_sessions", state="offline") == 1
    assert value(m, "ingestd_inflight_messages") == 3 + 1 + 2
    assert value(m, "ingestd_queued_messages") == 3
    assert value(m, "ingestd_session_overflow_bytes") == 0  # a broker without overflow
    assert value(m, "ingestd_retained_messages") == 4
    assert value(m, "ingestd_subscriptions") == 17
    # No engine, no lag monitor: their families are absent.
    assert "ingestd_ingest_pending_rows" not in m
    assert "ingestd_event_loop_lag_seconds" not in m


@dataclass
class FakeUpstream:
    """What the collector reads of an ingestd.upstream.Upstream."""

    name: str = "site-a"
    connected: bool = True
    messages_received: int = 1234
    acks_pending: int = 12
    connects: int = 3
    reconnects: int = 5
    ack_failures: int = 1
    sessions_lost: int = 2


def fake_upstreams() -> list[FakeUpstream]:
    return [FakeUpstream(), FakeUpstream(name="site-b", connected=False, sessions_lost=0)]


def test_upstream_metrics_from_fake_upstreams() -> None:
    registry, collector = build_registry(None, process_metrics=False)
    collector.upstreams = fake_upstreams()
    m = scrape(registry)
    up = "ingestd_upstream_"
    assert value(m, up + "connected", upstream="site-a") == 1
    assert value(m, up + "connected", upstream="site-b") == 0
    assert value(m, up + "acks_pending", upstream="site-a") == 12
    for fam, n in (("messages_received", 1234), ("connects", 3), ("reconnects", 5),
                   ("ack_failures", 1), ("sessions_lost", 2)):  # fmt: skip
        assert value(m, up + fam, up + fam + "_total", upstream="site-a") == n
    assert value(m, up + "sessions_lost", up + "sessions_lost_total", upstream="site-b") == 0


def test_session_overflow_gauges() -> None:
    b: Any = fake_broker()
    b.overflow = SimpleNamespace(used_bytes=4096, used_messages=30, peak_bytes=8192)
    registry, _ = build_registry(b, process_metrics=False)
    m = scrape(registry)
    assert value(m, "ingestd_session_overflow_bytes") == 4096
    assert value(m, "ingestd_session_overflow_messages") == 30
    assert value(m, "ingestd_session_overflow_peak_bytes") == 8192


def test_session_queue_pool_gauges() -> None:
    b: Any = fake_broker()
    assert value(scrape(build_registry(b, process_metrics=False)[0]),
                 "ingestd_session_queue_pool_bytes") == 0  # fmt: skip
    b.pool = SimpleNamespace(used=1234, peak=5678)
    m = scrape(build_registry(b, process_metrics=False)[0])
    assert value(m, "ingestd_session_queue_pool_bytes") == 1234
    assert value(m, "ingestd_session_queue_pool_peak_bytes") == 5678


def test_ingest_metrics_from_fake_engine() -> None:
    registry, collector = build_registry(None, process_metrics=False)
    collector.engine = FakeEngine()  # attached after the registry was built
    m = scrape(registry)
    r = "ingestd_ingest_rows"
    assert value(m, r, r + "_total", table="telemetry") == 1400
    assert value(m, r, r + "_total", table="events") == 42
    b = "ingestd_ingest_batch_rows"
    assert value(m, b, b + "_bucket", le="1.0") == 1
    assert value(m, b, b + "_bucket", le="100.0") == 3
    assert value(m, b, b + "_bucket", le="5000.0") == 4
    assert value(m, b, b + "_bucket", le="50000.0") == 4
    assert value(m, b, b + "_bucket", le="+Inf") == 5
    assert value(m, b, b + "_count") == 5
    assert value(m, b, b + "_sum") == 1 + 100 + 100 + 5000 + 60000
    assert len([k for k in m[b] if k[0] == b + "_bucket"]) == len(BATCH_ROWS_BUCKETS) + 1
    c = "ingestd_ingest_copy_seconds"
    assert value(m, c, c + "_bucket", le="0.0005") == 1
    assert value(m, c, c + "_bucket", le="0.005") == 2
    assert value(m, c, c + "_bucket", le="0.25") == 3
    assert value(m, c, c + "_bucket", le="30.0") == 3
    assert value(m, c, c + "_bucket", le="+Inf") == 4
    assert value(m, c, c + "_sum") == pytest.approx(0.0004 + 0.003 + 0.2 + 99.0)
    assert value(m, "ingestd_ingest_pending_rows") == 77
    assert value(m, "ingestd_ingest_spool_bytes") == 4096
    assert value(m, "ingestd_ingest_saturated") == 1
    dl = "ingestd_ingest_dead_letters"
    assert value(m, dl, dl + "_total") == 4
    assert value(m, "ingestd_database_errors", "ingestd_database_errors_total") == 2
    assert value(m, "ingestd_ingest_messages", "ingestd_ingest_messages_total") == 1500
    assert value(m, "ingestd_ingest_spooled_rows", "ingestd_ingest_spooled_rows_total") == 30
    assert value(m, "ingestd_ingest_replayed_rows", "ingestd_ingest_replayed_rows_total") == 20
    assert value(m, "ingestd_ingest_skipped_rows", "ingestd_ingest_skipped_rows_total") == 1
    assert value(m, "ingestd_ingest_lost_rows", "ingestd_ingest_lost_rows_total") == 0


def test_ingest_metrics_tolerate_a_minimal_engine() -> None:
    """An engine with only some counters (the engine as it stands) still yields every family."""

    class Stats:
        rows_committed = 10
        rows_replayed = 5
        write_errors = 1

    class Engine:
        stats = Stats()
        pending_rows = 3

    registry, _ = build_registry(None, Engine(), process_metrics=False)
    m = scrape(registry)
    r = "ingestd_ingest_rows"
    assert value(m, r, r + "_total", table="all") == 15
    assert value(m, "ingestd_ingest_pending_rows") == 3
    assert value(m, "ingestd_ingest_spool_bytes") == 0
    assert value(m, "ingestd_database_errors", "ingestd_database_errors_total") == 1
    b = "ingestd_ingest_batch_rows"
    assert value(m, b, b + "_count") == 0
    assert value(m, b, b + "_bucket", le="+Inf") == 0


def test_hook_metrics_from_fake_hooks() -> None:
    registry, collector = build_registry(fake_broker(), process_metrics=False)
    assert "ingestd_hook_events_queued" not in scrape(registry)  # no hooks: no families
    collector.hooks = fake_hooks()
    m = scrape(registry)
    q, s, f, d = (f"ingestd_hook_events_{k}" for k in ("queued", "sent", "failed", "dropped"))
    assert value(m, q, q + "_total", hook="radius") == 120
    assert value(m, s, s + "_total", hook="radius") == 100
    assert value(m, f, f + "_total", hook="radius") == 5
    assert value(m, d, d + "_total", hook="radius") == 7
    assert value(m, "ingestd_hook_retries", "ingestd_hook_retries_total", hook="radius") == 3
    assert value(m, "ingestd_hook_queue_events", hook="radius") == 15
    assert value(m, d, d + "_total", hook="audit") == 0


def test_loop_lag_monitor_records_a_stall() -> None:
    async def main() -> LoopLagMonitor:
        lag = LoopLagMonitor(interval=0.01)
        lag.start()
        lag.start()  # idempotent
        await asyncio.sleep(0.02)
        time.sleep(0.1)  # block the loop: the next wake-up overshoots
        while lag.samples < 3:
            await asyncio.sleep(0.01)
        await lag.stop()
        return lag

    lag = asyncio.run(main())
    # A 0.1 s block lands in one sleep that overshoots by at least the block minus its interval.
    assert lag.max_ever >= 0.09 - 0.01
    registry, _ = build_registry(None, None, lag, process_metrics=False)
    m = scrape(registry)
    assert value(m, "ingestd_event_loop_lag_seconds") == pytest.approx(lag.last)
    assert value(m, "ingestd_event_loop_lag_max_seconds") == pytest.approx(lag.max_ever)
    # The window maximum resets at each scrape.
    m = scrape(registry)
    assert value(m, "ingestd_event_loop_lag_max_seconds") == pytest.approx(lag.last)
    # The loop thread's wait for a CPU: a counter from the kernel's scheduler statistics.
    if Path("/proc/thread-self/schedstat").exists():
        name = "ingestd_event_loop_cpu_wait_seconds"
        assert value(m, name, name + "_total") >= 0


def test_cpu_wait_is_read_from_schedstat(tmp_path: Path) -> None:
    """The second field of schedstat (ns on a run queue) in seconds; None if unreadable."""
    f = tmp_path / "schedstat"
    f.write_text("4078086380 4776969223 87045\n")
    assert LoopLagMonitor.cpu_wait_seconds(str(f)) == pytest.approx(4.776969223)
    f.write_text("garbage\n")
    assert LoopLagMonitor.cpu_wait_seconds(str(f)) is None
    assert LoopLagMonitor.cpu_wait_seconds(str(tmp_path / "missing")) is None


def test_private_registry_and_process_metrics() -> None:
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    registry, collector = build_registry(fake_broker())
    assert set(REGISTRY._names_to_collectors) == before  # the global registry is untouched
    m = scrape(registry)
    assert "process_resident_memory_bytes" in m
    assert "python_info" in m
    assert isinstance(collector, IngestdCollector)
    # Two registries in one process do not clash.
    registry2, _ = build_registry(fake_broker())
    assert value(scrape(registry2), "ingestd_subscriptions") == 17


def _codec() -> str:
    from ingestd.build_info import codec_implementation

    return codec_implementation()


# -- against a real broker -------------------------------------------------------


def _connect_packet(client_id: str) -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id.encode()
    return bytes([0x10, len(body)]) + body


def _subscribe_packet(pid: int, flt: str, qos: int) -> bytes:
    body = pid.to_bytes(2, "big") + len(flt).to_bytes(2, "big") + flt.encode() + bytes([qos])
    return bytes([0x82, len(body)]) + body


def _publish_packet(
    topic: str, payload: bytes, qos: int, pid: int = 0, retain: bool = False
) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + (pid.to_bytes(2, "big") if qos else b"")
    body += payload
    return bytes([0x30 | (qos << 1) | int(retain), len(body)]) + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def test_collector_against_a_real_broker(server: Any) -> None:
    """Counters after a known exchange (raw 3.1.1 bytes, so no codec helper is involved)."""
    sub = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    pub = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sub.sendall(_connect_packet("metrics-sub"))
        assert _recv_exactly(sub, 4)[0] == 0x20
        sub.sendall(_subscribe_packet(1, "m/#", 1))
        assert _recv_exactly(sub, 5)[0] == 0x90
        pub.sendall(_connect_packet("metrics-pub"))
        assert _recv_exactly(pub, 4)[0] == 0x20
        pub.sendall(_publish_packet("m/a", b"x" * 10, 0))
        pub.sendall(_publish_packet("m/b", b"y" * 10, 1, pid=7))
        pub.sendall(_publish_packet("r/c", b"z", 0, retain=True))
        assert _recv_exactly(pub, 4) == b"\x40\x02\x00\x07"  # PUBACK 7
        # subscriber: QoS 0 publish then QoS 1 publish
        first = _recv_exactly(sub, 2)
        _recv_exactly(sub, first[1])
        second = _recv_exactly(sub, 2)
        rest = _recv_exactly(sub, second[1])
        assert second[0] & 0x06 == 0x02
        pid = rest[2 + 3 : 2 + 3 + 2]
        # Before the PUBACK, the delivery is in flight.
        app = server.app
        registry, _ = server.call(lambda: build_registry(app.broker, process_metrics=False))
        m = server.call(lambda: scrape(registry))
        assert value(m, "ingestd_inflight_messages") == 1
        sub.sendall(b"\x40\x02" + pid)
        # A PINGREQ round trip orders the PUBACK before the next scrape.
        sub.sendall(b"\xc0\x00")
        assert _recv_exactly(sub, 2) == b"\xd0\x00"
        m = server.call(lambda: scrape(registry))
    finally:
        sub.close()
        pub.close()
    assert value(m, "ingestd_connections", protocol="4") == 2
    acc = "ingestd_connections_accepted"
    assert value(m, acc, acc + "_total", protocol="4") == 2
    rx = "ingestd_messages_received"
    assert [value(m, rx, rx + "_total", qos=str(q)) for q in range(3)] == [2, 1, 0]
    tx = "ingestd_messages_delivered"
    assert [value(m, tx, tx + "_total", qos=str(q)) for q in range(3)] == [1, 1, 0]
    assert value(m, "ingestd_sessions", state="online") == 2
    assert value(m, "ingestd_inflight_messages") == 0
    # r/c and the $SYS/ingestd/... statistics (retained too, mqtt.sys_interval).
    sys_retained = server.call(lambda: len(list(app.broker.retained.match("$SYS/#"))))
    assert sys_retained > 0
    assert value(m, "ingestd_retained_messages") == 1 + sys_retained
    assert value(m, "ingestd_subscriptions") >= 1
    assert value(m, "ingestd_received_bytes", "ingestd_received_bytes_total") > 0
    assert value(m, "ingestd_sent_bytes", "ingestd_sent_bytes_total") > 0
    assert value(m, "ingestd_outbound_queue_bytes") >= 0
