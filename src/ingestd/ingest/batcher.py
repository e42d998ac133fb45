"""Per-table batches: collect messages, convert them, write them atomically.

Flow of one table's batch::

    deliver() -> TableBatcher.add()          (O(1): append the message)
      ... group commit: flushed on the next loop turn while the table has a
      free writer slot (max_concurrent_copies); while every slot is busy the
      batch grows until a writer finishes, batch_rows is reached, or
      flush_interval_ms passes ...
    TableBatcher.flush(): the batch is closed; a closed batch waits, as
      messages, until fewer than 2 x max_concurrent_copies writer tasks of the
      table run ...
    writer task (one per closed batch; converts, then waits for a COPY slot):
      convert_entries()  -> Groups (one per route, rows in column order)
                            + a dead-letter Group for messages that failed
      engine._persist()  -> Writer.write(): one statement (a lone COPY or upsert
                            commits on its own) or one transaction for several
                            groups; on failure retry,
                            then spool (see engine.py)
      resolve the batch future (after-commit acknowledgements)

Conversion happens here, at flush time, in chunks with a yield to the event
loop between them, so receiving stays cheap and a big batch does not stall
the broker.

``append`` groups are encoded by :class:`ingestd._copy.CopyEncoder` and sent
as one binary ``COPY`` (``copy_records_to_table`` for a group with a
``numeric`` column, which the encoder does not cover).
``latest`` groups keep only the last row per key (``ON CONFLICT DO UPDATE``
cannot touch one row twice per statement; the last row is what sequential
upserts would leave anyway) and are upserted with one
``INSERT ... SELECT * FROM unnest($1::type[], ...) ON CONFLICT (key) DO UPDATE``.
Measured against COPY into a temp table + ``INSERT ... SELECT ... ON CONFLICT``
and against ``executemany`` (``benchmarks/bench_ingest.py --upsert``, 100k
messages): with 500 keys (batches shrink to <= 500 rows after keeping the
last row per key) all three were within noise (~250-290k msgs/s); with
all-distinct keys in 5000-row batches unnest and temp-table tied (~105k/s)
and executemany trailed (~70k/s); in 500-row batches unnest led (53k vs 42k
and 35k). So unnest is the default; the other two stay selectable through
:data:`UPSERT_METHOD` for re-measuring.

Flushes of one ``latest`` table run one after another (each waits for the
previous) so a newer state can never be overwritten by an older batch
committing late; ``append`` flushes may overlap, bounded by
``ingest.max_concurrent_copies``.

A batch PostgreSQL rejects for its *data* (SQLSTATE classes 22 and 23, or a
value asyncpg cannot encode) is bisected inside the transaction with
savepoints until the bad rows are isolated; those become dead letters and the
rest is committed.
"""

from __future__ import annotations

import asyncio
import decimal
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from ingestd._copy import CopyEncoder
from ingestd._copy import supports as copy_supports
from ingestd._inbound import BatchRun
from ingestd.db import copy_binary
from ingestd.ingest import deadletter
from ingestd.ingest.routes import (
    SQL_TYPE,
    LookupCache,
    LookupMiss,
    Route,
    RowError,
    SkipRow,
    quote_ident,
)

if TYPE_CHECKING:
    from ingestd.broker.message import Message
    from ingestd.ingest.engine import IngestEngine
    from ingestd.ingest.routes import TableSpec

log = logging.getLogger("ingestd.ingest.batcher")

# "unnest" | "temp-table" | "executemany" (see the module docstring).
UPSERT_METHOD = "unnest"

# Append groups go through ingestd._copy.CopyEncoder (False: asyncpg's copy_records_to_table,
# kept for measuring one against the other: benchmarks/bench_ingest.py).
USE_COPY_ENCODER = True

# Rows converted between two yields to the event loop.
CONVERT_CHUNK = 1000

# Errors that mean "this data is bad", as opposed to "the database is unreachable".
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    # asyncpg's encoders raise these for values they cannot encode.
    ValueError,
    TypeError,
    OverflowError,
    UnicodeError,
)


class Group(msgspec.Struct, array_like=True):
    """Rows for one table from one route, in one column order: the unit of one COPY/upsert.

    This is also what the spool stores (msgpack), so it holds plain values only.
    """

    table: str
    kind: str  # "append" | "latest"
    route: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    key: tuple[str, ...]
    records: list[tuple[Any, ...]]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Group])


def encode_groups(groups: Sequence[Group]) -> bytes:
    """Serialize a batch for the spool."""
    return _encoder.encode(groups)


