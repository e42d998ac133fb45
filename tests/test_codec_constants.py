"""The compiled codec and ingestd.mqtt.constants declare the same numbers.

The codec's C enums (ext/_codec.pxd) are exported as plain dicts; each must
agree with the Python enums, and the packet classes with PacketType.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from codec_helpers import PROPERTIES
from ingestd import _codec
from ingestd.mqtt import constants as protocol
from ingestd.mqtt.constants import PacketType, Prop, Reason


def exported(name: str):
    if not hasattr(_codec, name):
        pytest.skip(f"the codec does not export {name}")
    return getattr(_codec, name)


def test_protocol_versions():
    assert exported("MQTT_3_1") == protocol.MQTT_3_1 == 3
    assert exported("MQTT_3_1_1") == protocol.MQTT_3_1_1 == 4
    assert exported("MQTT_5") == protocol.MQTT_5 == 5


def test_packet_types():
    assert exported("PACKET_TYPES") == {t.name: int(t) for t in PacketType}


def test_property_identifiers():
    assert exported("PROPERTY_IDS") == {p.name: int(p) for p in Prop}


def test_property_types_match_section_2_2_2_2():
    assert exported("PROPERTY_KINDS") == {pid: kind for pid, (kind, _) in PROPERTIES.items()}


def test_reason_codes():
    assert exported("REASON_CODES") == {r.name: int(r) for r in Reason}


@pytest.mark.parametrize(
    "cls,ptype",
    [
        (_codec.Connect, PacketType.CONNECT),
        (_codec.Connack, PacketType.CONNACK),
        (_codec.Publish, PacketType.PUBLISH),
        (_codec.Subscribe, PacketType.SUBSCRIBE),
        (_codec.Suback, PacketType.SUBACK),
        (_codec.Unsubscribe, PacketType.UNSUBSCRIBE),
        (_codec.Unsuback, PacketType.UNSUBACK),
        (_codec.Pingreq, PacketType.PINGREQ),
        (_codec.Pingresp, PacketType.PINGRESP),
        (_codec.Disconnect, PacketType.DISCONNECT),
        (_codec.Auth, PacketType.AUTH),
    ],
)
def test_class_packet_types(cls, ptype):
    assert cls.packet_type == ptype
    assert cls().packet_type == ptype


def test_puback_packet_type_is_per_instance():
    for ptype in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP):
        assert _codec.PubAck(packet_type=ptype, packet_id=1).packet_type == ptype
    assert _codec.PubAck().packet_type == PacketType.PUBACK


def test_ping_bytes():
    assert bytes([PacketType.PINGREQ << 4, 0]) == _codec.PINGREQ
    assert bytes([PacketType.PINGRESP << 4, 0]) == _codec.PINGRESP


# -- every Cython copy of a protocol number agrees with ingestd.mqtt.constants ---------

EXT = Path(__file__).resolve().parent.parent / "ext" / "ingestd"
_ENUM_MEMBER = re.compile(r"^\s+([A-Z_][A-Z0-9_]*)\s*=\s*(0x[0-9A-Fa-f]+|\d+)\s*(?:#.*)?$")
# Prefix of a Cython enum member -> the Python source it mirrors.
_PREFIXES = {"PT_": PacketType, "PROP_": Prop, "RC_": Reason}
_VERSIONS = {"MQTT_V31": protocol.MQTT_3_1, "MQTT_V311": protocol.MQTT_3_1_1, "MQTT_V5": 5}
# Members that are not protocol numbers (bounds, cache sizes).
_NOT_PROTOCOL = {"PROP_MAX_ID", "MAX_VBI"}


def cython_enum_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, value, line) of every member of every ``cdef enum`` block in ``path``."""
    out = []
    in_enum = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("cdef enum"):
            in_enum = True
            continue
        if in_enum and line and not line[0].isspace():
            in_enum = False
        if in_enum:
            m = _ENUM_MEMBER.match(line)
            if m:
                out.append((m.group(1), int(m.group(2), 0), n))
    return out


def expected_value(name: str) -> int | None:
    """What ``ingestd.mqtt.constants`` says a Cython enum member named ``name`` is."""
    if name in _VERSIONS:
        return _VERSIONS[name]
    for prefix, enum in _PREFIXES.items():
        if name.startswith(prefix):
            return int(enum[name[len(prefix) :]])
    return None


CYTHON_SOURCES = sorted(EXT.glob("*.pxd")) + sorted(EXT.glob("*.pyx"))


@pytest.mark.skipif(not EXT.is_dir(), reason="needs the source tree (ext/)")
@pytest.mark.parametrize("path", CYTHON_SOURCES, ids=lambda p: p.name)
def test_cython_enum_copies_agree_with_constants(path):
    for name, value, line in cython_enum_members(path):
        if name in _NOT_PROTOCOL:
            continue
        want = expected_value(name)
        if want is None:
            continue  # not a protocol number (protocol numbers take the PT_/PROP_/RC_ names)
        assert value == want, f"{path.name}:{line}: {name} = {value:#x}, constants say {want:#x}"


@pytest.mark.skipif(not EXT.is_dir(), reason="needs the source tree (ext/)")
def test_codec_pxd_mirrors_every_constant():
    names = {name for name, _, _ in cython_enum_members(EXT / "_codec.pxd")}
    for prefix, enum in _PREFIXES.items():
        assert {prefix + m.name for m in enum} <= names, prefix


def test_the_check_sees_a_disagreement(tmp_path):
    bad = tmp_path / "bad.pxd"
    bad.write_text("cdef enum:\n    PT_PUBACK = 5\n    RC_BANNED = 0x8A\n")
    members = cython_enum_members(bad)
    assert [(n, v) for n, v, _ in members] == [("PT_PUBACK", 5), ("RC_BANNED", 0x8A)]
    assert expected_value("PT_PUBACK") != 5
    assert expected_value("RC_BANNED") == 0x8A
