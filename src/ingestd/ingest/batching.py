"""Per-table batches: collect messages, close batches, run a writer task per batch.

Flow of one table's batch::

    deliver() -> TableBatcher.add()          (O(1): append the message)
      ... group commit: flushed on the next loop turn while the table has a
      free writer slot (max_concurrent_copies); while every slot is busy the
      batch grows until a writer finishes, batch_rows is reached, or
      flush_interval_ms passes ...
    TableBatcher.flush(): the batch is closed; a closed batch waits, as
      messages, until fewer than 2 x max_concurrent_copies writer tasks of the
      table run ...
    writer task (one per closed batch: the engine's ``process`` coroutine):
      conversion.convert_entries() -> Groups (one per route, rows in column order)
                            + a dead-letter Group for messages that failed
      engine: Writer.write() (writing.py) in a COPY slot; on failure retry,
                            then spool (see engine.py)
      resolve the batch future (after-commit acknowledgements)

Flushes of one ``latest`` table run one after another (each waits for the
previous) so a newer state can never be overwritten by an older batch
committing late; ``append`` flushes may overlap, bounded by
``ingest.max_concurrent_copies``.

The batcher owns its batches and writer slots only: what it shares with the
engine is explicit (constructor arguments): the pending-rows counter
(:class:`PendingRows`, which it increments and the engine releases), the
coroutine function that converts and persists one closed batch, and a
callback that tracks the writer tasks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ingestd._inbound import BatchRun
from ingestd.ingest.routes import Route

if TYPE_CHECKING:
    from ingestd._message import Message
    from ingestd.ingest.routes import TableSpec


class PendingRows:
    """Rows taken by the batchers and not yet committed or spooled, against their bound.

    The batchers add (per message: one attribute increment, so ``count`` is a
    plain attribute); the engine releases when a batch is done and reads
    :attr:`saturated` for back-pressure.
    """

    __slots__ = ("_released", "_resume", "bound", "count", "low_water")

    def __init__(self, bound: int) -> None:
        self.count = 0
        self.bound = bound
        # Resume publishers once pending rows fall to 3/4 of the bound (hysteresis,
        # so the broker does not flap between pausing and resuming).
        self.low_water = max(0, (bound * 3) // 4)
        self._resume: asyncio.Event | None = None
        # Completed at the next release (webhook requests waiting for room).
        self._released: asyncio.Future[None] | None = None

    @property
    def saturated(self) -> bool:
        """True while pending rows are at the bound or more."""
        return self.count >= self.bound

    async def wait_not_saturated(self) -> None:
        """Return once pending rows have fallen to 3/4 of the bound (immediately if not saturated)."""
        if self.count < self.bound:
            return
        if self._resume is None:
            self._resume = asyncio.Event()
        while self.count > self.low_water:
            self._resume.clear()
            await self._resume.wait()

    def release(self, n: int) -> None:
        """``n`` rows were committed, spooled or dropped."""
        self.count -= n
        if self.count <= self.low_water and self._resume is not None:
            self._resume.set()
        w = self._released
        if w is not None:
            self._released = None
            if not w.done():
                w.set_result(None)

    async def wait_released(self) -> None:
        """Return at the next :meth:`release` (of any number of rows)."""
        if self._released is None:
            self._released = asyncio.get_running_loop().create_future()
        # Shielded: one waiter's timeout must not cancel the others' wait.
        await asyncio.shield(self._released)


# Converts and persists one closed batch: (batcher, messages, routes, future, previous task).
ProcessBatch = Callable[
    [
        "TableBatcher",
        "list[Message]",
        "list[Route] | Route",
        "asyncio.Future[None] | None",
        "asyncio.Task[None] | None",
    ],
    Coroutine[Any, Any, None],
]


class TableBatcher:
    """Collects the messages for one table and flushes them as one batch.

    ``add`` is the hot path (called from ``deliver``): append, maybe start the
    timer, maybe flush. Conversion and writing happen in a task per batch, and
    at most twice ``ingest.max_concurrent_copies`` such tasks run per table (a
    batch is converted while earlier ones are being copied, and waits for a
    COPY slot); more closed batches wait in ``_closed``, as messages. (A task
    for every closed batch converted all of them at once under overload: each
    waiting batch was held twice, as messages and as rows, and the
    conversions competed with the COPYs in flight for the loop.)
    """

    __slots__ = (
        "_active",
        "_closed",
        "_last_task",
        "_loop",
        "_max_copies",
        "_pending",
        "_process",
        "_timer",
        "_track",
        "batch_rows",
        "batch_run",
        "flush_interval",
        "future",
        "kind",
        "msgs",
        "routes",
        "single",
        "spec",
    )

    def __init__(
        self,
        spec: TableSpec,
        routes: list[Route],
        batch_rows: int,
        flush_interval_s: float,
        *,
        max_concurrent_copies: int,
        pending: PendingRows,
        process: ProcessBatch,
        track: Callable[[asyncio.Task[None]], None],
    ) -> None:
        self._pending = pending
        self._process = process
        self._track = track
        self._max_copies = max_concurrent_copies
        self.spec = spec
        self.kind = spec.kind
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval_s
        self.msgs: list[Message] = []
        # With one route feeding the table (the common case) the route of each
        # message is implicit; otherwise a parallel list records it.
        self.single: Route | None = routes[0] if len(routes) == 1 else None
        self.routes: list[Route] | None = None if self.single is not None else []
        # One future per batch, shared by every after-commit message in it.
        self.future: asyncio.Future[None] | None = None
        self._timer: asyncio.Handle | None = None  # call_soon or call_later
        self._last_task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        # Writer tasks of this table in flight (group commit: see the module docstring).
        self._active = 0
        # Full batches waiting for a writer, oldest first: (messages, routes, future).
        self._closed: deque[tuple[list[Message], list[Route] | Route, Any]] = deque()
        # Where the connections' fast path collects this table's messages of one run
        # (ext/ingestd/_inbound.pyx): handed over through add_run.
        self.batch_run = BatchRun(self.add_run, self.routes is not None)

    def add(self, route: Route, msg: Message, durable: bool) -> asyncio.Future[None] | None:
        """Queue one message; returns the batch's future if ``durable``."""
        self.msgs.append(msg)
        if self.routes is not None:
            self.routes.append(route)
        self._pending.count += 1
        return self._added(durable)

    def add_run(
        self, msgs: list[Message], routes: list[Route] | None, durable: bool
    ) -> asyncio.Future[None] | None:
        """Queue a run of messages (``routes``: the route of each, for a table with
        several routes); returns the batch's future if ``durable``.

        The run joins one batch: a batch may pass ``batch_rows`` by less than one
        run (the PUBLISHes of one read from one connection).
        """
        self.msgs += msgs
        if self.routes is not None:
            assert routes is not None
            self.routes += routes
        self._pending.count += len(msgs)
        return self._added(durable)

    def _added(self, durable: bool) -> asyncio.Future[None] | None:
        """Rows just joined the open batch: its future if ``durable``; flush it when
        full, else arrange its flush if nothing has yet."""
        fut = None
        if durable:
            fut = self.future
            if fut is None:
                fut = self.future = self._loop.create_future()
        if len(self.msgs) >= self.batch_rows:
            self.flush()
        elif self._timer is None:
            if self._active < self._max_copies:
                # A writer is free: take everything that arrives in this loop turn and go.
                # Waiting for more rows would only add latency to after-commit acks.
                self._timer = self._loop.call_soon(self.flush)
            else:
                self._timer = self._loop.call_later(self.flush_interval, self.flush)
        return fut

    @property
    def backlog(self) -> int:
        """Batches closed and waiting for a writer."""
        return len(self._closed)

    def flush(self, force: bool = False) -> None:
        """Close the current batch (no-op when empty) and start writers for closed batches.

        A closed batch waits, as messages, until fewer than twice
        ``max_concurrent_copies`` of this table's writer tasks run. ``force`` (a
        flush of everything: tests, shutdown) starts a writer for every closed batch
        whatever the limit (they still take turns for a COPY slot).
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.msgs:
            self._close()
        self._start(force)

    def _close(self) -> None:
        routes: list[Route] | Route
        if self.routes is not None:
            routes = self.routes
            self.routes = []
        else:
            assert self.single is not None
            routes = self.single
        self._closed.append((self.msgs, routes, self.future))
        self.msgs = []
        self.future = None

    def _start(self, force: bool = False) -> None:
        """Start a writer task for each closed batch, oldest first, while fewer than
        twice ``max_concurrent_copies`` run (so up to that many batches are converted
        while the others' COPYs are in flight, and no more)."""
        limit = 2 * self._max_copies
        closed = self._closed
        while closed and (force or self._active < limit):
            msgs, routes, fut = closed.popleft()
            prev = self._last_task if self.kind == "latest" else None
            task = self._loop.create_task(self._process(self, msgs, routes, fut, prev))
            if self.kind == "latest":
                self._last_task = task
            self._active += 1
            task.add_done_callback(self._writer_done)
            self._track(task)

    def _writer_done(self, _task: asyncio.Task[None]) -> None:
        self._active -= 1
        # Closed batches first, in order; then rows that piled up while every writer
        # was busy go out now, not at the timer.
        if self._closed:
            self._start()
        elif self.msgs:
            self.flush()
