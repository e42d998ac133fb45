"""IngestEngine: the object the broker plugs in (sinks, presence, back-pressure).

Lifecycle, as the broker drives it::

    engine = IngestEngine(config)            # or IngestEngine(config, database=db)
    await engine.start()                     # DB (embedded or DSN), schema, lookups, spool
    for flt, sink in engine.sinks():
        broker.add_sink(flt, sink)           # sink.deliver(message) -> Future | None
    broker.add_listener(engine)              # presence (on_client_connected/_disconnected)
    broker.set_ingest(engine)                # reads .saturated / await .wait_not_saturated()
    ...
    await engine.stop()                      # flush, spool what cannot be written, close

Durability of one batch (``_persist``): write it in one transaction; on a
connection/server error retry with exponential backoff (``retry_initial_ms``
doubling to ``retry_max_ms``); once it has failed for ``spool_after_ms``,
append it to the spool (fsync'd) instead. From then on, while the spool holds
anything, every new batch is appended to the spool too, so rows reach
PostgreSQL in the order they were received; a replay task drains the spool
in order once PostgreSQL answers again. If the spool is full, batches stay in
memory and keep retrying: pending rows grow, the engine becomes
``saturated``, and the broker stops reading from publishers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingestd.accumulators import Histogram, batch_rows_histogram, copy_seconds_histogram
from ingestd.db import Database
from ingestd.errors import DatabaseError
from ingestd.ingest.batching import PendingRows, TableBatcher
from ingestd.ingest.conversion import convert_entries
from ingestd.ingest.deadletter import DeadLetterLog
from ingestd.ingest.lookups import LookupLoader
from ingestd.ingest.presence import Presence
from ingestd.ingest.routes import CompiledConfig, Route, compile_config
from ingestd.ingest.schema import ensure_schema
from ingestd.ingest.spool import Spool, SpoolFull
from ingestd.ingest.writing import Group, Writer, decode_groups, encode_groups

if TYPE_CHECKING:
    from ingestd._message import Message
    from ingestd.broker.hooks import ClientInfo
    from ingestd.config import Config

log = logging.getLogger("ingestd.ingest")

# Write failures are logged at most this often (seconds).
WARN_EVERY_S = 10.0


@dataclass
class IngestStats:
    """Counters for metrics (plain ints, updated per batch, not per message)."""

    messages_received: int = 0  # messages taken by sinks and handed to a batch
    rows_committed: int = 0  # rows committed directly (not via the spool)
    batches_committed: int = 0
    dead_letters: int = 0
    rows_skipped: int = 0  # lookup misses with on_miss = "skip"
    rows_spooled: int = 0
    batches_spooled: int = 0
    rows_replayed: int = 0  # rows committed from the spool
    batches_replayed: int = 0
    write_errors: int = 0  # failed write attempts (each retry counts)
    spool_full: int = 0  # spool appends refused because the spool was full
    rows_lost: int = 0  # rows neither committed nor spooled at shutdown
    bisections: int = 0  # batches PostgreSQL rejected for their data
    lookup_reloads: int = 0
    # For ingestd_ingest_rows_total{table}: rows handed to a committed batch, per table
    # (dead letters counted under their own table).
    rows_by_table: dict[str, int] = field(default_factory=dict)
    batch_rows: Histogram = field(default_factory=batch_rows_histogram)
    copy_seconds: Histogram = field(default_factory=copy_seconds_histogram)


class RouteSink:
    """The MessageSink of one route (registered once per subscription filter).

    Also a ``RunSink``: the connections' fast path hands runs of messages to
    ``batch_run`` (its table's) instead of calling ``deliver`` per message.
    """

    __slots__ = ("batch_run", "batcher", "durable", "route")

    def __init__(self, route: Route, batcher: TableBatcher) -> None:
        self.route = route
        self.batcher = batcher
        self.durable = route.ack == "after-commit"
        self.batch_run = batcher.batch_run

    def deliver(self, message: Message) -> asyncio.Future[None] | None:
        """Queue the message for its table's next batch.

        Returns None (on-receipt acks, or QoS 0), or a future that completes
        when the batch holding this message is committed or fsync'd to the
        spool. The future is shared by all messages of the batch: add
        callbacks or await it, never cancel it.
        """
        return self.batcher.add(self.route, message, self.durable and message.qos > 0)

    def __repr__(self) -> str:
        return f"RouteSink({self.route.name!r})"


class IngestEngine:
    """Ties routes, batchers, the writer, the spool, presence and lookups together.

    Implements ``ingestd.broker.hooks.BrokerListener``.
    """

    def __init__(
        self,
        config: Config,
        database: Database | None = None,
        compiled: CompiledConfig | None = None,
    ) -> None:
        self.config = config
        self.compiled = compiled if compiled is not None else compile_config(config)
        self.database = database
        self._owns_database = database is None
        self.stats = IngestStats()
        # Dead letters by (route, reason), and their rate-limited log lines.
        self.dead_log = DeadLetterLog()
        ing = config.ingest
        # Rows the batchers took and no batch has committed or spooled yet.
        self.pending = PendingRows(ing.max_pending_rows)
        self._retry_initial = ing.retry_initial_ms / 1000
        self._retry_max = ing.retry_max_ms / 1000
        self._spool_after = ing.spool_after_ms / 1000
        self._batchers: dict[str, TableBatcher] = {}
        self._sinks: list[tuple[str, RouteSink]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bg: list[asyncio.Task[Any]] = []
        self._replay_task: asyncio.Task[None] | None = None
        self._spool_active = False
        self._stopping = False
        self._started = False
        self.spool = Spool(Path(config.server.data_dir) / "spool", ing.spool_max_bytes)
        self.presence: Presence | None = None
        if config.presence.enabled:
            self.presence = Presence(
                config.presence.table, config.presence.flush_interval_ms / 1000
            )
        self._touch = config.presence.enabled and config.presence.touch_on_publish
        self.writer: Writer | None = None
        self.lookups = LookupLoader(list(self.compiled.lookups.values()), self.stats)
        self._last_warning = -WARN_EVERY_S

    # ------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (or start the embedded server), create/verify tables, load lookups,
        open the spool (replaying what a previous run left), start background tasks.

        Raises DatabaseError when PostgreSQL cannot be reached or a table does not fit.
        """
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        cfg = self.config
        if self.database is None:
            self.database = await Database.start(cfg)
        try:
            pool = self.database.pool
            await ensure_schema(pool, cfg, self.compiled)
            self._copy_sem = asyncio.Semaphore(cfg.ingest.max_concurrent_copies)
            self.writer = Writer(pool, cfg.ingest.dead_letter_table)
            self.writer.on_dead = self.dead_log.note
            await self.lookups.load_all(pool)
            if self.presence is not None and cfg.presence.reset_on_start:
                n = await self.presence.reset(pool)
                if n:
                    log.info(
                        "presence: %d clients marked offline (left online by a previous run)", n
                    )
            await loop.run_in_executor(None, self.spool.open)
        except BaseException:
            if self._owns_database:
                await self.database.close()
                self.database = None
            raise
        interval = cfg.ingest.flush_interval_ms / 1000
        by_table: dict[str, list[Route]] = {}
        for route in self.compiled.routes:
            by_table.setdefault(route.table, []).append(route)
        for table, routes in by_table.items():
            spec = self.compiled.tables[table]
            self._batchers[table] = TableBatcher(
                spec,
                routes,
                cfg.ingest.batch_rows,
                interval,
                max_concurrent_copies=cfg.ingest.max_concurrent_copies,
                pending=self.pending,
                process=self._process_batch,
                track=self._track,
            )
        for route in self.compiled.routes:
            b = self._batchers[route.table]
            for flt in route.filters:
                self._sinks.append((flt, RouteSink(route, b)))
        if self.presence is not None:
            self._bg.append(loop.create_task(self.presence.run(pool, self._retry_max)))
        if self.compiled.lookups:
            self._bg.append(loop.create_task(self.lookups.refresh_forever()))
        if not self.spool.empty:
            self._spool_active = True
            self._start_replay()
        self._started = True
        log.info(
            "ingest: %d routes into %d tables (ack %s, batch %d rows / %s ms)",
            len(self.compiled.routes),
            len(self._batchers),
            cfg.ingest.ack,
            cfg.ingest.batch_rows,
            cfg.ingest.flush_interval_ms,
        )

    def sinks(self) -> list[tuple[str, RouteSink]]:
        """(MQTT topic filter, sink) pairs for the broker's subscription trie."""
        return list(self._sinks)

    def replay(self, route_name: str, messages: list[Message]) -> asyncio.Future[Any] | None:
        """Feed ``messages`` to one route again (dead-letter replay), bypassing the broker.

        Every message is made durable whatever the route's ack mode: the returned
        future completes when all of them are committed or spooled (a message
        that still does not fit becomes a dead letter again). None: nothing to do.
        Raises KeyError for an unknown route.
        """
        sink = next((s for _f, s in self._sinks if s.route.name == route_name), None)
        if sink is None:
            raise KeyError(route_name)
        futures: list[asyncio.Future[Any]] = []
        for m in messages:
            fut = sink.batcher.add(sink.route, m, True)
            if fut is not None and (not futures or futures[-1] is not fut):
                futures.append(fut)
        if not futures:
            return None
        return futures[0] if len(futures) == 1 else asyncio.gather(*futures)

    async def flush(self) -> None:
        """Flush every batch now and wait until each is committed or spooled (tests, shutdown)."""
        while True:
            for b in self._batchers.values():
                b.flush(force=True)
            if not self._tasks:
                return
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Flush everything; what cannot be written goes to the spool; close the pool."""
        if not self._started:
            if self.database is not None and self._owns_database:
                await self.database.close()
            return
        self._started = False
        self._stopping = True
        self._stop_event.set()  # wake retry loops: spool now instead of waiting
        await self.flush()
        if self._replay_task is not None:
            self._replay_task.cancel()
        for t in self._bg:
            t.cancel()
        await asyncio.gather(
            *self._bg, *([self._replay_task] if self._replay_task else []), return_exceptions=True
        )
        if self.presence is not None and self.presence.pending and self.database is not None:
            try:
                await asyncio.wait_for(self.presence.flush(self.database.pool), timeout=5)
            except Exception as e:
                log.warning("presence: final update failed: %s", e)
        if self.database is not None and self._owns_database:
            await self.database.close()
            self.database = None
        if not self.spool.empty:
            log.warning(
                "ingest: %d bytes stay in the spool for the next start", self.spool.size_bytes
            )

    # ------------------------------------------------------------------
    # BrokerListener
    # ------------------------------------------------------------------

    def on_client_connected(self, info: ClientInfo) -> None:
        if self.presence is not None:
            self.presence.connected(info)

    def on_client_disconnected(self, info: ClientInfo, reason: str, will_published: bool) -> None:
        if self.presence is not None:
            self.presence.disconnected(info, reason, time.time())

    # ------------------------------------------------------------------
    # back-pressure
    # ------------------------------------------------------------------

    @property
    def saturated(self) -> bool:
        """True while rows not yet committed/spooled are at ``max_pending_rows`` or more."""
        p = self.pending
        return p.count >= p.bound

    @property
    def pending_rows(self) -> int:
        return self.pending.count

    async def wait_not_saturated(self) -> None:
        """Return once pending rows have fallen to 3/4 of the bound (immediately if not saturated)."""
        await self.pending.wait_not_saturated()

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------
    # batches
    # ------------------------------------------------------------------

    async def _process_batch(
        self,
        batcher: TableBatcher,
        msgs: list[Message],
        routes: list[Route] | Route,
        fut: asyncio.Future[None] | None,
        prev: asyncio.Task[None] | None,
    ) -> None:
        """Convert, persist and acknowledge one batch (a task per batch)."""
        n = len(msgs)
        try:
            if prev is not None and not prev.done():
                # Keep a latest table's batches in order. asyncio.wait neither
                # raises prev's failure nor swallows our own cancellation.
                await asyncio.wait([prev])
            self.stats.messages_received += n
            conv = await convert_entries(
                msgs,
                routes,
                batcher.kind,
                self.config.ingest.dead_letter_table,
                self.lookups.reload_for,
            )
            if self._touch and self.presence is not None:
                touch = self.presence.touch
                for m in msgs:
                    touch(m.client_id, m.received_at)
            self.stats.dead_letters += conv.dead
            self.stats.rows_skipped += conv.skipped
            ok = await self._persist(conv.groups, conv.origins)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(None)
                else:
                    fut.set_exception(DatabaseError("batch could be neither committed nor spooled"))
        except BaseException as e:
            log.exception("ingest: batch for %s failed", batcher.spec.name)
            if fut is not None and not fut.done():
                fut.set_exception(DatabaseError(f"ingest failed: {e}"))
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self.pending.release(n)

    async def _persist(self, groups: list[Group], origins: list[Any] | None) -> bool:
        """Commit or spool one batch. False only if neither was possible before stop()."""
        assert self.writer is not None
        rows = sum(len(g.records) for g in groups)
        if not rows:
            return True
        data_rows = _data_rows(groups)
        delay = self._retry_initial
        first_failure: float | None = None
        while True:
            if self._spool_active:
                if await self._to_spool(groups, rows):
                    self._note_dead(groups)
                    return True
                if self._stopping:
                    return self._lost(rows)
            else:
                try:
                    async with self._copy_sem:
                        t0 = time.perf_counter()
                        dead = await self.writer.write(groups, origins)
                        self.stats.copy_seconds.observe(time.perf_counter() - t0)
                    self.stats.batch_rows.observe(rows)
                    by_table = self.stats.rows_by_table
                    for g in groups:
                        by_table[g.table] = by_table.get(g.table, 0) + len(g.records)
                    self.stats.batches_committed += 1
                    self.stats.rows_committed += data_rows - dead
                    self.stats.dead_letters += dead
                    self.stats.bisections = self.writer.bisections
                    self._note_dead(groups)
                    return True
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.stats.write_errors += 1
                    now = time.monotonic()
                    if first_failure is None:
                        first_failure = now
                    self._warn(f"ingest: write failed ({type(e).__name__}: {e}); retrying")
                    if self._stopping or now - first_failure >= self._spool_after:
                        if await self._to_spool(groups, rows):
                            self._note_dead(groups)
                            return True
                        if self._stopping:
                            return self._lost(rows)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)
            delay = min(delay * 2, self._retry_max)

    def _note_dead(self, groups: list[Group]) -> None:
        """The batch's conversion dead letters are committed (or spooled): count and log them."""
        table = self.config.ingest.dead_letter_table
        for g in groups:
            if g.table == table:
                self.dead_log.note(g.records)

    def _warn(self, text: str) -> None:
        """Log a write problem at most every WARN_EVERY_S (an outage fails every batch)."""
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning("%s (%d failed attempts so far)", text, self.stats.write_errors)

    def _lost(self, rows: int) -> bool:
        self.stats.rows_lost += rows
        log.error("ingest: %d rows could be neither committed nor spooled at shutdown", rows)
        return False

    async def _to_spool(self, groups: list[Group], rows: int) -> bool:
        try:
            await self.spool.append(encode_groups(groups))
        except SpoolFull as e:
            self.stats.spool_full += 1
            if self.stats.spool_full == 1 or self.stats.spool_full % 100 == 0:
                log.error("ingest: %s; holding batches in memory", e)
            return False
        except OSError as e:
            log.error("ingest: cannot write the spool: %s", e)
            return False
        if not self._spool_active:
            log.warning("ingest: PostgreSQL unavailable; spooling batches to %s", self.spool.dir)
        self._spool_active = True
        self.stats.rows_spooled += _data_rows(groups)
        self.stats.batches_spooled += 1
        self._start_replay()
        return True

    # ------------------------------------------------------------------
    # spool replay
    # ------------------------------------------------------------------

    @property
    def spool_bytes(self) -> int:
        """Bytes waiting in the spool."""
        return self.spool.size_bytes

    def _start_replay(self) -> None:
        if self._stopping or (self._replay_task is not None and not self._replay_task.done()):
            return
        self._replay_task = asyncio.get_running_loop().create_task(self._replay())

    async def _replay(self) -> None:
        """Drain the spool into PostgreSQL, in order, then switch back to direct writes."""
        assert self.writer is not None
        delay = self._retry_initial
        while True:
            got = await self.spool.peek()
            if got is None:
                # Switch back only when no append is in flight (they hold the lock).
                if self.spool.empty and not self.spool._lock.locked():
                    self._spool_active = False
                    log.info("ingest: spool drained; writing to PostgreSQL directly again")
                    return
                await asyncio.sleep(0.01)
                continue
            pos, body = got
            try:
                groups = decode_groups(body)
            except Exception as e:
                log.error("ingest: dropping an undecodable spool entry: %s", e)
                await self.spool.consume(pos)
                continue
            try:
                async with self._copy_sem:
                    dead = await self.writer.write(groups, None)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.stats.write_errors += 1
                self._warn(f"ingest: spool replay waiting for PostgreSQL ({type(e).__name__}: {e})")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                continue
            delay = self._retry_initial
            await self.spool.consume(pos)
            self.stats.rows_replayed += _data_rows(groups) - dead
            self.stats.dead_letters += dead
            self.stats.batches_replayed += 1


def _data_rows(groups: list[Group]) -> int:
    """Rows of a batch that are data, not dead letters (the dead-letter group has no route)."""
    return sum(len(g.records) for g in groups if g.route)
