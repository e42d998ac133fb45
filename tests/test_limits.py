"""Broker limits (docs/security.md, "Limits"): topic length and levels, subscriptions per
client, retained messages per tree and in all. Each refusal is checked with paho in MQTT
3.1.1 and 5.0, counted in ``limits_hit`` and logged (rate-limited)."""

from __future__ import annotations

import logging
import queue

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ingestd._inbound import Inbound
from ingestd._trie import SubscriptionTrie

from ingestd.broker.channel import _short_topic
from ingestd.broker.hooks import BrokerStats
from ingestd.broker.limits import LimitLog, topic_over_limit
from mqtt_clients import WAIT, Client
from rawmqtt import Raw, connect_v5, s

VERSIONS = [pytest.param(4, id="v311"), pytest.param(5, id="v5")]


def hits(srv) -> dict[str, int]:
    return srv.call(lambda: dict(srv.app.broker.stats.limits_hit))


def publish_acks(cl: Client) -> queue.Queue[tuple[int, int]]:
    """(mid, reason code) of each PUBACK the paho client gets from now on."""
    acks: queue.Queue[tuple[int, int]] = queue.Queue()
    cl.c.on_publish = lambda c, u, mid, rc, p: acks.put((mid, int(rc.value)))
    return acks


def ack_code(cl: Client, acks: queue.Queue[tuple[int, int]], topic: str, qos: int = 1) -> int:
    info = cl.c.publish(topic, b"x", qos)
    mid, code = acks.get(timeout=WAIT)
    assert mid == info.mid
    return code


# -- the check itself -----------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "length", "levels", "over"),
    [
        ("a/b/c", 5, 3, None),
        ("a/b/c", 4, 0, "max_topic_length"),
        ("a/b/c", 0, 2, "max_topic_levels"),
        ("a/b/c", 0, 0, None),
        ("é" * 5, 9, 0, "max_topic_length"),  # 5 characters, 10 UTF-8 bytes
        ("é" * 5, 10, 0, None),
        ("😀", 3, 0, "max_topic_length"),  # 4 bytes
        ("/", 0, 2, None),  # two (empty) levels
        ("//", 0, 2, "max_topic_levels"),
        ("a/#", 0, 2, None),  # filters count the same way
    ],
)
def test_topic_over_limit(topic, length, levels, over) -> None:
    assert topic_over_limit(topic, length, levels) == over


@given(
    topic=st.text(alphabet=st.sampled_from("a/é😀+#"), max_size=40),
    length=st.integers(0, 80),
    levels=st.integers(0, 12),
)
def test_short_topics_need_no_check(topic, length, levels) -> None:
    """The channel skips the topic check for topics of at most _short_topic characters:
    no such topic may be over a limit."""
    if len(topic) <= _short_topic(length, levels):
        assert topic_over_limit(topic, length, levels) is None


def test_limit_log_counts_every_hit_and_logs_one_line_per_interval(caplog) -> None:
    stats = BrokerStats()
    lim = LimitLog(stats, interval=3600.0)
    with caplog.at_level(logging.WARNING, logger="ingestd.broker"):
        for i in range(3):
            lim.hit("max_topic_length", f"hit {i}")
        lim.hit("max_topic_levels", "other limit")
    assert stats.limits_hit == {"max_topic_length": 3, "max_topic_levels": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "limit mqtt.max_topic_length: hit 0",
        "limit mqtt.max_topic_levels: other limit",
    ]
    caplog.clear()
    lim.interval = 0.0  # the interval has passed: the next line says what was not logged
    with caplog.at_level(logging.WARNING, logger="ingestd.broker"):
        lim.hit("max_topic_length", "hit 3")
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("limit mqtt.max_topic_length: hit 3 (2 more hits")
    assert stats.limits_hit["max_topic_length"] == 4


def test_fast_path_leaves_a_topic_over_the_limits_to_the_handler() -> None:
    """The compiled fast path never takes a topic past the limits (nor asks the classifier)."""
    from ingestd._codec import Publish

    asked: list[str] = []

    def classify(topic: str) -> None:
        asked.append(topic)

    inbound = Inbound(lambda f: None, lambda b: None)
    inbound.attach(
        4, 100, SubscriptionTrie(), classify, "c", None, set(), BrokerStats(), {}, 0, 8, 3
    )
    packets = [
        Publish(topic=t, payload=b"x", qos=0) for t in ("toolongtopic", "a/b/c/d", "é" * 5, "a/b")
    ]
    for i in range(3):
        assert inbound.take(packets, i) == i  # not taken: _on_publish decides
    assert inbound.take(packets, 3) == 3  # within the limits: classified (None: not fast)
    assert asked == ["a/b"]


