"""Malformed and forbidden input: every case names the rule it breaks.

Each row is (statement, what, decoder, bytes, reason code). The statement
identifier is in the test id, and the ProtocolError message must cite it.
Decoders: "fresh" is a server-side decoder before any CONNECT, "server" one
after a CONNECT of the row's version, "client" a client-side decoder told the
version, "client0" one not told it.
"""

from __future__ import annotations

import pytest
from ingestd._codec import Decoder

from codec_helpers import (
    CONNECT_V5,
    client_decoder,
    connect,
    decode_error,
    h,
    packet,
    prop,
    props,
    publish,
    s,
    server_decoder,
    u16,
    vbi,
)
from ingestd.errors import ProtocolError

MALFORMED, PROTOCOL, UNSUPPORTED = 0x81, 0x82, 0x84
TOPIC_INVALID, ALIAS_INVALID, TOO_LARGE = 0x90, 0x94, 0x95

NO_PROPS = b"\x00"


def row(cite, what, decoder, version, data, reason):
    return pytest.param(cite, decoder, version, data, reason, id=f"{cite} {what} v{version}")


def sub_v5(*pairs: tuple[str, int], pid: int = 1, props_section: bytes = NO_PROPS) -> bytes:
    return packet(0x82, u16(pid) + props_section + b"".join(s(f) + bytes([o]) for f, o in pairs))


def sub_v4(*pairs: tuple[str, int], pid: int = 1) -> bytes:
    return packet(0x82, u16(pid) + b"".join(s(f) + bytes([o]) for f, o in pairs))


def will_connect(version: int, flags: int, will_props: bytes = NO_PROPS) -> bytes:
    payload = s("c") + (will_props if version == 5 else b"") + s("w/t") + s("bye")
    return connect(version, flags=flags, payload=payload)


