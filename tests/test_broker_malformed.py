"""Malformed and hostile input over raw sockets: one connection closes, nothing else does.

Every expected byte string here is written by hand from the specification.
"""

from __future__ import annotations

import pytest

from mqtt_clients import Client
from rawmqtt import Raw, connect_v4, connect_v5, packet, publish, s, varint

CONNACK_V5_OK_PREFIX = 0x20


def connected_v5(port: int, client_id: str = "raw") -> Raw:
    r = Raw(port)
    r.send(connect_v5(client_id))
    first, body = r.read_packet()
    assert first == 0x20 and body[1] == 0x00, (first, body)
    return r


def disconnect_reason(packets: list[tuple[int, bytes]]) -> int | None:
    for first, body in packets:
        if first == 0xE0:
            return body[0] if body else 0
    return None


CASES = [
    # (id, bytes after a v5 CONNECT, expected DISCONNECT reason)
    (
        "MQTT-3.8.1-1 SUBSCRIBE reserved flags",
        packet(0x80, b"\x00\x01\x00" + s("a") + b"\x00"),
        0x81,
    ),
    ("MQTT-3.3.2-2 wildcard in PUBLISH topic", publish("a/+", b"x"), 0x90),
    ("MQTT-3.3.1-4 PUBLISH QoS 3", packet(0x36, s("a") + b"\x00\x01\x00"), 0x81),
    ("MQTT-1.5.4-1 invalid UTF-8 topic", publish(b"a\xff", b"x"), 0x81),
    ("MQTT-1.5.4-2 U+0000 in topic", publish(b"a\x00b", b"x"), 0x81),
    ("MQTT-2.2.1-3 QoS 1 PUBLISH packet id 0", publish("a", b"x", qos=1, pid=0), 0x82),
    ("MQTT-3.1.0-2 second CONNECT", connect_v5("again"), 0x82),
    ("MQTT-3.8.3-2 SUBSCRIBE without filters", packet(0x82, b"\x00\x01\x00"), 0x82),
    ("MQTT-1.5.5 remaining length over 4 bytes", b"\x30\xff\xff\xff\xff\x01", 0x81),
    (
        "MQTT-2.2.2-2 duplicate property",
        packet(0x30, s("a") + varint(4) + b"\x01\x01\x01\x01" + b"x"),
        0x82,  # "It is a Protocol Error to include the same property more than once"
    ),
    (
        "MQTT-3.3.4-6 subscription identifier in client PUBLISH",
        packet(0x30, s("a") + varint(2) + b"\x0b\x01" + b"x"),
        0x82,
    ),
    ("MQTT-3.3.2-8 topic alias 0", packet(0x30, s("a") + varint(3) + b"\x23\x00\x00" + b"x"), 0x94),
    (
        "MQTT-3.3.2-9 topic alias above maximum",
        packet(0x30, s("a") + varint(3) + b"\x23\x01\x00" + b"x"),
        0x94,
    ),
]


@pytest.mark.parametrize("name,data,reason", CASES, ids=[c[0] for c in CASES])
def test_malformed_closes_only_that_connection(server, name, data, reason):
    bystander = Client(server.port)
    bystander.subscribe("ok/#", 1)
    r = connected_v5(server.port)
    r.send(data)
    got = r.read_until_closed()
    assert disconnect_reason(got) == reason, got
    # the server and other sessions are unaffected
    Client(server.port).publish("ok/1", b"still here", 1)
    assert bystander.expect()[0].payload == b"still here"


def test_packet_too_large_is_refused_from_its_header(server_factory):
    srv = server_factory(max_packet_size=1024)
    r = connected_v5(srv.port)
    # Announce a 2 MB PUBLISH but send only its header: the server must not wait for the body.
    r.send(b"\x30" + varint(2_000_000))
    assert disconnect_reason(r.read_until_closed()) == 0x95


def test_unsupported_protocol_level(server):
    r = Raw(server.port)
    r.send(packet(0x10, s("MQTT") + bytes([6, 2]) + b"\x00\x3c" + s("x")))
    got = r.read_until_closed()
    assert got == [(0x20, b"\x00\x01")]  # 3.1.1 CONNACK, unacceptable protocol version


def test_first_packet_not_connect(server):
    r = Raw(server.port)
    r.send(publish("a", b"x", v5=False))
    assert r.read_until_closed() == []


def test_v3_malformed_just_closes(server):
    r = Raw(server.port)
    r.send(connect_v4("v3raw"))
    assert r.read_packet() == (0x20, b"\x00\x00")
    r.send(publish("a/#", b"x", v5=False))
    assert r.read_until_closed() == []  # 3.1.1 has no DISCONNECT from the server


def test_receive_maximum_exceeded(server_factory):
    srv = server_factory(receive_maximum=5)
    r = connected_v5(srv.port)
    # QoS 2 publishes stay unacknowledged until PUBREL: the sixth exceeds our Receive Maximum.
    for pid in range(1, 7):
        r.send(publish("rm", b"x", qos=2, pid=pid))
    got = r.read_until_closed()
    pubrecs = [body for first, body in got if first == 0x50]
    assert len(pubrecs) == 5
    assert disconnect_reason(got) == 0x93


def test_keepalive_timeout_disconnects_and_publishes_will(server):
    watcher = Client(server.port)
    watcher.subscribe("ka/will", 1)
    # CONNECT v5 keepalive 1 s, will flag + QoS 1 (flags 0b0000_1110), will props empty.
    body = (
        s("MQTT")
        + bytes([5, 0x0E])
        + b"\x00\x01"
        + b"\x00"
        + s("ka-dev")
        + b"\x00"
        + s("ka/will")
        + s(b"timeout")
    )
    r = Raw(server.port)
    r.send(packet(0x10, body))
    assert r.read_packet()[0] == 0x20
    got = r.read_until_closed()  # we stay silent
    assert disconnect_reason(got) == 0x8D
    assert watcher.expect()[0].payload == b"timeout"


def test_pingreq_answered(server):
    r = connected_v5(server.port)
    r.send(b"\xc0\x00")
    assert r.read_packet() == (0xD0, b"")


def test_connect_timeout_with_partial_connect_does_not_block_others(server):
    r = Raw(server.port)
    r.send(b"\x10\x20\x00")  # a CONNECT that never completes
    c = Client(server.port)
    c.subscribe("x", 0)
    c.publish("x", b"1")
    assert c.expect()[0].payload == b"1"
    r.sock.close()
