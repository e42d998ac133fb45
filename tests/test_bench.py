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
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.bench.accounting import (
    HEADER,
    LatencySampler,
    SeqTracker,
    merge_samples,
    percentiles,
)
from ingestd.bench.command import bench, parse_target
from ingestd.bench.runner import BenchFailed, Result, format_table, run
from ingestd.bench.worker import TOPIC_FILTER, Plan, json_payloads, publisher_topic

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


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 10**6), max_size=30), max_size=20),
    st.integers(2, 40),
)
def test_latency_sampler_add_many_equals_adding_one_by_one(chunks, cap) -> None:
    one, many = LatencySampler(cap=cap), LatencySampler(cap=cap)
    for chunk in chunks:
        for v in chunk:
            one.add(v)
        many.add_many(chunk)
    assert (many.count, many.max_us, many.stride) == (one.count, one.max_us, one.stride)
    assert list(many.samples) == list(one.samples)


@pytest.mark.parametrize(("qos", "version"), [(0, 4), (1, 4), (2, 5), (1, 5)])
def test_pre_encoded_packets_are_what_publish_each_would_encode(qos: int, version: int) -> None:
    from ingestd._codec import encode_publish

    from ingestd.bench.client import PreEncoded

    payloads = list(json_payloads("pre", 2, 100, 70_000, None))
    pre = PreEncoded("t/x", payloads, qos, version)
    assert len(pre.packets) == 70_000
    for seq in (0, 1, 65_534, 65_535, 69_999):  # packet ids wrap after 65535
        pid = seq % 65535 + 1 if qos else 0
        assert pre.packets[seq] == encode_publish(
            "t/x", payloads[seq], qos, False, False, pid, None, version
        )


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


@pytest.mark.parametrize("size", [16, 100, 130, 300])
def test_json_payloads_fields_and_size(size: int) -> None:
    t_before = time.time_ns()
    got = list(json_payloads('r"1', 7, size, 250, None))
    t_after = time.time_ns()
    assert len(got) == 250
    for seq, body in enumerate(got):
        assert isinstance(body, bytes)
        d = json.loads(body)
        assert list(d) == ["run", "pub", "seq", "ts", "temperature", "pressure", "pad"]
        assert (d["run"], d["pub"], d["seq"]) == ('r"1', 7, seq)
        assert isinstance(d["ts"], int) and t_before <= d["ts"] <= t_after
        assert d["temperature"] == 20.0 + (seq % 100) / 10
        assert d["pressure"] == 1007.0
        assert set(d["pad"]) <= {"x"}
        # Padded to exactly `size` when shorter; never padded when longer.
        natural = len(body) - len(d["pad"])
        assert len(body) == max(size, natural)
        assert (d["pad"] == "") == (natural >= size)
    # A deadline ends an unbounded stream; a past one yields nothing.
    assert list(json_payloads("r", 0, 100, None, time.monotonic_ns())) == []
    assert len(list(json_payloads("r", 0, 100, None, time.monotonic_ns() + 20_000_000))) > 0


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


