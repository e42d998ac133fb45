"""Golden bytes for every MQTT control packet, written by hand from the specifications.

Each case is decoded three ways (whole, byte by byte, with trailing bytes) and
compared to the expected packet object, and the object is encoded and compared
to the bytes. "c2s" cases go through a server-side decoder (after a CONNECT of
that version), "s2c" cases through a client-side one.
"""

from __future__ import annotations

import pytest
from ingestd._codec import (
    PINGREQ,
    PINGRESP,
    Auth,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    Pingreq,
    Pingresp,
    PubAck,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
    encode,
    encode_ack,
    encode_publish,
)

from codec_helpers import CONNECTS, client_decoder, decode_three_ways, h, server_decoder

C2S, S2C = "c2s", "s2c"


def case(name, version, side, hexstr, packet, roundtrip=True):
    return pytest.param(version, side, h(hexstr), packet, roundtrip, id=f"v{version}-{name}")


GOLDEN = [
    # ---------------------------------------------------------------- CONNECT
    case("connect-minimal", 4, C2S, "10 0c 0004 4d515454 04 02 003c 0000", Connect()),
    case(
        "connect-will-user-password",
        4,
        C2S,
        # flags 0xEE: user, password, will retain, will QoS 1, will, clean session
        "10 1c 0004 4d515454 04 ee 000a 0002 6331 0001 77 0003 627965 0001 75 0001 70",
        Connect(
            keepalive=10,
            client_id="c1",
            username="u",
            password=b"p",
            will=Will(topic="w", payload=b"bye", qos=1, retain=True),
        ),
    ),
    case(
        "connect-mqtt-3.1",
        3,
        C2S,
        "10 0f 0006 4d5149736470 03 00 0000 0001 78",  # "MQIsdp", level 3
        Connect(
            protocol_name="MQIsdp", protocol_level=3, clean_start=False, keepalive=0, client_id="x"
        ),
    ),
    case(
        "connect-properties-will",
        5,
        C2S,
        """10 53 0004 4d515454 05 96 0078
           0f 11 0000012c 21 0014 26 0001 6b 0001 76
           0005 6465762d31
           14 18 00000005 01 01 03 000a 746578742f706c61696e
           000c 6465762f312f737461747573
           0007 6f66666c696e65
           0004 75736572""",
        Connect(
            protocol_level=5,
            keepalive=120,
            client_id="dev-1",
            username="user",
            will=Will(
                topic="dev/1/status",
                payload=b"offline",
                qos=2,
                properties={0x18: 5, 0x01: 1, 0x03: "text/plain"},
            ),
            properties={0x11: 300, 0x21: 20, 0x26: [("k", "v")]},
        ),
    ),
    case(
        "connect-password-without-user",  # allowed in 5.0 (not in 3.1.1)
        5,
        C2S,
        "10 11 0004 4d515454 05 42 0000 00 0000 0002 00ff",
        Connect(protocol_level=5, keepalive=0, password=b"\x00\xff"),
    ),
    # ---------------------------------------------------------------- CONNACK
    case("connack-session-present", 4, S2C, "20 02 01 00", Connack(session_present=True)),
    case("connack-refused", 4, S2C, "20 02 00 05", Connack(reason_code=5)),
    case("connack-minimal", 5, S2C, "20 03 00 00 00", Connack()),
    case(
        "connack-properties",
        5,
        S2C,
        """20 20 00 00 1d 21 000a 24 01 25 00 27 00100000 12 0006 6175746f2d31
           22 0010 13 001e 2a 00""",
        Connack(
            properties={
                0x21: 10,
                0x24: 1,
                0x25: 0,
                0x27: 1_048_576,
                0x12: "auto-1",
                0x22: 16,
                0x13: 30,
                0x2A: 0,
            }
        ),
    ),
    case(
        "connack-refused-reason-string",
        5,
        S2C,
        "20 09 00 87 06 1f 0003 6e6f21",
        Connack(reason_code=0x87, properties={0x1F: "no!"}),
    ),
    # ---------------------------------------------------------------- PUBLISH
    case("publish-qos0", 4, C2S, "30 07 0003 612f62 6869", Publish(topic="a/b", payload=b"hi")),
    case(
        "publish-qos1-dup-retain",
        4,
        C2S,
        "3b 09 0003 612f62 000a 6869",
        Publish(topic="a/b", payload=b"hi", qos=1, retain=True, dup=True, packet_id=10),
    ),
    case(
        "publish-to-client",
        4,
        S2C,
        "3b 09 0003 612f62 000a 6869",
        Publish(topic="a/b", payload=b"hi", qos=1, retain=True, dup=True, packet_id=10),
    ),
    case(
        "publish-qos2-empty-payload",
        4,
        C2S,
        "34 07 0003 612f62 ffff",
        Publish(topic="a/b", qos=2, packet_id=65535),
    ),
    case("publish-qos0", 5, C2S, "30 08 0003 612f62 00 6869", Publish(topic="a/b", payload=b"hi")),
    case("publish-utf8-topic", 5, C2S, "30 05 0002 c3bc 00", Publish(topic="ü")),
    case(
        "publish-qos1-properties",
        5,
        C2S,
        """32 39 0003 742f31 0102 2a 01 01 02 0000003c 03 0004 6a736f6e 08 0003 722f31
           09 0002 abcd 26 0001 61 0001 31 26 0001 61 0001 32 23 0005 7b2276223a317d""",
        Publish(
            topic="t/1",
            payload=b'{"v":1}',
            qos=1,
            packet_id=0x0102,
            properties={
                0x01: 1,
                0x02: 60,
                0x03: "json",
                0x08: "r/1",
                0x09: b"\xab\xcd",
                0x26: [("a", "1"), ("a", "2")],
                0x23: 5,
            },
        ),
    ),
    case(
        "publish-topic-alias-only",
        5,
        C2S,
        "30 08 0000 03 23 0007 6869",
        Publish(topic="", payload=b"hi", properties={0x23: 7}),
    ),
    case(
        "publish-two-subscription-ids",
        5,
        S2C,
        "30 0a 0001 78 05 0b 05 0b 8001 21",
        Publish(topic="x", payload=b"!", properties={0x0B: [5, 128]}),
    ),
    # ------------------------------------------------- PUBACK PUBREC PUBREL PUBCOMP
    case("puback", 4, C2S, "40 02 0001", PubAck(packet_type=4, packet_id=1)),
    case("pubrec", 4, C2S, "50 02 0002", PubAck(packet_type=5, packet_id=2)),
    case("pubrel", 4, C2S, "62 02 0003", PubAck(packet_type=6, packet_id=3)),
    case("pubcomp", 4, C2S, "70 02 0004", PubAck(packet_type=7, packet_id=4)),
    case("puback", 4, S2C, "40 02 0001", PubAck(packet_type=4, packet_id=1)),
    case("pubrel", 4, S2C, "62 02 0003", PubAck(packet_type=6, packet_id=3)),
    case("puback-short", 5, C2S, "40 02 0001", PubAck(packet_type=4, packet_id=1)),
    case(
        "pubrec-reason",
        5,
        C2S,
        "50 03 0001 10",
        PubAck(packet_type=5, packet_id=1, reason_code=0x10),
    ),
    case(
        "pubrel-reason",
        5,
        S2C,
        "62 03 0007 92",
        PubAck(packet_type=6, packet_id=7, reason_code=0x92),
    ),
    case(
        "pubcomp-properties",
        5,
        S2C,
        "70 09 0009 00 05 1f 0002 6f6b",
        PubAck(packet_type=7, packet_id=9, properties={0x1F: "ok"}),
    ),
    case(
        "puback-reason-user-property",
        5,
        C2S,
        "40 0b 0001 87 07 26 0001 6b 0001 76",
        PubAck(packet_type=4, packet_id=1, reason_code=0x87, properties={0x26: [("k", "v")]}),
    ),
    # The long forms of a success ack decode the same; the encoder writes the short one.
    case("puback-long-success", 5, C2S, "40 03 0001 00", PubAck(packet_type=4, packet_id=1), False),
    case(
        "puback-empty-properties",
        5,
        C2S,
        "40 04 0001 00 00",
        PubAck(packet_type=4, packet_id=1),
        False,
    ),
    case(
        "pubrec-reason-empty-properties",
        5,
        S2C,
        "50 04 0001 10 00",
        PubAck(packet_type=5, packet_id=1, reason_code=0x10),
        False,
    ),
    # ---------------------------------------------------------- SUBSCRIBE SUBACK
    case(
        "subscribe",
        4,
        C2S,
        "82 0e 0001 0003 612f2b 01 0003 622f23 02",
        Subscribe(
            packet_id=1, subscriptions=[("a/+", 1, False, False, 0), ("b/#", 2, False, False, 0)]
        ),
    ),
    case(
        "subscribe-options-properties",
        5,
        C2S,
        "82 1f 0002 09 0b 05 26 0001 6b 0001 76 0003 612f62 2d 000a 247368617265 2f672f63 10",
        Subscribe(
            packet_id=2,
            subscriptions=[("a/b", 1, True, True, 2), ("$share/g/c", 0, False, False, 1)],
            properties={0x0B: [5], 0x26: [("k", "v")]},
        ),
    ),
    case(
        "suback",
        4,
        S2C,
        "90 06 0001 00 01 02 80",
        Suback(packet_id=1, reason_codes=[0, 1, 2, 0x80]),
    ),
    case(
        "suback-properties",
        5,
        S2C,
        "90 0c 0003 05 1f 0002 6e6f 00 01 87 8f",
        Suback(packet_id=3, reason_codes=[0, 1, 0x87, 0x8F], properties={0x1F: "no"}),
    ),
    # ------------------------------------------------------ UNSUBSCRIBE UNSUBACK
    case(
        "unsubscribe",
        4,
        C2S,
        "a2 0a 0001 0001 61 0003 622f23",
        Unsubscribe(packet_id=1, topic_filters=["a", "b/#"]),
    ),
    case(
        "unsubscribe-properties",
        5,
        C2S,
        "a2 0d 0004 07 26 0001 6b 0001 76 0001 61",
        Unsubscribe(packet_id=4, topic_filters=["a"], properties={0x26: [("k", "v")]}),
    ),
    case("unsuback", 4, S2C, "b0 02 0001", Unsuback(packet_id=1)),
    case("unsuback", 5, S2C, "b0 05 0001 00 00 11", Unsuback(packet_id=1, reason_codes=[0, 0x11])),
    # ---------------------------------------------------------- PINGREQ PINGRESP
    case("pingreq", 4, C2S, "c0 00", Pingreq()),
    case("pingreq", 5, C2S, "c0 00", Pingreq()),
    case("pingresp", 4, S2C, "d0 00", Pingresp()),
    case("pingresp", 5, S2C, "d0 00", Pingresp()),
    # --------------------------------------------------------------- DISCONNECT
    case("disconnect", 4, C2S, "e0 00", Disconnect()),
    case("disconnect", 5, C2S, "e0 00", Disconnect()),
    case("disconnect-with-will", 5, C2S, "e0 01 04", Disconnect(reason_code=4)),
    case(
        "disconnect-session-expiry",
        5,
        C2S,
        "e0 07 00 05 11 0000000a",
        Disconnect(properties={0x11: 10}),
    ),
    case(
        "disconnect-server-moved",
        5,
        S2C,
        "e0 10 9c 0e 1c 0004 73727632 1f 0004 6d6f7665",
        Disconnect(reason_code=0x9C, properties={0x1C: "srv2", 0x1F: "move"}),
    ),
    case("disconnect-long-success", 5, C2S, "e0 02 00 00", Disconnect(), False),
    # --------------------------------------------------------------------- AUTH
    case("auth", 5, C2S, "f0 00", Auth()),
    case(
        "auth-continue",
        5,
        C2S,
        "f0 10 18 0e 15 0005 534352414d 16 0003 78797a",
        Auth(reason_code=0x18, properties={0x15: "SCRAM", 0x16: b"xyz"}),
    ),
    case(
        "auth-continue",
        5,
        S2C,
        "f0 10 18 0e 15 0005 534352414d 16 0003 78797a",
        Auth(reason_code=0x18, properties={0x15: "SCRAM", 0x16: b"xyz"}),
    ),
]


