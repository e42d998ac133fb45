"""MQTT 5 properties: where each may appear, repetition, value ranges, and encoding.

The table in codec_helpers restates section 2.2.2.2; every property is tried in
every packet that has properties (and in the Will Properties) and must be
accepted exactly where the table allows it.
"""

from __future__ import annotations

import pytest
from ingestd._codec import Decoder, Disconnect, Publish, encode, encode_publish

from codec_helpers import (
    BYTE,
    PROPERTIES,
    SAMPLE,
    VALUE_RANGES,
    WILL,
    WITH_PROPERTIES,
    client_decoder,
    connect,
    decode_error,
    decoded_value,
    h,
    packet,
    prop,
    props,
    publish,
    s,
    server_decoder,
    u16,
)
from ingestd.mqtt.constants import PacketType as T
from ingestd.mqtt.constants import Prop


def carrier(ctx: int, section: bytes):
    """(decoder factory, bytes, getter of the decoded properties) for one context."""
    if ctx == WILL:
        data = connect(5, flags=0x06, payload=s("c") + section + s("w") + s("x"))
        return (lambda: Decoder(server_side=True)), data, lambda p: p.will.properties
    if ctx == T.CONNECT:
        return (lambda: Decoder(server_side=True)), connect(5, props_section=section), None
    server = lambda: server_decoder(5)  # noqa: E731
    client = lambda: client_decoder(5)  # noqa: E731
    data = {
        T.CONNACK: (client, packet(0x20, b"\x00\x00" + section)),
        # server to client: the only direction where a Subscription Identifier is allowed
        T.PUBLISH: (client, publish("a", props_section=section)),
        T.PUBACK: (server, packet(0x40, u16(1) + b"\x00" + section)),
        T.PUBREC: (client, packet(0x50, u16(1) + b"\x00" + section)),
        T.PUBREL: (server, packet(0x62, u16(1) + b"\x00" + section)),
        T.PUBCOMP: (client, packet(0x70, u16(1) + b"\x00" + section)),
        T.SUBSCRIBE: (server, packet(0x82, u16(1) + section + s("a") + b"\x00")),
        T.SUBACK: (client, packet(0x90, u16(1) + section + b"\x00")),
        T.UNSUBSCRIBE: (server, packet(0xA2, u16(1) + section + s("a"))),
        T.UNSUBACK: (client, packet(0xB0, u16(1) + section + b"\x00")),
        T.DISCONNECT: (server, packet(0xE0, b"\x00" + section)),
        T.AUTH: (server, packet(0xF0, b"\x18" + section)),
    }[ctx]
    return data[0], data[1], None


def decode_props(ctx: int, section: bytes) -> dict:
    make, data, getter = carrier(ctx, section)
    (pkt,) = make().feed(data)
    return getter(pkt) if getter else pkt.properties


def ctx_name(ctx: int) -> str:
    return "Will" if ctx == WILL else T(ctx).name


MATRIX = [
    pytest.param(pid, ctx, id=f"0x{pid:02X}-in-{ctx_name(ctx)}")
    for pid in PROPERTIES
    for ctx in sorted(WITH_PROPERTIES)
]


@pytest.mark.parametrize("pid,ctx", MATRIX)
def test_property_allowed_exactly_where_the_table_says(pid, ctx):
    section = props(prop(pid, SAMPLE[pid]))
    if ctx in PROPERTIES[pid][1]:
        assert decode_props(ctx, section) == {pid: decoded_value(pid, SAMPLE[pid])}
    else:
        make, data, _ = carrier(ctx, section)
        exc = decode_error(make, data)
        assert exc.reason_code == 0x81
        assert "[MQTT-5.0 §2.2.2.2]" in str(exc)


def first_context(pid: int) -> int:
    return min(PROPERTIES[pid][1], key=lambda c: (c == WILL, c))


@pytest.mark.parametrize("pid", [p for p in PROPERTIES if p not in (0x26, 0x0B)])
def test_duplicate_property_is_malformed(pid):
    ctx = first_context(pid)
    make, data, _ = carrier(ctx, props(prop(pid, SAMPLE[pid]), prop(pid, SAMPLE[pid])))
    exc = decode_error(make, data)
    # "It is a Protocol Error to include <the property> more than once."
    assert exc.reason_code == 0x82
    assert "more than once" in str(exc) and "[MQTT-5.0 §2.2.2.2]" in str(exc)


def test_user_properties_repeat_in_order():
    pairs = [("b", "2"), ("a", "1"), ("b", "2"), ("", "")]
    section = props(*(prop(0x26, p) for p in pairs))
    for ctx in WITH_PROPERTIES:
        assert decode_props(ctx, section) == {0x26: pairs}, ctx_name(ctx)