CASES = [
    # ------------------------------------------------ fixed header and lengths
    row("[MQTT-5.0 §1.5.5]", "remaining length over 4 bytes", "server", 5, h("30 ff ff ff ff 01"), MALFORMED),
    row("[MQTT-5.0 §1.5.5]", "remaining length over 4 bytes first", "fresh", 5, h("10 80 80 80 80 01"), MALFORMED),
    row("[MQTT-3.1.1 §2.2.3]", "remaining length over 4 bytes", "server", 4, h("30 ff ff ff ff 01"), MALFORMED),
    row("[MQTT-5.0 §1.5.5]", "property length over 4 bytes", "server", 5, publish("a", props_section=h("ff ff ff ff 01")), MALFORMED),
    row("[MQTT-5.0 §2.1.4]", "remaining length shorter than packet id", "server", 5, h("40 01 00"), MALFORMED),
    row("[MQTT-5.0 §2.1.4]", "topic length past the end", "server", 5, h("30 03 0005 61"), MALFORMED),
    row("[MQTT-5.0 §2.1.4]", "property length past the end", "server", 5, publish("a", props_section=h("05 01 01")), MALFORMED),
    row("[MQTT-5.0 §2.1.4]", "property value past its section", "server", 5, publish("a", props_section=h("02 02 00"), payload=b"\x00\x00\x00"), MALFORMED),
    row("[MQTT-5.0 §2.1.4]", "PINGREQ with a body", "server", 5, h("c0 01 00"), MALFORMED),
    row("[MQTT-5.0 §2.1.4]", "PUBREL longer than its fields", "server", 5, h("62 05 0001 00 00 00"), MALFORMED),
    row("[MQTT-5.0 §2.1.4]", "truncated CONNECT", "fresh", 5, h("10 05 0004 4d5154"), MALFORMED),
    row("[MQTT-5.0 §2.1.4]", "CONNECT with bytes after the password", "fresh", 5, connect(5, flags=0x42, payload=s("c") + s("pw") + b"!"), MALFORMED),
    row("[MQTT-3.1.1 §2.2.3]", "PUBACK longer than 2 bytes", "server", 4, h("40 03 0001 00"), MALFORMED),
    row("[MQTT-3.1.1 §2.2.3]", "UNSUBACK longer than 2 bytes", "client", 4, h("b0 03 0001 00"), MALFORMED),
    row("[MQTT-3.1.1 §2.2.3]", "DISCONNECT with a body", "server", 4, h("e0 01 00"), MALFORMED),
    row("[MQTT-3.1.1 §2.2.3]", "CONNACK of 1 byte", "client", 4, h("20 01 00"), MALFORMED),
    # ---------------------------------------------------------- packet types
    row("[MQTT-5.0 §2.1.2]", "packet type 0", "server", 5, h("00 00"), MALFORMED),
    row("[MQTT-3.1.1 §2.2.1]", "packet type 0", "server", 4, h("00 00"), MALFORMED),
    row("[MQTT-3.1.1 §2.2.1]", "AUTH does not exist", "server", 4, h("f0 00"), MALFORMED),
    row("[MQTT-5.0 §2.1.2]", "CONNACK to a server", "server", 5, h("20 03 00 00 00"), PROTOCOL),
    row("[MQTT-5.0 §2.1.2]", "SUBACK to a server", "server", 4, h("90 03 0001 00"), PROTOCOL),
    row("[MQTT-5.0 §2.1.2]", "UNSUBACK to a server", "server", 5, h("b0 03 0001 00"), PROTOCOL),
    row("[MQTT-5.0 §2.1.2]", "PINGRESP to a server", "server", 5, h("d0 00"), PROTOCOL),
    row("[MQTT-5.0 §2.1.2]", "CONNECT to a client", "client", 5, CONNECT_V5, PROTOCOL),
    row("[MQTT-5.0 §2.1.2]", "SUBSCRIBE to a client", "client", 5, sub_v5(("a", 0)), PROTOCOL),
    row("[MQTT-5.0 §2.1.2]", "UNSUBSCRIBE to a client", "client", 4, h("a2 05 0001 0001 61"), PROTOCOL),
    row("[MQTT-5.0 §2.1.2]", "PINGREQ to a client", "client", 4, h("c0 00"), PROTOCOL),
    row("[MQTT-3.1.1 §3.14]", "DISCONNECT to a 3.1.1 client", "client", 4, h("e0 00"), PROTOCOL),
    row("[MQTT-3.1.0-1]", "PUBLISH before CONNECT", "fresh", 5, publish("a"), PROTOCOL),
    row("[MQTT-3.1.0-1]", "PINGREQ before CONNECT", "fresh", 5, h("c0 00"), PROTOCOL),
    row("[MQTT-3.1.0-2]", "second CONNECT", "server", 5, CONNECT_V5, PROTOCOL),
    row("[MQTT-3.1.0-2]", "second CONNECT", "server", 4, CONNECT_V5, PROTOCOL),
    row("[MQTT-3.2.0-1]", "PUBLISH before CONNACK", "client0", 0, publish("a"), PROTOCOL),
    # --------------------------------------------------------- reserved flags
    row("[MQTT-2.1.3-1]", "CONNECT flags", "fresh", 5, b"\x11" + CONNECT_V5[1:], MALFORMED),
    row("[MQTT-2.1.3-1]", "PUBACK flags", "server", 5, h("41 02 0001"), MALFORMED),
    row("[MQTT-2.2.2-1]", "PUBACK flags", "server", 4, h("48 02 0001"), MALFORMED),
    row("[MQTT-2.1.3-1]", "PINGREQ flags", "server", 5, h("c1 00"), MALFORMED),
    row("[MQTT-2.1.3-1]", "CONNACK flags", "client", 5, h("28 03 00 00 00"), MALFORMED),
    row("[MQTT-2.1.3-1]", "SUBACK flags", "client", 5, h("92 04 0001 00 00"), MALFORMED),
    row("[MQTT-3.6.1-1]", "PUBREL flags 0000", "server", 5, h("60 02 0001"), MALFORMED),
    row("[MQTT-3.6.1-1]", "PUBREL flags 0011", "client", 4, h("63 02 0001"), MALFORMED),
    row("[MQTT-3.8.1-1]", "SUBSCRIBE flags", "server", 5, b"\x80" + sub_v5(("a", 0))[1:], MALFORMED),
    row("[MQTT-3.10.1-1]", "UNSUBSCRIBE flags", "server", 4, h("a0 05 0001 0001 61"), MALFORMED),
    row("[MQTT-3.14.1-1]", "DISCONNECT flags", "server", 5, h("e8 00"), MALFORMED),
    row("[MQTT-3.15.1-1]", "AUTH flags", "server", 5, h("f1 00"), MALFORMED),
    row("[MQTT-3.3.1-4]", "PUBLISH QoS 3", "server", 5, packet(0x36, s("a") + u16(1) + NO_PROPS), MALFORMED),
    row("[MQTT-3.3.1-4]", "PUBLISH QoS 3", "client", 4, packet(0x36, s("a") + u16(1)), MALFORMED),
    # ------------------------------------------------------------ UTF-8 strings
    row("[MQTT-1.5.4-1]", "invalid UTF-8 topic", "server", 5, publish(b"a\xff"), MALFORMED),
    row("[MQTT-1.5.4-1]", "UTF-8 encoded surrogate U+D800", "server", 5, publish(b"a\xed\xa0\x80"), MALFORMED),
    row("[MQTT-1.5.4-1]", "UTF-8 encoded surrogate U+DFFF", "server", 5, publish(b"\xed\xbf\xbf"), MALFORMED),
    row("[MQTT-1.5.4-1]", "overlong UTF-8", "server", 5, publish(b"\xc0\xaf"), MALFORMED),
    row("[MQTT-1.5.4-1]", "truncated UTF-8 sequence", "server", 5, publish(b"a\xe2\x82"), MALFORMED),
    row("[MQTT-1.5.4-1]", "code point above U+10FFFF", "server", 5, publish(b"\xf4\x90\x80\x80"), MALFORMED),
    row("[MQTT-1.5.4-1]", "invalid UTF-8 client id", "fresh", 5, connect(5, payload=s(b"\xfe")), MALFORMED),
    row("[MQTT-1.5.4-1]", "invalid UTF-8 subscription filter", "server", 5, packet(0x82, u16(1) + NO_PROPS + s(b"\xff") + b"\x00"), MALFORMED),
    row("[MQTT-1.5.4-1]", "invalid UTF-8 user property", "server", 5, publish("a", props_section=props(h("26 0001 61 0001 ff"))), MALFORMED),
    row("[MQTT-1.5.4-2]", "U+0000 in topic", "server", 5, publish(b"a\x00b"), MALFORMED),
    row("[MQTT-1.5.4-2]", "U+0000 in client id", "fresh", 5, connect(5, payload=s(b"c\x00")), MALFORMED),
    row("[MQTT-1.5.4-2]", "U+0000 in user name", "fresh", 5, connect(5, flags=0x82, payload=s("c") + s(b"\x00")), MALFORMED),
    row("[MQTT-1.5.4-2]", "U+0000 in unsubscribe filter", "server", 5, packet(0xA2, u16(1) + NO_PROPS + s(b"a/\x00")), MALFORMED),
    row("[MQTT-1.5.4-2]", "U+0000 in reason string", "client", 5, packet(0x40, u16(1) + b"\x00" + props(prop(0x1F, "\x00"))), MALFORMED),
    row("[MQTT-1.5.3-1]", "invalid UTF-8 topic", "server", 4, publish(b"a\xff", version=4), MALFORMED),
    row("[MQTT-1.5.3-2]", "U+0000 in topic", "server", 4, publish(b"\x00", version=4), MALFORMED),
    # ------------------------------------------------------------------ PUBLISH
    row("[MQTT-3.3.2-2]", "+ in PUBLISH topic", "server", 5, publish("a/+"), TOPIC_INVALID),
    row("[MQTT-3.3.2-2]", "# in PUBLISH topic", "server", 5, publish("a/#"), TOPIC_INVALID),
    row("[MQTT-3.3.2-2]", "+ in PUBLISH topic", "server", 4, publish("+", version=4), TOPIC_INVALID),
    row("[MQTT-3.3.2-2]", "# in PUBLISH topic to a client", "client", 5, publish("#"), TOPIC_INVALID),
    row("[MQTT-2.2.1-3]", "QoS 1 PUBLISH packet id 0", "server", 5, publish("a", qos=1, pid=0), PROTOCOL),
    row("[MQTT-2.2.1-3]", "QoS 2 PUBLISH packet id 0", "server", 5, publish("a", qos=2, pid=0), PROTOCOL),
    row("[MQTT-2.3.1-1]", "QoS 1 PUBLISH packet id 0", "server", 4, publish("a", qos=1, pid=0, version=4), PROTOCOL),
    row("[MQTT-4.7.3-1]", "zero-length topic without Topic Alias", "server", 5, publish(""), PROTOCOL),
    row("[MQTT-4.7.3-1]", "zero-length topic", "server", 4, publish("", version=4), PROTOCOL),
    row("[MQTT-3.3.4-6]", "Subscription Identifier from a client", "server", 5, publish("a", props_section=props(prop(0x0B, 1))), PROTOCOL),
    row("[MQTT-3.3.2-8]", "Topic Alias 0", "server", 5, publish("a", props_section=props(prop(0x23, 0))), ALIAS_INVALID),
    row("[MQTT-3.3.2-8]", "Topic Alias 0 to a client", "client", 5, publish("a", props_section=props(prop(0x23, 0))), ALIAS_INVALID),
    # ------------------------------------------------------------ acknowledgements
    row("[MQTT-5.0 §2.2.1]", "PUBACK packet id 0", "server", 5, h("40 02 0000"), PROTOCOL),
    row("[MQTT-5.0 §2.2.1]", "PUBREL packet id 0", "client", 5, h("62 02 0000"), PROTOCOL),
    row("[MQTT-3.1.1 §2.3.1]", "PUBCOMP packet id 0", "server", 4, h("70 02 0000"), PROTOCOL),
    row("[MQTT-5.0 §2.2.1]", "SUBACK packet id 0", "client", 5, h("90 04 0000 00 00"), PROTOCOL),
    row("[MQTT-3.1.1 §2.3.1]", "UNSUBACK packet id 0", "client", 4, h("b0 02 0000"), PROTOCOL),
    row("[MQTT-3.2.2-1]", "CONNACK reserved acknowledge flags", "client", 5, h("20 03 02 00 00"), MALFORMED),
    row("[MQTT-3.2.2-1]", "CONNACK reserved acknowledge flags", "client", 4, h("20 02 80 00"), MALFORMED),
    # ------------------------------------------------------------------ CONNECT
    row("[MQTT-3.1.2-1]", "protocol name MQTX", "fresh", 5, connect(5, name=b"MQTX"), UNSUPPORTED),
    row("[MQTT-3.1.2-2]", "protocol level 6", "fresh", 6, connect(6), UNSUPPORTED),
    row("[MQTT-3.1.2-2]", "protocol level 0", "fresh", 0, connect(0), UNSUPPORTED),
    row("[MQTT-3.1.2-2]", "MQTT with level 3", "fresh", 3, connect(3), UNSUPPORTED),
    row("[MQTT-3.1.2-2]", "MQIsdp with level 4", "fresh", 4, connect(4, name=b"MQIsdp"), UNSUPPORTED),
    row("[MQTT-3.1.2-3]", "CONNECT reserved flag", "fresh", 5, connect(5, flags=0x03), MALFORMED),
    row("[MQTT-3.1.2-3]", "CONNECT reserved flag", "fresh", 4, connect(4, flags=0x01), MALFORMED),
    row("[MQTT-3.1.2-11]", "Will QoS without Will Flag", "fresh", 5, connect(5, flags=0x0A), PROTOCOL),
    row("[MQTT-3.1.2-13]", "Will Retain without Will Flag", "fresh", 5, connect(5, flags=0x22), PROTOCOL),
    row("[MQTT-3.1.2-13]", "Will QoS without Will Flag", "fresh", 4, connect(4, flags=0x12), PROTOCOL),
    row("[MQTT-3.1.2-15]", "Will Retain without Will Flag", "fresh", 4, connect(4, flags=0x20), PROTOCOL),
    row("[MQTT-3.1.2-12]", "Will QoS 3", "fresh", 5, will_connect(5, 0x1E), MALFORMED),
    row("[MQTT-3.1.2-14]", "Will QoS 3", "fresh", 4, will_connect(4, 0x1E), MALFORMED),
    row("[MQTT-3.1.2-22]", "password without user name", "fresh", 4, connect(4, flags=0x42, payload=s("c") + s("pw")), PROTOCOL),
    row("[MQTT-3.1.2-22]", "password without user name", "fresh", 3, connect(3, name=b"MQIsdp", flags=0x42, payload=s("c") + s("pw")), PROTOCOL),
    row("[MQTT-5.0 §2.1.4]", "Will Flag without a will", "fresh", 5, connect(5, flags=0x06, payload=s("c")), MALFORMED),
    row("[MQTT-5.0 §2.1.4]", "user name flag without a user name", "fresh", 5, connect(5, flags=0x82, payload=s("c")), MALFORMED),
    # ------------------------------------------------------- SUBSCRIBE UNSUBSCRIBE
    row("[MQTT-3.8.3-2]", "SUBSCRIBE without topic filters", "server", 5, h("82 03 0001 00"), PROTOCOL),
    row("[MQTT-3.8.3-3]", "SUBSCRIBE without topic filters", "server", 4, h("82 02 0001"), PROTOCOL),
    row("[MQTT-3.10.3-2]", "UNSUBSCRIBE without topic filters", "server", 5, h("a2 03 0001 00"), PROTOCOL),
    row("[MQTT-3.10.3-2]", "UNSUBSCRIBE without topic filters", "server", 4, h("a2 02 0001"), PROTOCOL),
    row("[MQTT-2.2.1-3]", "SUBSCRIBE packet id 0", "server", 5, sub_v5(("a", 0), pid=0), PROTOCOL),
    row("[MQTT-2.3.1-1]", "UNSUBSCRIBE packet id 0", "server", 4, h("a2 05 0000 0001 61"), PROTOCOL),
    row("[MQTT-3.8.3-5]", "subscription options bit 6", "server", 5, sub_v5(("a", 0), ("b", 0x40)), MALFORMED),
    row("[MQTT-3.8.3-5]", "subscription options bit 7", "server", 5, sub_v5(("a", 0x81)), MALFORMED),
    row("[MQTT-3-8.3-4]", "requested QoS reserved bits", "server", 4, sub_v4(("a", 0x04)), MALFORMED),
    row("[MQTT-3-8.3-4]", "requested QoS 3", "server", 4, sub_v4(("a", 0x03)), MALFORMED),
    row("[MQTT-5.0 §3.8.3.1]", "subscription QoS 3", "server", 5, sub_v5(("a", 0x03)), PROTOCOL),
    row("[MQTT-5.0 §3.8.3.1]", "retain handling 3", "server", 5, sub_v5(("a", 0x30)), PROTOCOL),
    row("[MQTT-3.8.3-4]", "No Local on a shared subscription", "server", 5, sub_v5(("$share/g/a", 0x04)), PROTOCOL),
    row("[MQTT-5.0 §2.1.4]", "subscription options missing", "server", 5, packet(0x82, u16(1) + NO_PROPS + s("a")), MALFORMED),
    # -------------------------------------------------------------- properties
    row("[MQTT-5.0 §2.2.2.2]", "duplicate Payload Format Indicator", "server", 5, publish("a", props_section=props(prop(0x01, 1), prop(0x01, 1))), PROTOCOL),
    row("[MQTT-5.0 §2.2.2.2]", "duplicate Session Expiry Interval", "fresh", 5, connect(5, props_section=props(prop(0x11, 1), prop(0x11, 2))), PROTOCOL),
    row("[MQTT-5.0 §2.2.2.2]", "duplicate Topic Alias", "client", 5, publish("a", props_section=props(prop(0x23, 1), prop(0x23, 1))), PROTOCOL),
    row("[MQTT-5.0 §2.2.2.2]", "duplicate Subscription Identifier in SUBSCRIBE", "server", 5, sub_v5(("a", 0), props_section=props(prop(0x0B, 1), prop(0x0B, 2))), PROTOCOL),
    row("[MQTT-5.0 §2.2.2.2]", "duplicate Reason String", "client", 5, h("40 0c 0001 80 08 1f 0001 61 1f 0001 62"), PROTOCOL),
    row("[MQTT-5.0 §2.2.2.2]", "duplicate Will Delay Interval", "fresh", 5, will_connect(5, 0x06, props(prop(0x18, 1), prop(0x18, 1))), PROTOCOL),
    row("[MQTT-5.0 §2.2.2.2]", "Session Expiry Interval in PUBLISH", "server", 5, publish("a", props_section=props(prop(0x11, 1))), MALFORMED),
    row("[MQTT-5.0 §2.2.2.2]", "Topic Alias in CONNECT", "fresh", 5, connect(5, props_section=props(prop(0x23, 1))), MALFORMED),
    row("[MQTT-5.0 §2.2.2.2]", "Will Delay Interval in CONNECT properties", "fresh", 5, connect(5, props_section=props(prop(0x18, 1))), MALFORMED),
    row("[MQTT-5.0 §2.2.2.2]", "Session Expiry Interval in Will Properties", "fresh", 5, will_connect(5, 0x06, props(prop(0x11, 1))), MALFORMED),
    row("[MQTT-5.0 §2.2.2.2]", "Reason String in PUBLISH", "server", 5, publish("a", props_section=props(prop(0x1F, "x"))), MALFORMED),
    row("[MQTT-5.0 §2.2.2.2]", "Maximum QoS in CONNECT", "fresh", 5, connect(5, props_section=props(prop(0x24, 1))), MALFORMED),
    row("[MQTT-5.0 §2.2.2.2]", "Reason String in SUBSCRIBE", "server", 5, sub_v5(("a", 0), props_section=props(prop(0x1F, "x"))), MALFORMED),
    row("[MQTT-5.0 §2.2.2.2]", "unknown property 0x7F", "server", 5, publish("a", props_section=h("02 7f 00")), MALFORMED),
    row("[MQTT-5.0 §2.2.2.2]", "unknown property 0x00", "server", 5, publish("a", props_section=h("02 00 00")), MALFORMED),
    row("[MQTT-5.0 §2.2.2.2]", "two-byte property identifier", "server", 5, publish("a", props_section=h("03 81 01 00")), MALFORMED),
    row("[MQTT-5.0 §3.3.2.3.2]", "Payload Format Indicator 2", "server", 5, publish("a", props_section=props(prop(0x01, 2))), PROTOCOL),
    row("[MQTT-5.0 §3.1.3.2.3]", "Will Payload Format Indicator 255", "fresh", 5, will_connect(5, 0x06, props(prop(0x01, 255))), PROTOCOL),
    row("[MQTT-5.0 §3.1.2.11.3]", "Receive Maximum 0", "fresh", 5, connect(5, props_section=props(prop(0x21, 0))), PROTOCOL),
    row("[MQTT-5.0 §3.1.2.11.4]", "Maximum Packet Size 0", "fresh", 5, connect(5, props_section=props(prop(0x27, 0))), PROTOCOL),
    row("[MQTT-5.0 §3.1.2.11.6]", "Request Response Information 2", "fresh", 5, connect(5, props_section=props(prop(0x19, 2))), PROTOCOL),
    row("[MQTT-5.0 §3.1.2.11.7]", "Request Problem Information 2", "fresh", 5, connect(5, props_section=props(prop(0x17, 2))), PROTOCOL),
    row("[MQTT-5.0 §3.2.2.3.3]", "Receive Maximum 0", "client", 5, packet(0x20, b"\x00\x00" + props(prop(0x21, 0))), PROTOCOL),
    row("[MQTT-5.0 §3.2.2.3.4]", "Maximum QoS 2", "client", 5, packet(0x20, b"\x00\x00" + props(prop(0x24, 2))), PROTOCOL),
    row("[MQTT-5.0 §3.2.2.3.5]", "Retain Available 2", "client", 5, packet(0x20, b"\x00\x00" + props(prop(0x25, 2))), PROTOCOL),
    row("[MQTT-5.0 §3.2.2.3.6]", "Maximum Packet Size 0", "client", 5, packet(0x20, b"\x00\x00" + props(prop(0x27, 0))), PROTOCOL),
    row("[MQTT-5.0 §3.2.2.3.11]", "Wildcard Subscription Available 3", "client", 5, packet(0x20, b"\x00\x00" + props(prop(0x28, 3))), PROTOCOL),
    row("[MQTT-5.0 §3.2.2.3.12]", "Subscription Identifier Available 2", "client", 5, packet(0x20, b"\x00\x00" + props(prop(0x29, 2))), PROTOCOL),
    row("[MQTT-5.0 §3.2.2.3.13]", "Shared Subscription Available 2", "client", 5, packet(0x20, b"\x00\x00" + props(prop(0x2A, 2))), PROTOCOL),
    row("[MQTT-5.0 §3.8.2.1.2]", "Subscription Identifier 0", "server", 5, sub_v5(("a", 0), props_section=props(prop(0x0B, 0))), PROTOCOL),
    row("[MQTT-5.0 §3.3.2.3.8]", "Subscription Identifier 0 to a client", "client", 5, publish("a", props_section=props(prop(0x0B, 0))), PROTOCOL),
]  # fmt: skip


