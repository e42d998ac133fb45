"""Channel, the per-client MQTT state machine, driven with bytes alone (no socket).

Every packet here is golden bytes written out by hand from the MQTT 3.1.1 / 5.0
specifications, never built by the code under test. A :class:`RecordingPort`
stands in for the transport and records what the channel sends, writes ahead
of its queue, and the bytes it closes with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from ingestd.broker.channel import AWAIT_CONNECT, CLOSED, CONNECTED, Channel
from ingestd.broker.server import Broker
from ingestd.config import Config

# CONNECT, protocol "MQTT", level 4, flags 0x02 (clean session), keepalive 60, client id "c1".
CONNECT_V4 = bytes.fromhex("10 0e 0004 4d515454 04 02 003c 0002 6331")
# The same at level 5 with an empty property section (0x00) before the payload.
CONNECT_V5 = bytes.fromhex("10 0f 0004 4d515454 05 02 003c 00 0002 6331")
# CONNECT 3.1.1, flags 0x06 (will, clean session), client "w1", will "a/b" = "bye" at QoS 0.
WILL_CONNECT_V4 = bytes.fromhex("10 18 0004 4d515454 04 06 003c 0002 7731 0003 612f62 0003 627965")
# CONNECT at protocol level 6: no such version.
CONNECT_V6 = bytes.fromhex("10 0e 0004 4d515454 06 02 003c 0002 6331")

# CONNACK 3.1.1: session present 0, return code 0.
CONNACK_V4 = bytes.fromhex("20 02 00 00")
# CONNACK 5.0 with the default limits: Receive Maximum (0x21) 1024, Maximum Packet
# Size (0x27) 1048576, Topic Alias Maximum (0x22) 64.
CONNACK_V5 = bytes.fromhex("20 0e 00 00 0b 21 0400 27 00100000 22 0040")
# CONNACK 3.1.1 return code 1: unacceptable protocol version.
CONNACK_V4_BAD_VERSION = bytes.fromhex("20 02 00 01")

# SUBSCRIBE id 1, "a/b" at QoS 1 (3.1.1) and its SUBACK granting QoS 1.
SUBSCRIBE_V4 = bytes.fromhex("82 08 0001 0003 612f62 01")
SUBACK_V4 = bytes.fromhex("90 03 0001 01")
# The same in 5.0 (an empty property section after the packet id).
SUBSCRIBE_V5 = bytes.fromhex("82 09 0001 00 0003 612f62 01")
SUBACK_V5 = bytes.fromhex("90 04 0001 00 01")

# PUBLISH "a/b" payload "hi": QoS 0; QoS 1 id 7; QoS 2 id 8 (3.1.1).
PUBLISH_Q0 = bytes.fromhex("30 07 0003 612f62 6869")
PUBLISH_Q1 = bytes.fromhex("32 09 0003 612f62 0007 6869")
PUBLISH_Q2 = bytes.fromhex("34 09 0003 612f62 0008 6869")
PUBACK_7 = bytes.fromhex("40 02 0007")
PUBREC_8 = bytes.fromhex("50 02 0008")
PUBREL_8 = bytes.fromhex("62 02 0008")
PUBCOMP_8 = bytes.fromhex("70 02 0008")
# What a QoS 1 subscriber of "a/b" gets: QoS 1, its first packet id (1).
DELIVERED_Q1 = bytes.fromhex("32 09 0003 612f62 0001 6869")
DELIVERED_Q0 = PUBLISH_Q0

PINGREQ = bytes.fromhex("c0 00")
PINGRESP = bytes.fromhex("d0 00")
DISCONNECT = bytes.fromhex("e0 00")
# PUBLISH with QoS bits 11 (QoS 3), 5.0: a malformed packet [MQTT-3.3.1-4].
PUBLISH_QOS3_V5 = bytes.fromhex("36 06 0001 61 0001 00")


class RecordingPort:
    """The transport side of a Channel, recording instead of writing to a socket."""

    peer = "192.0.2.1:5000"

    def __init__(self) -> None:
        self.sent: list[bytes] = []  # port.send, in order
        self.written_now: list[bytes] = []  # port.write_now
        self.closed_with: bytes | None = None  # close(last); None while open
        self.reading = True
        self.ok_to_write = True

    def send(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def write_now(self, data: bytes) -> None:
        self.written_now.append(bytes(data))

    def writable(self) -> bool:
        return self.ok_to_write

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self, last: bytes = b"") -> None:
        if self.closed_with is None:
            self.closed_with = last

    def take(self) -> list[bytes]:
        out, self.sent = self.sent, []
        return out


@pytest.fixture
def broker() -> Iterator[Broker]:
    # Timers (connect timeout, keepalive) are scheduled on a loop that never runs.
    loop = asyncio.new_event_loop()
    try:
        yield Broker(Config(), loop)
    finally:
        loop.close()


def channel(broker: Broker) -> tuple[Channel, RecordingPort]:
    port = RecordingPort()
    return Channel(broker, port, "test"), port


def connected(broker: Broker, connect: bytes = CONNECT_V4) -> tuple[Channel, RecordingPort]:
    ch, port = channel(broker)
    ch.feed(connect)
    port.take()
    return ch, port


def feed_three_ways(broker: Broker, data: bytes) -> list[list[bytes]]:
    """What a fresh channel sends for ``data`` whole, byte by byte, and in two halves."""
    results = []
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))], [data[:5], data[5:]]):
        ch, port = channel(broker)
        for chunk in chunks:
            ch.feed(chunk)
        results.append(port.take())
        ch.feed(DISCONNECT)
    return results


def test_connect_v311_gets_connack(broker: Broker) -> None:
    ch, port = channel(broker)
    assert ch.state == AWAIT_CONNECT
    assert ch in broker.connections
    ch.feed(CONNECT_V4)
    assert port.sent == [CONNACK_V4]
    assert ch.state == CONNECTED
    assert (ch.client_id, ch.version, ch.keepalive) == ("c1", 4, 60)
    assert broker.sessions["c1"].connection is ch


def test_connect_v5_gets_connack_with_our_limits(broker: Broker) -> None:
    ch, port = channel(broker)
    ch.feed(CONNECT_V5)
    assert port.sent == [CONNACK_V5]
    assert ch.version == 5


def test_connect_split_anywhere_is_the_same(broker: Broker) -> None:
    assert feed_three_ways(broker, CONNECT_V4) == [[CONNACK_V4]] * 3
    assert feed_three_ways(broker, CONNECT_V4 + PINGREQ) == [[CONNACK_V4, PINGRESP]] * 3


def test_unsupported_protocol_level_gets_connack_1_and_close(broker: Broker) -> None:
    ch, port = channel(broker)
    ch.feed(CONNECT_V6)
    assert port.written_now == [CONNACK_V4_BAD_VERSION]
    assert port.sent == []
    assert port.closed_with == b""
    assert ch.state == CLOSED
    assert broker.stats.protocol_errors == 1


def test_first_packet_must_be_connect(broker: Broker) -> None:
    ch, port = channel(broker)
    ch.feed(PINGREQ)
    assert ch.state == CLOSED
    assert port.sent == [] and port.written_now == []  # 3.1.1 gets no CONNACK for this
    assert port.closed_with == b""


def test_pingreq_gets_pingresp(broker: Broker) -> None:
    ch, port = connected(broker)
    ch.feed(PINGREQ)
    assert port.sent == [PINGRESP]


def test_subscribe_and_publish_qos0(broker: Broker) -> None:
    sub, sub_port = connected(broker)
    sub.feed(SUBSCRIBE_V4)
    assert sub_port.take() == [SUBACK_V4]
    pub, pub_port = connected(broker, CONNECT_V4.replace(b"c1", b"p1"))
    pub.feed(PUBLISH_Q0)
    assert pub_port.sent == []  # QoS 0: no acknowledgement
    assert sub_port.take() == [DELIVERED_Q0]
    assert broker.stats.messages_received[0] == 1


def test_subscribe_v5(broker: Broker) -> None:
    ch, port = connected(broker, CONNECT_V5)
    ch.feed(SUBSCRIBE_V5)
    assert port.sent == [SUBACK_V5]
    assert "a/b" in broker.sessions["c1"].subscriptions


def test_publish_qos1_puback_and_delivery(broker: Broker) -> None:
    sub, sub_port = connected(broker)
    sub.feed(SUBSCRIBE_V4)
    sub_port.take()
    pub, pub_port = connected(broker, CONNECT_V4.replace(b"c1", b"p1"))
    pub.feed(PUBLISH_Q1)
    assert pub_port.take() == [PUBACK_7]
    assert sub_port.take() == [DELIVERED_Q1]
    session = broker.sessions["c1"]
    assert list(session.inflight) == [1]
    sub.feed(bytes.fromhex("40 02 0001"))  # the subscriber's PUBACK completes it
    assert session.inflight == {}


def test_publish_qos2_flow(broker: Broker) -> None:
    ch, port = connected(broker)
    ch.feed(PUBLISH_Q2)
    assert port.take() == [PUBREC_8]
    session = broker.sessions["c1"]
    assert session.inbound_qos2 == {8}
    ch.feed(PUBLISH_Q2)  # re-sent before PUBREL: PUBREC again, not routed twice
    assert port.take() == [PUBREC_8]
    assert broker.stats.messages_received[2] == 2
    ch.feed(PUBREL_8)
    assert port.take() == [PUBCOMP_8]
    assert session.inbound_qos2 == set()


def test_disconnect_closes_and_discards_the_will(broker: Broker) -> None:
    ch, port = connected(broker)
    ch.feed(DISCONNECT)
    assert ch.state == CLOSED
    assert port.closed_with == b""
    assert "c1" not in broker.sessions  # clean session: it ends with the connection
    ch.connection_lost()
    assert ch not in broker.connections


def test_malformed_packet_gets_disconnect_0x81_in_v5(broker: Broker) -> None:
    ch, port = connected(broker, CONNECT_V5)
    ch.feed(PUBLISH_QOS3_V5)
    assert ch.state == CLOSED
    last = port.closed_with
    assert last is not None
    # DISCONNECT, remaining length, reason code 0x81 (Malformed Packet), properties with
    # a Reason String (0x1F).
    assert last[0] == 0xE0 and last[2] == 0x81 and last[4] == 0x1F
    assert broker.stats.protocol_errors == 1


def test_malformed_packet_closes_a_v311_client_without_disconnect(broker: Broker) -> None:
    ch, port = connected(broker)
    ch.feed(bytes.fromhex("36 05 0001 61 0001"))
    assert ch.state == CLOSED
    assert port.closed_with == b""


def test_nothing_is_handled_after_close(broker: Broker) -> None:
    ch, port = connected(broker)
    ch.feed(DISCONNECT + PINGREQ)
    assert port.sent == []
    ch.feed(PINGREQ)
    assert port.sent == []


def test_qos0_delivery_is_dropped_while_the_port_is_full(broker: Broker) -> None:
    sub, sub_port = connected(broker)
    sub.feed(bytes.fromhex("82 08 0001 0003 612f62 00"))  # QoS 0 subscription
    sub_port.take()
    sub_port.ok_to_write = False
    pub, _ = connected(broker, CONNECT_V4.replace(b"c1", b"p1"))
    pub.feed(PUBLISH_Q0)
    assert sub_port.sent == []
    assert broker.stats.dropped == {"qos0_queue_full": 1}


def test_no_connect_in_time_closes(broker: Broker) -> None:
    ch, port = channel(broker)
    ch._connect_timeout()  # what the connect_timeout timer calls
    assert ch.state == CLOSED
    assert port.closed_with == b""


def test_keepalive_exceeded_gets_disconnect_0x8d_in_v5(broker: Broker) -> None:
    ch, port = connected(broker, CONNECT_V5)
    ch.last_rx -= 60 * 1.5  # silent for one and a half keepalive periods
    ch._keepalive_check()  # what the keepalive timer calls
    last = port.closed_with
    assert ch.state == CLOSED and last is not None
    assert last[0] == 0xE0 and last[2] == 0x8D


def test_takeover_closes_the_old_channel_with_0x8e(broker: Broker) -> None:
    old, old_port = connected(broker, CONNECT_V5)
    new, new_port = channel(broker)
    new.feed(CONNECT_V5)
    assert new_port.sent == [CONNACK_V5]
    last = old_port.closed_with
    assert old.state == CLOSED and last is not None
    assert last[0] == 0xE0 and last[2] == 0x8E  # Session taken over
    assert broker.sessions["c1"].connection is new


def test_lost_connection_publishes_the_will(broker: Broker) -> None:
    sub, sub_port = connected(broker)
    sub.feed(SUBSCRIBE_V4)
    sub_port.take()
    dev, _ = connected(broker, WILL_CONNECT_V4)
    dev.connection_lost()  # no DISCONNECT: the will goes out
    assert sub_port.take() == [bytes.fromhex("30 08 0003 612f62 627965")]


def test_normal_disconnect_discards_the_will(broker: Broker) -> None:
    sub, sub_port = connected(broker)
    sub.feed(SUBSCRIBE_V4)
    sub_port.take()
    dev, _ = connected(broker, WILL_CONNECT_V4)
    dev.feed(DISCONNECT)
    dev.connection_lost()
    assert sub_port.sent == []
