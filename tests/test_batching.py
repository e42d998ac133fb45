"""TableBatcher on its own: its seam to the engine is its constructor arguments
(a PendingRows counter, the coroutine that processes a closed batch, a task
tracker), so it is tested here with plain fakes and no database."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from ingestd._message import Message
from ingestd.config import Config, RouteConfig
from ingestd.ingest.batching import PendingRows, TableBatcher
from ingestd.ingest.routes import Route, compile_config


def _compiled(kind: str = "append") -> tuple[Any, Route]:
    extra: dict[str, Any] = {"kind": "latest", "key": ["id"]} if kind == "latest" else {}
    rc = msgspec.convert(
        {"name": "r", "topic": "dev/{id}", "table": "t", "columns": {"id": "topic.id"}, **extra},
        RouteConfig,
    )
    cc = compile_config(Config(routes=[rc]))
    return cc.tables["t"], cc.routes[0]


class FakeEngine:
    """What the engine gives a batcher: a process coroutine that holds each batch
    until released, and a task tracker."""

    def __init__(self, pending: PendingRows) -> None:
        self.pending = pending
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.running = 0
        self.max_running = 0

    async def process(
        self, batcher: Any, msgs: list[Message], routes: Any, fut: Any, prev: Any
    ) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if prev is not None:
                await asyncio.wait([prev])
            await self.gate.wait()
            self.batches.append([m.topic for m in msgs])
            if fut is not None:
                fut.set_result(None)
        finally:
            self.running -= 1
            self.pending.release(len(msgs))

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _batcher(eng: FakeEngine, kind: str = "append", batch_rows: int = 3) -> TableBatcher:
    spec, route = _compiled(kind)
    return TableBatcher(
        spec,
        [route],
        batch_rows,
        0.005,
        max_concurrent_copies=1,
        pending=eng.pending,
        process=eng.process,
        track=eng.track,
    )


def test_pending_rows_counted_and_released_and_batches_in_order() -> None:
    async def main() -> None:
        pending = PendingRows(5)
        eng = FakeEngine(pending)
        b = _batcher(eng)
        route = b.single
        assert route is not None
        futs = [b.add(route, Message(f"dev/{i}", b"", 1), True) for i in range(7)]
        assert pending.count == 7 and pending.saturated
        # batch_rows = 3: two batches closed; one writer per free COPY slot x 2.
        await asyncio.sleep(0.05)
        assert eng.max_running <= 2
        waiter = asyncio.ensure_future(pending.wait_not_saturated())
        await asyncio.sleep(0)
        assert not waiter.done()
        eng.gate.set()
        await asyncio.sleep(0.05)
        b.flush(force=True)
        await asyncio.gather(*eng.tasks)
        await asyncio.wait_for(waiter, 1)
        assert pending.count == 0 and not pending.saturated
        assert [t for batch in eng.batches for t in batch] == [f"dev/{i}" for i in range(7)]
        assert all(f is not None and f.done() for f in futs)

    asyncio.run(main())


def test_writer_tasks_bounded_per_table() -> None:
    async def main() -> None:
        pending = PendingRows(1000)
        eng = FakeEngine(pending)
        b = _batcher(eng, batch_rows=1)
        route = b.single
        assert route is not None
        for i in range(10):
            b.add(route, Message(f"dev/{i}", b"", 0), False)
        await asyncio.sleep(0.05)
        # 2 x max_concurrent_copies writer tasks at most; the rest wait as messages.
        assert eng.max_running == 2 and b.backlog == 8
        eng.gate.set()
        while eng.tasks or b.backlog:
            await asyncio.sleep(0.01)
        assert len(eng.batches) == 10 and pending.count == 0

    asyncio.run(main())


def test_latest_table_batches_wait_for_the_previous_one() -> None:
    async def main() -> None:
        pending = PendingRows(1000)
        eng = FakeEngine(pending)
        b = _batcher(eng, kind="latest", batch_rows=1)
        route = b.single
        assert route is not None
        for i in range(4):
            b.add(route, Message(f"dev/{i}", b"", 0), False)
        eng.gate.set()
        while eng.tasks or b.backlog:
            await asyncio.sleep(0.01)
        assert eng.batches == [["dev/0"], ["dev/1"], ["dev/2"], ["dev/3"]]

    asyncio.run(main())


def test_a_free_copy_slot_takes_a_small_batch_at_once() -> None:
    """A batch goes on the next loop turn while a COPY slot is free, even with another
    writer of the table busy (two overlapping COPYs, whose commits PostgreSQL can
    flush together, measured faster than one bigger one: docs/benchmarks.md); with
    every slot busy, rows wait and go as one batch when a writer finishes."""

    async def until(cond: Any) -> None:
        for _ in range(10_000):
            if cond():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("condition not met")

    async def main() -> None:
        pending = PendingRows(1000)
        eng = FakeEngine(pending)
        spec, route = _compiled()
        # flush_interval: far beyond the test, so only free slots and finishing
        # writers flush.
        b = TableBatcher(
            spec,
            [route],
            100,
            60.0,
            max_concurrent_copies=2,
            pending=pending,
            process=eng.process,
            track=eng.track,
        )
        b.add(route, Message("dev/0", b"", 1), True)
        await until(lambda: eng.running == 1)
        b.add(route, Message("dev/1", b"", 1), True)
        await until(lambda: eng.running == 2)
        # Both slots busy: these wait, as messages, for a writer to finish.
        for i in range(2, 5):
            b.add(route, Message(f"dev/{i}", b"", 1), True)
            for _ in range(3):
                await asyncio.sleep(0)
        assert eng.running == 2 and len(b.msgs) == 3
        eng.gate.set()
        await until(lambda: len(eng.batches) == 3 and not eng.tasks)
        assert eng.batches == [["dev/0"], ["dev/1"], ["dev/2", "dev/3", "dev/4"]]
        assert pending.count == 0

    asyncio.run(main())
