"""Bounded fuzzing of the decoder (issue 9, "Limits and hardening").

What test_codec_hypothesis.py does not: it round-trips *valid* streams and
feeds short garbage to a fresh server decoder. Here the input is hostile and
comes after a valid CONNECT (or to a client decoder told its version):
arbitrary bytes, and valid streams of every packet type mutated by bit flips,
byte overwrites, insertions, deletions and truncation, fed whole, one byte at
a time and in random chunks. For every input:

* ``feed`` returns packets or raises ProtocolError with one of the reason
  codes docs/codec.md lists for the decoder; no other exception, ever;
* the three ways of feeding agree (same packets, same error);
* after an error the decoder holds nothing and only repeats that error;
* every packet it returned re-encodes (``encode``) to bytes that a decoder in
  the same state accepts and decodes back to the same packet.

Plus the length bomb: an announced size over ``max_packet_size`` is refused
from the fixed header alone, nothing of the body buffered.

Bounded: every test has an explicit ``max_examples`` so the file runs in a few
seconds; ``database=None`` keeps no example database between runs.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from ingestd._codec import Connect, Decoder, Suback, encode

from codec_helpers import CONNECTS, client_decoder, packet, server_decoder, u16, vbi
from ingestd.errors import ProtocolError
from ingestd.mqtt.constants import PacketType as T
from ingestd.mqtt.constants import Reason
from test_codec_hypothesis import client_packets, connects, server_packets

# The reason codes docs/codec.md allows the decoder to raise.
DECODER_CODES = {0x81, 0x82, 0x84, 0x90, 0x94, 0x95}
V5_CODES = {int(r) for r in Reason}

# A longer hunt: INGESTD_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_decoder.py
EXAMPLES = int(os.environ.get("INGESTD_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VERSIONS = [3, 4, 5]
SIDES = ["server", "client"]


def make_decoder(side: str, version: int, **kw: object):
    """A factory of decoders ready for the packets after the CONNECT / CONNACK."""
    if side == "server":
        return lambda: server_decoder(version, **kw)
    # A client decoder speaks 3.1.1 to a 3.1 server too (the CONNACK has the same form).
    return lambda: client_decoder(5 if version == 5 else 4, **kw)


# ------------------------------------------------------------------- feeding


class Outcome:
    """What one way of feeding a blob gave: the packets, then the error (or None)."""

    def __init__(self, packets: list, error: tuple[int, str] | None, buffered: int) -> None:
        self.packets = packets
        self.error = error
        self.buffered = buffered


def feed(make, chunks: list[bytes]) -> Outcome:
    d = make()
    got: list = []
    try:
        for chunk in chunks:
            got += d.feed(chunk)
    except ProtocolError as exc:
        code = exc.reason_code
        assert code in DECODER_CODES, f"reason 0x{code:02X} ({exc}) not a decoder reason code"
        assert code in V5_CODES
        # The decoder's state after the error is not reused: nothing is held, and
        # whatever comes next (even a valid PINGREQ / PINGRESP) raises the same error.
        assert d.buffered == 0
        for more in (b"", b"\xc0\x00", b"\xd0\x00"):
            with pytest.raises(ProtocolError) as again:
                d.feed(more)
            assert (again.value.reason_code, str(again.value)) == (code, str(exc))
        return Outcome(got, (code, str(exc)), 0)
    return Outcome(got, None, d.buffered)


def split(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(blob)) for c in cuts})
    out, start = [], 0
    for p in [*points, len(blob)]:
        out.append(blob[start:p])
        start = p
    return out


def check_blob(make, blob: bytes, cuts: list[int], version: int, side: str) -> Outcome:
    """Feed ``blob`` three ways, check they agree, and re-encode every packet."""
    whole = feed(make, [blob])
    bytewise = feed(make, [blob[i : i + 1] for i in range(len(blob))])
    chunked = feed(make, split(blob, cuts))

    assert whole.error == bytewise.error == chunked.error, "fed whole / byte by byte / chunks"
    if whole.error is None:
        assert whole.packets == bytewise.packets == chunked.packets
        assert whole.buffered == bytewise.buffered == chunked.buffered
    else:
        # A feed that raises returns nothing of its call; earlier calls' packets stand.
        assert whole.packets == []
        assert chunked.packets == bytewise.packets[: len(chunked.packets)]

    level = version
    for p in bytewise.packets:
        if isinstance(p, Connect):
            level = p.protocol_level
        check_reencodes(p, side, level)
    return bytewise


def check_reencodes(p: object, side: str, version: int) -> None:
    """A decoded packet encodes, and a decoder in the same state decodes it back."""
    if isinstance(p, Connect):
        fresh = Decoder(server_side=True)
        enc_version = p.protocol_level
    elif side == "server":
        fresh = server_decoder(version)
        enc_version = version
    else:
        fresh = make_decoder("client", version)()
        enc_version = fresh.protocol_version
        if getattr(p, "packet_type", None) == T.CONNACK and p.properties:
            enc_version = 5  # a CONNACK with properties is the v5 form whatever we were told
    try:
        blob = encode(p, enc_version)
    except (ValueError, TypeError) as exc:  # pragma: no cover - a finding
        raise AssertionError(f"decoded {p!r} cannot be re-encoded: {exc}") from exc
    try:
        again = fresh.feed(blob)
    except ProtocolError as exc:  # pragma: no cover - a finding
        raise AssertionError(
            f"decoded {p!r}, re-encoded {blob.hex(' ')}, refused: {exc} (0x{exc.reason_code:02X})"
        ) from exc
    if enc_version < 5 and getattr(p, "packet_type", None) == T.SUBACK:
        # Documented: 3.1.1 encoding writes every failure code (>= 0x80) as 0x80.
        p = Suback(
            packet_id=p.packet_id,
            reason_codes=[min(c, 0x80) if c >= 0x80 else c for c in p.reason_codes],
        )
    assert again == [p], f"re-encoded {blob.hex(' ')} decodes to {again!r}, not {p!r}"


# ------------------------------------------------------- (a) arbitrary bytes


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("side", SIDES)
@FUZZ
@given(blob=st.binary(min_size=1, max_size=200), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_arbitrary_bytes_after_connect(side, version, blob, cuts):
    check_blob(make_decoder(side, version), blob, cuts, version, side)


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(
    # Arbitrary bytes behind a plausible fixed header: they reach the packet parsers
    # (a random first byte mostly stops at the type/flags check).
    first=st.sampled_from([0x30, 0x32, 0x34, 0x3B, 0x40, 0x50, 0x62, 0x70, 0x82, 0xA2, 0xE0, 0xF0]),
    body=st.binary(max_size=120),
    tail=st.binary(max_size=8),
    cuts=st.lists(st.integers(0, 140), max_size=6),
)
def test_arbitrary_bodies_after_connect(version, first, body, tail, cuts):
    make = make_decoder("server", version)
    check_blob(make, packet(first, body) + tail, cuts, version, "server")


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(rest=st.binary(max_size=120), cuts=st.lists(st.integers(0, 140), max_size=6))
def test_arbitrary_connect_bodies(version, rest, cuts):
    """A CONNECT header of the right protocol name and level, then anything."""
    name = b"MQIsdp" if version == 3 else b"MQTT"
    blob = packet(0x10, u16(len(name)) + name + bytes([version]) + rest)
    check_blob(lambda: Decoder(server_side=True), blob, cuts, version, "server")


# ------------------------------------------------------- (b) mutated streams


@st.composite
def mutations(draw, blob: bytes) -> bytes:
    """1 to 4 edits of ``blob``: bit flip, overwrite, insert, delete, truncate, duplicate."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        n = len(data)
        pos = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[pos] = draw(
                st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x23, 0x2B]) | st.integers(0, 255)
            )
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and n:
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
        elif op == "dup" and n:
            end = pos + draw(st.integers(1, 16))
            data[pos:pos] = data[pos:end]
    return bytes(data)


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(data=st.data())
def test_mutated_client_streams(version, data):
    """CONNECT + client packets of every type, encoded, then mutated (CONNECT included)."""
    first = data.draw(connects(version), "connect")
    rest = data.draw(st.lists(client_packets(version), min_size=1, max_size=6), "packets")
    blob = b"".join(encode(p, version) for p in [first, *rest])
    bad = data.draw(mutations(blob), "mutated")
    cuts = data.draw(st.lists(st.integers(0, len(bad)), max_size=6), "cuts")
    check_blob(lambda: Decoder(server_side=True), bad, cuts, version, "server")


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(data=st.data())
def test_mutated_client_packets_after_connect(version, data):
    """The CONNECT intact, the packets behind it mutated."""
    rest = data.draw(st.lists(client_packets(version), min_size=1, max_size=6), "packets")
    blob = b"".join(encode(p, version) for p in rest)
    bad = data.draw(mutations(blob), "mutated")
    cuts = data.draw(st.lists(st.integers(0, len(bad)), max_size=6), "cuts")
    check_blob(make_decoder("server", version), bad, cuts, version, "server")


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ
@given(data=st.data())
def test_mutated_server_streams(version, data):
    packets = data.draw(st.lists(server_packets(version), min_size=1, max_size=6), "packets")
    blob = b"".join(encode(p, version) for p in packets)
    bad = data.draw(mutations(blob), "mutated")
    cuts = data.draw(st.lists(st.integers(0, len(bad)), max_size=6), "cuts")
    check_blob(make_decoder("client", version), bad, cuts, version, "client")