def decode_groups(body: bytes) -> list[Group]:
    """Read a spooled batch back. Restores what msgpack cannot carry (Decimal, tuples)."""
    groups = _decoder.decode(body)
    for g in groups:
        numeric = [i for i, t in enumerate(g.types) if t == "numeric"]
        if numeric:
            fixed = []
            for r in g.records:
                row = list(r)
                for i in numeric:
                    if row[i] is not None:
                        row[i] = decimal.Decimal(row[i])
                fixed.append(tuple(row))
            g.records = fixed
        else:
            g.records = [tuple(r) for r in g.records]
    return groups


# --------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------


class Converted:
    """A converted batch: groups to write, and for each group the messages of its rows."""

    __slots__ = ("dead", "groups", "origins", "skipped")

    def __init__(self) -> None:
        self.groups: list[Group] = []
        # Parallel to groups: the message of each record (None for the dead-letter group).
        self.origins: list[list[Message] | None] = []
        self.dead = 0
        self.skipped = 0


def _new_group(route: Route) -> Group:
    return Group(
        route.table,
        route.kind,
        route.name,
        route.column_names,
        tuple(c.pgtype for c in route.columns),
        route.key,
        [],
    )


class _Sink:
    """Where converted rows go: one group per route (append) or per run of a route (latest)."""

    __slots__ = ("current", "kind", "out", "runs")

    def __init__(self, out: Converted, kind: str) -> None:
        self.out = out
        self.kind = kind
        self.runs: dict[Route, tuple[Group, list[Message]]] = {}
        self.current: tuple[Route, Group, list[Message]] | None = None

    def target(self, route: Route) -> tuple[list[tuple[Any, ...]], list[Message]]:
        if self.kind == "append":
            gr = self.runs.get(route)
            if gr is None:
                gr = self.runs[route] = (_new_group(route), [])
                self.out.groups.append(gr[0])
                self.out.origins.append(gr[1])
            return gr[0].records, gr[1]
        cur = self.current
        if cur is None or cur[0] is not route:
            cur = self.current = (route, _new_group(route), [])
            self.out.groups.append(cur[1])
            self.out.origins.append(cur[2])
        return cur[1].records, cur[2]


async def convert_entries(
    msgs: list[Message],
    routes: list[Route] | Route,
    kind: str,
    dead_letter_table: str,
    engine: IngestEngine | None = None,
) -> Converted:
    """Turn a batch of messages into Groups (+ a dead-letter group).

    ``routes`` is the route of each message, or one Route when the table has
    a single route (the common case, which converts whole chunks with the
    route's compiled RowBuilder and only falls back to the per-message loop,
    through the generated converter, for a chunk holding a bad message or a
    lookup miss).

    ``append`` tables: one group per route. ``latest`` tables: one group per
    run of consecutive messages of one route, deduplicated by key (keeping the
    last row), so different routes writing different columns of one row keep
    their order. Lookup misses trigger (rate-limited) lookup reloads through
    the engine, then the lookup's ``on_miss`` policy.
    """
    out = Converted()
    dead: list[tuple[Any, ...]] = []
    sink = _Sink(out, kind)
    finals: list[LookupCache] = []
    single = routes if isinstance(routes, Route) else None
    n = len(msgs)
    i = 0
    while i < n:
        end = min(n, i + CONVERT_CHUNK)
        if single is not None and not finals:
            chunk = msgs[i:end]
            try:
                recs = single.convert_many(chunk)  # compiled: ext/ingestd/_rows.pyx
            except Exception:
                pass  # a bad message, a skip or a lookup miss: per-message loop below
            else:
                records, origins = sink.target(single)
                records += recs
                origins += chunk
                i = end
                if i < n:
                    await asyncio.sleep(0)
                continue
        i, miss = _convert_range(msgs, routes, i, end, sink, dead, finals)
        if miss is not None:
            if engine is None:
                raise RuntimeError("lookup miss without an engine to reload it")
            # Reload the lookup if allowed (rate-limited), then retry from the
            # same message with misses of that lookup final (on_miss applies).
            finals.append(miss)
            await engine.reload_lookup_on_miss(miss)
            continue
        if i < n:
            await asyncio.sleep(0)
    if kind == "latest":
        for gi, g in enumerate(out.groups):
            _dedup_latest(g, out.origins[gi])  # type: ignore[arg-type]
    if dead:
        out.dead = len(dead)
        out.groups.append(
            Group(dead_letter_table, "append", "", deadletter.COLUMNS, deadletter.TYPES, (), dead)
        )
        out.origins.append(None)
    return out