def make_decoder(version: int, side: str, packet: object):
    if side == S2C:
        return lambda: client_decoder(version)
    if isinstance(packet, Connect):
        return lambda: Decoder(server_side=True)
    return lambda: server_decoder(version)


@pytest.mark.parametrize("version,side,data,packet,roundtrip", GOLDEN)
def test_decode_golden(version, side, data, packet, roundtrip):
    decode_three_ways(make_decoder(version, side, packet), data, [packet])


# The long forms of a success ack (roundtrip False) decode, but the encoder writes the short one.
ENCODABLE = [p for p in GOLDEN if p.values[4]]


@pytest.mark.parametrize("version,side,data,packet,roundtrip", ENCODABLE)
def test_encode_golden(version, side, data, packet, roundtrip):
    assert encode(packet, version).hex(" ") == data.hex(" ")


def test_server_decoder_learns_the_version_from_connect():
    for version, data in CONNECTS.items():
        d = Decoder(server_side=True)
        assert d.protocol_version == 0
        d.feed(data)
        assert d.protocol_version == version


@pytest.mark.parametrize("version,data", [(4, "20 02 01 00"), (5, "20 03 01 00 00")])
def test_client_decoder_decodes_connack_of_either_version_before_knowing_it(version, data):
    d = Decoder(server_side=False)
    assert d.feed(h(data)) == [Connack(session_present=True)]