@pytest.mark.parametrize(("qos", "batch"), [(1, 32), (2, 64), (0, 50)])
def test_publish_each_writes_whole_batches(server: Any, qos: int, batch: int) -> None:
    """1000 JSON payloads, a window that never fills: one write per batch, exact accounting."""
    import asyncio

    from ingestd.bench.client import BenchClient

    async def go() -> tuple[Any, list[bytes]]:
        c = await BenchClient.open("127.0.0.1", server.port, "each", 4)
        writes: list[bytes] = []
        assert c.transport is not None
        raw_write = c.transport.write

        def counting_write(data: Any) -> None:
            writes.append(bytes(data))
            raw_write(data)

        c.transport.write = counting_write  # type: ignore[method-assign]
        payloads = json_payloads("each", 3, 100, 1000, None)
        await c.publish_each(publisher_topic(3), payloads, qos, window=65535, batch=batch)
        await c.disconnect()
        return c, writes

    c, writes = asyncio.run(go())
    assert c.error is None
    assert (c.sent, c.inflight) == (1000, 0)
    assert c.acked == (1000 if qos else 0)
    assert c.ack_latency.count == c.acked
    publish_writes = [w for w in writes if w[0] >> 4 == 3]
    assert len(publish_writes) == -(-1000 // batch)
    stats = server.call(lambda: server.app.broker.stats)
    assert stats.messages_received[qos] == 1000


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_each_sends_pre_encoded_packets_as_they_are(server: Any, qos: int) -> None:
    """What the ingest scenario does with --messages: the same bytes, batched, all acked."""
    import asyncio

    from ingestd.bench.client import BenchClient, PreEncoded

    payloads = list(json_payloads("pre", 3, 100, 700, None))

    async def go() -> tuple[Any, bytes]:
        c = await BenchClient.open("127.0.0.1", server.port, "pre", 4)
        sent: list[bytes] = []
        assert c.transport is not None
        raw_write = c.transport.write

        def recording_write(data: Any) -> None:
            if data[0] >> 4 == 3:
                sent.append(bytes(data))
            raw_write(data)

        c.transport.write = recording_write  # type: ignore[method-assign]
        pre = PreEncoded(publisher_topic(3), payloads, qos, 4)
        await c.publish_each(publisher_topic(3), pre, qos, window=100, batch=64)
        with pytest.raises(ValueError):
            await c.publish_each("other/topic", pre, qos, window=100)
        await c.disconnect()
        return c, b"".join(sent)

    c, sent = asyncio.run(go())
    assert c.error is None
    assert (c.sent, c.inflight, c.acked) == (700, 0, 700 if qos else 0)
    assert c.ack_latency.count == c.acked
    assert sent == b"".join(PreEncoded(publisher_topic(3), payloads, qos, 4).packets)


class _FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


@pytest.mark.parametrize("qos", [1, 2])
def test_publish_each_refills_the_window_at_the_low_water_mark(qos: int) -> None:
    """Window 10, batch 64: 10 packets, then nothing until 5 are acknowledged, then 5 more."""
    import asyncio

    from ingestd._codec import PINGRESP, Decoder, Publish, encode_ack

    from ingestd.bench.client import BenchClient
    from ingestd.mqtt.constants import PacketType

    decoder = Decoder(server_side=False)  # it decodes PUBLISH without a CONNECT first
    decoder.protocol_version = 4
    first_ack = int(PacketType.PUBACK if qos == 1 else PacketType.PUBREC)

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def go() -> tuple[BenchClient, list[list[Any]]]:
        c = BenchClient("fake", 4, keepalive=0)
        t = _FakeTransport()
        c.connection_made(t)  # type: ignore[arg-type]
        task = asyncio.create_task(
            c.publish_each("t/x", json_payloads("f", 0, 100, 23, None), qos, window=10, batch=64)
        )
        batches: list[list[Any]] = []

        async def take() -> list[int]:
            """Sizes of the PUBLISH writes since the last call (PUBRELs are written apart)."""
            await settle()
            sizes = []
            for w in t.writes:
                if w[0] >> 4 == 3:
                    pkts = decoder.feed(w)
                    assert all(type(p) is Publish for p in pkts)
                    batches.append(pkts)
                    sizes.append(len(pkts))
            t.writes.clear()
            return sizes

        def ack(pid: int) -> None:
            c.data_received(encode_ack(first_ack, pid, 0, 4))
            if qos == 2:
                c.data_received(encode_ack(int(PacketType.PUBCOMP), pid, 0, 4))

        assert await take() == [10]
        for pid in range(1, 5):  # 6 in flight: above the low-water mark (5)
            ack(pid)
        assert await take() == []
        assert (c.inflight, c.acked) == (6, 4)
        ack(5)  # 5 in flight: refill with one write of 5
        assert await take() == [5]
        for pid in range(6, 16):
            ack(pid)  # 0 in flight; the rest (8 of 23) in one write
        assert await take() == [8]
        for pid in range(16, 24):
            ack(pid)
        await settle()
        assert t.writes[-1] == b"\xc0\x00"  # PINGREQ: all acknowledged
        assert not [w for w in t.writes if w[0] >> 4 == 3]
        c.data_received(PINGRESP)
        await asyncio.wait_for(task, 5)
        return c, batches

    c, batches = asyncio.run(go())
    assert [len(b) for b in batches] == [10, 5, 8]
    flat = [p for b in batches for p in b]
    assert [p.packet_id for p in flat] == list(range(1, 24))
    assert [json.loads(p.payload)["seq"] for p in flat] == list(range(23))
    assert all(p.qos == qos and p.topic == "t/x" for p in flat)
    assert (c.sent, c.acked, c.inflight) == (23, 23, 0)
    assert c.ack_latency.count == 23
    # It waited for its full window (twice), and that time is counted.
    assert c.window_wait_ns > 0


def test_paced_publisher_sleeps_at_least_one_timer_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 2,000 msgs/s the next message is due 0.5 ms later, under uvloop's 1 ms timer
    resolution: the publisher sleeps a whole tick and sends what fell due in one write,
    instead of sleeping "0.5 ms" (a zero-length timer: the loop spins, and its CPU is
    taken from the broker on the same cores)."""
    import asyncio

    import uvloop
    from ingestd._codec import PINGRESP, Decoder

    from ingestd.bench import client as client_mod
    from ingestd.bench.client import PACING_TICK_S, BenchClient

    real_sleep = asyncio.sleep
    sleeps: list[float] = []

    async def recording_sleep(delay: float, result: Any = None) -> Any:
        sleeps.append(delay)
        return await real_sleep(delay, result)

    monkeypatch.setattr(client_mod.asyncio, "sleep", recording_sleep)

    async def go() -> tuple[BenchClient, list[bytes]]:
        c = BenchClient("fake", 4, keepalive=0)
        t = _FakeTransport()
        c.connection_made(t)  # type: ignore[arg-type]
        deadline = time.monotonic_ns() + 100_000_000
        task = asyncio.create_task(
            c.publish_stream(
                0, "t/x", 0, 32, count=None, deadline_ns=deadline, rate=2000.0, window=0
            )
        )
        while not t.writes or t.writes[-1] != b"\xc0\x00":  # PINGREQ: done publishing
            await real_sleep(0.01)
        c.data_received(PINGRESP)
        await asyncio.wait_for(task, 5)
        return c, t.writes[:-1]

    c, writes = uvloop.run(go())
    decoder = Decoder(server_side=False)
    decoder.protocol_version = 4
    seqs = [HEADER.unpack_from(p.payload)[1] for w in writes for p in decoder.feed(w)]
    assert seqs == list(range(c.sent)) and c.sent > 0
    pacing = [d for d in sleeps if d > 0]
    assert pacing, "a paced run sleeps between writes"
    assert min(pacing) >= PACING_TICK_S
    # Fewer writes than messages: each tick sends what fell due meanwhile.
    assert len(writes) < c.sent
    assert c.window_wait_ns == 0  # QoS 0: no window to wait for


def test_loss_is_counted_exactly_when_the_broker_drops(server_factory: Any) -> None:
    """Tiny session queues (no overflow) make the broker drop QoS 1 deliveries; our loss
    equals its count."""
    srv = server_factory(max_queued_messages=2, max_inflight=2, overflow_max_bytes=0)
    res = run(
        plan_for(srv.port, qos=1, messages=1000, processes=2, inflight=256, drain_timeout=2.0)
    )
    dropped = srv.call(lambda: dict(srv.app.broker.stats.dropped))
    assert res.sent == res.acked == 10_000
    assert res.duplicates == 0
    assert res.lost == dropped.get("session_queue_full", 0)
    assert res.delivered + res.lost == res.expected == 10_000


def test_stalled_subscriber_loses_nothing_through_the_session_overflow(
    server_factory: Any,
) -> None:
    """--stall-subscriber: the subscriber stops reading mid-run; with small memory queues
    the broker keeps the QoS 1 deliveries in its memory pool, then on disk, and the
    subscriber gets every one."""
    srv = server_factory(
        max_queued_messages=100, max_outbound_bytes=16384, queue_pool_bytes=1_000_000
    )
    # 2 KB payloads: the 20 MB sent after the stall begins are far more than the kernel's
    # socket buffers and the 16 KB outbound bound hold, so the overflow is used.
    plan = plan_for(
        srv.port, qos=1, messages=2000, payload_size=2000, stall_subscriber=1.0, drain_timeout=2.0
    )
    res = run(plan)
    assert_exact(res, 20_000)
    assert res.duration_s >= 1.0  # the stall happened
    peak = srv.call(lambda: srv.app.broker.overflow.peak_messages)
    assert peak > 0
    pool = srv.app.broker.pool
    assert srv.call(lambda: (pool.used, pool.peak > 0)) == (0, True)  # lent, and given back
    assert srv.call(lambda: dict(srv.app.broker.stats.dropped)) == {}


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


class PeerRecorder:
    """A broker listener that keeps the peer address of every CONNECTED client."""

    def __init__(self) -> None:
        self.peers: list[str] = []

    def on_client_connected(self, info: Any) -> None:
        self.peers.append(info.peer)

    def on_client_disconnected(self, info: Any, reason: str, will_published: bool) -> None:
        pass


def test_connections_scenario_from_several_source_addresses(server: Any) -> None:
    rec = PeerRecorder()
    server.call(lambda: server.app.broker.listeners.append(rec))
    plan = Plan("connections", "127.0.0.1", server.port, connections=30, processes=1, messages=1)
    plan.source_addresses = 3
    res = run(plan)
    assert res.errors == [] and res.connected == 30
    hosts = server.call(lambda: sorted({p.rsplit(":", 1)[0] for p in rec.peers}))
    assert hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


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
    # Scheduling delay of the broker's process and of the generator, and the host's load.
    if Path("/proc/self/schedstat").exists():
        assert res.broker_runqueue_wait_s is not None and res.broker_runqueue_wait_s >= 0
        assert res.loadgen_runqueue_wait_s is not None and res.loadgen_runqueue_wait_s >= 0
        assert "broker run-queue wait s" in table and "loadgen run-queue wait s" in table
    assert res.load_average is not None and res.load_average >= 0
    assert "host load average" in table


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
    r = CliRunner().invoke(bench, ["--scenario", "ingest", "--reference"])
    assert r.exit_code == 2 and "--reference needs" in r.output
    r = CliRunner().invoke(
        bench, ["--scenario", "fan-in", "--dsn", "postgresql:///x", "--reference"]
    )
    assert r.exit_code == 2 and "--reference needs" in r.output
    # Nothing listens there: a clean failure, not a hang.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(
        bench, ["--port", str(port), "--messages", "1", "--publishers", "1", "--processes", "1"]
    )
    assert r.exit_code == 1
    assert "benchmark failed" in r.output and "cannot connect" in r.output
    # PostgreSQL is connected before the run: an unreachable one fails at once.
    r = CliRunner().invoke(
        bench,
        [
            *("--port", str(port), "--scenario", "ingest", "--messages", "1"),
            *("--dsn", f"postgresql://bench@127.0.0.1:{port}/x", "--processes", "1"),
        ],
    )
    assert r.exit_code == 1
    assert "cannot connect to PostgreSQL" in r.output


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


@pytest.fixture(scope="module")
def ingest_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    """(server, DSN): ingestd with the bench route into a fresh database, for this module."""
    import pg
    from ingestd.config import load_config
    from server_thread import ServerThread

    try:
        dsn = pg.create_database()
    except Exception as e:  # pragma: no cover
        pytest.skip(f"no PostgreSQL: {e}")
    tmp_path = tmp_path_factory.mktemp("ingest")
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
        srv = ServerThread(cfg, database=True).start()
        try:
            assert srv.call(lambda: srv.app.broker.router.sinks)  # the route is in the trie
            yield srv, dsn
        finally:
            srv.stop()
    finally:
        pg.drop_database(dsn)


def pg_value(dsn: str, sql: str, *args: Any) -> Any:
    import asyncio

    import asyncpg

    async def q() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(q())


def ingest_plan(port: int, **kw: Any) -> Plan:
    base: dict[str, Any] = {
        "publishers": 4,
        "subscribers": 0,
        "messages": 250,
        "qos": 1,
        "payload_size": 120,
        "drain_timeout": 10.0,
    }
    base.update(kw)
    return Plan("ingest", "127.0.0.1", port, **base)


@pytest.mark.pg
@pytest.mark.parametrize(
    ("qos", "inflight", "batch"),
    [(1, 64, 64), (1, 10, 64), (2, 50, 16), (0, 64, 7)],
)
def test_ingest_scenario_verifies_rows_and_measures_the_reference(
    ingest_server: tuple[Any, str], qos: int, inflight: int, batch: int
) -> None:
    srv, dsn = ingest_server
    total_before = pg_value(dsn, "SELECT count(*) FROM bench_telemetry")
    plan = ingest_plan(srv.port, qos=qos, inflight=inflight, batch=batch)
    res = run(
        plan,
        dsn=dsn,
        table="bench_telemetry",
        reference_batch=300,
    )
    assert res.errors == [] and res.notes == []
    assert res.sent == 1000
    assert res.acked == (1000 if qos else 0)
    assert (res.rows, res.unique_rows, res.lost, res.duplicates) == (1000, 1000, 0, 0)
    assert (res.expected, res.delivered) == (1000, 1000)
    assert res.rate_of == "rows/s" and res.msgs_per_s > 0
    assert res.duration_s > 0
    if qos:
        assert res.latency_kind == "publish->ack" and res.latency_ms["p50"] is not None
    # The reference ran (on by default with a DSN), and its rows are gone again:
    # the table grew by exactly the run's rows.
    assert res.reference_rows_per_s is not None and res.reference_rows_per_s > 0
    assert res.reference_batch == 300
    assert res.vs_reference == pytest.approx(res.msgs_per_s / res.reference_rows_per_s)
    assert pg_value(dsn, "SELECT count(*) FROM bench_telemetry") == total_before + 1000
    assert pg_value(dsn, "SELECT count(*) FROM bench_telemetry WHERE run = $1", plan.run_id) == 1000
    ref_run = f"{plan.run_id}-ref"
    assert pg_value(dsn, "SELECT count(*) FROM bench_telemetry WHERE run = $1", ref_run) == 0
    assert pg_value(dsn, "SELECT count(*) FROM bench_telemetry WHERE run LIKE '%-ref'") == 0
    table = format_table([res])
    assert "reference rows/s" in table and "vs reference" in table
    assert f"{res.vs_reference:.2f}x" in table
    assert res.to_dict()["reference_rows_per_s"] == res.reference_rows_per_s
    # The pre-encoded binary references ran over 1 and 2 connections (notes == [] above:
    # each stored exactly the run's rows), and their rows are gone again too.
    assert res.binary_reference_rows_per_s is not None and res.binary_reference_rows_per_s > 0
    assert res.vs_binary_reference == pytest.approx(
        res.msgs_per_s / res.binary_reference_rows_per_s
    )
    assert res.binary_reference_connections == 2
    assert res.binary_reference_parallel_rows_per_s is not None
    assert res.vs_binary_reference_parallel == pytest.approx(
        res.msgs_per_s / res.binary_reference_parallel_rows_per_s
    )
    assert pg_value(dsn, "SELECT count(*) FROM bench_telemetry WHERE run LIKE '%-bin%'") == 0
    assert "binary reference rows/s" in table and "vs binary reference x2" in table
    assert f"{res.vs_binary_reference:.2f}x" in table


@pytest.mark.pg
def test_ingest_duration_run_without_reference(ingest_server: tuple[Any, str]) -> None:
    """--duration: publishers stop at the deadline; every message sent is a row."""
    srv, dsn = ingest_server
    res = run(
        ingest_plan(srv.port, messages=None, duration=0.3, publishers=2, batch=32),
        dsn=dsn,
        reference=False,
    )
    assert res.errors == [] and res.notes == []
    assert res.sent > 0
    assert res.acked == res.sent
    assert (res.rows, res.unique_rows, res.lost, res.duplicates) == (res.sent, res.sent, 0, 0)
    assert res.reference_rows_per_s is None and res.vs_reference is None
    assert "reference" not in format_table([res])


@pytest.mark.pg
def test_ingest_counting_a_missing_table_fails_cleanly(ingest_server: tuple[Any, str]) -> None:
    srv, dsn = ingest_server
    with pytest.raises(BenchFailed, match="counting the rows in no_such_table"):
        run(ingest_plan(srv.port, messages=10, publishers=1), dsn=dsn, table="no_such_table")


@pytest.mark.pg
def test_ingest_reference_skipped_for_a_column_it_cannot_fill(
    ingest_server: tuple[Any, str],
) -> None:
    srv, dsn = ingest_server
    pg_value(dsn, "ALTER TABLE bench_telemetry ADD COLUMN spot point")
    try:
        res = run(ingest_plan(srv.port, messages=50), dsn=dsn)
    finally:
        pg_value(dsn, "ALTER TABLE bench_telemetry DROP COLUMN spot")
    assert res.errors == []
    assert (res.rows, res.lost) == (200, 0)
    assert res.reference_rows_per_s is None and res.vs_reference is None
    assert len(res.notes) == 1
    assert "reference skipped" in res.notes[0] and "'spot'" in res.notes[0]
    assert "point" in res.notes[0]
    assert "note (" in format_table([res])
    # PostgreSQL encodes the binary reference's rows itself: any column type will do.
    assert res.binary_reference_rows_per_s is not None
    assert res.binary_reference_parallel_rows_per_s is not None
    assert res.reference_batch == 5000


@pytest.mark.pg
def test_ingest_cli_reference_and_no_reference(ingest_server: tuple[Any, str]) -> None:
    srv, dsn = ingest_server
    common = [
        "--port",
        str(srv.port),
        "--scenario",
        "ingest",
        "--publishers",
        "2",
        "--messages",
        "100",
        "--processes",
        "1",
        "--dsn",
        dsn,
        "--no-progress",
    ]
    r = CliRunner().invoke(bench, [*common, "--json", "--reference-batch", "64"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert (data["sent"], data["rows"], data["lost"]) == (200, 200, 0)
    assert data["reference_rows_per_s"] > 0 and data["reference_batch"] == 64
    assert data["vs_reference"] == pytest.approx(data["msgs_per_s"] / data["reference_rows_per_s"])
    assert data["binary_reference_rows_per_s"] > 0 and data["notes"] == []
    assert data["binary_reference_connections"] == 2
    r = CliRunner().invoke(
        bench, [*common, "--json", "--reference-batch", "7", "--reference-connections", "3"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["notes"] == [] and data["binary_reference_connections"] == 3
    assert data["vs_binary_reference_parallel"] == pytest.approx(
        data["msgs_per_s"] / data["binary_reference_parallel_rows_per_s"]
    )
    r = CliRunner().invoke(bench, [*common, "--json", "--reference-connections", "1"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["binary_reference_rows_per_s"] > 0
    assert data["binary_reference_connections"] is None
    assert data["binary_reference_parallel_rows_per_s"] is None
    r = CliRunner().invoke(bench, [*common, "--json", "--no-reference"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert (data["sent"], data["rows"], data["lost"]) == (200, 200, 0)
    assert data["reference_rows_per_s"] is None and data["vs_reference"] is None
    assert data["binary_reference_rows_per_s"] is None and data["vs_binary_reference"] is None
    r = CliRunner().invoke(bench, common)
    assert r.exit_code == 0, r.output
    assert "reference rows/s" in r.output and "vs reference" in r.output
    r = CliRunner().invoke(bench, [*common, "--no-reference"])
    assert r.exit_code == 0, r.output
    assert "rows/s" in r.output and "reference" not in r.output
    # Only the runs' own rows are left.
    assert pg_value(dsn, "SELECT count(*) FROM bench_telemetry WHERE run LIKE '%-ref'") == 0
    assert pg_value(dsn, "SELECT count(*) FROM bench_telemetry WHERE run LIKE '%-bin%'") == 0


@pytest.mark.pg
def test_reference_fills_every_supported_type(ingest_server: tuple[Any, str]) -> None:
    """The reference's values by column type are accepted by COPY; defaults are left alone."""
    import asyncio

    import asyncpg

    from ingestd.bench.database import ReferenceSkipped, measure_reference, reference_records

    _, dsn = ingest_server

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "CREATE TABLE ref_types (id bigserial, run varchar(20), pub smallint,"
                " seq numeric(12, 0), ts timestamptz, a real, b double precision, c integer,"
                " d bigint NOT NULL, e boolean, f jsonb, g json, h bytea, i numeric(4, 2),"
                " j text, k varchar(2), m smallint, n numeric,"
                " dd bigint GENERATED ALWAYS AS (d * 2) STORED,"
                " idn integer GENERATED ALWAYS AS IDENTITY, at timestamptz DEFAULT now(),"
                " other point DEFAULT '(0,0)')"
            )
            cols, recs = await reference_records(conn, "public.ref_types", 700, "r1-ref", 3)
            assert cols == [
                *("run", "pub", "seq", "ts", "a", "b", "c", "d", "e"),
                *("f", "g", "h", "i", "j", "k", "m", "n"),
            ]
            assert len(recs) == 700
            assert len({(r[1], r[2]) for r in recs}) == 700  # distinct (pub, seq)
            assert {r[1] for r in recs} == {0, 1, 2}
            rate = await measure_reference(conn, "public.ref_types", 700, "r1-ref", 3, 250)
            assert rate > 0
            assert await conn.fetchval("SELECT count(*) FROM ref_types") == 0
            assert await conn.fetchval("SELECT max(id) FROM ref_types") is None
            # 700 rows went in (and out) through the serial id.
            assert await conn.fetchval("SELECT last_value FROM ref_types_id_seq") == 700
            with pytest.raises(ReferenceSkipped, match="no rows"):
                await measure_reference(conn, "ref_types", 0, "r1-ref", 3, 250)
            await conn.execute("CREATE TABLE ref_norun (pub integer, seq bigint)")
            with pytest.raises(ReferenceSkipped, match="no column run"):
                await measure_reference(conn, "ref_norun", 10, "r1-ref", 3, 250)
            await conn.execute("CREATE TABLE ref_shortrun (run varchar(4), pub integer)")
            with pytest.raises(ReferenceSkipped, match="column run"):
                await measure_reference(conn, "ref_shortrun", 10, "r1-ref", 3, 250)
            assert await conn.fetchval("SELECT count(*) FROM ref_shortrun") == 0
        finally:
            await conn.execute("DROP TABLE IF EXISTS ref_types, ref_norun, ref_shortrun")
            await conn.close()

    asyncio.run(go())


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


