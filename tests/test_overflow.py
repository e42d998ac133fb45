"""The session overflow queue on disk (ingestd.broker.overflow): order, budget, files."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.broker.message import Message
from ingestd.broker.overflow import OverflowStore


def msg(i: int, **kw) -> Message:
    return Message(f"t/{i}", str(i).encode() * (i % 7 + 1), 1, False, kw.pop("props", {}), **kw)


def fields(m: Message) -> tuple:
    return (m.topic, m.payload, m.qos, m.retain, m.properties, m.client_id, m.username,
            m.received_at, m.expires_at)  # fmt: skip


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    store = OverflowStore(tmp_path / "ov", 1 << 20)
    q = store.queue()
    props = {0x26: [("k", "v"), ("k", "w")], 0x09: b"\x00corr", 0x08: "reply/to", 0x03: "json"}
    m1 = Message(
        "a/b", b"\x00\xffbin", 2, True, props, "dev-1", "alice", 123.5, time.monotonic() + 9
    )
    m2 = Message("c", b"", 1, False, {}, "", None, 7.0, None)
    assert q.append(m1, 1, False, [3, 7], 42)
    assert q.append(m2, 1, True, None)
    assert len(q) == 2
    (a, aq, ar, aids, aseq), (b, bq, br, bids, bseq) = q.take(10)
    assert fields(a) == fields(m1)
    assert (aq, ar, aids, aseq) == (1, False, [3, 7], 42)
    assert fields(b) == fields(m2)
    assert (bq, br, bids, bseq) == (1, True, None, 0)
    assert isinstance(a.properties[0x26][0], tuple)  # pairs come back as the codec gives them
    assert len(q) == 0 and store.used_bytes == 0


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=40))
def test_order_across_segments_matches_a_fifo(tmp_path_factory, ops) -> None:
    d = tmp_path_factory.mktemp("ov")
    # Tiny segments and write buffer: many files, reads that seal the tail.
    store = OverflowStore(d, 1 << 30, segment_bytes=256, write_buffer_bytes=100)
    q = store.queue()
    model: deque[int] = deque()
    n = 0
    for is_append, k in ops:
        if is_append:
            for _ in range(k):
                assert q.append(msg(n), 1, False, None, n)
                model.append(n)
                n += 1
        else:
            got = [seq for _m, _q, _r, _ids, seq in q.take(k)]
            want = [model.popleft() for _ in range(min(k, len(model)))]
            assert got == want
        assert len(q) == len(model)
        assert store.used_bytes == q.bytes
    rest = [seq for *_x, seq in q.take(n + 1)]
    assert rest == list(model)
    assert store.used_bytes == 0
    assert not any(d.rglob("*.seg"))  # an empty queue keeps no file


def test_budget_is_shared_and_refusal_writes_nothing(tmp_path: Path) -> None:
    store = OverflowStore(tmp_path, 600)
    a, b = store.queue(), store.queue()
    taken = 0
    while a.append(msg(1), 1, False, None):
        taken += 1
    assert taken > 0
    before = (a.count, a.bytes, store.used_bytes)
    assert not b.append(msg(1), 1, False, None)  # the other queue spent the budget
    assert not a.append(msg(1), 1, False, None)
    assert (a.count, a.bytes, store.used_bytes) == before
    assert len(b) == 0 and store.queues == 1
    a.take(1)
    assert b.append(msg(1), 1, False, None)  # freed space is usable by anyone
    assert store.queues == 2


def test_discard_frees_budget_and_files(tmp_path: Path) -> None:
    store = OverflowStore(tmp_path / "ov", 1 << 20, segment_bytes=128, write_buffer_bytes=64)
    q = store.queue()
    for i in range(50):
        assert q.append(msg(i), 1, False, None)
    q.take(3)  # a segment is being read
    assert any((tmp_path / "ov").rglob("*.seg"))
    q.discard()
    assert store.used_bytes == 0 and store.queues == 0 and len(q) == 0
    assert not any((tmp_path / "ov").rglob("*.seg"))
    assert q.append(msg(1), 1, False, None)  # usable again
    assert [m.topic for m, *_ in q.take(5)] == ["t/1"]


def test_start_removes_what_a_previous_process_left(tmp_path: Path) -> None:
    stale = tmp_path / "ov" / "q1"
    stale.mkdir(parents=True)
    (stale / "00000000.seg").write_bytes(b"old")
    store = OverflowStore(tmp_path / "ov", 1 << 20)
    store.start()
    assert not stale.exists()
