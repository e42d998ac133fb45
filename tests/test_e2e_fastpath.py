"""The inbound fast path through the real broker and real PostgreSQL.

PUBLISHes whose topic only ingest routes take are handled a run at a time by
ingestd._inbound (see its module comment). These tests send such runs in one
write (a raw client, so one read holds many PUBLISHes) and with paho, mix in
packets that must leave the fast path, and check rows, acks and deliveries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from mqtt_clients import Client
from pg_fixtures import config_from_toml, fetch_sync, wait_rows
from rawmqtt import Raw, connect_v4, connect_v5, packet, publish, s
from server_thread import ServerThread

ROUTES = """
[server]
http_listen = ""
[presence]
enabled = false

[[routes]]
name = "rows"
topic = "fp/{dev}/t"
table = "fp_rows"
[routes.columns]
dev = "topic.dev"
seq = "payload.seq::bigint"
who = "client_id"
note = "user_property.note"

[[routes]]
name = "state_a"
topic = "st/a"
table = "fp_state"
kind = "latest"
key = ["id"]
[routes.columns]
id = "payload.id::bigint"
v = "payload.v::bigint"

[[routes]]
name = "state_b"
topic = "st/b"
table = "fp_state"
kind = "latest"
key = ["id"]
[routes.columns]
id = "payload.id::bigint"
v = "payload.v::bigint"
"""


def start(pg_dsn, tmp_path, ingest=None, **mqtt):
    cfg = config_from_toml(ROUTES, tmp_path, pg_dsn, mqtt=mqtt, ingest=ingest or {})
    cfg.server.listen = ["127.0.0.1:0"]
    return ServerThread(cfg, database=True).start()


def taken(srv) -> int:
    """PUBLISHes the open connections' fast paths have handled."""
    return srv.call(
        # (a connection that has not published since its last keepalive tick has no inbound)
        lambda: sum(c.inbound.taken for c in srv.app.broker.connections if c.inbound is not None)
    )


def body(seq: int) -> bytes:
    return json.dumps({"seq": seq}).encode()


