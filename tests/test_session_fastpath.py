"""The compiled delivery path through the real broker, with real clients.

A run of PUBLISHes whose topic only plain session subscriptions take is routed
by ``ingestd._inbound`` (``Inbound.take`` with a ``SessionTarget``) instead of
``Channel._on_publish`` + ``Router.publish``; a run of PUBACKs from one read is
applied by ``take_pubacks`` and pumped once. These tests send runs in one write
(a raw client, so one read holds many packets) or with paho / mosquitto_sub, and
check that what subscribers get is what the per-message path gives: order,
granted QoS, subscription identifiers, the read ACL, No Local, ``$`` topics.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ingestd._inbound import READ_BIT

from ingestd.broker.acl import READ
from mqtt_clients import WAIT, Client
from pg_fixtures import fetch_sync, wait_for
from rawmqtt import Raw, connect_v4, connect_v5, packet, publish, s, split_packets
from server_thread import ServerThread
from test_persistence import config, journal_rows


def routed(srv: Any) -> int:
    """PUBLISHes the open connections' fast paths have delivered to sessions."""
    return srv.call(
        lambda: sum(c.inbound.routed for c in srv.app.broker.connections if c.inbound is not None)
    )


def read_n(r: Raw, n: int) -> list[tuple[int, bytes]]:
    return [r.read_packet() for _ in range(n)]


def v5_publish(body: bytes) -> tuple[str, dict[int, int], bytes]:
    """Topic, properties (Message Expiry 0x02 and Topic Alias 0x23 only) and payload of
    a v5 QoS 1 PUBLISH body whose properties are shorter than 128 bytes."""
    tlen = int.from_bytes(body[:2], "big")
    topic = body[2 : 2 + tlen].decode()
    plen = body[4 + tlen]
    raw = body[5 + tlen : 5 + tlen + plen]
    props: dict[int, int] = {}
    i = 0
    while i < len(raw):
        ident = raw[i]
        width = {0x02: 4, 0x23: 2}[ident]
        props[ident] = int.from_bytes(raw[i + 1 : i + 1 + width], "big")
        i += 1 + width
    return topic, props, body[5 + tlen + plen :]


def test_read_bit_agrees_with_the_acl_module() -> None:
    assert READ_BIT == READ


def test_run_in_one_write_reaches_every_session_in_order(server: Any) -> None:
    # v3.1.1 at QoS 1, v5 at QoS 0 with a subscription identifier (downgraded copies).
    sub4 = Client(server.port, version=4)
    sub4.subscribe("company/+/machine/+/telemetry", 1)
    sub5 = Client(server.port, version=5)
    sub5.subscribe("company/#", 0, sub_id=42)
    r = Raw(server.port)
    r.send(connect_v4("fp-sess-pub"))
    assert r.read_packet() == (0x20, b"\x00\x00")
    sent = []
    data = b""
    pids = []
    for k in range(400):
        topic = f"company/c{k % 3}/machine/{k % 5}/telemetry"
        qos = 0 if k % 4 == 3 else 1
        pid = 0
        if qos:
            pid = len(pids) + 1
            pids.append(pid)
        data += publish(topic, b"m%d" % k, qos=qos, pid=pid, v5=False)
        sent.append((topic, b"m%d" % k, qos))
    r.send(data)
    assert read_n(r, len(pids)) == [(0x40, pid.to_bytes(2, "big")) for pid in pids]
    # In arrival order per QoS (a QoS 0 copy is written at once, a QoS 1 one may wait in
    # the session queue behind the inflight window: the per-message path does the same).
    got4 = [(m.topic, m.payload, m.qos) for m in sub4.expect(400)]
    for qos in (0, 1):
        assert [g for g in got4 if g[2] == qos] == [x for x in sent if x[2] == qos]
    got5 = sub5.expect(400)  # granted QoS 0: every copy downgraded, all in order
    assert [(m.topic, m.payload, m.qos) for m in got5] == [(t, p, 0) for t, p, _ in sent]
    assert {tuple(m.properties.SubscriptionIdentifier) for m in got5} == {(42,)}
    assert routed(server) == 400  # every one took the compiled path
    stats = server.call(lambda: server.app.broker.stats)
    assert stats.messages_fast_path == 0  # (that counter is the ingest routes')
    # written by the compiled session (v3.1.1) or Channel.send_publish (the v5 copies
    # carry a subscription identifier): each counted once, at the QoS it went out with
    assert stats.messages_delivered == [100 + 400, 300, 0]
    sub4.expect_nothing()
    sub5.expect_nothing()


