"""The codec's Python surface as docs/codec.md describes it: classes, Decoder, encoders."""

from __future__ import annotations

import pickle

import pytest
from ingestd._codec import (
    Auth,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    Pingreq,
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

from codec_helpers import CONNECT_V5, client_decoder, h, publish, s, server_decoder
from ingestd.errors import ProtocolError

DEFAULTS = [
    (Connect, dict(protocol_name="MQTT", protocol_level=4, clean_start=True, keepalive=60, client_id="",
                   username=None, password=None, will=None, properties={})),
    (Will, dict(topic="", payload=b"", qos=0, retain=False, properties={})),
    (Connack, dict(session_present=False, reason_code=0, properties={})),
    (Publish, dict(topic="", payload=b"", qos=0, retain=False, dup=False, packet_id=0, properties={})),
    (PubAck, dict(packet_type=4, packet_id=0, reason_code=0, properties={})),
    (Subscribe, dict(packet_id=0, subscriptions=[], properties={})),
    (Suback, dict(packet_id=0, reason_codes=[], properties={})),
    (Unsubscribe, dict(packet_id=0, topic_filters=[], properties={})),
    (Unsuback, dict(packet_id=0, reason_codes=[], properties={})),
    (Disconnect, dict(reason_code=0, properties={})),
    (Auth, dict(reason_code=0, properties={})),
]  # fmt: skip


@pytest.mark.parametrize("cls,defaults", DEFAULTS, ids=[c.__name__ for c, _ in DEFAULTS])
def test_defaults_attributes_equality_repr(cls, defaults):
    obj = cls()
    for name, value in defaults.items():
        assert getattr(obj, name) == value, name
    assert obj == cls(**defaults)
    assert (obj != cls(**defaults)) is False
    assert repr(obj).startswith(cls.__name__ + "(")
    for name, value in defaults.items():
        assert f"{name}={value!r}" in repr(obj)
    # every attribute is writable and takes part in equality
    if "properties" in defaults:
        other = cls()
        other.properties = {0x1F: "x"}
        assert other != obj
    with pytest.raises(TypeError):
        hash(obj)


def test_each_instance_gets_its_own_properties_dict():
    a, b = Publish(), Publish()
    a.properties[1] = 1
    assert b.properties == {}


def test_none_properties_become_an_empty_dict():
    assert Publish(properties=None).properties == {}


def test_packets_of_different_types_are_not_equal():
    assert Disconnect() != Auth()
    assert Pingreq() != Disconnect()
    assert Publish() != "Publish()"


def test_packets_pickle():
    p = Publish(topic="a", payload=b"x", qos=1, packet_id=3, properties={0x26: [("k", "v")]})
    assert pickle.loads(pickle.dumps(p)) == p


# ------------------------------------------------------------------ Decoder


def test_partial_input_is_kept_until_the_packet_completes():
    d = server_decoder(5)
    data = publish("a/b", b"payload", qos=1, pid=7)
    assert d.feed(data[:1]) == []
    assert d.feed(data[1:2]) == []
    assert d.feed(data[2:-1]) == []
    assert d.feed(data[-1:]) == [Publish(topic="a/b", payload=b"payload", qos=1, packet_id=7)]


def test_many_packets_in_one_feed_are_all_returned_in_order():
    d = server_decoder(5)
    data = b"".join(publish(f"t/{i}", bytes([i])) for i in range(100))
    got = d.feed(data)
    assert [p.topic for p in got] == [f"t/{i}" for i in range(100)]


def test_consecutive_publishes_each_get_their_own_topic():
    # Same, different, same-length and non-ASCII topics one after the other.
    topics = ["a/b", "a/b", "a/c", "a/b/c", "ü/1", "ü/1", "ü/2", "a/b", "x" * 300, "x" * 300]
    for version in (4, 5):
        d = server_decoder(version)
        got = d.feed(b"".join(publish(t, version=version) for t in topics))
        assert [p.topic for p in got] == topics
        for bad, reason in ((b"a/+", 0x90), (b"a/\x00", 0x81), (b"a/\xff", 0x81)):
            d = server_decoder(version)
            d.feed(publish("a/b", version=version))
            with pytest.raises(ProtocolError) as exc:
                d.feed(publish(bad, version=version))
            assert exc.value.reason_code == reason


def test_connect_and_following_packets_in_one_feed():
    d = Decoder(server_side=True)
    got = d.feed(CONNECT_V5 + publish("a", b"1") + h("c0 00"))
    assert [type(p) for p in got] == [Connect, Publish, Pingreq]
    assert d.protocol_version == 5


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_accepts_bytes_like(kind):
    d = server_decoder(4)
    assert d.feed(kind(h("c0 00 c0"))) == [Pingreq()]
    assert d.feed(kind(b"\x00")) == [Pingreq()]


def test_feed_does_not_keep_a_reference_to_the_callers_buffer():
    d = server_decoder(5)
    buf = bytearray(publish("a", b"xyz"))
    tail = bytearray(buf[-2:])
    del buf[-2:]
    assert d.feed(buf) == []
    buf[:] = b"\xff" * len(buf)  # the caller reuses its buffer
    assert d.feed(tail) == [Publish(topic="a", payload=b"xyz")]


def test_payload_and_topic_are_independent_copies():
    d = server_decoder(5)
    data = bytearray(publish("a", b"xyz"))
    (p,) = d.feed(data)
    data[:] = bytes(len(data))
    assert p.payload == b"xyz" and type(p.payload) is bytes and p.topic == "a"


def test_decoded_properties_are_always_a_dict():
    for version in (3, 4, 5):
        d = server_decoder(version)
        (p,) = d.feed(publish("a", version=version))
        assert p.properties == {} and type(p.properties) is dict


def test_client_decoder_must_know_the_version_except_for_connack():
    d = Decoder(server_side=False)
    assert d.server_side is False
    with pytest.raises(ProtocolError) as exc:
        d.feed(publish("a"))
    assert exc.value.reason_code == 0x82


def test_client_decoder_follows_the_version_it_is_told():
    # The same bytes are a v5 PUBLISH (property length 0, payload "x") or a 3.1.1 one.
    data = publish("a", b"x", version=5)
    assert client_decoder(5).feed(data) == [Publish(topic="a", payload=b"x")]
    assert client_decoder(4).feed(data) == [Publish(topic="a", payload=b"\x00x")]


def test_mqtt_3_1_is_decoded_like_3_1_1():
    d = Decoder(server_side=True)
    (c,) = d.feed(h("10 1b 0006 4d5149736470 03 c2 0005 0001 61 0004 75736572 0004 70617373"))
    assert c == Connect(protocol_name="MQIsdp", protocol_level=3, keepalive=5, client_id="a",
                        username="user", password=b"pass")  # fmt: skip
    assert d.protocol_version == 3
    # 3.1 has no properties: a 3.1.1-style PUBLISH follows.
    assert d.feed(publish("t", b"v", version=3)) == [Publish(topic="t", payload=b"v")]


# ------------------------------------------------------------------ encoders


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode_publish("t", b"", 3, False, False, 1, None, 5),
        lambda: encode_publish("t", b"", 1, False, False, 65536, None, 5),
        lambda: encode_publish("t", b"", 0, False, False, -1, None, 5),
        lambda: encode_publish("x" * 65536, b"", 0, False, False, 0, None, 5),
        lambda: encode_publish("t", b"", 0, False, False, 0, None, 6),
        lambda: encode_ack(3, 1, 0, 5),
        lambda: encode_ack(8, 1, 0, 5),
        lambda: encode_ack(4, 65536, 0, 5),
        lambda: encode_ack(4, 1, 256, 5),
        lambda: encode_ack(4, 1, 0, 2),
        lambda: encode(Publish(topic="t"), 2),
        lambda: encode(Auth(), 4),
        lambda: encode(Connect(protocol_level=5), 4),
        lambda: encode(Connect(protocol_level=4), 5),
        lambda: encode(Connect(password=b"p"), 4),
        lambda: encode(Connect(will=Will(topic="w", qos=3)), 4),
        lambda: encode(Connect(keepalive=65536), 4),
        lambda: encode(Subscribe(packet_id=1), 5),
        lambda: encode(Subscribe(packet_id=1, subscriptions=[("a", 3, False, False, 0)]), 5),
        lambda: encode(Subscribe(packet_id=1, subscriptions=[("a", 1, False, False, 3)]), 5),
        lambda: encode(Subscribe(packet_id=1, subscriptions=[("a", 1)]), 5),
        lambda: encode(Unsubscribe(packet_id=1), 5),
        lambda: encode(Suback(packet_id=1, reason_codes=[256]), 5),
        lambda: encode(PubAck(packet_type=3, packet_id=1), 5),
        lambda: encode(Connack(reason_code=-1), 5),
        lambda: encode(Disconnect(reason_code=300), 5),
    ],
)
def test_encoders_raise_value_error_for_what_they_cannot_encode(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: encode("not a packet", 5),
        lambda: encode(None, 5),
        lambda: encode_publish(None, b"", 0, False, False, 0, None, 5),
        lambda: encode_publish("t", "str payload", 0, False, False, 0, None, 5),
        lambda: encode(Subscribe(packet_id=1, subscriptions=[(b"a", 1, False, False, 0)]), 5),
    ],
)
def test_encoders_raise_type_error_for_wrong_types(call):
    with pytest.raises(TypeError):
        call()


