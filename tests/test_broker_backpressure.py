"""A subscriber that never reads must not stall publishers, lose acknowledged QoS 1
messages, or grow memory without bound.

The contract (docs/architecture.md, "What is bounded"): QoS 0 past a connection's
outbound bound is dropped and counted; QoS 1/2 past a session's memory queue waits
on disk (the session overflow), in order, and is delivered when the client reads.
"""

from __future__ import annotations

import time
from pathlib import Path

from mqtt_clients import Client
from rawmqtt import Raw, connect_v5, packet, s

QOS1 = 300


class Reader:
    """Reads a raw v5 subscriber's PUBLISHes incrementally, acknowledging QoS 1."""

    def __init__(self, raw: Raw) -> None:
        self.raw = raw
        self.buf = bytearray(raw.buf)
        self.pos = 0

    def _packet(self) -> tuple[int, bytes] | None:
        buf, i = self.buf, self.pos
        if i >= len(buf):
            return None
        j, mult, length = i + 1, 1, 0
        while True:
            if j >= len(buf):
                return None
            b = buf[j]
            j += 1
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        if j + length > len(buf):
            return None
        self.pos = j + length
        return buf[i], bytes(buf[j : j + length])

    def publishes(self, topic: str, n: int, timeout: float = 60) -> list[bytes]:
        """Payloads of the first ``n`` QoS 1 PUBLISHes on ``topic`` (others are skipped)."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        sock = self.raw.sock
        while len(got) < n:
            pkt = self._packet()
            if pkt is None:
                assert time.monotonic() < deadline, f"got {len(got)} of {n}"
                del self.buf[: self.pos]
                self.pos = 0
                try:
                    data = sock.recv(1 << 20)
                except TimeoutError:
                    continue
                assert data, "closed"
                self.buf += data
                continue
            first, body = pkt
            if first >> 4 != 3:
                continue
            qos = (first >> 1) & 3
            tlen = int.from_bytes(body[:2], "big")
            t = body[2 : 2 + tlen].decode()
            i = 2 + tlen
            pid = 0
            if qos:
                pid = int.from_bytes(body[i : i + 2], "big")
                i += 2
            # properties: a varint length, then that many bytes
            plen, mult = 0, 1
            while True:
                b = body[i]
                i += 1
                plen += (b & 0x7F) * mult
                mult *= 128
                if not b & 0x80:
                    break
            payload = body[i + plen :]
            if qos == 1:
                sock.sendall(packet(0x40, pid.to_bytes(2, "big")))
                if t == topic:
                    got.append(payload)
        return got


def test_stalled_subscriber_is_bounded_and_others_keep_flowing(server_factory, tmp_path):
    bound = 64 * 1024
    srv = server_factory(max_outbound_bytes=bound, max_queued_messages=100, queue_pool_bytes=0)
    # A raw subscriber that subscribes (QoS 0 and QoS 1) and then does not read its socket.
    stalled = Raw(srv.port)
    stalled.send(connect_v5("stalled"))
    assert stalled.read_packet()[0] == 0x20
    stalled.send(packet(0x82, b"\x00\x01\x00" + s("flood/q0") + b"\x00" + s("flood/q1") + b"\x01"))
    assert stalled.read_packet()[0] == 0x90
    healthy = Client(srv.port)
    healthy.subscribe("flood/#", 1)
    pub = Client(srv.port)
    payload = b"x" * 1000
    n = 20_000  # ~20 MB, far beyond the kernel's socket buffers
    for _ in range(n):
        pub.c.publish("flood/q0", payload, 0)
    # The publisher is never blocked: each QoS 1 publish is acknowledged (Client.publish
    # waits for its PUBACK) while the stalled subscriber reads nothing.
    for i in range(QOS1):
        pub.publish("flood/q1", str(i).encode(), 1)
    # The healthy subscriber gets every QoS 1 message, in order. (Its QoS 0 copies may be
    # dropped at its own outbound bound; its QoS 1 ones wait in its session, never dropped.)
    q1 = []
    while len(q1) < QOS1:
        m = healthy.messages.get(timeout=30)
        if m.topic == "flood/q1":
            q1.append(int(m.payload))
    assert q1 == list(range(QOS1))

    def state():
        b = srv.app.broker
        sess = b.sessions["stalled"]
        return (
            sess.connection.port.get_write_buffer_size(),  # not yet flushed + the transport's
            len(sess.queue or ()),
            len(sess.inflight),
            len(sess.overflow or ()),
            dict(b.stats.dropped),
        )

    buffered, queued, inflight, overflowed, dropped = srv.call(state)
    # Memory held for the stalled subscriber stays within its bounds ...
    assert buffered <= bound + len(payload) + 64  # at most one packet past the bound
    assert queued <= 100
    assert inflight <= 256
    # ... every QoS 1 message is kept (the rest of them on disk) ...
    assert queued + inflight + overflowed == QOS1
    assert overflowed >= QOS1 - 100 - inflight > 0
    assert dropped.get("session_queue_full", 0) == 0
    assert dropped.get("overflow_full", 0) == 0
    # ... and QoS 0 past the outbound bound was dropped and counted.
    assert dropped.get("qos0_queue_full", 0) > 0

    # When the stalled subscriber finally reads, it gets every QoS 1 message in order.
    stalled.sock.settimeout(1.0)
    got = Reader(stalled).publishes("flood/q1", QOS1)
    assert [int(p) for p in got] == list(range(QOS1))

    def drained():
        b = srv.app.broker
        sess = b.sessions["stalled"]
        return len(sess.overflow or ()), b.overflow.used_bytes

    deadline = time.monotonic() + 10
    while srv.call(drained) != (0, 0):
        assert time.monotonic() < deadline, srv.call(drained)
        time.sleep(0.02)
    assert not any((tmp_path / "overflow").rglob("*.seg"))
    stalled.sock.close()


def publish_n(port: int, topic: str, n: int, size: int = 100) -> None:
    pub = Client(port)
    for i in range(n):
        pub.c.publish(topic, str(i).encode().ljust(size, b"."), 1)
    pub.publish(topic + "/end", b"", 1)  # acknowledged after everything before it
    pub.disconnect()


def offline_session(port: int, client_id: str, topic: str) -> None:
    dev = Client(port, client_id=client_id, session_expiry=3600)
    dev.subscribe(topic, 1)
    dev.disconnect()


def seqs(messages) -> list[int]:
    return [int(m.payload.rstrip(b".")) for m in messages]


def test_offline_session_overflows_to_disk_and_gets_everything_in_order(server_factory, tmp_path):
    srv = server_factory(max_queued_messages=50, queue_pool_bytes=0)
    offline_session(srv.port, "dev-ovf", "cmd/#")
    publish_n(srv.port, "cmd/x", 2000)

    def state():
        b = srv.app.broker
        sess = b.sessions["dev-ovf"]
        return len(sess.queue or ()), len(sess.overflow or ()), dict(b.stats.dropped)

    queued, overflowed, dropped = srv.call(state)
    assert queued == 50 and overflowed == 2001 - 50
    assert dropped == {}
    assert any((tmp_path / "overflow").rglob("*.seg"))  # past the 64 KiB write buffer
    dev = Client(srv.port, client_id="dev-ovf", session_expiry=3600, clean_start=False)
    assert dev.session_present
    got = dev.expect(2001)
    assert seqs(got[:-1]) == list(range(2000)) and got[-1].topic == "cmd/x/end"
    dev.expect_nothing()
    assert srv.call(state) == (0, 0, {})
    assert not any((tmp_path / "overflow").rglob("*.seg"))


def test_a_session_that_ends_removes_its_overflow_files(server_factory, tmp_path):
    srv = server_factory(max_queued_messages=10, queue_pool_bytes=0)
    offline_session(srv.port, "dev-end", "cmd/#")
    publish_n(srv.port, "cmd/x", 2000)
    assert any((tmp_path / "overflow").rglob("*.seg"))
    # Clean Start discards the old session: its disk queue goes with it.
    dev = Client(srv.port, client_id="dev-end", clean_start=True)
    assert not dev.session_present
    b = srv.app.broker
    assert srv.call(lambda: (b.overflow.used_bytes, b.overflow.used_messages)) == (0, 0)
    assert not any((tmp_path / "overflow").rglob("*.seg"))
    dev.expect_nothing()


def test_overflow_off_keeps_the_memory_bound_as_the_last_word(server_factory, tmp_path):
    srv = server_factory(max_queued_messages=50, overflow_max_bytes=0, queue_pool_bytes=0)
    assert srv.app.broker.overflow is None
    offline_session(srv.port, "dev-off", "cmd/#")
    publish_n(srv.port, "cmd/x", 200)
    b = srv.app.broker
    sess = b.sessions["dev-off"]
    assert srv.call(lambda: (len(sess.queue), sess.overflow, dict(b.stats.dropped))) == (
        50,
        None,
        {"session_queue_full": 151},
    )
    dev = Client(srv.port, client_id="dev-off", session_expiry=3600, clean_start=False)
    assert seqs(dev.expect(50)) == list(range(50))
    dev.expect_nothing()
    assert not (tmp_path / "overflow").exists()


def test_past_the_disk_budget_deliveries_are_dropped_and_counted(server_factory, caplog):
    budget = 20_000
    srv = server_factory(max_queued_messages=10, overflow_max_bytes=budget, queue_pool_bytes=0)
    offline_session(srv.port, "dev-full", "cmd/#")
    publish_n(srv.port, "cmd/x", 500)
    b = srv.app.broker

    def state():
        sess = b.sessions["dev-full"]
        return (
            len(sess.queue),
            len(sess.overflow),
            b.overflow.used_bytes,
            b.stats.dropped.get("overflow_full", 0),
        )

    queued, overflowed, used, full = srv.call(state)
    assert queued == 10
    assert 0 < used <= budget
    assert full > 0 and queued + overflowed + full == 501  # nothing else lost or kept
    assert any("session overflow full" in r.getMessage() for r in caplog.records)
    # What was kept comes out in order: the first ones, a prefix of what was sent (the
    # small final "end" message may still have fitted after the budget refused others).
    dev = Client(srv.port, client_id="dev-full", session_expiry=3600, clean_start=False)
    got = [m for m in dev.expect(queued + overflowed) if m.topic == "cmd/x"]
    assert seqs(got) == list(range(len(got)))
    assert len(got) >= queued + overflowed - 1
    dev.expect_nothing()
    assert srv.call(lambda: b.overflow.used_bytes) == 0


def test_the_memory_pool_takes_a_burst_before_the_disk_and_is_given_back(server_factory, tmp_path):
    # Room in the broker-wide pool for about 300 of the 2,001 deliveries past the
    # session's own 10: those wait in memory, the rest on disk, all in order.
    from ingestd.broker.session import DELIVERY_OVERHEAD

    per = 100 + len("cmd/x") + DELIVERY_OVERHEAD
    srv = server_factory(max_queued_messages=10, queue_pool_bytes=300 * per)
    offline_session(srv.port, "dev-pool", "cmd/#")
    publish_n(srv.port, "cmd/x", 2000)
    b = srv.app.broker

    def state():
        sess = b.sessions["dev-pool"]
        return (len(sess.queue or ()), len(sess.overflow or ()), sess.pooled, b.pool.used,
                b.pool.peak, dict(b.stats.dropped))  # fmt: skip

    queued, overflowed, pooled, used, peak, dropped = srv.call(state)
    assert queued == 10 + 300 and queued + overflowed == 2001
    assert pooled == used == peak == 300 * per
    assert dropped == {}
    dev = Client(srv.port, client_id="dev-pool", session_expiry=3600, clean_start=False)
    got = dev.expect(2001)
    assert seqs(got[:-1]) == list(range(2000)) and got[-1].topic == "cmd/x/end"
    dev.expect_nothing()
    queued, overflowed, pooled, used, peak, dropped = srv.call(state)
    assert (queued, overflowed, pooled, used, dropped) == (0, 0, 0, 0, {})
    assert peak == 300 * per


def test_a_discarded_session_gives_its_pool_share_back(server_factory):
    srv = server_factory(max_queued_messages=10)  # the stock pool: the burst fits
    offline_session(srv.port, "dev-gone", "cmd/#")
    publish_n(srv.port, "cmd/x", 500)
    b = srv.app.broker
    sess = b.sessions["dev-gone"]
    assert srv.call(lambda: (len(sess.queue), len(sess.overflow or ()))) == (501, 0)
    assert srv.call(lambda: b.pool.used) == sess.pooled > 0
    dev = Client(srv.port, client_id="dev-gone", clean_start=True)  # discards the session
    assert not dev.session_present
    assert srv.call(lambda: (b.pool.used, sess.pooled)) == (0, 0)
    dev.expect_nothing()


def test_start_removes_stale_overflow_files(server_factory, tmp_path):
    stale = tmp_path / "overflow" / "q1"
    stale.mkdir(parents=True)
    (stale / "00000000.seg").write_bytes(b"left by a previous process")
    server_factory()
    assert not stale.exists()


def test_overflow_dir_is_configurable(server_factory, tmp_path: Path):
    where = tmp_path / "elsewhere"
    srv = server_factory(max_queued_messages=10, overflow_dir=str(where), queue_pool_bytes=0)
    offline_session(srv.port, "dev-dir", "cmd/#")
    publish_n(srv.port, "cmd/x", 2000)
    assert any(where.rglob("*.seg"))
    assert not (tmp_path / "overflow").exists()
