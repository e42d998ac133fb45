"""Property-based round trips: decode(encode(p)) == p for arbitrary valid packets.

Packets of every type are generated for MQTT 3.1, 3.1.1 and 5.0 (with every
property allowed in each packet), encoded, cut at random places and fed to a
decoder of the matching direction, which must give back the same packets.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingestd._codec import (
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
)

from codec_helpers import BIN, BYTE, PAIR, PROPERTIES, STR, U16, U32, VALUE_RANGES, VBI, WILL
from ingestd.mqtt.constants import PacketType as T

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# UTF-8 Encoded Strings: any character but U+0000 and the surrogates [MQTT-1.5.4-1/2].
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
text = st.text(CHARS, max_size=12)
topic_name = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
    min_size=1,
    max_size=12,
)
packet_id = st.integers(1, 0xFFFF)
byte = st.integers(0, 0xFF)
KIND_MAX = {BYTE: 0xFF, U16: 0xFFFF, U32: 0xFFFF_FFFF, VBI: 268_435_455}


def value_of(pid: int, many_ids: bool = False) -> st.SearchStrategy:
    kind = PROPERTIES[pid][0]
    if kind == STR:
        return text
    if kind == BIN:
        return st.binary(max_size=16)
    if kind == PAIR:
        return st.lists(st.tuples(text, text), min_size=1, max_size=3)
    lo, hi = VALUE_RANGES.get(pid, (0, KIND_MAX[kind]))
    if pid == 0x0B:  # Subscription Identifier: a list, several only from the server in PUBLISH
        return st.lists(st.integers(lo, hi), min_size=1, max_size=3 if many_ids else 1)
    return st.integers(lo, hi)


def properties(ctx: int, version: int, server_to_client: bool = False) -> st.SearchStrategy:
    if version != 5:
        return st.just({})
    allowed = [p for p, (_, where) in PROPERTIES.items() if ctx in where]
    if ctx == T.PUBLISH and not server_to_client:
        allowed.remove(0x0B)  # [MQTT-3.3.4-6]
    many = ctx == T.PUBLISH and server_to_client
    return st.fixed_dictionaries({}, optional={p: value_of(p, many) for p in allowed})


@st.composite
def publishes(draw, version: int, server_to_client: bool = False):
    props = draw(properties(T.PUBLISH, version, server_to_client))
    # v5 allows an empty topic when a Topic Alias stands for it.
    topic = draw(topic_name | st.just("")) if 0x23 in props else draw(topic_name)
    qos = draw(st.integers(0, 2))
    return Publish(
        topic=topic,
        payload=draw(st.binary(max_size=64)),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()),
        packet_id=draw(packet_id) if qos else 0,
        properties=props,
    )


@st.composite
def acks(draw, version: int):
    ptype = draw(st.sampled_from([T.PUBACK, T.PUBREC, T.PUBREL, T.PUBCOMP]))
    return PubAck(
        packet_type=int(ptype),
        packet_id=draw(packet_id),
        reason_code=draw(byte) if version == 5 else 0,
        properties=draw(properties(ptype, version)),
    )


@st.composite
def subscribes(draw, version: int):
    subs = []
    for _ in range(draw(st.integers(1, 4))):
        topic_filter = draw(text | st.builds(lambda g, f: f"$share/{g}/{f}", text, text))
        if version == 5:
            no_local = draw(st.booleans()) and not topic_filter.startswith("$share/")
            options = (draw(st.booleans()), draw(st.integers(0, 2)))
            subs.append((topic_filter, draw(st.integers(0, 2)), no_local, *options))
        else:
            subs.append((topic_filter, draw(st.integers(0, 2)), False, False, 0))
    return Subscribe(
        packet_id=draw(packet_id),
        subscriptions=subs,
        properties=draw(properties(T.SUBSCRIBE, version)),
    )


def unsubscribes(version: int):
    return st.builds(
        Unsubscribe,
        packet_id=packet_id,
        topic_filters=st.lists(text, min_size=1, max_size=4),
        properties=properties(T.UNSUBSCRIBE, version),
    )


def reason_and_props(cls, ctx: int, version: int):
    return st.builds(cls, reason_code=byte, properties=properties(ctx, version))


@st.composite
def connects(draw, version: int):
    will = None
    if draw(st.booleans()):
        will = Will(
            topic=draw(topic_name),
            payload=draw(st.binary(max_size=32)),
            qos=draw(st.integers(0, 2)),
            retain=draw(st.booleans()),
            properties=draw(properties(WILL, version)),
        )
    username = draw(st.none() | text)
    password = draw(st.none() | st.binary(max_size=16))
    if version < 5 and username is None:
        password = None  # [MQTT-3.1.2-22]
    return Connect(
        protocol_name="MQIsdp" if version == 3 else "MQTT",
        protocol_level=version,
        clean_start=draw(st.booleans()),
        keepalive=draw(st.integers(0, 0xFFFF)),
        client_id=draw(text),
        username=username,
        password=password,
        will=will,
        properties=draw(properties(T.CONNECT, version)),
    )


def client_packets(version: int) -> st.SearchStrategy:
    """Anything a client may send after its CONNECT."""
    kinds = [
        publishes(version),
        acks(version),
        subscribes(version),
        unsubscribes(version),
        st.just(Pingreq()),
    ]
    if version == 5:
        kinds += [reason_and_props(Disconnect, T.DISCONNECT, 5), reason_and_props(Auth, T.AUTH, 5)]
    else:
        kinds.append(st.just(Disconnect()))
    return st.one_of(kinds)


def server_packets(version: int) -> st.SearchStrategy:
    """Anything a server may send after its CONNACK (the CONNACK included)."""
    codes = byte if version == 5 else st.sampled_from([0, 1, 2, 0x80])
    kinds = [
        st.builds(Connack, session_present=st.booleans(), reason_code=byte, properties=properties(T.CONNACK, version)),
        publishes(version, server_to_client=True),
        acks(version),
        st.builds(Suback, packet_id=packet_id, reason_codes=st.lists(codes, min_size=1, max_size=4), properties=properties(T.SUBACK, version)),
        st.just(Pingresp()),
    ]  # fmt: skip
    if version == 5:
        kinds += [
            st.builds(Unsuback, packet_id=packet_id, reason_codes=st.lists(byte, min_size=1, max_size=4), properties=properties(T.UNSUBACK, 5)),
            reason_and_props(Disconnect, T.DISCONNECT, 5),
            reason_and_props(Auth, T.AUTH, 5),
        ]  # fmt: skip
    else:
        kinds.append(st.builds(Unsuback, packet_id=packet_id))
    return st.one_of(kinds)


def feed_in_chunks(decoder: Decoder, blob: bytes, cuts: list[int]) -> list:
    out: list = []
    start = 0
    for cut in [*sorted(cuts), len(blob)]:
        out += decoder.feed(blob[start:cut])
        start = cut
    return out


VERSIONS = [3, 4, 5]


@pytest.mark.parametrize("version", VERSIONS)
@SETTINGS
@given(data=st.data())
def test_client_stream_roundtrip(version, data):
    first = data.draw(connects(version), "connect")
    rest = data.draw(st.lists(client_packets(version), max_size=6), "packets")
    blob = b"".join(encode(p, version) for p in [first, *rest])
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=8), "cuts")
    d = Decoder(server_side=True)
    assert feed_in_chunks(d, blob, cuts) == [first, *rest]
    assert d.protocol_version == version


@pytest.mark.parametrize("version", VERSIONS)
@SETTINGS
@given(data=st.data())
def test_server_stream_roundtrip(version, data):
    packets = data.draw(st.lists(server_packets(version), min_size=1, max_size=6), "packets")
    blob = b"".join(encode(p, version) for p in packets)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=8), "cuts")
    d = Decoder(server_side=False)
    d.protocol_version = 5 if version == 5 else 4
    assert feed_in_chunks(d, blob, cuts) == packets


STRATEGIES = {
    "connect": lambda v: connects(v),
    "publish": lambda v: publishes(v),
    "ack": lambda v: acks(v),
    "subscribe": lambda v: subscribes(v),
    "unsubscribe": lambda v: unsubscribes(v),
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", sorted(STRATEGIES))
@SETTINGS
@given(data=st.data())
def test_single_packet_roundtrip_byte_by_byte(kind, version, data):
    pkt = data.draw(STRATEGIES[kind](version), kind)
    blob = encode(pkt, version)
    d = Decoder(server_side=True)
    if kind != "connect":
        d.feed(
            encode(
                Connect(protocol_name="MQIsdp" if version == 3 else "MQTT", protocol_level=version),
                version,
            )
        )
    got: list = []
    for i in range(len(blob)):
        got += d.feed(blob[i : i + 1])
    assert got == [pkt]


@SETTINGS
@given(blob=st.binary(max_size=64), cuts=st.lists(st.integers(0, 64), max_size=4))
def test_arbitrary_bytes_never_crash(blob, cuts):
    """Garbage either decodes or raises ProtocolError, the same way however it is cut."""
    from ingestd.errors import ProtocolError

    results = []
    for chunks in ([], cuts):
        d = Decoder(server_side=True)
        try:
            results.append(("ok", feed_in_chunks(d, blob, [c for c in chunks if c <= len(blob)])))
        except ProtocolError as exc:
            results.append(("error", exc.reason_code, str(exc)))
    assert results[0] == results[1]
