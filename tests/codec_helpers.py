"""Shared helpers for the codec tests: hand-made MQTT bytes and the three-way feeder.

Nothing here calls the encoder under test: byte strings are built from the
specification (field by field) so that the tests can fail.
"""

from __future__ import annotations

from collections.abc import Callable

from ingestd._codec import Decoder, Pingreq, Pingresp

from ingestd.mqtt.constants import PacketType as T

# -- hand encoding of MQTT fields -------------------------------------------


def h(hexstr: str) -> bytes:
    """Bytes from hex with spaces and newlines for readability."""
    return bytes.fromhex(hexstr)


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def vbi(n: int) -> bytes:
    """A Variable Byte Integer [MQTT-5.0 §1.5.5]."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text: str | bytes) -> bytes:
    """A UTF-8 Encoded String (or raw bytes standing for one) with its length."""
    raw = text.encode() if isinstance(text, str) else text
    return u16(len(raw)) + raw


def bin_(data: bytes) -> bytes:
    return u16(len(data)) + data


def packet(first: int, body: bytes) -> bytes:
    """Fixed header (first byte, remaining length) + body."""
    return bytes([first]) + vbi(len(body)) + body


# -- the MQTT 5 property table, restated from section 2.2.2.2 -----------------

BYTE = "byte"
U16 = "two-byte integer"
U32 = "four-byte integer"
VBI = "variable byte integer"
STR = "UTF-8 string"
BIN = "binary data"
PAIR = "UTF-8 string pair"

WILL = 0  # the Will Properties of a CONNECT, as a context next to the packet types
ACKS = {T.PUBACK, T.PUBREC, T.PUBREL, T.PUBCOMP}
WITH_PROPERTIES = {
    WILL, T.CONNECT, T.CONNACK, T.PUBLISH, *ACKS, T.SUBSCRIBE, T.SUBACK, T.UNSUBSCRIBE,
    T.UNSUBACK, T.DISCONNECT, T.AUTH,
}  # fmt: skip

PROPERTIES: dict[int, tuple[str, set[int]]] = {
    0x01: (BYTE, {T.PUBLISH, WILL}),
    0x02: (U32, {T.PUBLISH, WILL}),
    0x03: (STR, {T.PUBLISH, WILL}),
    0x08: (STR, {T.PUBLISH, WILL}),
    0x09: (BIN, {T.PUBLISH, WILL}),
    0x0B: (VBI, {T.PUBLISH, T.SUBSCRIBE}),
    0x11: (U32, {T.CONNECT, T.CONNACK, T.DISCONNECT}),
    0x12: (STR, {T.CONNACK}),
    0x13: (U16, {T.CONNACK}),
    0x15: (STR, {T.CONNECT, T.CONNACK, T.AUTH}),
    0x16: (BIN, {T.CONNECT, T.CONNACK, T.AUTH}),
    0x17: (BYTE, {T.CONNECT}),
    0x18: (U32, {WILL}),
    0x19: (BYTE, {T.CONNECT}),
    0x1A: (STR, {T.CONNACK}),
    0x1C: (STR, {T.CONNACK, T.DISCONNECT}),
    0x1F: (STR, {T.CONNACK, *ACKS, T.SUBACK, T.UNSUBACK, T.DISCONNECT, T.AUTH}),
    0x21: (U16, {T.CONNECT, T.CONNACK}),
    0x22: (U16, {T.CONNECT, T.CONNACK}),
    0x23: (U16, {T.PUBLISH}),
    0x24: (BYTE, {T.CONNACK}),
    0x25: (BYTE, {T.CONNACK}),
    0x26: (PAIR, set(WITH_PROPERTIES)),
    0x27: (U32, {T.CONNECT, T.CONNACK}),
    0x28: (BYTE, {T.CONNACK}),
    0x29: (BYTE, {T.CONNACK}),
    0x2A: (BYTE, {T.CONNACK}),
}

# Valid value ranges where narrower than the type (sections 3.1.2.11, 3.2.2.3, 3.3.2.3, 3.8.2.1).
VALUE_RANGES = {
    0x01: (0, 1),
    0x0B: (1, 268_435_455),
    0x17: (0, 1),
    0x19: (0, 1),
    0x21: (1, 0xFFFF),
    0x23: (1, 0xFFFF),
    0x24: (0, 1),
    0x25: (0, 1),
    0x27: (1, 0xFFFF_FFFF),
    0x28: (0, 1),
    0x29: (0, 1),
    0x2A: (0, 1),
}


def prop(pid: int, value: object) -> bytes:
    """One property (identifier + value) encoded by hand."""
    kind = PROPERTIES[pid][0]
    head = bytes([pid])
    if kind == BYTE:
        return head + bytes([value])  # type: ignore[list-item]
    if kind == U16:
        return head + u16(value)  # type: ignore[arg-type]
    if kind == U32:
        return head + u32(value)  # type: ignore[arg-type]
    if kind == VBI:
        return head + vbi(value)  # type: ignore[arg-type]
    if kind == STR:
        return head + s(value)  # type: ignore[arg-type]
    if kind == BIN:
        return head + bin_(value)  # type: ignore[arg-type]
    k, v = value  # type: ignore[misc]
    return head + s(k) + s(v)


def props(*encoded: bytes) -> bytes:
    """A property section: Property Length then the properties."""
    body = b"".join(encoded)
    return vbi(len(body)) + body


# A valid sample value for every property, and how the decoder reports it.
SAMPLE = {
    0x01: 1, 0x02: 3600, 0x03: "application/json", 0x08: "reply/1", 0x09: b"\x00corr",
    0x0B: 7, 0x11: 120, 0x12: "assigned-9", 0x13: 30, 0x15: "SCRAM-SHA-1", 0x16: b"\x01\x02",
    0x17: 0, 0x18: 10, 0x19: 1, 0x1A: "resp/", 0x1C: "other:1883", 0x1F: "because",
    0x21: 100, 0x22: 10, 0x23: 3, 0x24: 1, 0x25: 0, 0x26: ("key", "value"), 0x27: 65536,
    0x28: 1, 0x29: 0, 0x2A: 1,
}  # fmt: skip


def decoded_value(pid: int, value: object) -> object:
    """The value of one property as the decoder puts it in the dict."""
    if pid == 0x26 or pid == 0x0B:
        return [value]
    return value


# -- whole packets built by hand --------------------------------------------

CONNECT_V3 = h("10 0f 0006 4d5149736470 03 02 003c 0001 78")  # MQIsdp, client id "x"
CONNECT_V4 = h("10 0c 0004 4d515454 04 02 003c 0000")
CONNECT_V5 = h("10 0d 0004 4d515454 05 02 003c 00 0000")
CONNECTS = {3: CONNECT_V3, 4: CONNECT_V4, 5: CONNECT_V5}


def connect(version: int = 5, flags: int = 0x02, props_section: bytes = b"\x00",
            payload: bytes = b"\x00\x00", name: bytes = b"MQTT", keepalive: int = 60) -> bytes:  # fmt: skip
    """A CONNECT: variable header from the arguments, then ``payload`` as given."""
    body = s(name) + bytes([version, flags]) + u16(keepalive)
    if version == 5:
        body += props_section
    return packet(0x10, body + payload)


def publish(topic: str | bytes, payload: bytes = b"x", qos: int = 0, pid: int = 1,
            version: int = 5, props_section: bytes = b"\x00", flags: int = 0) -> bytes:  # fmt: skip
    body = s(topic) + (u16(pid) if qos else b"")
    if version == 5:
        body += props_section
    return packet(0x30 | (qos << 1) | flags, body + payload)


def server_decoder(version: int, **kw: object) -> Decoder:
    """A server-side decoder that has already decoded a CONNECT of ``version``."""
    d = Decoder(server_side=True, **kw)  # type: ignore[arg-type]
    got = d.feed(CONNECTS[version])
    assert len(got) == 1 and got[0].protocol_level == version
    return d


def client_decoder(version: int, **kw: object) -> Decoder:
    """A client-side decoder told the protocol version."""
    d = Decoder(server_side=False, **kw)  # type: ignore[arg-type]
    d.protocol_version = version
    return d


# The next packet the trailing-bytes check feeds in two pieces (its first byte
# rides behind the packet under test and must wait for the second).
NEXT = {True: (b"\xc0\x00", Pingreq), False: (b"\xd0\x00", Pingresp)}


def decode_three_ways(make: Callable[[], Decoder], data: bytes, expected: list) -> None:
    """Feed ``data`` whole, one byte at a time, and followed by trailing bytes.

    Every way must give exactly ``expected``. With trailing bytes (the first
    byte of a PINGREQ/PINGRESP) nothing more may come out until the rest of
    that packet arrives, and then exactly that packet.
    """
    d = make()
    assert d.feed(data) == expected, "fed whole"

    d = make()
    got: list = []
    for i in range(len(data)):
        got += d.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert got == expected[: len(got)]
    assert got == expected, "fed one byte at a time"

    d = make()
    nxt, cls = NEXT[d.server_side]
    assert d.feed(data + nxt[:1]) == expected, "followed by trailing bytes"
    assert d.feed(b"") == []
    assert d.feed(nxt[1:]) == [cls()], "the trailing bytes were not kept"

    d = make()
    assert d.feed(bytearray(data) + nxt) == [*expected, cls()], "with the next packet in one feed"


def decode_error(make: Callable[[], Decoder], data: bytes) -> Exception:
    """Feed ``data`` whole and one byte at a time; both must raise the same error. Returns it."""
    from ingestd.errors import ProtocolError

    d = make()
    try:
        d.feed(data)
    except ProtocolError as exc:
        whole = exc
    else:
        raise AssertionError(f"no ProtocolError for {data.hex(' ')}")
    d = make()
    try:
        for i in range(len(data)):
            d.feed(data[i : i + 1])
    except ProtocolError as exc:
        assert (exc.reason_code, str(exc)) == (whole.reason_code, str(whole)), "byte by byte"
    else:
        raise AssertionError(f"no ProtocolError byte by byte for {data.hex(' ')}")
    return whole