def read_acks(r: Raw, n: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    while len(got) < n:
        got.append(r.read_packet())
    return got


def test_run_in_one_write_is_stored_and_acked_in_order(pg_dsn, tmp_path):
    srv = start(pg_dsn, tmp_path)
    try:
        r = Raw(srv.port)
        r.send(connect_v4("fp-raw"))
        assert r.read_packet() == (0x20, b"\x00\x00")
        # 300 QoS 1 and 100 QoS 0 PUBLISHes, interleaved, in one write.
        data = b""
        pids = []
        for seq in range(400):
            if seq % 4 == 3:
                data += publish(f"fp/d{seq % 3}/t", body(seq), qos=0, v5=False)
            else:
                pid = len(pids) + 1
                pids.append(pid)
                data += publish(f"fp/d{seq % 3}/t", body(seq), qos=1, pid=pid, v5=False)
        r.send(data)
        acks = read_acks(r, len(pids))
        # every PUBACK, in the order of the PUBLISHes [MQTT-4.6.0-2], after its commit
        assert acks == [(0x40, pid.to_bytes(2, "big")) for pid in pids]
        # acknowledged = committed (QoS 0 ones after the last QoS 1 may still be on the way)
        assert fetch_sync(pg_dsn, "SELECT count(*) FROM fp_rows")[0][0] >= len(pids)
        assert taken(srv) > 1  # the runs took the fast path
        stats = srv.call(lambda: srv.app.broker.stats)
        assert stats.messages_fast_path == taken(srv)  # the broker-wide counter agrees
        r.sock.close()
        wait_rows(pg_dsn, "SELECT count(*) FROM fp_rows", until=lambda r: r[0][0] == 400)
        rows = fetch_sync(pg_dsn, "SELECT dev, seq, who FROM fp_rows ORDER BY seq")
        assert [(x[0], x[1], x[2]) for x in rows] == [
            (f"d{seq % 3}", seq, "fp-raw") for seq in range(400)
        ]
    finally:
        srv.stop()


def test_a_subscriber_joining_an_ingest_topic_gets_what_follows(pg_dsn, tmp_path):
    srv = start(pg_dsn, tmp_path)
    try:
        pub = Client(srv.port, version=4)
        for seq in range(20):
            pub.publish("fp/x/t", body(seq), qos=1)
        assert taken(srv) >= 20  # ingest-only topic: the fast path, cached
        sub = Client(srv.port)
        sub.subscribe("fp/+/t", qos=1)
        for seq in range(20, 40):
            pub.publish("fp/x/t", body(seq), qos=1)
        got = sub.expect(20)
        assert [json.loads(m.payload)["seq"] for m in got] == list(range(20, 40))
        sub.unsubscribe("fp/+/t")
        before = taken(srv)
        for seq in range(40, 60):
            pub.publish("fp/x/t", body(seq), qos=1)
        sub.expect_nothing()
        assert taken(srv) - before == 20  # back on the fast path
        rows = fetch_sync(pg_dsn, "SELECT seq FROM fp_rows ORDER BY seq")
        assert [x[0] for x in rows] == list(range(60))
        pub.disconnect()
        sub.disconnect()
    finally:
        srv.stop()


def test_latest_table_keeps_the_last_message_of_a_mixed_run(pg_dsn, tmp_path):
    """Two routes of one latest table on two topics, interleaved in one read: the state
    left is the last message's, as if they had been handled one by one."""
    srv = start(pg_dsn, tmp_path)
    try:
        r = Raw(srv.port)
        r.send(connect_v4("fp-state"))
        assert r.read_packet() == (0x20, b"\x00\x00")
        seq = [("st/b", 1), ("st/a", 2), ("st/b", 3), ("st/a", 4)]
        data = b"".join(
            publish(t, json.dumps({"id": 1, "v": v}).encode(), qos=1, pid=k + 1, v5=False)
            for k, (t, v) in enumerate(seq)
        )
        r.send(data)
        assert [p[0] for p in read_acks(r, 4)] == [0x40] * 4
        assert fetch_sync(pg_dsn, "SELECT id, v FROM fp_state")[0][1] == 4
        r.sock.close()
    finally:
        srv.stop()


def test_packets_that_must_leave_the_fast_path_keep_their_meaning(pg_dsn, tmp_path):
    """In one write: fast PUBLISHes around a retained one, a QoS 2 one and a v5 one with a
    user property. Each is stored; the retained one is kept; the QoS 2 one gets PUBREC."""
    srv = start(pg_dsn, tmp_path)
    try:
        r = Raw(srv.port)
        r.send(connect_v5("fp-v5"))
        first, _ = r.read_packet()
        assert first == 0x20
        user_prop = b"\x26" + s("note") + s("hello")
        with_prop = packet(
            0x32,
            s("fp/p/t") + (4).to_bytes(2, "big") + bytes([len(user_prop)]) + user_prop + body(3),
        )
        data = (
            publish("fp/p/t", body(0), qos=1, pid=1)
            + packet(0x33, s("fp/p/t") + (2).to_bytes(2, "big") + b"\x00" + body(1))  # retain
            + publish("fp/p/t", body(2), qos=2, pid=3)
            + with_prop
            + publish("fp/p/t", body(4), qos=1, pid=5)
        )
        r.send(data)
        got = read_acks(r, 5)
        assert [(f, b[:2]) for f, b in got] == [
            (0x40, b"\x00\x01"),
            (0x40, b"\x00\x02"),
            (0x50, b"\x00\x03"),
            (0x40, b"\x00\x04"),
            (0x40, b"\x00\x05"),
        ]
        r.send(packet(0x62, b"\x00\x03"))  # PUBREL
        assert r.read_packet()[0] == 0x70
        wait_rows(pg_dsn, "SELECT count(*) FROM fp_rows", until=lambda r: r[0][0] == 5)
        rows = fetch_sync(pg_dsn, "SELECT seq, note FROM fp_rows ORDER BY seq")
        assert [tuple(x) for x in rows] == [
            (0, None),
            (1, None),
            (2, None),
            (3, "hello"),
            (4, None),
        ]
        sub = Client(srv.port)
        sub.subscribe("fp/p/t", qos=1)
        (kept,) = sub.expect(1)
        assert kept.retain and json.loads(kept.payload) == {"seq": 1}
        sub.disconnect()
        r.sock.close()
    finally:
        srv.stop()


def test_v5_receive_maximum_still_enforced_on_fast_publishes(pg_dsn, tmp_path):
    srv = start(pg_dsn, tmp_path, receive_maximum=5)
    try:
        r = Raw(srv.port)
        r.send(connect_v5("fp-rm"))
        assert r.read_packet()[0] == 0x20
        # after-commit acks cannot leave within this one read: the 6th exceeds 5.
        r.send(b"".join(publish("fp/rm/t", body(k), qos=1, pid=k + 1) for k in range(6)))
        got = r.read_until_closed()
        disconnects = [b for f, b in got if f == 0xE0]
        assert disconnects and disconnects[0][0] == 0x93
        assert len([f for f, _ in got if f == 0x40]) <= 5
    finally:
        srv.stop()


def _v5_publish(topic: str, payload: bytes, pid: int, props: bytes) -> bytes:
    return packet(0x32, s(topic) + pid.to_bytes(2, "big") + bytes([len(props)]) + props + payload)


def test_v5_topic_aliases_and_properties_on_the_fast_path(pg_dsn, tmp_path):
    """One write: a PUBLISH setting alias 1 with a user property, two using it (empty
    topic), one re-pointing it; rows carry the resolved topic and the property."""
    srv = start(pg_dsn, tmp_path)
    try:
        r = Raw(srv.port)
        r.send(connect_v5("fp-alias"))
        assert r.read_packet()[0] == 0x20
        alias1 = b"\x23\x00\x01"
        note = b"\x26" + s("note") + s("n1")
        r.send(
            _v5_publish("fp/a1/t", body(0), 1, alias1 + note)
            + _v5_publish("", body(1), 2, alias1)
            + _v5_publish("", body(2), 3, alias1 + b"\x02\x00\x00\x00\x3c")  # + expiry 60 s
            + _v5_publish("fp/a2/t", body(3), 4, alias1)
            + _v5_publish("", body(4), 5, alias1)
        )
        assert [p[0] for p in read_acks(r, 5)] == [0x40] * 5
        assert taken(srv) == 5
        rows = fetch_sync(pg_dsn, "SELECT seq, dev, note FROM fp_rows ORDER BY seq")
        assert [tuple(x) for x in rows] == [
            (0, "a1", "n1"),
            (1, "a1", None),
            (2, "a1", None),
            (3, "a2", None),
            (4, "a2", None),
        ]
        # An alias used before it is set is still a protocol error (via _on_publish).
        r.send(_v5_publish("", body(5), 6, b"\x23\x00\x07"))
        got = r.read_until_closed()
        assert [b[0] for f, b in got if f == 0xE0] == [0x82]
    finally:
        srv.stop()


def test_fast_path_off_stores_the_same_rows(pg_dsn, tmp_path):
    """ingest.fast_path = false: every PUBLISH goes through _on_publish; same rows, acks."""
    srv = start(pg_dsn, tmp_path, ingest={"fast_path": False})
    try:
        r = Raw(srv.port)
        r.send(connect_v4("fp-off"))
        assert r.read_packet() == (0x20, b"\x00\x00")
        r.send(
            b"".join(publish("fp/off/t", body(k), qos=1, pid=k + 1, v5=False) for k in range(50))
        )
        assert read_acks(r, 50) == [(0x40, (k + 1).to_bytes(2, "big")) for k in range(50)]
        assert taken(srv) == 0
        assert srv.call(lambda: srv.app.broker.stats.messages_fast_path) == 0
        rows = fetch_sync(pg_dsn, "SELECT seq FROM fp_rows ORDER BY seq")
        assert [x[0] for x in rows] == list(range(50))
        r.sock.close()
    finally:
        srv.stop()


JS = Path(__file__).parent / "js"


@pytest.mark.skipif(
    shutil.which("node") is None or not (JS / "node_modules" / "mqtt").exists(),
    reason="node and tests/js/node_modules (npm ci in tests/js) are needed",
)
def test_mqttjs_over_websocket_with_topic_aliases_is_ingested(pg_dsn, tmp_path):
    """An independent client (MQTT.js, MQTT 5 over WebSocket, automatic topic aliases,
    user properties, 500 QoS 1 PUBLISHes in flight at once): every acknowledged one is
    a row with the topic it was aliased to, and the runs took the fast path."""
    cfg = config_from_toml(ROUTES, tmp_path, pg_dsn)
    cfg.server.listen = ["127.0.0.1:0"]
    cfg.server.ws_listen = ["127.0.0.1:0"]
    srv = ServerThread(cfg, database=True).start()
    try:
        node = subprocess.Popen(
            ["node", str(JS / "ingest.mjs"), f"ws://127.0.0.1:{srv.app.port('ws')}/mqtt", "500"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watchdog = threading.Timer(60, node.kill)  # bounded even if node hangs
        watchdog.start()
        try:
            assert node.stdout is not None
            result = json.loads(node.stdout.readline())
            assert result == {"acked": 500}, result
            # MQTT.js replaced the topic by an alias after its first use of each one.
            aliases = srv.call(
                lambda: [dict(c._inbound_aliases) for c in srv.app.broker.connections]
            )
            assert sorted(v for a in aliases for v in a.values()) == [
                "fp/js0/t",
                "fp/js1/t",
                "fp/js2/t",
            ]
        finally:
            _, err = node.communicate(timeout=30)
            watchdog.cancel()
        assert node.returncode == 0, err
        rows = fetch_sync(pg_dsn, "SELECT seq, dev, who, note FROM fp_rows ORDER BY seq")
        assert [tuple(r) for r in rows] == [
            (k, f"js{k % 3}", "js-ingest", f"n{k}" if k % 10 == 0 else None) for k in range(500)
        ]
        assert srv.call(lambda: srv.app.broker.stats.messages_fast_path) == 500
    finally:
        srv.stop()


def test_topic_over_the_limits_leaves_the_run_and_is_refused(pg_dsn, tmp_path):
    """mqtt.max_topic_levels on the fast path: a PUBLISH to a route's topic family that is
    one level too deep, in the middle of a run, is not taken, gets PUBACK 0x90 and no row;
    the packets around it are stored and acked in order."""
    srv = start(pg_dsn, tmp_path, max_topic_levels=3)
    try:
        r = Raw(srv.port)
        r.send(connect_v5("fp-deep"))
        ptype, _ = r.read_packet()
        assert ptype == 0x20
        data = publish("fp/a/t", body(1), qos=1, pid=1)
        data += publish("fp/a/t/x", body(2), qos=1, pid=2)  # 4 levels: refused
        data += publish("fp/a/t", body(3), qos=1, pid=3)
        r.send(data)
        acks = read_acks(r, 3)
        codes = {int.from_bytes(b[:2], "big"): (b[2] if len(b) > 2 else 0) for _, b in acks}
        assert [int.from_bytes(b[:2], "big") for _, b in acks] == [1, 2, 3]
        assert codes == {1: 0, 2: 0x90, 3: 0}
        rows = wait_rows(
            pg_dsn, "SELECT seq FROM fp_rows ORDER BY seq", until=lambda x: len(x) == 2
        )
        assert [x[0] for x in rows] == [1, 3]
        assert srv.call(lambda: dict(srv.app.broker.stats.limits_hit)) == {"max_topic_levels": 1}
        assert taken(srv) == 2  # 1 and 3 on the fast path, 2 through _on_publish
        r.sock.close()
    finally:
        srv.stop()
