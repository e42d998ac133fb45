"""The compiled codec and ingestd.protocol declare the same numbers.

The codec's C enums (ext/_codec.pxd) are exported as plain dicts; each must
agree with the Python enums, and the packet classes with PacketType.
"""

from __future__ import annotations

import pytest

from codec_helpers import PROPERTIES
from ingestd import _codec, protocol
from ingestd.protocol import PacketType, Prop, Reason


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