def _convert_range(
    msgs: list[Message],
    routes: list[Route] | Route,
    i: int,
    end: int,
    sink: _Sink,
    dead: list[tuple[Any, ...]],
    finals: list[LookupCache],
) -> tuple[int, LookupCache | None]:
    """Convert msgs[i:end] one by one. Returns (next index, lookup that missed or None).

    Synchronous on purpose: the lookups' ``final`` flags are set only for its duration.
    """
    for lk in finals:
        lk.final = True
    try:
        while i < end:
            msg = msgs[i]
            route = routes if isinstance(routes, Route) else routes[i]
            try:
                rec = route.convert(msg)
            except RowError as e:
                dead.append(deadletter.record(route.name, msg, str(e)))
            except SkipRow:
                sink.out.skipped += 1
            except LookupMiss as miss:
                return i, miss.lookup
            else:
                records, origins = sink.target(route)
                records.append(rec)
                origins.append(msg)
            i += 1
        return i, None
    finally:
        for lk in finals:
            lk.final = False


def _dedup_latest(g: Group, origins: list[Message]) -> None:
    """Keep the last record per key, in their original order."""
    if len(g.records) < 2:
        return
    idx = [g.columns.index(k) for k in g.key]
    last: dict[tuple[Any, ...], int] = {}
    for j, r in enumerate(g.records):
        last[tuple([r[k] for k in idx])] = j
    if len(last) == len(g.records):
        return
    keep = sorted(last.values())
    g.records = [g.records[j] for j in keep]
    origins[:] = [origins[j] for j in keep]


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _split_table(name: str) -> tuple[str | None, str]:
    schema, _, table = name.rpartition(".")
    return (schema or None), table


