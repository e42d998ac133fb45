"""Writing a batch to PostgreSQL: COPY, upsert, dead-letter bisection.

A batch is a list of :class:`Group` (one per route, rows in column order; the
unit of one COPY/upsert and what the spool stores). :class:`Writer` commits
them atomically: one statement (a lone COPY or upsert commits on its own) or
one transaction for several groups.

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

A batch PostgreSQL rejects for its *data* (SQLSTATE classes 22 and 23, or a
value asyncpg cannot encode) is bisected inside the transaction with
savepoints until the bad rows are isolated; those become dead letters and the
rest is committed.
"""

from __future__ import annotations

import decimal
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from ingestd._copy import CopyEncoder
from ingestd._copy import supports as copy_supports
from ingestd.db import copy_binary
from ingestd.ingest import deadletter
from ingestd.ingest.pgtypes import SQL_TYPE, quote_ident

if TYPE_CHECKING:
    from ingestd._message import Message

log = logging.getLogger("ingestd.ingest.writing")

# "unnest" | "temp-table" | "executemany" (see the module docstring).
UPSERT_METHOD = "unnest"

# Append groups go through ingestd._copy.CopyEncoder (False: asyncpg's copy_records_to_table,
# kept for measuring one against the other: benchmarks/bench_ingest.py).
USE_COPY_ENCODER = True

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
    # latest: columns whose NULL keeps the stored value (keep_when_missing). Last and
    # defaulted, so spool entries written before it existed still decode.
    keep: tuple[str, ...] = ()


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
        self._sql: dict[tuple[Any, ...], str] = {}
        self._encoders: dict[tuple[str, ...], CopyEncoder | None] = {}
        self.bisections = 0
        # Told the dead-letter rows bisection isolated, once they are committed.
        self.on_dead: Callable[[list[tuple[Any, ...]]], None] | None = None

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
        if bad and self.on_dead is not None:
            self.on_dead(bad)  # committed: the transaction above is closed
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
            g.table,
            g.kind,
            g.route,
            g.columns,
            g.types,
            g.key,
            [g.records[i] for i in rows],
            g.keep,
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
        k = (mode, (g.table, *g.keep), g.columns, g.key)
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
            # keep_when_missing: a NULL from this message keeps what the row holds
            # (an LWT carrying only `status` must not wipe the last energy reading).
            action = "DO UPDATE SET " + ", ".join(
                f"{quote_ident(c)} = COALESCE(EXCLUDED.{quote_ident(c)}, _old.{quote_ident(c)})"
                if c in g.keep
                else f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}"
                for c in updates
            )
        else:
            action = "DO NOTHING"
        target = quote_ident(g.table) + (" AS _old" if g.keep else "")
        sql = f"INSERT INTO {target} ({cols}) {source} ON CONFLICT ({conflict}) {action}"
        self._sql[k] = sql
        return sql