def test_overlapping_subscriptions_are_one_delivery_with_every_id(server: Any) -> None:
    sub = Client(server.port)
    sub.subscribe("ov/#", 0, sub_id=7)
    sub.subscribe("ov/+", 1, sub_id=9)
    pub = Client(server.port, version=4)
    pub.publish("ov/x", b"p", 1)
    [m] = sub.expect()
    assert (m.topic, m.qos) == ("ov/x", 1)
    assert sorted(m.properties.SubscriptionIdentifier) == [7, 9]
    assert routed(server) == 1
    sub.expect_nothing()


def test_no_local_and_dollar_topics_stay_on_the_python_path(server: Any) -> None:
    me = Client(server.port)
    me.subscribe("nl/t", 1, noLocal=True)
    other = Client(server.port)
    other.subscribe("nl/t", 1)
    other.subscribe("$app/x", 1)
    me.publish("nl/t", b"1", 1)
    me.publish("$app/x", b"2", 1)
    assert [(m.topic, m.payload) for m in other.expect(2)] == [("nl/t", b"1"), ("$app/x", b"2")]
    assert routed(server) == 0
    me.expect_nothing()  # No Local kept (its barrier, on a private topic, is routed)


def test_read_acl_is_checked_per_delivery(tmp_path: Path, server_factory: Any) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic write fa/#\ntopic read fa/open/#\n")
    srv = server_factory(acl_file=str(acl))
    sub = Client(srv.port, version=4)
    sub.subscribe("fa/#", 1)  # granted; each delivery is checked against read
    r = Raw(srv.port)
    r.send(connect_v4("fp-acl-pub"))
    assert r.read_packet() == (0x20, b"\x00\x00")
    data = b"".join(
        publish(f"fa/{'open' if k % 2 else 'closed'}/{k}", b"%d" % k, qos=1, pid=k + 1, v5=False)
        for k in range(20)
    )
    r.send(data)
    assert read_n(r, 20) == [(0x40, (k + 1).to_bytes(2, "big")) for k in range(20)]
    got = [m.topic for m in sub.expect(10)]
    assert got == [f"fa/open/{k}" for k in range(1, 20, 2)]
    assert srv.call(lambda: srv.app.broker.stats.acl_denied_read) == 10
    assert routed(srv) == 20


def test_message_expiry_and_outbound_topic_alias(server: Any) -> None:
    # A raw v5 subscriber that allows 4 topic aliases: the second delivery of a topic
    # carries the alias and an empty topic; the Message Expiry Interval is forwarded.
    sub = Raw(server.port)
    sub.send(connect_v5("fp-alias-sub", props=b"\x22\x00\x04"))  # Topic Alias Maximum 4
    assert sub.read_packet()[0] == 0x20
    sub.send(packet(0x82, (1).to_bytes(2, "big") + b"\x00" + s("al/t") + b"\x01"))
    assert sub.read_packet() == (0x90, b"\x00\x01\x00\x01")
    pub = Raw(server.port)
    pub.send(connect_v5("fp-alias-pub"))
    assert pub.read_packet()[0] == 0x20
    expiry = b"\x02\x00\x00\x0e\x10"  # Message Expiry Interval 3600
    body = s("al/t") + (1).to_bytes(2, "big") + bytes([len(expiry)]) + expiry + b"one"
    body2 = s("al/t") + (2).to_bytes(2, "big") + b"\x00" + b"two"
    pub.send(packet(0x32, body) + packet(0x32, body2))
    assert read_n(pub, 2) == [(0x40, b"\x00\x01"), (0x40, b"\x00\x02")]
    (f1, b1), (f2, b2) = read_n(sub, 2)
    assert f1 == 0x32 and f2 == 0x32
    topic1, props1, payload1 = v5_publish(b1)
    assert (topic1, payload1, props1[0x23]) == ("al/t", b"one", 1)
    assert 3590 <= props1[0x02] <= 3600  # the interval left, as the publisher set it
    topic2, props2, payload2 = v5_publish(b2)
    assert (topic2, payload2, props2) == ("", b"two", {0x23: 1})  # the alias alone
    assert routed(server) == 2