def test_v5_client_decodes_a_3_1_1_refusal():
    # A 3.1.1-only server answers a v5 CONNECT with return code 1 in a 2-byte CONNACK.
    assert client_decoder(5).feed(h("20 02 00 01")) == [Connack(reason_code=1)]


# ------------------------------------------------------------- encode-only


ENCODE_ONLY = [
    pytest.param(
        Suback(packet_id=1, reason_codes=[0, 0x87, 0x8F, 2]),
        4,
        "90 06 0001 00 80 80 02",
        id="v4-suback-failures-become-0x80",
    ),
    pytest.param(Unsuback(packet_id=1, reason_codes=[0x11]), 4, "b0 02 0001", id="v4-unsuback-drops-codes"),
    pytest.param(Connack(reason_code=1), 4, "20 02 00 01", id="v4-connack-return-code-as-given"),
    pytest.param(
        Publish(topic="a/b", payload=b"hi", properties={0x01: 1}),
        4,
        "30 07 0003 612f62 6869",
        id="v4-publish-drops-properties",
    ),
    pytest.param(
        Connect(properties={0x11: 5}, will=Will(topic="w", properties={0x18: 1})),
        4,
        "10 11 0004 4d515454 04 06 003c 0000 0001 77 0000",
        id="v4-connect-drops-properties",
    ),
    pytest.param(
        PubAck(packet_type=4, packet_id=1, reason_code=0x10, properties={0x1F: "x"}),
        4,
        "40 02 0001",
        id="v4-puback-drops-reason",
    ),
    pytest.param(Disconnect(reason_code=0x8E), 4, "e0 00", id="v4-disconnect-drops-reason"),
    pytest.param(
        Subscribe(packet_id=9, subscriptions=[("a", 1, True, True, 2)]),
        4,
        "82 06 0009 0001 61 01",
        id="v4-subscribe-drops-v5-options",
    ),
    pytest.param(
        PubAck(packet_type=6, packet_id=0x1234, properties={0x1F: "x"}),
        5,
        "62 08 1234 00 04 1f 0001 78",
        id="v5-pubrel-properties-need-the-reason-byte",
    ),
    pytest.param(Disconnect(properties={0x1F: "x"}), 5, "e0 06 00 04 1f 0001 78", id="v5-disconnect-properties"),
    pytest.param(Connect(protocol_level=5, properties=None), 5, "10 0d 0004 4d515454 05 02 003c 00 0000", id="v5-connect-none-properties"),
]  # fmt: skip