# -- the pre-encoded binary reference ---------------------------------------------------


def _copy_stream(rows: list[list[bytes | None]]) -> bytes:
    """A binary COPY stream built by hand (the format as PostgreSQL documents it)."""
    out = bytearray(b"PGCOPY\n\xff\r\n\x00" + bytes(8))
    for r in rows:
        out += len(r).to_bytes(2, "big")
        for v in r:
            out += (-1).to_bytes(4, "big", signed=True) if v is None else len(v).to_bytes(4, "big")
            out += v or b""
    return bytes(out + b"\xff\xff")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.one_of(st.none(), st.binary(max_size=12)), min_size=0, max_size=4),
        max_size=30,
    ),
    st.integers(1, 8),
)
def test_split_copy_binary_cuts_at_row_boundaries(rows, per) -> None:
    from ingestd.bench.database import split_copy_binary

    parts = split_copy_binary(_copy_stream(rows), per)
    expected = [rows[i : i + per] for i in range(0, len(rows), per)]
    assert parts == [_copy_stream(chunk) for chunk in expected]


def test_split_copy_binary_refuses_a_malformed_stream() -> None:
    from ingestd.bench.database import split_copy_binary

    good = _copy_stream([[b"ab", None], [b"c", b""]])
    with pytest.raises(ValueError, match="not a binary COPY stream"):
        split_copy_binary(b"PGCOPX" + good[6:], 2)
    with pytest.raises(ValueError, match="without its trailer"):
        split_copy_binary(good[:-2], 2)
    with pytest.raises(ValueError, match="inside a row"):
        split_copy_binary(good[:-4], 2)
    with pytest.raises(ValueError, match="at least 1"):
        split_copy_binary(good, 0)