def test_acks_of_a_small_window_flow_in_runs(server_factory: Any) -> None:
    """A v5 subscriber with Receive Maximum 5 that acknowledges what it got in one write:
    each run of PUBACKs frees the window and the queue behind it is sent, in order."""
    srv = server_factory()
    sub = Raw(srv.port)
    sub.send(connect_v5("fp-window", props=b"\x21\x00\x05"))  # Receive Maximum 5
    assert sub.read_packet()[0] == 0x20
    sub.send(packet(0x82, (1).to_bytes(2, "big") + b"\x00" + s("win/+") + b"\x01"))
    assert sub.read_packet() == (0x90, b"\x00\x01\x00\x01")
    pub = Client(srv.port, version=4)
    for k in range(60):
        pub.c.publish(f"win/{k % 4}", b"%d" % k, 1)
    pub.barrier()
    got: list[bytes] = []
    while len(got) < 60:
        batch = [sub.read_packet()]
        # what is already here arrived together: acknowledge it in one write
        batch += split_packets(sub.buf)
        sub.buf = b""
        acks = b""
        for first, body in batch:
            assert first & 0xF0 == 0x30 and (first >> 1) & 3 == 1
            tlen = int.from_bytes(body[:2], "big")
            pid = body[2 + tlen : 4 + tlen]
            got.append(body[4 + tlen + 1 :])
            acks += packet(0x40, pid)
        assert len(batch) <= 5  # never more in flight than the window
        sub.send(acks)
    assert got == [b"%d" % k for k in range(60)]
    session = srv.call(lambda: srv.app.broker.registry.sessions["fp-window"])
    assert srv.call(lambda: (len(session.inflight), len(session.queue or ()))) == (0, 0)


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs mosquitto_sub")
def test_mosquitto_sub_gets_a_paho_run(server: Any) -> None:
    cmd = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(server.port), "-t", "mo/#", "-q", "1"]
    proc = subprocess.Popen(
        [*cmd, "-C", "100", "-V", "mqttv311"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: server.call(
                lambda: any(
                    "mo/#" in sess.subscriptions
                    for sess in server.app.broker.registry.sessions.values()
                )
            ),
            "mosquitto_sub's subscription",
            WAIT,
        )
        pub = Client(server.port, version=5)
        for k in range(100):
            pub.c.publish(f"mo/{k % 7}", b"%d" % k, 1)
        out, _ = proc.communicate(timeout=WAIT * 3)
        assert out.split() == [str(k) for k in range(100)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sessions_and_the_default_route_with_ack_after_journal(pg_dsn: str, tmp_path: Path) -> None:
    """A topic an offline persistent session and the default ingest route both take:
    one run delivers to the session (journaled) and hands the messages to the route;
    each PUBACK waits for the journal's commit (the write-behind interval is long, so an
    early ack would find no row)."""
    cfg = config(tmp_path, pg_dsn)
    cfg.persistence.flush_interval_ms = 1500.0
    cfg.persistence.ack_after_journal = True
    srv = ServerThread(cfg, database=True).start()
    try:
        dev = Client(srv.port, client_id="fpj-dev", session_expiry=3600)
        dev.subscribe("cmd/fpj-dev/#", 1)
        dev.disconnect()
        r = Raw(srv.port)
        r.send(connect_v4("fpj-pub"))
        assert r.read_packet() == (0x20, b"\x00\x00")
        r.send(
            b"".join(
                publish(f"cmd/fpj-dev/{k}", b'{"k":%d}' % k, qos=1, pid=k + 1, v5=False)
                for k in range(3)
            )
        )
        assert read_n(r, 3) == [(0x40, (k + 1).to_bytes(2, "big")) for k in range(3)]
        assert len(fetch_sync(pg_dsn, journal_rows("fpj-dev"))) == 3
        assert routed(srv) == 3
        taken = srv.call(
            lambda: sum(c.inbound.taken for c in srv.app.broker.connections if c.inbound)
        )
        assert taken == 3  # handed to the default route's batch in the same run
        rows = "SELECT topic FROM messages WHERE topic LIKE 'cmd/fpj-dev/%' ORDER BY topic"
        wait_for(lambda: len(fetch_sync(pg_dsn, rows)) == 3, "the default route's rows", WAIT)
        # the session gets them, in order, when it comes back
        back = Client(srv.port, client_id="fpj-dev", session_expiry=3600, clean_start=False)
        assert [m.payload for m in back.expect(3)] == [b'{"k":%d}' % k for k in range(3)]
        back.disconnect()
    finally:
        srv.stop()


def test_a_delivery_is_not_tracked_by_the_cyclic_gc() -> None:
    """A backlog of queued deliveries must not be traversed by every full collection
    (its Message is untracked too); a Session, which can be in cycles, is tracked."""
    import gc

    from ingestd.broker.message import Message
    from ingestd.broker.session import Delivery, Session

    d = Delivery(Message("t", b"x", 1), 1, False, [3])
    assert not gc.is_tracked(d)
    assert d.sub_ids == [3] and d.message.topic == "t"
    assert gc.is_tracked(Session("c", None, 10, 1000))
