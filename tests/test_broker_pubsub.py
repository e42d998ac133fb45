"""Publish/subscribe through the real server with paho-mqtt, MQTT 3.1.1 and 5.0."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes

from mqtt_clients import Client, props
from rawmqtt import Raw, connect_v4, connect_v5, packet, s


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_roundtrip_each_qos(server, version, qos):
    sub = Client(server.port, version=version)
    assert [int(rc.value) if hasattr(rc, "value") else rc for rc in sub.subscribe("a/b", qos)] == [
        qos
    ]
    pub = Client(server.port, version=version)
    pub.publish("a/b", b"hello", qos)
    [m] = sub.expect()
    assert (m.topic, m.payload, m.qos, m.retain) == ("a/b", b"hello", qos, False)


@pytest.mark.parametrize("pub_qos,sub_qos,got", [(2, 1, 1), (1, 2, 1), (0, 2, 0), (2, 0, 0)])
def test_delivered_qos_is_the_minimum(server, pub_qos, sub_qos, got):
    sub = Client(server.port)
    sub.subscribe("q", sub_qos)
    Client(server.port).publish("q", b"x", pub_qos)
    [m] = sub.expect()
    assert m.qos == got


def test_wildcards_and_dollar_topics(server):
    sub = Client(server.port)
    sub.subscribe("company/+/machine/+/telemetry", 1)
    sub.subscribe("#", 0)
    pub = Client(server.port)
    pub.publish("company/acme/machine/7/telemetry", b"1", 1)
    pub.publish("$internal/x", b"2", 1)  # not matched by '#' [MQTT-4.7.2-1]
    got = sorted((m.topic, m.qos) for m in sub.expect(1))
    # one delivery for two overlapping subscriptions, at the highest granted QoS
    assert got == [("company/acme/machine/7/telemetry", 1)]
    sub.expect_nothing()


def test_overlapping_subscriptions_one_delivery_with_all_ids(server):
    sub = Client(server.port)
    sub.subscribe("s/#", 0, sub_id=7)
    sub.subscribe("s/+", 2, sub_id=9)
    Client(server.port).publish("s/x", b"p", 2)
    [m] = sub.expect()
    assert m.qos == 2
    assert sorted(m.properties.SubscriptionIdentifier) == [7, 9]
    sub.expect_nothing()


def test_no_local(server):
    c = Client(server.port)
    c.subscribe("nl/t", 1, noLocal=True)
    other = Client(server.port)
    other.subscribe("nl/t", 1)
    c.publish("nl/t", b"mine", 1)
    [m] = other.expect()
    assert m.payload == b"mine"
    c.expect_nothing()


def test_unsubscribe(server):
    sub = Client(server.port)
    sub.subscribe("u/1", 1)
    rcs = sub.unsubscribe("u/1")
    assert [int(rc.value) for rc in rcs] == [0]
    rcs = sub.unsubscribe("u/never")
    assert [int(rc.value) for rc in rcs] == [0x11]  # No subscription existed
    Client(server.port).publish("u/1", b"x", 1)
    sub.expect_nothing()


@pytest.mark.parametrize(
    "connect,subscribe,suback",
    [
        # v5: filter "a/#/b" is invalid -> 0x8F Topic Filter invalid; the valid one is granted.
        (
            connect_v5("bad-filter"),
            packet(0x82, b"\x00\x07\x00" + s("a/#/b") + b"\x01" + s("ok") + b"\x01"),
            b"\x00\x07\x00\x8f\x01",
        ),
        # 3.1.1: "a+" is invalid -> 0x80 Failure [MQTT-3.8.4-5 / 3.9.3]
        (
            connect_v4("bad-filter-3"),
            packet(0x82, b"\x00\x07" + s("a+") + b"\x00"),
            b"\x00\x07\x80",
        ),
    ],
    ids=["v5", "v3"],
)
def test_invalid_filter_gets_failure_code(server, connect, subscribe, suback):
    # paho refuses to send invalid filters, so these go over a raw socket.
    r = Raw(server.port)
    r.send(connect)
    assert r.read_packet()[0] == 0x20
    r.send(subscribe)
    assert r.read_packet() == (0x90, suback)


def test_v5_properties_forwarded_untouched(server):
    sub = Client(server.port)
    sub.subscribe("req/+", 1)
    p = props(
        PayloadFormatIndicator=1,
        ContentType="application/json",
        ResponseTopic="resp/abc",
        CorrelationData=b"\x00\x01corr",
        UserProperty=[("k1", "v1"), ("k1", "v2"), ("z", "")],
    )
    Client(server.port).publish("req/1", b'{"a":1}', 1, properties=p)
    [m] = sub.expect()
    mp = m.properties
    assert mp.PayloadFormatIndicator == 1
    assert mp.ContentType == "application/json"
    assert mp.ResponseTopic == "resp/abc"
    assert mp.CorrelationData == b"\x00\x01corr"
    assert mp.UserProperty == [("k1", "v1"), ("k1", "v2"), ("z", "")]


def test_request_response(server):
    """A requester and a responder speaking through Response Topic / Correlation Data."""
    responder = Client(server.port)
    responder.subscribe("svc/echo", 1)
    requester = Client(server.port)
    requester.subscribe("svc/reply/me", 1)
    requester.publish(
        "svc/echo",
        b"ping",
        1,
        properties=props(ResponseTopic="svc/reply/me", CorrelationData=b"42"),
    )
    [req] = responder.expect()
    responder.publish(
        req.properties.ResponseTopic,
        req.payload + b"-pong",
        1,
        properties=props(CorrelationData=req.properties.CorrelationData),
    )
    [resp] = requester.expect()
    assert (resp.payload, resp.properties.CorrelationData) == (b"ping-pong", b"42")


def test_message_expiry_forwarded_and_enforced(server):
    # Online: the remaining interval is forwarded.
    sub = Client(server.port)
    sub.subscribe("exp/on", 1)
    Client(server.port).publish("exp/on", b"x", 1, properties=props(MessageExpiryInterval=100))
    [m] = sub.expect()
    assert 99 <= m.properties.MessageExpiryInterval <= 100
    # Retained with expiry 0 seconds left is not delivered: publish with expiry 1 and
    # check the forwarded value never exceeds what was set.
    Client(server.port).publish(
        "exp/ret", b"r", 1, retain=True, properties=props(MessageExpiryInterval=3600)
    )
    late = Client(server.port)
    late.subscribe("exp/ret", 1)
    [r] = late.expect()
    assert r.retain and 3599 <= r.properties.MessageExpiryInterval <= 3600


def test_assigned_client_identifier(server):
    c = Client(server.port, client_id="")
    assigned = c.connack_props.AssignedClientIdentifier
    assert assigned
    c2 = Client(server.port, client_id="")
    assert c2.connack_props.AssignedClientIdentifier != assigned


def test_v3_empty_client_id_needs_clean_session(server):
    Client(server.port, client_id="", version=4, clean_start=True)
    # paho refuses clean session 0 with an empty id, so this one is raw:
    r = Raw(server.port)
    r.send(connect_v4("", flags=0x00))
    assert r.read_until_closed() == [(0x20, b"\x00\x02")]  # identifier rejected [MQTT-3.1.3-8]


def test_connack_advertises_limits(server):
    c = Client(server.port)
    p = c.connack_props
    assert p.ReceiveMaximum == 1024
    assert p.MaximumPacketSize == 1_048_576
    assert p.TopicAliasMaximum == 64


def test_publish_with_topic_alias(server):
    sub = Client(server.port)
    sub.subscribe("alias/t", 1)
    pub = Client(server.port)
    pub.publish("alias/t", b"1", 1, properties=props(TopicAlias=3))
    pub.publish("", b"2", 1, properties=props(TopicAlias=3))
    got = [(m.topic, m.payload) for m in sub.expect(2)]
    assert got == [("alias/t", b"1"), ("alias/t", b"2")]


def test_outbound_topic_aliases_when_client_allows(server):
    cp = props(PacketTypes.CONNECT, TopicAliasMaximum=5)
    sub = Client(server.port, connect_props=cp)
    sub.subscribe("oa/#", 1)
    pub = Client(server.port)
    for i in range(3):
        pub.publish("oa/x", str(i).encode(), 1)
    msgs = sub.expect(3)
    # The first delivery sets the alias with the full topic; later ones send only the alias
    # (paho hands the raw, empty topic through, which shows the server used the alias).
    assert [m.topic for m in msgs] == ["oa/x", "", ""]
    aliases = {m.properties.TopicAlias for m in msgs}
    assert len(aliases) == 1 and 1 <= aliases.pop() <= 5


def test_server_keep_alive_caps_the_clients(server_factory):
    srv = server_factory(max_keepalive=10)
    c = Client(srv.port, keepalive=60)
    assert c.connack_props.ServerKeepAlive == 10


def test_client_receive_maximum_limits_inflight(server):
    """With Receive Maximum 2, a third QoS 1 delivery waits until one is acknowledged."""
    r = Raw(server.port)
    # CONNECT v5, properties: Receive Maximum (0x21) = 2
    r.send(connect_v5("rm-client", props=b"\x21\x00\x02"))
    assert r.read_packet()[0] == 0x20
    # SUBSCRIBE id 1: "rm/q1" QoS 1 and "rm/barrier" QoS 0
    r.send(packet(0x82, b"\x00\x01\x00" + s("rm/q1") + b"\x01" + s("rm/barrier") + b"\x00"))
    assert r.read_packet() == (0x90, b"\x00\x01\x00\x01\x00")
    pub = Client(server.port)
    for i in range(5):
        pub.publish("rm/q1", str(i).encode(), 1)
    pub.publish("rm/barrier", b"b", 0)  # QoS 0 is not held by the window
    got = [r.read_packet() for _ in range(3)]
    kinds = [(first & 0xF6, body[-1:]) for first, body in got]
    # two QoS 1 PUBLISH (0x32), then the QoS 0 barrier (0x30): the rest wait
    assert kinds == [(0x32, b"0"), (0x32, b"1"), (0x30, b"b")]
    first_pid = got[0][1][2 + len("rm/q1") : 4 + len("rm/q1")]
    r.send(b"\x40\x02" + first_pid)  # PUBACK the first
    first, body = r.read_packet()
    assert (first & 0xF6, body[-1:]) == (0x32, b"2")
    r.sock.close()


def test_client_maximum_packet_size_respected(server):
    cp = props(PacketTypes.CONNECT, MaximumPacketSize=200)
    sub = Client(server.port, connect_props=cp)
    sub.subscribe("mps/#", 1)
    pub = Client(server.port)
    pub.publish("mps/big", b"x" * 500, 1)  # too large for this client: not sent [MQTT-3.1.2-24]
    pub.publish("mps/small", b"ok", 1)
    [m] = sub.expect()
    assert m.topic == "mps/small"
    sub.expect_nothing()
