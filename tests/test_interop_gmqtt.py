"""A second, independent client library (gmqtt, asyncio) against the server."""

from __future__ import annotations

import asyncio

import pytest

gmqtt = pytest.importorskip("gmqtt")


async def pub_acked(client) -> None:
    """Wait until gmqtt has no unacknowledged outgoing message left."""
    for _ in range(1000):
        if client._persistent_storage.is_empty:  # gmqtt keeps QoS>0 messages here until acked
            return
        await asyncio.sleep(0.01)
    raise AssertionError("publish not acknowledged")


def test_gmqtt_v5_pubsub_with_subscription_id_and_retained(server):
    async def scenario():
        got: asyncio.Queue = asyncio.Queue()
        subacked: asyncio.Queue = asyncio.Queue()
        sub = gmqtt.Client("gm-sub")
        sub.on_message = lambda client, topic, payload, qos, properties: got.put_nowait(
            (topic, payload, qos, properties)
        )
        sub.on_subscribe = lambda client, mid, qos, properties: subacked.put_nowait(qos)
        await sub.connect("127.0.0.1", server.port, version=gmqtt.constants.MQTTv50)
        pub = gmqtt.Client("gm-pub")
        await pub.connect("127.0.0.1", server.port, version=gmqtt.constants.MQTTv50)
        # Wait for the PUBACK so the retained message is stored before we subscribe.
        pub.publish("gm/retained", b"kept", qos=1, retain=True)
        await pub_acked(pub)
        sub.subscribe(gmqtt.Subscription("gm/#", qos=1), subscription_identifier=42)
        assert await asyncio.wait_for(subacked.get(), 10) == (1,)
        first = await asyncio.wait_for(got.get(), 10)
        pub.publish("gm/live", b"now", qos=1, user_property=("k", "v"))
        second = await asyncio.wait_for(got.get(), 10)
        await pub.disconnect()
        await sub.disconnect()
        return first, second

    first, second = asyncio.run(scenario())
    assert (first[0], first[1]) == ("gm/retained", b"kept")
    assert first[3]["subscription_identifier"] == [42]
    assert (second[0], second[1], second[2]) == ("gm/live", b"now", 1)
    assert second[3]["user_property"] == [("k", "v")]


def test_gmqtt_v311(server):
    async def scenario():
        got: asyncio.Queue = asyncio.Queue()
        subacked: asyncio.Queue = asyncio.Queue()
        c = gmqtt.Client("gm-v3")
        c.on_message = lambda client, topic, payload, qos, properties: got.put_nowait(
            (topic, payload, qos)
        )
        c.on_subscribe = lambda client, mid, qos, properties: subacked.put_nowait(qos)
        await c.connect("127.0.0.1", server.port, version=gmqtt.constants.MQTTv311)
        c.subscribe("gm3/t", qos=2)
        assert await asyncio.wait_for(subacked.get(), 10) == (2,)
        c.publish("gm3/t", b"v3", qos=2)
        msg = await asyncio.wait_for(got.get(), 10)
        await c.disconnect()
        return msg

    assert asyncio.run(scenario()) == ("gm3/t", b"v3", 2)