@pytest.mark.pg
def test_binary_reference_sends_what_postgresql_encoded(ingest_server: tuple[Any, str]) -> None:
    """The reference re-sends the run's own rows (PostgreSQL's encoding, any column type,
    NULLs included) under its own run id, counts them, and deletes them again."""
    import asyncio

    import asyncpg

    from ingestd.bench.database import (
        ReferenceSkipped,
        encode_run_rows,
        measure_binary_reference,
    )

    _, dsn = ingest_server

    async def go() -> None:
        conns = [await asyncpg.connect(dsn) for _ in range(3)]
        c = conns[0]
        try:
            await c.execute(
                "CREATE TABLE bin_ref (id bigserial, run text, pub integer, seq bigint,"
                " spot point, doc jsonb, amount numeric(8, 2), at timestamptz DEFAULT now())"
            )
            await c.execute(
                "INSERT INTO bin_ref (run, pub, seq, spot, doc, amount)"
                " SELECT 'r9', g % 4, g / 4, CASE WHEN g % 3 = 0 THEN NULL"
                " ELSE point(g, -g) END, jsonb_build_object('g', g), g / 7.0"
                " FROM generate_series(0, 1234) g"
            )
            cols, data = await encode_run_rows(c, "bin_ref", "r9", "r9-x")
            assert cols == ["run", "pub", "seq", "spot", "doc", "amount"]
            for n, batch in ((1, 100), (3, 7)):
                got = await measure_binary_reference(conns[:n], "bin_ref", "r9", "r9-b", batch)
                assert (got.rows, got.connections) == (1235, n)
                assert got.streams == -(-1235 // batch) and got.rows_per_s > 0
                assert await c.fetchval("SELECT count(*) FROM bin_ref WHERE run = 'r9-b'") == 0
            # What went in was the run's rows, value for value: copy once more and compare.
            from ingestd.bench.database import split_copy_binary

            stream = split_copy_binary(data, 10_000)[0]
            await c.copy_to_table(
                "bin_ref", source=memoryview(stream), columns=cols, format="binary"
            )
            diff = await c.fetchval(
                "SELECT count(*) FROM (SELECT pub, seq, spot::text, doc, amount FROM bin_ref"
                " WHERE run = 'r9' EXCEPT SELECT pub, seq, spot::text, doc, amount FROM bin_ref"
                " WHERE run = 'r9-x') d"
            )
            assert diff == 0
            assert await c.fetchval("SELECT count(*) FROM bin_ref WHERE run = 'r9-x'") == 1235
            with pytest.raises(ReferenceSkipped, match="no rows"):
                await measure_binary_reference(conns[:1], "bin_ref", "nothing", "n-b", 10)
            await c.execute("CREATE TABLE bin_short (run varchar(3), pub integer)")
            with pytest.raises(ReferenceSkipped, match="column run"):
                await measure_binary_reference(conns[:1], "bin_short", "abc", "abc-b", 10)
        finally:
            await c.execute("DROP TABLE IF EXISTS bin_ref, bin_short")
            for x in conns:
                await x.close()

    asyncio.run(go())


def test_tree_cpu_seconds_counts_live_and_reaped_children() -> None:
    """A parent's tree CPU takes in a live child's CPU, and keeps it once the child is reaped.

    Measured in a fresh Python process whose only child is the burner: the test
    process's own tree (servers and tools of other tests starting and ending) would
    move the sum by itself."""
    import json
    import subprocess
    import sys

    probe = (
        "import json, os, subprocess, sys\n"
        "from ingestd.bench.procstat import cpu_seconds, tree_cpu_seconds\n"
        "me = os.getpid()\n"
        "before = tree_cpu_seconds(me)\n"
        "burn = ('import sys, time\\n'\n"
        "        'while time.process_time() < 0.3: pass\\n'\n"
        "        \"print('done', flush=True)\\n\"\n"
        "        'sys.stdin.read()\\n')\n"
        "child = subprocess.Popen([sys.executable, '-c', burn], stdin=subprocess.PIPE,\n"
        "                         stdout=subprocess.PIPE, text=True)\n"
        "ready = child.stdout.readline()\n"
        "own = cpu_seconds(child.pid)\n"
        "alive = tree_cpu_seconds(me)\n"
        "child.stdin.close()\n"
        "child.wait(30)\n"
        "reaped = tree_cpu_seconds(me)\n"
        "print(json.dumps(dict(ready=ready, before=before, own=own, alive=alive,\n"
        "                      reaped=reaped)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    r = json.loads(out.stdout)
    assert r["ready"] == "done\n"
    assert r["own"] >= 0.29
    assert r["alive"] - r["before"] >= r["own"]
    # Reaped: its time moved into the parent's cutime/cstime.
    assert r["reaped"] - r["before"] >= r["own"]


@pytest.mark.pg
def test_ingest_cpu_accounting_with_the_postmaster(ingest_server: tuple[Any, str]) -> None:
    srv, dsn = ingest_server
    backend = pg_value(dsn, "SELECT pg_backend_pid()")
    stat = Path(f"/proc/{backend}/stat")
    # The postmaster is the parent of every backend (a remote server: our own tree instead).
    pg_pid = int(stat.read_text().rsplit(")", 1)[1].split()[1]) if stat.exists() else os.getpid()
    res = run(ingest_plan(srv.port), dsn=dsn, pid=os.getpid(), pg_pid=pg_pid)
    assert res.errors == [] and res.notes == []
    assert (res.rows, res.lost) == (1000, 0)
    assert res.postgres_cpu_s is not None and res.postgres_cpu_s >= 0
    assert res.binary_reference_cpu_s is not None and res.binary_reference_cpu_s >= 0
    assert res.broker_cpu_s is not None
    total = res.broker_cpu_s + res.postgres_cpu_s + res.loadgen_cpu_s
    assert total > 0  # the load generator alone takes CPU
    assert res.cpu_vs_binary_reference == pytest.approx(res.binary_reference_cpu_s / total)
    table = format_table([res])
    assert "PostgreSQL CPU s" in table and "CPU vs binary reference" in table
    assert "binary reference CPU s" in table
    # Without pg_pid there is no PostgreSQL accounting.
    res = run(ingest_plan(srv.port, messages=20), dsn=dsn)
    assert res.postgres_cpu_s is None and res.cpu_vs_binary_reference is None
    assert res.binary_reference_cpu_s is None and "PostgreSQL CPU s" not in format_table([res])


def _fake_stat(root: Path, pid: int, ppid: int, ticks: tuple[int, int, int, int]) -> None:
    d = root / str(pid)
    d.mkdir()
    u, s, cu, cs = ticks
    (d / "stat").write_text(
        f"{pid} (post gres) S {ppid} 1 1 0 -1 0 0 0 0 0 {u} {s} {cu} {cs} 20 0\n"
    )


@pytest.mark.parametrize("children_lists", [True, False])
def test_tree_cpu_seconds_from_a_fake_proc(tmp_path: Path, children_lists: bool) -> None:
    """Own + reaped children's + live children's ticks; grandchildren and strangers not.
    With the kernel's children lists, or by scanning parents where there are none."""
    from ingestd.bench.procstat import tree_cpu_seconds

    hz = os.sysconf("SC_CLK_TCK")
    _fake_stat(tmp_path, 10, 1, (100, 20, 300, 40))
    _fake_stat(tmp_path, 11, 10, (5, 6, 700, 800))  # its cutime is not ours
    _fake_stat(tmp_path, 12, 10, (7, 8, 0, 0))
    _fake_stat(tmp_path, 13, 11, (1000, 1000, 0, 0))  # a grandchild
    _fake_stat(tmp_path, 14, 1, (2000, 2000, 0, 0))  # not ours
    if children_lists:
        (tmp_path / "10" / "task" / "10").mkdir(parents=True)
        (tmp_path / "10" / "task" / "10" / "children").write_text("11 12 99 ")  # 99: gone
    assert tree_cpu_seconds(10, tmp_path) == pytest.approx((100 + 20 + 300 + 40 + 11 + 15) / hz)


def test_tree_rss_bytes_adds_the_live_children(tmp_path: Path) -> None:
    """A broker with --workers holds its connections in its children: their VmRSS
    counts; a grandchild, a stranger and a child that is gone or a zombie do not."""
    from ingestd.bench.procstat import rss_bytes, tree_rss_bytes

    for pid, ppid, kb in ((20, 1, 1000), (21, 20, 300), (22, 20, 50), (23, 21, 7000), (24, 1, 9)):
        _fake_stat(tmp_path, pid, ppid, (0, 0, 0, 0))
        (tmp_path / str(pid) / "status").write_text(f"Name:\tx\nVmRSS:\t  {kb} kB\n")
    _fake_stat(tmp_path, 25, 20, (0, 0, 0, 0))
    (tmp_path / "25" / "status").write_text("Name:\tzombie\n")
    (tmp_path / "20" / "task" / "20").mkdir(parents=True)
    (tmp_path / "20" / "task" / "20" / "children").write_text("21 22 25 99")  # 99: gone
    assert tree_rss_bytes(20, tmp_path) == (1000 + 300 + 50) * 1024
    assert tree_rss_bytes(22, tmp_path) == rss_bytes(22, tmp_path) == 50 * 1024


def test_runqueue_wait_from_a_fake_proc(tmp_path: Path) -> None:
    """The second field of /proc/PID/schedstat (ns waiting on a run queue), in seconds;
    None where the kernel keeps no scheduler statistics."""
    from ingestd.bench.procstat import runqueue_wait_seconds

    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "schedstat").write_text("4078086380 4776969223 87045\n")
    assert runqueue_wait_seconds(10, tmp_path) == pytest.approx(4.776969223)
    assert runqueue_wait_seconds(11, tmp_path) is None