@pytest.mark.parametrize("packet,version,expected", ENCODE_ONLY)
def test_encode_only(packet, version, expected):
    assert encode(packet, version).hex(" ") == h(expected).hex(" ")


@pytest.mark.parametrize(
    "args,expected",
    [
        (("a/b", b"hi", 0, False, False, 0, None, 4), "30 07 0003 612f62 6869"),
        (("a/b", b"hi", 1, True, True, 10, None, 4), "3b 09 0003 612f62 000a 6869"),
        (("a/b", b"hi", 2, False, False, 0xFFFF, {0x01: 1}, 4), "34 09 0003 612f62 ffff 6869"),
        (("a/b", b"hi", 0, False, False, 0, None, 5), "30 08 0003 612f62 00 6869"),
        (("a/b", b"hi", 0, False, False, 0, {}, 5), "30 08 0003 612f62 00 6869"),
        (("x", b"", 1, True, False, 1, {0x0B: [1, 2]}, 5), "33 0a 0001 78 0001 04 0b 01 0b 02"),
        (("x", bytearray(b"ab"), 0, False, False, 0, None, 4), "30 05 0001 78 6162"),
        (("x", memoryview(b"abc")[1:], 0, False, False, 0, None, 4), "30 05 0001 78 6263"),
        (("ü", b"", 0, False, False, 0, None, 3), "30 04 0002 c3bc"),
    ],
)
def test_encode_publish(args, expected):
    assert encode_publish(*args).hex(" ") == h(expected).hex(" ")