class Writer:
    """Writes a batch's groups to PostgreSQL atomically (one statement, or one transaction)."""

    def __init__(
        self, pool: asyncpg.Pool, dead_letter_table: str, upsert_method: str | None = None
    ) -> None:
        self.pool = pool
        self.dead_letter_table = dead_letter_table
        self.upsert_method = upsert_method or UPSERT_METHOD
        self._sql: dict[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], str] = {}
        self._encoders: dict[tuple[str, ...], CopyEncoder | None] = {}
        self.bisections = 0

    def _copy_encoder(self, types: tuple[str, ...]) -> CopyEncoder | None:
        """The binary COPY encoder for these column types, or None (e.g. numeric): asyncpg's path."""
        try:
            return self._encoders[types]
        except KeyError:
            enc = CopyEncoder(types) if USE_COPY_ENCODER and copy_supports(types) else None
            self._encoders[types] = enc
            return enc

    async def write(
        self, groups: list[Group], origins: list[list[Message] | None] | None = None
    ) -> int:
        """Commit all groups atomically. Returns the number of rows turned into dead letters.

        Raises on connection/server errors (the caller retries or spools).
        """
        async with self.pool.acquire() as conn:
            try:
                if len(groups) == 1 and self._one_statement(groups[0]):
                    # One COPY (or one upsert) is atomic on its own: no BEGIN/COMMIT
                    # round trips for the common batch (one table, no dead letters).
                    await self._write_group(conn, groups[0])
                else:
                    async with conn.transaction():
                        for g in groups:
                            await self._write_group(conn, g)
                return 0
            except DATA_ERRORS as e:
                log.warning("batch rejected for its data (%s); isolating the bad rows", e)
                self.bisections += 1
            return await self._write_isolating(conn, groups, origins)

    def _one_statement(self, g: Group) -> bool:
        """True when writing ``g`` is a single SQL statement (hence atomic without BEGIN)."""
        return g.kind == "append" or self.upsert_method == "unnest"

    async def _write_isolating(
        self, conn: Any, groups: list[Group], origins: list[list[Message] | None] | None
    ) -> int:
        bad: list[tuple[Any, ...]] = []
        async with conn.transaction():
            for gi, g in enumerate(groups):
                org = origins[gi] if origins is not None else None
                await self._bisect(conn, g, list(range(len(g.records))), org, bad)
            if bad:
                dl = Group(
                    self.dead_letter_table,
                    "append",
                    "",
                    deadletter.COLUMNS,
                    deadletter.TYPES,
                    (),
                    bad,
                )
                try:
                    async with conn.transaction():
                        await self._write_group(conn, dl)
                except DATA_ERRORS as e:  # pragma: no cover - dead letters are sanitized
                    log.error("dropping %d dead letters PostgreSQL rejected: %s", len(bad), e)
                    return 0
        return len(bad)

    async def _bisect(
        self,
        conn: Any,
        g: Group,
        rows: list[int],
        origins: list[Message] | None,
        bad: list[tuple[Any, ...]],
    ) -> None:
        if not rows:
            return
        sub = Group(
            g.table, g.kind, g.route, g.columns, g.types, g.key, [g.records[i] for i in rows]
        )
        try:
            async with conn.transaction():  # a savepoint
                await self._write_group(conn, sub)
            return
        except DATA_ERRORS as e:
            if len(rows) == 1:
                if g.table == self.dead_letter_table:
                    log.error("dropping a dead letter PostgreSQL rejected: %s", e)
                    return
                err = f"rejected by PostgreSQL: {type(e).__name__}: {e}"
                if origins is not None:
                    bad.append(deadletter.record(g.route, origins[rows[0]], err))
                else:
                    bad.append(
                        deadletter.record_from_spooled(g.table, g.route, g.records[rows[0]], err)
                    )
                return
        mid = len(rows) // 2
        await self._bisect(conn, g, rows[:mid], origins, bad)
        await self._bisect(conn, g, rows[mid:], origins, bad)

    async def _write_group(self, conn: Any, g: Group) -> None:
        if not g.records:
            return
        if g.kind == "append":
            schema, table = _split_table(g.table)
            await self._copy(conn, table, schema, g)
            return
        method = self.upsert_method
        if method == "unnest":
            cols = list(zip(*g.records, strict=True))
            await conn.execute(self._upsert_sql(g, "unnest"), *cols)
        elif method == "executemany":
            await conn.executemany(self._upsert_sql(g, "values"), g.records)
        elif method == "temp-table":
            stage = "_ingestd_stage_" + g.table.replace(".", "_")
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {quote_ident(stage)} "
                f"(LIKE {quote_ident(g.table)} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            await self._copy(conn, stage, "pg_temp", g)
            await conn.execute(self._upsert_sql(g, "stage:" + stage))
            # Another group of this table may follow in the same transaction.
            await conn.execute(f"TRUNCATE pg_temp.{quote_ident(stage)}")
        else:  # pragma: no cover - a programming error
            raise ValueError(f"unknown upsert method {method!r}")

    async def _copy(self, conn: Any, table: str, schema: str | None, g: Group) -> None:
        """COPY the group's records into ``schema.table`` (binary)."""
        encoder = self._copy_encoder(g.types)
        if encoder is None:
            await conn.copy_records_to_table(
                table, records=g.records, columns=g.columns, schema_name=schema
            )
            return
        # Encoded here (Cython, one pass); see ext/ingestd/_copy.pyx for why and for
        # the asyncpg-compatible contract.
        await copy_binary(conn, table, encoder.encode(g.records), g.columns, schema)

    def _upsert_sql(self, g: Group, mode: str) -> str:
        k = (mode, (g.table,), g.columns, g.key)
        sql = self._sql.get(k)
        if sql is not None:
            return sql
        cols = ", ".join(quote_ident(c) for c in g.columns)
        if mode == "unnest":
            args = ", ".join(f"${i + 1}::{SQL_TYPE[t]}[]" for i, t in enumerate(g.types))
            source = f"SELECT * FROM unnest({args})"
        elif mode == "values":
            source = (
                "VALUES ("
                + ", ".join(f"${i + 1}::{SQL_TYPE[t]}" for i, t in enumerate(g.types))
                + ")"
            )
        else:
            source = f"SELECT {cols} FROM pg_temp.{quote_ident(mode[len('stage:') :])}"
        updates = [c for c in g.columns if c not in g.key]
        conflict = ", ".join(quote_ident(c) for c in g.key)
        if updates:
            action = "DO UPDATE SET " + ", ".join(
                f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in updates
            )
        else:
            action = "DO NOTHING"
        sql = f"INSERT INTO {quote_ident(g.table)} ({cols}) {source} ON CONFLICT ({conflict}) {action}"
        self._sql[k] = sql
        return sql


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


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
        "_engine",
        "_last_task",
        "_loop",
        "_timer",
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
        engine: IngestEngine,
        spec: TableSpec,
        routes: list[Route],
        batch_rows: int,
        flush_interval_s: float,
    ) -> None:
        self._engine = engine
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
        self._engine._pending += 1
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
        self._engine._pending += len(msgs)
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
            if self._active < self._engine.config.ingest.max_concurrent_copies:
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
        limit = 2 * self._engine.config.ingest.max_concurrent_copies
        closed = self._closed
        while closed and (force or self._active < limit):
            msgs, routes, fut = closed.popleft()
            prev = self._last_task if self.kind == "latest" else None
            task = self._loop.create_task(
                self._engine._process_batch(self, msgs, routes, fut, prev)
            )
            if self.kind == "latest":
                self._last_task = task
            self._active += 1
            task.add_done_callback(self._writer_done)
            self._engine._track(task)

    def _writer_done(self, _task: asyncio.Task[None]) -> None:
        self._active -= 1
        # Closed batches first, in order; then rows that piled up while every writer
        # was busy go out now, not at the timer.
        if self._closed:
            self._start()
        elif self.msgs:
            self.flush()
