"""Sessions, wills, retained messages, takeover, shared subscriptions (paho-mqtt)."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes

from mqtt_clients import WAIT, Client, props


def codes(rcs):
    return [int(getattr(rc, "value", rc)) for rc in rcs]


# -- retained -------------------------------------------------------------


def test_retained_store_replace_delete(server):
    pub = Client(server.port)
    pub.publish("r/1", b"old", 1, retain=True)
    pub.publish("r/1", b"new", 1, retain=True)
    pub.publish("r/2", b"two", 0, retain=True)
    sub = Client(server.port)
    sub.subscribe("r/+", 1)
    got = sorted((m.topic, m.payload, m.retain) for m in sub.expect(2))
    assert got == [("r/1", b"new", True), ("r/2", b"two", True)]
    pub.publish("r/1", b"", 1, retain=True)  # empty payload deletes [MQTT-3.3.1-6]
    [live] = sub.expect()  # still delivered to current subscribers
    assert (live.topic, live.payload) == ("r/1", b"")
    late = Client(server.port)
    late.subscribe("r/#", 1)
    [m] = late.expect()
    assert m.topic == "r/2"
    late.expect_nothing()


def test_retain_flag_cleared_on_live_delivery_unless_rap(server):
    plain = Client(server.port)
    plain.subscribe("rap/t", 1)
    rap = Client(server.port)
    rap.subscribe("rap/t", 1, retainAsPublished=True)
    v3 = Client(server.port, version=4)
    v3.subscribe("rap/t", 1)
    Client(server.port).publish("rap/t", b"x", 1, retain=True)
    assert plain.expect()[0].retain is False
    assert rap.expect()[0].retain is True
    assert v3.expect()[0].retain is False  # [MQTT-3.3.1-9]


@pytest.mark.parametrize("handling,first,again", [(0, 1, 1), (1, 1, 0), (2, 0, 0)])
def test_retain_handling(server, handling, first, again):
    Client(server.port).publish(f"rh/{handling}", b"kept", 1, retain=True)
    sub = Client(server.port)
    sub.subscribe(f"rh/{handling}", 1, retainHandling=handling)
    sub.barrier()
    assert sub.messages.qsize() == first
    sub.subscribe(f"rh/{handling}", 1, retainHandling=handling)  # subscription exists now
    sub.barrier()
    assert sub.messages.qsize() == first + again


def test_retained_not_sent_to_shared_subscription(server):
    Client(server.port).publish("sh/r", b"kept", 1, retain=True)
    sub = Client(server.port)
    sub.subscribe("$share/g/sh/r", 1)
    sub.expect_nothing()


# -- wills ----------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_will_on_abnormal_disconnect_not_on_normal(server, version):
    watcher = Client(server.port)
    watcher.subscribe("will/#", 1)
    a = Client(server.port, version=version, will=("will/a", b"a gone", 1, False))
    b = Client(server.port, version=version, will=("will/b", b"b gone", 1, False))
    b.disconnect()
    a.drop()
    [m] = watcher.expect()
    assert (m.topic, m.payload) == ("will/a", b"a gone")
    watcher.expect_nothing()


def test_disconnect_with_will_message_publishes_it(server):
    watcher = Client(server.port)
    watcher.subscribe("will/x", 1)
    c = Client(server.port, will=("will/x", b"bye", 1, False))
    c.disconnect(reason_code=0x04)
    [m] = watcher.expect()
    assert m.payload == b"bye"


def test_will_retained(server):
    c = Client(server.port, will=("will/ret", b"offline", 1, True))
    c.drop()
    # the will was retained: a later subscriber gets it
    late = Client(server.port)
    late.subscribe("will/ret", 1)
    [m] = late.expect()
    assert (m.payload, m.retain) == (b"offline", True)


def test_will_delay_cancelled_by_reconnect(server):
    watcher = Client(server.port)
    watcher.subscribe("wd/#", 1)
    wp = props(PacketTypes.WILLMESSAGE, WillDelayInterval=30)
    c = Client(
        server.port,
        client_id="wd-dev",
        session_expiry=300,
        will=("wd/dev", b"gone", 1, False),
        will_props=wp,
    )
    c.drop()
    c2 = Client(server.port, client_id="wd-dev", session_expiry=300, clean_start=False)
    assert c2.session_present
    watcher.expect_nothing()


def test_will_published_at_session_end_before_delay(server):
    """Will Delay 60 s but Session Expiry 1 s: the will goes out when the session ends."""
    watcher = Client(server.port)
    watcher.subscribe("wse/#", 1)
    wp = props(PacketTypes.WILLMESSAGE, WillDelayInterval=60)
    c = Client(
        server.port,
        client_id="wse-dev",
        session_expiry=1,
        will=("wse/dev", b"gone", 1, False),
        will_props=wp,
    )
    c.drop()
    [m] = watcher.expect()
    assert m.payload == b"gone"


def test_will_delay_then_published(server):
    watcher = Client(server.port)
    watcher.subscribe("wdl/#", 1)
    wp = props(PacketTypes.WILLMESSAGE, WillDelayInterval=1)
    c = Client(
        server.port,
        client_id="wdl-dev",
        session_expiry=600,
        will=("wdl/dev", b"late", 1, False),
        will_props=wp,
    )
    c.drop()
    [m] = watcher.expect()
    assert m.payload == b"late"
    # the session outlives the will
    assert server.call(lambda: "wdl-dev" in server.app.broker.sessions)


# -- persistent sessions --------------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_persistent_session_queues_while_offline(server, version):
    kw = {"session_expiry": 600} if version == 5 else {}
    c = Client(server.port, client_id=f"ps-{version}", version=version, clean_start=False, **kw)
    c.subscribe("ps/t", 1)
    c.disconnect()
    pub = Client(server.port)
    for i in range(5):
        pub.publish("ps/t", str(i).encode(), 1)
    pub.publish("ps/t", b"q0", 0)  # QoS 0 is not queued for offline sessions
    c2 = Client(server.port, client_id=f"ps-{version}", version=version, clean_start=False, **kw)
    assert c2.session_present
    assert [m.payload for m in c2.expect(5)] == [b"0", b"1", b"2", b"3", b"4"]
    c2.expect_nothing()


def test_clean_start_discards_session(server):
    c = Client(server.port, client_id="cs", session_expiry=600)
    c.subscribe("cs/t", 1)
    c.disconnect()
    c2 = Client(server.port, client_id="cs", session_expiry=600, clean_start=True)
    assert not c2.session_present
    Client(server.port).publish("cs/t", b"x", 1)
    c2.expect_nothing()


def test_session_expiry_zero_ends_at_disconnect(server):
    c = Client(server.port, client_id="se0")
    c.subscribe("se0/t", 1)
    c.disconnect()
    c2 = Client(server.port, client_id="se0", clean_start=False)
    assert not c2.session_present


def test_session_expiry_set_at_disconnect(server):
    c = Client(server.port, client_id="sed", session_expiry=600)
    c.subscribe("sed/t", 1)
    c.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    c2 = Client(server.port, client_id="sed", clean_start=False)
    assert not c2.session_present


def test_session_expires(server):
    c = Client(server.port, client_id="sexp", session_expiry=1)
    c.subscribe("sexp/t", 1)
    c.disconnect()
    import time

    deadline = time.monotonic() + WAIT
    while server.call(lambda: "sexp" in server.app.broker.sessions):
        assert time.monotonic() < deadline, "session did not expire"
        time.sleep(0.1)
    c2 = Client(server.port, client_id="sexp", clean_start=False)
    assert not c2.session_present


def test_inflight_redelivered_with_dup_on_resume(server):
    """QoS 1 deliveries not acknowledged before the connection dropped come back with DUP."""
    c = Client(server.port, client_id="dup", session_expiry=600)
    c.subscribe("dup/t", 1)
    # Stop paho from acknowledging: drop the socket right after the message arrives.
    c.c.on_message = lambda *a: None
    import paho.mqtt.client as mqtt

    def no_ack(*a, **k):
        return mqtt.MQTT_ERR_SUCCESS

    c.c._send_puback = no_ack  # type: ignore[attr-defined]
    Client(server.port).publish("dup/t", b"once", 1)
    sess = lambda: server.app.broker.sessions["dup"]  # noqa: E731
    import time

    deadline = time.monotonic() + WAIT
    while not server.call(lambda: len(sess().inflight)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    c.drop()
    c2 = Client(server.port, client_id="dup", session_expiry=600, clean_start=False)
    [m] = c2.expect()
    assert (m.payload, m.dup) == (b"once", True)


# -- takeover -------------------------------------------------------------


def test_session_takeover(server):
    old = Client(server.port, client_id="same", session_expiry=600)
    old.subscribe("to/t", 1)
    new = Client(server.port, client_id="same", session_expiry=600, clean_start=False)
    assert new.session_present
    rc = old.disconnects.get(timeout=WAIT)
    assert int(rc.value) == 0x8E  # Session taken over
    Client(server.port).publish("to/t", b"x", 1)
    [m] = new.expect()
    assert m.payload == b"x"


# -- shared subscriptions ---------------------------------------------------


def test_shared_subscription_round_robin_and_redistribution(server):
    a = Client(server.port)
    b = Client(server.port)
    a.subscribe("$share/grp/jobs/#", 1)
    b.subscribe("$share/grp/jobs/#", 1)
    plain = Client(server.port)
    plain.subscribe("jobs/#", 1)
    pub = Client(server.port)
    for i in range(10):
        pub.publish("jobs/x", str(i).encode(), 1)
    assert len(plain.expect(10)) == 10
    a.barrier()
    b.barrier()
    na, nb = a.messages.qsize(), b.messages.qsize()
    assert (na, nb) == (5, 5)  # each message to one member, alternating
    a.disconnect()
    for i in range(4):
        pub.publish("jobs/y", str(i).encode(), 1)
    b.barrier()
    assert b.messages.qsize() == 5 + 4


@pytest.mark.parametrize("clean_start,published", [(True, True), (False, False)])
def test_takeover_with_delayed_will(server, clean_start, published):
    """Takeover: a delayed will goes out if the new CONNECT ends the session (Clean Start)."""
    watcher = Client(server.port)
    watcher.subscribe("tw/#", 1)
    wp = props(PacketTypes.WILLMESSAGE, WillDelayInterval=300)
    cid = f"tw-{clean_start}"
    Client(
        server.port,
        client_id=cid,
        session_expiry=600,
        will=("tw/dev", b"gone", 1, False),
        will_props=wp,
    )
    Client(server.port, client_id=cid, session_expiry=600, clean_start=clean_start)
    if published:
        assert watcher.expect()[0].payload == b"gone"
    watcher.expect_nothing()