# -- PUBLISH ------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_publish_over_topic_limits_is_dropped(server_factory, version) -> None:
    srv = server_factory(max_topic_length=24, max_topic_levels=3)
    sub = Client(srv.port)
    assert [rc.value for rc in sub.subscribe("#", 1)] == [1]
    pub = Client(srv.port, version=version)
    acks = publish_acks(pub)
    refused = 0x90 if version == 5 else 0  # 3.1.1 has no failure code: the plain PUBACK
    assert ack_code(pub, acks, "l/" + "x" * 23) == refused  # 25 bytes
    assert ack_code(pub, acks, "é" * 13) == refused  # 13 characters, 26 bytes
    assert ack_code(pub, acks, "a/b/c/d") == refused  # 4 levels
    assert ack_code(pub, acks, "a/b/c/d", qos=0) == 0  # QoS 0: dropped (no ack on the wire)
    assert ack_code(pub, acks, "a/b/c") == 0
    assert ack_code(pub, acks, "é" * 12) == 0  # exactly 24 bytes
    got = sub.expect(2)
    assert sorted(m.topic for m in got) == sorted(["a/b/c", "é" * 12])
    sub.expect_nothing()
    assert hits(srv) == {"max_topic_length": 2, "max_topic_levels": 2}
    # The connection was kept.
    assert ack_code(pub, acks, "ok") == 0
    assert [m.topic for m in sub.expect()] == ["ok"]


def test_publish_limit_is_logged(server_factory, caplog) -> None:
    srv = server_factory(max_topic_levels=2)
    pub = Client(srv.port, client_id="deep-device")
    with caplog.at_level(logging.WARNING, logger="ingestd.broker"):
        pub.publish("a/b/c", b"x", 1)
        pub.barrier()
    lines = [r.getMessage() for r in caplog.records if "max_topic_levels" in r.getMessage()]
    assert len(lines) == 1
    assert "'deep-device'" in lines[0] and "'a/b/c'" in lines[0]


# -- SUBSCRIBE ----------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_subscribe_over_topic_limits_is_refused(server_factory, version) -> None:
    srv = server_factory(max_topic_length=24, max_topic_levels=3)
    cl = Client(srv.port, version=version)
    failure = 0x8F if version == 5 else 0x80

    def code(flt: str) -> int:
        [rc] = cl.subscribe(flt, 1)
        return int(rc.value)

    assert code("a/very-long-filter-name/#") == failure  # 25 bytes
    assert code("a/b/c/#") == failure  # 4 levels
    assert code("a/b/#") == 1
    assert hits(srv) == {"max_topic_length": 1, "max_topic_levels": 1}
    pub = Client(srv.port)
    pub.publish("a/b/c", b"in", 1)
    assert [m.topic for m in cl.expect()] == ["a/b/c"]


# -- Will ---------------------------------------------------------------------


# paho reports 3.1.1's return code 3 (Server unavailable) as the v5 code 0x88.
@pytest.mark.parametrize(("version", "code"), [(4, 0x88), (5, 0x90)])
def test_will_topic_over_limits_refuses_connect(server_factory, version, code) -> None:
    srv = server_factory(max_topic_levels=2)
    cl = Client(srv.port, version=version, will=("a/b/c", b"bye", 1, False), connect=False)
    rc = cl.connect(expect_rc=code)
    assert rc.value == code
    cl.c.loop_stop()
    assert hits(srv) == {"max_topic_levels": 1}
    ok = Client(srv.port, version=version, will=("a/b", b"bye", 1, False))
    ok.disconnect()


# -- subscriptions per client ---------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_max_subscriptions_per_client(server_factory, version) -> None:
    # The test client holds one subscription of its own (its barrier topic).
    srv = server_factory(max_subscriptions_per_client=3)
    cl = Client(srv.port, version=version)

    def codes(*flts: str) -> list[int]:
        if version == 5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            cl.c.subscribe([(f, SubscribeOptions(qos=1)) for f in flts])
        else:
            cl.c.subscribe([(f, 1) for f in flts])
        _, rcs = cl.subacks.get(timeout=WAIT)
        return [int(rc.value) for rc in rcs]

    quota = 0x97 if version == 5 else 0x80
    assert codes("s/1", "s/2", "s/3") == [1, 1, quota]
    assert codes("s/1") == [1]  # replacing one of its own is not a new subscription
    assert hits(srv) == {"max_subscriptions_per_client": 1}
    cl.unsubscribe("s/2")
    assert codes("s/3") == [1]
    pub = Client(srv.port)
    pub.publish("s/3", b"x", 1)
    assert [m.topic for m in cl.expect()] == ["s/3"]