def make(decoder: str, version: int):
    if decoder == "fresh":
        return lambda: Decoder(server_side=True)
    if decoder == "server":
        return lambda: server_decoder(version)
    if decoder == "client":
        return lambda: client_decoder(version)
    return lambda: Decoder(server_side=False)


@pytest.mark.parametrize("cite,decoder,version,data,reason", CASES)
def test_malformed(cite, decoder, version, data, reason):
    exc = decode_error(make(decoder, version), data)
    assert exc.reason_code == reason, str(exc)
    assert cite in str(exc)


@pytest.mark.parametrize("cite,decoder,version,data,reason", CASES)
def test_error_is_sticky(cite, decoder, version, data, reason):
    d = make(decoder, version)()
    with pytest.raises(ProtocolError) as first:
        d.feed(data)
    # Whatever comes next, a failed decoder raises the same error again.
    for more in (b"", h("c0 00"), data):
        with pytest.raises(ProtocolError) as again:
            d.feed(more)
        assert (again.value.reason_code, str(again.value)) == (
            first.value.reason_code,
            str(first.value),
        )


def test_packets_before_the_error_in_the_same_feed_ride_on_the_exception():
    # feed() either returns packets or raises; when it raises, the complete packets
    # before the malformed one are on the exception, in order, and nothing after it.
    d = server_decoder(5)
    with pytest.raises(ProtocolError) as exc:
        d.feed(h("c0 00") + h("c0 00") + publish("a/+") + h("c0 00"))
    assert [p.packet_type for p in exc.value.packets] == [12, 12]
    with pytest.raises(ProtocolError) as again:
        d.feed(h("c0 00"))
    assert again.value.packets == []  # a later feed of a failed decoder returns nothing