def test_encoded_packets_are_bytes():
    assert type(encode(Pingreq(), 4)) is bytes
    assert type(encode_publish("t", b"", 0, False, False, 0, None, 4)) is bytes
    assert type(encode_ack(4, 1, 0, 4)) is bytes


def test_encode_publish_matches_encode_of_a_publish():
    p = Publish(
        topic="a/b", payload=b"x" * 300, qos=2, retain=True, packet_id=9, properties={0x02: 5}
    )
    for version in (3, 4, 5):
        assert encode(p, version) == encode_publish(
            p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, p.properties, version
        )


def test_long_topic_and_strings_up_to_65535_bytes():
    topic = "t" * 65535
    data = encode_publish(topic, b"", 0, False, False, 0, None, 4)
    assert data[:6] == h("30 81 80 04 ff ff")
    assert server_decoder(4).feed(data) == [Publish(topic=topic)]
    assert s("x") == h("0001 78")


def test_shared_decoder_hands_an_incomplete_packet_to_a_decoder_of_its_own() -> None:
    """What a broker channel does past CONNECT: read through one shared decoder, and
    take the bytes of an incomplete packet into its own (``detach``)."""
    from ingestd._codec import Decoder as D

    shared = D.for_connection(4, 1024)
    assert shared.feed(b"\xc0\x00\xc0") and shared.buffered == 1
    own = shared.detach()
    assert shared.buffered == 0 and own.buffered == 1 and own.protocol_version == 4
    [ping] = own.feed(b"\x00")
    assert ping.packet_type == 12 and own.buffered == 0
    # A CONNECT is a second one for a decoder past CONNECT; reset makes it usable again.
    with pytest.raises(ProtocolError):
        shared.feed(b"\x10\x00")
    shared.reset()
    assert len(shared.feed(b"\xc0\x00")) == 1