def test_subscriptions_limit_with_a_raw_v5_subscribe(server_factory) -> None:
    """The SUBACK bytes, by hand: one SUBSCRIBE of three filters with a limit of two."""
    srv = server_factory(max_subscriptions_per_client=2)
    raw = Raw(srv.port)
    raw.send(connect_v5("raw-subs"))
    ptype, body = raw.read_packet()
    assert (ptype, body[1]) == (0x20, 0)
    payload = b"".join(s(f) + b"\x01" for f in ("r/1", "r/2", "r/3"))
    raw.send(bytes([0x82, 3 + len(payload)]) + b"\x00\x07\x00" + payload)
    ptype, body = raw.read_packet()
    assert ptype == 0x90
    assert body == b"\x00\x07\x00\x01\x01\x97"  # id 7, no properties, 1, 1, Quota exceeded
    raw.sock.close()


# -- retained messages ------------------------------------------------------------


def retained_topics(port: int, version: int, flt: str) -> list[str]:
    """What a new subscriber to ``flt`` gets as retained messages."""
    cl = Client(port, version=version)
    cl.subscribe(flt, 1)
    cl.barrier()  # retained messages come before the barrier's delivery
    out = []
    while not cl.messages.empty():
        m = cl.messages.get_nowait()
        assert m.retain
        out.append(m.topic)
    cl.disconnect()
    return sorted(out)


@pytest.mark.parametrize("version", VERSIONS)
def test_max_retained_per_tree(server_factory, version, caplog) -> None:
    srv = server_factory(max_retained_per_tree=2, retained_tree_levels=2)
    live = Client(srv.port)
    live.subscribe("company/#", 1)
    pub = Client(srv.port, version=version)
    with caplog.at_level(logging.WARNING, logger="ingestd.broker"):
        for t in ("company/a/x", "company/a/y", "company/a/z", "company/b/x"):
            pub.publish(t, b"v", 1, retain=True)
    # Past the limit a message is still delivered, only not retained.
    assert sorted(m.topic for m in live.expect(4)) == [
        "company/a/x", "company/a/y", "company/a/z", "company/b/x",
    ]  # fmt: skip
    assert retained_topics(srv.port, version, "company/#") == [
        "company/a/x", "company/a/y", "company/b/x",
    ]  # fmt: skip
    assert hits(srv) == {"max_retained_per_tree": 1}
    assert any("company/a/z" in r.getMessage() and "'company/a'" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    # Replacing a retained message is never refused; deleting one frees its place.
    pub.publish("company/a/x", b"v2", 1, retain=True)
    pub.publish("company/a/y", b"", 1, retain=True)
    pub.publish("company/a/z", b"v", 1, retain=True)
    assert retained_topics(srv.port, version, "company/a/#") == ["company/a/x", "company/a/z"]
    assert hits(srv) == {"max_retained_per_tree": 1}


@pytest.mark.parametrize("version", VERSIONS)
def test_max_retained_messages_in_all_is_counted_and_logged(
    server_factory, version, caplog
) -> None:
    srv = server_factory(max_retained_messages=2)
    pub = Client(srv.port, version=version)
    with caplog.at_level(logging.WARNING, logger="ingestd.broker"):
        for t in ("r/1", "r/2", "r/3"):
            pub.publish(t, b"v", 1, retain=True)
        pub.barrier()
    assert retained_topics(srv.port, version, "r/#") == ["r/1", "r/2"]
    assert hits(srv) == {"max_retained_messages": 1}
    assert any("max_retained_messages" in r.getMessage() and "'r/3'" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_limits_are_exported_to_prometheus(server_factory) -> None:
    from ingestd.metrics import build_registry

    srv = server_factory(max_topic_levels=2)
    pub = Client(srv.port)
    pub.publish("a/b/c", b"x", 1)
    pub.barrier()
    registry, _ = srv.call(lambda: build_registry(srv.app.broker, None, None))
    value = registry.get_sample_value("ingestd_limits_hit_total", {"limit": "max_topic_levels"})
    assert value == 1.0


def test_restored_retained_messages_over_the_limits_are_counted_in_one_line(
    tmp_path, caplog
) -> None:
    """Retained messages stored under higher limits: what fits is restored, the rest is
    named in one warning (they stay in the store)."""
    import asyncio

    from conftest import make_config
    from ingestd.broker.message import Message
    from ingestd.broker.server import Broker

    loop = asyncio.new_event_loop()
    try:
        broker = Broker(make_config(tmp_path, max_retained_per_tree=1), loop)
        msgs = [
            Message(t, b"v", 1, True, {}, "c", None, None, None)
            for t in ("company/a/1", "company/a/2", "company/b/1")
        ]
        with caplog.at_level(logging.WARNING, logger="ingestd.broker"):
            broker.restore(msgs, [])
        assert sorted(m.topic for m in broker.retained.messages()) == ["company/a/1", "company/b/1"]
        [line] = [r.getMessage() for r in caplog.records if "not restored" in r.getMessage()]
        assert line.startswith("1 stored retained messages not restored")
    finally:
        loop.close()