def test_encode_publish_large_payload_uses_a_four_byte_remaining_length():
    payload = bytes(2_097_152)  # 2 MiB: 2 + 1 + 2 MiB needs 4 length bytes
    out = encode_publish("t", payload, 0, False, False, 0, None, 4)
    assert out[:8] == h("30 83 80 80 01 0001 74")
    assert len(out) == 1 + 4 + 3 + len(payload) and out[8:] == payload


@pytest.mark.parametrize(
    "args,expected",
    [
        ((4, 1, 0, 4), "40 02 0001"),
        ((5, 2, 0, 4), "50 02 0002"),
        ((6, 3, 0, 4), "62 02 0003"),
        ((7, 0xABCD, 0, 4), "70 02 abcd"),
        ((4, 1, 0x10, 4), "40 02 0001"),  # 3.1.1 has no reason code
        ((4, 1, 0, 5), "40 02 0001"),  # v5 omits reason code 0
        ((5, 1, 0x10, 5), "50 03 0001 10"),
        ((6, 1, 0x92, 5), "62 03 0001 92"),
        ((7, 1, 0x92, 3), "70 02 0001"),
    ],
)
def test_encode_ack(args, expected):
    assert encode_ack(*args).hex(" ") == h(expected).hex(" ")


def test_ping_constants():
    assert PINGREQ == b"\xc0\x00"
    assert PINGRESP == b"\xd0\x00"
    for version in (4, 5):
        assert encode(Pingreq(), version) == PINGREQ
        assert encode(Pingresp(), version) == PINGRESP
