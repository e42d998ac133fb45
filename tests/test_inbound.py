"""ingestd._inbound: the ack queue and the fast path, against a per-message model.

The fast path must be indistinguishable from handling each PUBLISH one by one
(Channel._on_publish -> Router.publish -> RouteSink.deliver): the same
messages reach the same batchers in the same order, acks leave in arrival order
and wait for the same futures. Here the broker side is a real SubscriptionTrie
and the batchers are recorders; the end-to-end tests are in
test_e2e_fastpath.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ingestd._codec import Publish, encode_ack
from ingestd._inbound import BatchRun, Inbound, IngestTarget
from ingestd._trie import SubscriptionTrie

from ingestd.broker.hooks import BrokerStats
from ingestd.broker.message import Message


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def ack(pid: int, ptype: int = 4) -> bytes:
    return encode_ack(ptype, pid, 0, 4)


class Sent:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.data.append(data)


# -- the ack queue ------------------------------------------------------------


def test_ack_without_future_on_empty_queue_is_sent_at_once(loop):
    q = Inbound(lambda f: None, Sent())
    assert q.queue(None, 4, 0x1234, 1) == b"\x40\x02\x12\x34"
    assert q.queue(None, 5, 7, 2) == b"\x50\x02\x00\x07"
    assert q.ack_count == 0 and q.pending_qos1 == 0


def test_acks_wait_for_their_future_and_keep_arrival_order(loop):
    ready: list[Any] = []
    q = Inbound(ready.append, Sent())
    f1, f2 = loop.create_future(), loop.create_future()
    assert q.queue(f1, 4, 1, 1) is None
    assert q.queue(None, 4, 2, 1) is None  # behind f1: held back too
    assert q.queue(f2, 5, 3, 2) is None
    assert q.queue(f1, 4, 4, 1) is None
    assert q.ack_count == 4 and q.pending_qos1 == 3
    assert q.release() == (b"", None)  # nothing done yet
    f2.set_result(None)  # done, but behind f1
    assert q.release() == (b"", None)
    f1.set_result(None)
    out, failed = q.release()
    assert failed is None
    assert out == ack(1) + ack(2) + ack(3, 5) + ack(4)
    assert q.ack_count == 0 and q.pending_qos1 == 0
    loop.run_until_complete(asyncio.sleep(0))
    # a callback each time another future heads a stretch of acks, not one per ack
    assert len(ready) == 3 and ready.count(f1) == 2 and ready.count(f2) == 1


def test_failure_acks_carry_their_reason_and_keep_arrival_order(loop):
    # A PUBLISH the ACL refuses (v5: reason 0x87) is acknowledged in its place.
    q = Inbound(lambda f: None, Sent())
    assert q.queue(None, 4, 9, 1, 0x87) == b"\x40\x03\x00\x09\x87"  # nothing held: at once
    f1 = loop.create_future()
    assert q.queue(f1, 4, 1, 1) is None
    assert q.queue(None, 4, 2, 1, 0x87) is None  # behind f1
    assert q.queue(None, 5, 3, 2, 0x87) is None
    assert q.queue(None, 4, 4, 1) is None
    assert q.pending_qos1 == 3
    f1.set_result(None)
    out, failed = q.release()
    assert failed is None
    assert out == ack(1) + b"\x40\x03\x00\x02\x87" + b"\x50\x03\x00\x03\x87" + ack(4)
    assert q.ack_count == 0 and q.pending_qos1 == 0


def test_one_callback_per_future_while_it_heads_a_run(loop):
    calls: list[Any] = []

    class Fut:
        def __init__(self) -> None:
            self.callbacks = 0

        def add_done_callback(self, cb: Any) -> None:
            self.callbacks += 1

    q = Inbound(calls.append, Sent())
    f = Fut()
    for pid in range(1, 101):
        q.queue(f, 4, pid, 1)
    assert f.callbacks == 1


def test_failed_future_stops_the_release_and_is_reported(loop):
    q = Inbound(lambda f: None, Sent())
    ok, bad = loop.create_future(), loop.create_future()
    q.queue(ok, 4, 1, 1)
    q.queue(bad, 5, 2, 2)
    q.queue(None, 4, 3, 1)
    ok.set_result(None)
    bad.set_exception(RuntimeError("disk on fire"))
    out, failed = q.release()
    assert out == ack(1)
    assert failed == (bad, 2, 2)
    assert q.ack_count == 2  # the failed one and what is behind it stay queued
    assert q.pending_qos1 == 1
    bad.exception()  # retrieved


def test_cancelled_future_is_a_failure(loop):
    q = Inbound(lambda f: None, Sent())
    f = loop.create_future()
    q.queue(f, 4, 9, 1)
    f.cancel()
    assert q.release() == (b"", (f, 9, 1))


def test_many_acks_released_in_portions_come_out_once_in_order(loop):
    """Exercises the compaction of released entries (more than 1024 at the head)."""
    q = Inbound(lambda f: None, Sent())
    futs = [loop.create_future() for _ in range(10)]
    expected = b""
    pid = 0
    for f in futs:
        for _ in range(700):
            pid = pid % 65535 + 1
            q.queue(f, 4, pid, 1)
            expected += ack(pid)
    got = b""
    for f in futs:
        f.set_result(None)
        out, failed = q.release()
        assert failed is None
        assert len(out) == 700 * 4
        got += out
    assert got == expected
    assert q.ack_count == 0 and q.pending_qos1 == 0


def test_clear_forgets_acks_and_disables_the_fast_path(loop):
    q = Inbound(lambda f: None, Sent())
    q.queue(loop.create_future(), 4, 1, 1)
    trie = SubscriptionTrie()
    q.attach(4, 100, trie, lambda t: None, "c", None, set(), BrokerStats())
    assert q.enabled
    q.clear()
    assert q.ack_count == 0 and not q.enabled
    pkts = [Publish("t", b"x", 1, False, False, 1, {})]
    assert q.take(pkts, 0) == 0  # disabled: nothing taken


# -- the fast path against a per-message model ---------------------------------------


class Batcher:
    """Records what a TableBatcher would get; one future per 'batch' like the real one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, multi: bool) -> None:
        self.loop = loop
        self.name = name
        self.got: list[tuple[str, str, bytes]] = []  # (route, topic, payload)
        self.future: asyncio.Future[None] | None = None
        self.run = BatchRun(self.add_run, multi)
        self.single_route: str | None = None if multi else f"{name}.r"

    def add_run(self, msgs: list[Any], routes: list[str] | None, durable: bool) -> Any:
        for k, m in enumerate(msgs):
            route = routes[k] if routes is not None else self.single_route
            assert route is not None
            self.got.append((route, m.topic, m.payload))
        if durable and self.future is None:
            self.future = self.loop.create_future()
        return self.future if durable else None

    def add(self, route: str, m: Any, durable: bool) -> Any:
        return self.add_run([m], [route], durable)