def test_mutation_reaches_every_outcome():
    """The fuzz above is not vacuous: known mutations of one valid stream give each outcome."""
    make = make_decoder("server", 5)
    sub = packet(0x82, u16(1) + b"\x00" + u16(1) + b"a" + b"\x01")
    assert len(feed(make, [sub]).packets) == 1
    assert feed(make, [b"\x80" + sub[1:]]).error[0] == 0x81  # flip: reserved flags
    assert feed(make, [sub[:-1]]).packets == []  # truncated: waits, no error
    assert feed(make, [sub[:-1]]).buffered == len(sub) - 1
    wrong_len = bytes([sub[0], sub[1] - 1]) + sub[2:]
    assert feed(make, [wrong_len]).error is not None  # shorter remaining length


# ---------------------------------------------------------- (c) length bombs

# First bytes valid in each state, so that only the length can be refused.
BOMB_FIRST = {
    "server": [0x30, 0x32, 0x35, 0x40, 0x50, 0x62, 0x70, 0x82, 0xA2, 0xE0],
    "client": [0x30, 0x33, 0x40, 0x50, 0x62, 0x70, 0x90, 0xB0],
}


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=80, deadline=None, database=None)
@given(
    data=st.data(),
    max_size=st.integers(2, 2_000_000),
    bytewise=st.booleans(),
)
def test_length_bomb_is_refused_from_the_fixed_header(side, version, data, max_size, bytewise):
    first = data.draw(st.sampled_from(BOMB_FIRST[side]), "first byte")
    # Any remaining length that makes the packet larger than max_size.
    lo = max(0, max_size - 1)  # with a 1-byte length the packet is rl + 2
    rl = data.draw(st.integers(lo, 268_435_455), "remaining length")
    header = bytes([first]) + vbi(rl)
    if 1 + len(header) - 1 + rl <= max_size:  # total = header + rl
        rl = max_size  # ensure it is over (header is at least 2 bytes)
        header = bytes([first]) + vbi(rl)
    assert len(header) + rl > max_size
    d = make_decoder(side, version)()
    d.max_packet_size = max_size
    with pytest.raises(ProtocolError) as exc:
        if bytewise:
            for i in range(len(header)):
                before = d.buffered
                d.feed(header[i : i + 1])
                # Until the length is complete only the header itself is held.
                assert d.buffered == before + 1 <= 4
        else:
            d.feed(header)
    assert exc.value.reason_code == 0x95
    assert d.buffered == 0
    with pytest.raises(ProtocolError):
        d.feed(b"\x00" * 16)  # the body that follows is never accepted