# -------------------------------------------------------- packet too large


@pytest.mark.parametrize("server_side", [True, False])
def test_packet_too_large_is_refused_from_its_fixed_header(server_side):
    d = (
        server_decoder(5, max_packet_size=1024)
        if server_side
        else client_decoder(5, max_packet_size=1024)
    )
    # Announce a 2 MB PUBLISH and send only its fixed header.
    with pytest.raises(ProtocolError) as exc:
        d.feed(b"\x30" + vbi(2_000_000))
    assert exc.value.reason_code == TOO_LARGE
    assert ("[MQTT-3.2.2-15]" if server_side else "[MQTT-3.1.2-24]") in str(exc.value)
    if hasattr(d, "buffered"):
        assert d.buffered == 0


def test_packet_too_large_with_the_maximum_remaining_length():
    d = server_decoder(5, max_packet_size=1_000_000)
    with pytest.raises(ProtocolError) as exc:
        d.feed(h("30 ff ff ff 7f"))  # 268,435,455: the largest remaining length there is
    assert exc.value.reason_code == TOO_LARGE


def test_packet_too_large_counts_the_whole_packet():
    # max 100: a PUBLISH of exactly 100 bytes (1 + 1 + 98) passes, 101 bytes does not.
    body = s("t") + b"\x00" + bytes(98 - 4)
    ok = packet(0x30, body)
    assert len(ok) == 100
    d = server_decoder(5, max_packet_size=100)
    assert len(d.feed(ok)) == 1
    with pytest.raises(ProtocolError) as exc:
        d.feed(packet(0x30, body + b"!"))
    assert exc.value.reason_code == TOO_LARGE