class Sink:
    def __init__(self, batcher: Batcher, route: str, durable: bool) -> None:
        self.batcher = batcher
        self.route = route
        self.durable = durable
        self.batch_run = batcher.run


def build_world(loop: asyncio.AbstractEventLoop) -> tuple[SubscriptionTrie, dict[str, Batcher]]:
    """Tables: 'a' (one route on a/+), 'l' (two routes: l/x and l/+, a latest-like table),
    'r' (on-receipt route on r/#). Topic s/1 has a session subscriber (slow path)."""
    trie = SubscriptionTrie()
    ba = Batcher(loop, "a", multi=False)
    bl = Batcher(loop, "l", multi=True)
    br = Batcher(loop, "r", multi=False)
    trie.subscribe("a/+", Sink(ba, "a.r", True), None)
    trie.subscribe("l/x", Sink(bl, "l.x", True), None)
    trie.subscribe("l/+", Sink(bl, "l.plus", True), None)
    trie.subscribe("r/#", Sink(br, "r.r", False), None)
    trie.subscribe("a/1", Sink(br, "r.r", False), None)  # a/1 feeds two tables
    trie.subscribe("s/1", "a-session", None)
    return trie, {"a": ba, "l": bl, "r": br}


def classify(trie: SubscriptionTrie):
    def ingest_target(topic: str):
        subs, groups = trie.match_all(topic)
        if groups or not subs or any(not isinstance(s, Sink) for s, _ in subs):
            return None
        return IngestTarget([(s.batch_run, s.route, s.durable) for s, _ in subs])

    return ingest_target


TOPICS = ["a/1", "a/2", "l/x", "l/y", "r/q/z", "s/1", "none/1"]

packet_st = st.builds(
    lambda topic, qos, retain, props, payload: (topic, qos, retain, props, payload),
    st.sampled_from(TOPICS),
    st.integers(0, 2),
    st.sampled_from([False, False, False, True]),
    st.sampled_from([{}, {}, {}, {0x26: [("k", "v")]}]),
    st.binary(max_size=4),
)


def model(world: dict[str, Batcher], trie: SubscriptionTrie, packets: list[Publish]):
    """Per-message handling, as Broker.publish would: (per batcher list, per packet fut or None)."""
    out: dict[str, list[tuple[str, str, bytes]]] = {k: [] for k in world}
    for p in packets:
        subs, _ = trie.match_all(p.topic)
        for s, _ in subs:
            if isinstance(s, Sink):
                out[s.batcher.name].append((s.route, p.topic, p.payload))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(packet_st, min_size=1, max_size=60), st.integers(1, 5))