@pytest.mark.parametrize("side", SIDES)
@settings(max_examples=40, deadline=None, database=None)
@given(max_size=st.integers(5, 300_000), first_index=st.integers(0, 7))
@example(max_size=130, first_index=0)  # no packet has this size
@example(max_size=131, first_index=0)
def test_length_at_the_limit_waits_for_the_body(side, max_size, first_index):
    """The bound is not off by one: a packet of exactly max_packet_size is waited for."""
    firsts = BOMB_FIRST[side]
    first = firsts[first_index % len(firsts)]
    # Find rl with 1 + len(vbi(rl)) + rl == max_size.
    for k in (1, 2, 3, 4):
        rl = max_size - 1 - k
        if rl >= 0 and len(vbi(rl)) == k:
            break
    else:
        # No packet is exactly this long (130: 127 bytes of body take a 1-byte length,
        # 128 a 2-byte one, so 129 and 131 exist and 130 does not): nothing to check.
        assume(False)
    header = bytes([first]) + vbi(rl)
    d = make_decoder(side, 5)()
    d.max_packet_size = max_size
    assert d.feed(header) == []
    assert d.buffered == len(header)


@pytest.mark.parametrize("version", VERSIONS)
def test_length_bomb_as_first_packet(version):
    """A CONNECT announcing more than max_packet_size: refused before any of it arrives."""
    d = Decoder(server_side=True, max_packet_size=1024)
    with pytest.raises(ProtocolError) as exc:
        d.feed(b"\x10" + vbi(268_435_455))
    assert exc.value.reason_code == 0x95
    assert d.buffered == 0