def test_several_subscription_identifiers_from_the_server():
    section = props(prop(0x0B, 1), prop(0x0B, 268_435_455), prop(0x0B, 1))
    assert decode_props(T.PUBLISH, section) == {0x0B: [1, 268_435_455, 1]}


def test_subscription_identifier_once_in_subscribe():
    assert decode_props(T.SUBSCRIBE, props(prop(0x0B, 16384))) == {0x0B: [16384]}


RANGE_CASES = []
for _pid, (_lo, _hi) in VALUE_RANGES.items():
    RANGE_CASES.append(pytest.param(_pid, _lo, True, id=f"0x{_pid:02X}={_lo}"))
    RANGE_CASES.append(pytest.param(_pid, _hi, True, id=f"0x{_pid:02X}={_hi}"))
    if _lo > 0:
        RANGE_CASES.append(pytest.param(_pid, _lo - 1, False, id=f"0x{_pid:02X}={_lo - 1}"))
    if PROPERTIES[_pid][0] == BYTE:
        for _bad in (_hi + 1, 255):
            RANGE_CASES.append(pytest.param(_pid, _bad, False, id=f"0x{_pid:02X}={_bad}"))


@pytest.mark.parametrize("pid,value,ok", RANGE_CASES)
def test_property_value_ranges(pid, value, ok):
    ctx = first_context(pid)
    section = props(prop(pid, value))
    if ok:
        assert decode_props(ctx, section) == {pid: decoded_value(pid, value)}
        return
    make, data, _ = carrier(ctx, section)
    exc = decode_error(make, data)
    # Out-of-range values are Protocol Errors; Topic Alias 0 is Topic Alias Invalid.
    assert exc.reason_code == (0x94 if pid == 0x23 else 0x82)
    assert f"got {value}" in str(exc) or "[MQTT-3.3.2-8]" in str(exc)


def test_integer_properties_use_their_full_width():
    section = props(prop(0x02, 0xFFFF_FFFF), prop(0x23, 0xFFFF))
    assert decode_props(T.PUBLISH, section) == {0x02: 0xFFFF_FFFF, 0x23: 0xFFFF}


def test_subscription_identifier_is_a_variable_byte_integer():
    # 0x0B then 80 80 01 = 16384 in three bytes.
    section = h("04 0b 80 80 01")
    assert decode_props(T.SUBSCRIBE, section) == {0x0B: [16384]}


def test_property_length_zero_gives_an_empty_dict():
    for ctx in WITH_PROPERTIES:
        assert decode_props(ctx, b"\x00") == {}, ctx_name(ctx)


# ------------------------------------------------------------------ encoding


def test_encoder_writes_every_property_of_its_packet():
    pkt = Publish(
        topic="t",
        properties={
            pid: decoded_value(pid, SAMPLE[pid])
            for pid in PROPERTIES
            if T.PUBLISH in PROPERTIES[pid][1]
        },
    )
    data = encode(pkt, 5)
    assert client_decoder(5).feed(data) == [pkt]


def test_encoder_accepts_intenum_keys_and_single_subscription_identifier():
    data = encode_publish("t", b"", 0, False, False, 0, {Prop.SUBSCRIPTION_IDENTIFIER: 5}, 5)
    assert data == h("30 06 0001 74 02 0b 05")
    data = encode(Disconnect(properties={Prop.REASON_STRING: "x"}), 5)
    assert data == h("e0 06 00 04 1f 0001 78")


@pytest.mark.parametrize(
    "properties,error",
    [
        ({0x01: 256}, ValueError),
        ({0x01: -1}, ValueError),
        ({0x23: 65536}, ValueError),
        ({0x02: 2**32}, ValueError),
        ({0x0B: 0}, ValueError),
        ({0x0B: [1, 268_435_456]}, ValueError),
        ({0x7F: 1}, ValueError),
        ({0x00: 1}, ValueError),
        ({0x03: b"bytes"}, TypeError),
        ({0x09: "str"}, TypeError),
        ({0x02: "1"}, TypeError),
        ({0x26: [("only-key",)]}, ValueError),
        ({0x26: [("k", 1)]}, TypeError),
        ({0x03: "x" * 65536}, ValueError),
        ({0x03: "\ud800"}, ValueError),  # a lone surrogate has no UTF-8 form
    ],
)
def test_encoder_rejects_what_it_cannot_encode(properties, error):
    with pytest.raises(error):
        encode_publish("t", b"", 0, False, False, 0, properties, 5)