def test_fast_path_equals_per_message_handling(specs, chunks):
    loop = asyncio.new_event_loop()
    try:
        trie, world = build_world(loop)
        sent = Sent()
        inbound = Inbound(lambda f: None, sent)
        stats = BrokerStats()
        received = stats.messages_received
        inbound.attach(4, 65535, trie, classify(trie), "dev", "u", set(), stats)
        packets = [
            Publish(t, pl, q, rt, False, (k % 65535) + 1 if q else 0, dict(pr))
            for k, (t, q, rt, pr, pl) in enumerate(specs)
        ]
        # The slow path: what Channel._on_publish + Router.publish would do.
        slow: list[int] = []

        def handle_slow(p: Publish) -> None:
            slow.append(p.packet_id)
            subs, _ = trie.match_all(p.topic)
            futs = []
            for s, _o in subs:
                if isinstance(s, Sink):
                    f = s.batcher.add(s.route, Message(p.topic, p.payload, p.qos), s.durable)
                    if f is not None and p.qos:
                        futs.append(f)
            fut = None if not futs else futs[0] if len(futs) == 1 else asyncio.gather(*futs)
            if p.qos:
                a = inbound.queue(fut, 4 if p.qos == 1 else 5, p.packet_id, p.qos)
                if a is not None:
                    sent(a)

        # feed in ``chunks`` reads, as data_received would
        size = max(1, len(packets) // chunks)
        for c in range(0, len(packets), size):
            part = packets[c : c + size]
            i = 0
            while i < len(part):
                i = inbound.take(part, i)
                if i == len(part):
                    break
                handle_slow(part[i])
                i += 1
        fast = [p for p in packets if p.qos < 2 and not p.retain]
        fast = [p for p in fast if classify(trie)(p.topic) is not None]
        assert inbound.taken == len(fast)
        assert received[0] == sum(1 for p in fast if p.qos == 0)
        assert received[1] == sum(1 for p in fast if p.qos == 1)
        assert stats.messages_fast_path == len(fast)
        # same rows, same order, per batcher
        expected = model(world, trie, packets)
        assert {k: b.got for k, b in world.items()} == expected
        # every QoS 1/2 PUBLISH gets its ack, in arrival order, once its futures are done
        for b in world.values():
            if b.future is not None:
                b.future.set_result(None)
        loop.run_until_complete(asyncio.sleep(0))
        out, failed = inbound.release()
        assert failed is None
        sent(out)
        acks = b"".join(sent.data)
        want = b"".join(ack(p.packet_id, 4 if p.qos == 1 else 5) for p in packets if p.qos)
        assert acks == want
        assert inbound.pending_qos1 == 0
        assert inbound.ack_count == 0
    finally:
        loop.close()


def test_acks_of_a_run_wait_for_every_durable_table(loop):
    trie, world = build_world(loop)
    sent = Sent()
    inbound = Inbound(lambda f: None, sent)
    inbound.attach(4, 65535, trie, classify(trie), "dev", None, set(), BrokerStats())
    # a/1 feeds table a (after-commit) and table r (on-receipt): its ack waits for a only.
    pkts = [
        Publish("a/1", b"1", 1, False, False, 1, {}),
        Publish("r/x", b"2", 1, False, False, 2, {}),
    ]
    assert inbound.take(pkts, 0) == 2
    assert sent.data == []  # r/x's ack is behind a/1's
    assert inbound.release() == (b"", None)
    world["a"].future.set_result(None)
    out, failed = inbound.release()
    assert failed is None and out == ack(1) + ack(2)


def test_on_receipt_run_is_acked_in_one_write(loop):
    trie, world = build_world(loop)
    sent = Sent()
    inbound = Inbound(lambda f: None, sent)
    inbound.attach(4, 65535, trie, classify(trie), "dev", None, set(), BrokerStats())
    pkts = [Publish(f"r/{k}", b"x", 1, False, False, k, {}) for k in range(1, 6)]
    assert inbound.take(pkts, 0) == 5
    assert sent.data == [b"".join(ack(k) for k in range(1, 6))]
    assert [g[1] for g in world["r"].got] == [f"r/{k}" for k in range(1, 6)]


def recording_world(loop):
    """A trie where a/+ is one on-receipt route whose batcher records the Messages."""
    _trie, world = build_world(loop)
    got: list[Any] = []
    b = world["a"]
    b.add_run = lambda msgs, routes, durable: got.extend(msgs)  # type: ignore[method-assign]
    b.run = BatchRun(b.add_run, False)
    trie2 = SubscriptionTrie()
    trie2.subscribe("a/+", Sink(b, "a.r", False), None)
    return trie2, got


def test_messages_carry_the_client_and_one_receive_time(loop):
    trie2, got = recording_world(loop)
    inbound = Inbound(lambda f: None, Sent())
    inbound.attach(5, 65535, trie2, classify(trie2), "dev-9", "alice", set(), BrokerStats())
    pkts = [
        Publish("a/2", b"p", 1, False, False, 3, {}),
        Publish("a/3", b"q", 0, False, False, 0, {}),
    ]
    assert inbound.take(pkts, 0) == 2
    assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [
        ("a/2", b"p", 1, False),
        ("a/3", b"q", 0, False),
    ]
    assert {(m.client_id, m.username, m.expires_at) for m in got} == {("dev-9", "alice", None)}
    assert got[0].received_at == got[1].received_at > 0


def test_trie_change_invalidates_the_cached_topics(loop):
    trie, _world = build_world(loop)
    inbound = Inbound(lambda f: None, Sent())
    inbound.attach(4, 65535, trie, classify(trie), "dev", None, set(), BrokerStats())
    p = [Publish("a/2", b"x", 0, False, False, 0, {})]
    assert inbound.take(p, 0) == 1
    trie.subscribe("a/2", "a-session", None)  # now a session wants a/2 too
    assert inbound.take(p, 0) == 0  # the slow path must route it
    trie.unsubscribe("a/2", "a-session")
    assert inbound.take(p, 0) == 1


def test_v5_receive_maximum_leaves_the_exceeding_publish_to_the_slow_path(loop):
    trie, _world = build_world(loop)
    inbound = Inbound(lambda f: None, Sent())
    qos2 = {100, 101}
    inbound.attach(5, 5, trie, classify(trie), "dev", None, qos2, BrokerStats())
    pkts = [Publish("a/2", b"x", 1, False, False, k, {}) for k in range(1, 6)]
    # 2 QoS 2 ids pending + 3 QoS 1 = 5 = Receive Maximum: the 4th QoS 1 must not be taken
    assert inbound.take(pkts, 0) == 3
    assert inbound.pending_qos1 == 3


def test_v5_topic_alias_is_set_and_resolved_like_on_publish(loop):
    trie, got = recording_world(loop)
    inbound = Inbound(lambda f: None, Sent())
    aliases: dict[int, str] = {}
    inbound.attach(5, 65535, trie, classify(trie), "d", None, set(), BrokerStats(), aliases, 10)
    pkts = [
        Publish("a/1", b"x", 1, False, False, 1, {0x23: 3, 0x26: [("k", "v")]}),  # sets 3
        Publish("", b"y", 1, False, False, 2, {0x23: 3}),  # uses 3
        Publish("a/2", b"z", 0, False, False, 0, {0x23: 3, 0x02: 60}),  # re-sets 3, expiry
        Publish("", b"w", 0, False, False, 0, {0x23: 3}),
    ]
    assert inbound.take(pkts, 0) == 4
    assert aliases == {3: "a/2"}
    assert [(m.topic, m.payload) for m in got] == [
        ("a/1", b"x"),
        ("a/1", b"y"),
        ("a/2", b"z"),
        ("a/2", b"w"),
    ]
    # the alias leaves the properties (as _on_publish does); other properties stay
    assert [m.properties for m in got] == [{0x26: [("k", "v")]}, {}, {0x02: 60}, {}]
    assert pkts[0].properties == {0x23: 3, 0x26: [("k", "v")]}  # the packet is untouched
    assert [m.expires_at is None for m in got] == [True, True, False, True]
    assert got[2].remaining_expiry(got[2].expires_at - 59.5) == 60


def test_v5_aliases_on_publish_would_refuse_are_left_to_it(loop):
    trie, got = recording_world(loop)
    inbound = Inbound(lambda f: None, Sent())
    aliases: dict[int, str] = {}
    inbound.attach(5, 65535, trie, classify(trie), "d", None, set(), BrokerStats(), aliases, 10)
    unknown = [Publish("", b"x", 1, False, False, 1, {0x23: 4})]
    assert inbound.take(unknown, 0) == 0  # used before it was set
    too_big = [Publish("a/1", b"x", 1, False, False, 1, {0x23: 11})]
    assert inbound.take(too_big, 0) == 0  # above our Topic Alias Maximum
    not_ingest = [Publish("s/1", b"x", 1, False, False, 1, {0x23: 5})]
    assert inbound.take(not_ingest, 0) == 0
    assert aliases == {} and got == []  # nothing set by packets left to _on_publish