# ------------------------------------------------------------- regressions

# Inputs the fuzz met that need care in the checks above (decoder, version, hex). None
# of them is a decoder fault: each pins a corner so that a change there is seen.
REGRESSIONS = [
    # 3.1.1 SUBACK with the reserved return code 0x81: accepted; encoding writes 0x80
    # (docs/codec.md: 3.1.1 encoding maps failure codes to 0x80).
    pytest.param("client", 4, "90 03 0001 81", id="v4-suback-reserved-return-code"),
    # A v5-form CONNACK (with properties) to a client decoder told 3.1.1.
    pytest.param("client", 4, "20 06 00 00 03 21 00 0a", id="v5-connack-to-v4-client"),
    # A CONNECT announcing the largest remaining length: waited for, not refused.
    pytest.param("fresh", 5, "10 ff ff ff 7f", id="connect-max-remaining-length-waits"),
    # A mutated 3.1 stream whose PINGREQ follows a CONNECT with an empty client id.
    pytest.param(
        "fresh", 3, "10 0e 0006 4d5149736470 03 02 0000 0000 c0 00", id="v3-empty-id-ping"
    ),
]


@pytest.mark.parametrize("decoder,version,hexdata", REGRESSIONS)
def test_regressions(decoder, version, hexdata):
    blob = bytes.fromhex(hexdata)
    if decoder == "fresh":
        make, side = (lambda: Decoder(server_side=True)), "server"
    else:
        make, side = make_decoder(decoder, version), decoder
    got = check_blob(make, blob, [1, 3], version, side)
    assert got.error is None


@pytest.mark.parametrize("version", VERSIONS)
@example(blob=CONNECTS[5])
@FUZZ
@given(blob=st.binary(max_size=40))
def test_second_connect_is_refused_whatever_follows(version, blob):
    d = server_decoder(version)
    with pytest.raises(ProtocolError) as exc:
        d.feed(CONNECTS[version] + blob)
    assert exc.value.reason_code == 0x82
