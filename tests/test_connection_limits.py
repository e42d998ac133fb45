"""mqtt.max_connections and mqtt.max_connections_per_peer: refused with a reason, counted, logged."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt

from mqtt_clients import WAIT, Client
from rawmqtt import Raw, connect_v5


def _connack(srv_port: int, client_id: str, version: int = 5) -> int:
    """Connect one raw client; the CONNACK's reason code (v5) or return code (3.1.1)."""
    raw = Raw(srv_port)
    if version == 5:
        raw.send(connect_v5(client_id))
    else:
        body = (
            b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id.encode()
        )
        raw.send(bytes([0x10, len(body)]) + body)
    ptype, body = raw.read_packet()
    assert ptype == 0x20
    return body[1]  # [flags, code, ...]


def test_max_connections_refuses_past_the_limit_and_counts(server_factory) -> None:
    srv = server_factory(max_connections=2)
    a = Client(srv.port, client_id="a")
    b = Client(srv.port, client_id="b")
    assert _connack(srv.port, "c", 5) == 0x97  # Quota exceeded
    assert _connack(srv.port, "d", 4) == 3  # 3.1.1: server unavailable
    # A client taking over its own session is not refused.
    again = Client(srv.port, client_id="a")
    again.subscribe("t", 1)
    b.publish("t", b"x", 1)
    assert [m.payload for m in again.expect()] == [b"x"]
    hits = srv.call(lambda: dict(srv.app.broker.stats.limits_hit))
    assert hits == {"max_connections": 2}
    # A slot frees when a client leaves.
    b.disconnect()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="c", protocol=mqtt.MQTTv5)
    rcs = []
    c.on_connect = lambda cl, u, f, rc, p: rcs.append(int(rc.value))
    c.connect("127.0.0.1", srv.port)
    c.loop_start()
    try:
        for _ in range(int(WAIT * 20)):
            if rcs:
                break
            time.sleep(0.05)
        assert rcs == [0]
    finally:
        c.disconnect()
        c.loop_stop()
    del a


def test_max_connections_per_peer(server_factory) -> None:
    srv = server_factory(max_connections_per_peer=1)
    first = Client(srv.port, client_id="p1")
    assert _connack(srv.port, "p2", 5) == 0x97
    first.subscribe("u", 0)  # the first connection is untouched
    hits = srv.call(lambda: dict(srv.app.broker.stats.limits_hit))
    assert hits == {"max_connections_per_peer": 1}