def test_max_packet_size_is_writable():
    d = server_decoder(5)
    d.max_packet_size = 10
    assert d.max_packet_size == 10
    with pytest.raises(ProtocolError) as exc:
        d.feed(b"\x30\x0a")
    assert exc.value.reason_code == TOO_LARGE


def test_default_max_packet_size_waits_for_a_huge_packet():
    d = server_decoder(5)
    assert d.feed(h("30 ff ff ff 7f") + s("t")) == []


def test_unsupported_level_leaves_the_version_unknown():
    d = Decoder(server_side=True)
    with pytest.raises(ProtocolError) as exc:
        d.feed(connect(6))
    assert exc.value.reason_code == UNSUPPORTED
    assert d.protocol_version == 0


def test_malformed_v5_connect_still_reports_version_5():
    # The broker answers a malformed v5 CONNECT with a v5 CONNACK carrying the reason.
    d = Decoder(server_side=True)
    with pytest.raises(ProtocolError) as exc:
        d.feed(connect(5, props_section=h("02 7f 00")))  # unknown property 0x7F
    assert exc.value.reason_code == MALFORMED
    assert d.protocol_version == 5


def test_message_cites_like_paho():
    exc = decode_error(lambda: Decoder(server_side=True), connect(5, flags=0x03))
    assert str(exc) == "reserved flag in CONNECT must be 0 [MQTT-3.1.2-3]"
