"""PostgreSQL side of the ingest scenario: counting the run's rows, and the same-run references.

The ingest scenario stores each message as one row of ``table`` with columns
``run`` (the run id), ``pub`` and ``seq``. :func:`count_rows` polls until
every published row of the run is there or the count stops growing.

:func:`measure_reference` measures, in the same run and into the same table,
what a plain client does without a broker in between: one asyncpg
connection, rows built before the clock starts, one
``copy_records_to_table`` per batch in its own transaction. Its rows carry
a run id of their own and are deleted afterwards.

:func:`measure_binary_reference` measures PostgreSQL's own floor for the
same rows: the rows the run stored, read back with ``COPY (SELECT ...) TO
STDOUT (FORMAT binary)`` (PostgreSQL encodes them; the ``run`` column
rewritten to a run id of its own) and cut into ``batch``-row COPY streams
before the clock starts; timed, each stream is one lone ``COPY ... FROM
STDIN (FORMAT binary)`` (its own transaction, one commit per batch as
ingestd's), over one connection or spread round-robin over several
connections sending concurrently. The rows are counted after the clock
stops (all of them must be there) and deleted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

# Columns COPY can fill: not generated, not identity, no default (a serial id or
# a default such as now() is left to the table, as ingestd's routes leave it).
_COLUMNS_SQL = """
SELECT a.attname, t.typname, a.atttypmod, format_type(a.atttypid, a.atttypmod) AS type
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
ORDER BY a.attnum
"""

_TEXT_TYPES = ("text", "varchar")


class ReferenceSkipped(Exception):
    """The reference cannot be measured for this table (the message says why)."""


@dataclass
class RowCount:
    rows: int  # rows of the run
    unique: int  # distinct (pub, seq) of the run
    t_seen_ns: int  # time.monotonic_ns() just before the query that first saw ``rows``


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_table(table: str) -> str:
    """``a.b`` -> ``"a"."b"`` (each part quoted as given)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in table.split("."))


async def count_rows(
    conn: Any, table: str, run_id: str, expected: int, idle_timeout: float
) -> RowCount:
    """Poll the table until ``expected`` distinct rows of ``run_id`` are there, or no change
    for ``idle_timeout`` seconds.

    The time kept is taken just before the query that first returned the final
    count is sent: the query's snapshot is taken then, and a count over a large
    table may take long to return.
    """
    sql = f"SELECT count(*), count(DISTINCT (pub, seq)) FROM {quote_table(table)} WHERE run = $1"
    last = -1
    last_change = time.monotonic()
    t_seen = time.monotonic_ns()
    while True:
        t_query = time.monotonic_ns()
        rows, uniq = await conn.fetchrow(sql, run_id)
        now = time.monotonic()
        if rows != last:
            last, last_change = rows, now
            t_seen = t_query
        if uniq >= expected or now - last_change > idle_timeout:
            return RowCount(int(rows), int(uniq), t_seen)
        await asyncio.sleep(0.05)


def _value_maker(typname: str, typmod: int, type_text: str, column: str) -> Callable[[int], Any]:
    """A function of a row's number that gives a value of the column's type."""
    if typname == "int2":
        return lambda k: k % 32768
    if typname == "int4":
        return lambda k: k % 2147483648
    if typname == "int8":
        return lambda k: k
    if typname in ("float4", "float8"):
        return lambda k: 20.0 + (k % 100) / 10
    if typname == "numeric":
        if typmod >= 4:  # numeric(p, s): at most p - s digits before the point
            precision, scale = (typmod - 4) >> 16, (typmod - 4) & 0xFFFF
            limit = 10 ** max(precision - scale, 0)
            return lambda k: Decimal(k % limit)
        return lambda k: Decimal(k)
    if typname in _TEXT_TYPES:
        if typname == "varchar" and typmod >= 4:
            n = typmod - 4
            return lambda k: f"m{k % 10}"[:n]
        return lambda k: f"m{k % 10}"
    if typname == "bool":
        return lambda k: k % 2 == 0
    if typname == "timestamptz":
        base = dt.datetime.now(dt.UTC)
        return lambda k: base + dt.timedelta(microseconds=k)
    if typname in ("jsonb", "json"):
        return lambda k: f'{{"k": {k % 100}}}'
    if typname == "bytea":
        return lambda k: k.to_bytes(8, "big")
    raise ReferenceSkipped(f"cannot generate values for column {column!r} of type {type_text}")


async def reference_records(
    conn: Any, table: str, rows: int, run_id: str, publishers: int
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(columns, records): ``rows`` rows for the table, by the types of its columns.

    ``run`` is ``run_id``; row i has ``pub`` = i mod ``publishers`` and
    ``seq`` = i div ``publishers``, as the run's rows are numbered.
    """
    cols = await conn.fetch(_COLUMNS_SQL, quote_table(table))
    names = [c["attname"] for c in cols]
    if "run" not in names:
        raise ReferenceSkipped(f"table {table} has no column run (without a default) to mark rows")
    pubs = max(publishers, 1)
    values: list[list[Any]] = []
    for c in cols:
        name, typname, typmod = c["attname"], c["typname"], c["atttypmod"]
        if name == "run":
            if typname not in _TEXT_TYPES or (
                typname == "varchar" and 0 <= typmod - 4 < len(run_id)
            ):
                raise ReferenceSkipped(f"column run is {c['type']}, cannot hold {run_id!r}")
            values.append([run_id] * rows)
            continue
        make = _value_maker(typname, typmod, c["type"], name)
        if name == "pub":
            values.append([make(i % pubs) for i in range(rows)])
        elif name == "seq":
            values.append([make(i // pubs) for i in range(rows)])
        else:
            values.append([make(i) for i in range(rows)])
    return names, list(zip(*values, strict=True))


async def measure_reference(
    conn: Any, table: str, rows: int, run_id: str, publishers: int, batch: int
) -> float:
    """Rows/s of a plain ``copy_records_to_table`` loop of ``batch``-row transactions.

    Inserts ``rows`` rows marked ``run = run_id`` into ``table`` and deletes
    them again (also when the COPY fails). Raises :class:`ReferenceSkipped`
    when the table's columns cannot be filled.
    """
    if rows <= 0:
        raise ReferenceSkipped("the run stored no rows")
    columns, records = await reference_records(conn, table, rows, run_id, publishers)
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    parts = table.split(".")
    name, schema = parts[-1], (parts[-2] if len(parts) > 1 else None)
    try:
        t0 = time.perf_counter()
        for b in batches:
            async with conn.transaction():
                await conn.copy_records_to_table(
                    name, schema_name=schema, records=b, columns=columns
                )
        elapsed = time.perf_counter() - t0
    finally:
        await conn.execute(f"DELETE FROM {quote_table(table)} WHERE run = $1", run_id)
    return len(records) / max(elapsed, 1e-9)


# The binary COPY format (PostgreSQL docs, "COPY", binary format): an 11-byte
# signature, 32-bit flags and header-extension length; per row a 16-bit field count
# and per field a 32-bit length (-1: NULL) and the value; a 16-bit -1 trailer.
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_TRAILER = b"\xff\xff"


def split_copy_binary(data: bytes, rows_per_stream: int) -> list[bytes]:
    """Cut one binary COPY stream into streams of at most ``rows_per_stream`` rows
    (each with the header and the trailer). Raises ValueError for a malformed stream."""
    if rows_per_stream < 1:
        raise ValueError("rows_per_stream must be at least 1")
    if len(data) < 21 or not data.startswith(COPY_SIGNATURE):
        raise ValueError("not a binary COPY stream")
    ext = int.from_bytes(data[15:19], "big")
    start = 19 + ext
    header = data[:start]
    mv = memoryview(data)
    out: list[bytes] = []
    pos = start
    first = pos
    rows = 0
    n = len(data)
    while True:
        if pos + 2 > n:
            raise ValueError("binary COPY stream ends without its trailer")
        fields = int.from_bytes(mv[pos : pos + 2], "big", signed=True)
        if fields == -1:
            break
        pos += 2
        for _ in range(fields):
            if pos + 4 > n:
                raise ValueError("binary COPY stream ends inside a row")
            size = int.from_bytes(mv[pos : pos + 4], "big", signed=True)
            pos += 4 + max(size, 0)
        if pos > n:
            raise ValueError("binary COPY stream ends inside a row")
        rows += 1
        if rows == rows_per_stream:
            out.append(header + mv[first:pos] + _TRAILER)
            first, rows = pos, 0
    if rows:
        out.append(header + mv[first:pos] + _TRAILER)
    return out


@dataclass
class BinaryReference:
    rows_per_s: float
    rows: int  # rows the reference stored (counted after the clock stopped)
    streams: int  # COPY statements
    connections: int
    cpu_s: float | None = None  # what ``cpu`` read over the timed COPYs


async def encode_run_rows(
    conn: Any, table: str, run_id: str, new_run_id: str
) -> tuple[list[str], bytes]:
    """(columns, stream): the run's rows as PostgreSQL encodes them for binary COPY, with
    ``run`` = ``new_run_id`` (columns COPY can fill; ordered by pub, seq when present)."""
    cols = await conn.fetch(_COLUMNS_SQL, quote_table(table))
    names = [c["attname"] for c in cols]
    if "run" not in names:
        raise ReferenceSkipped(f"table {table} has no column run (without a default) to mark rows")
    run_type = next(c for c in cols if c["attname"] == "run")
    if run_type["typname"] not in _TEXT_TYPES or (
        run_type["typname"] == "varchar" and 0 <= run_type["atttypmod"] - 4 < len(new_run_id)
    ):
        raise ReferenceSkipped(f"column run is {run_type['type']}, cannot hold {new_run_id!r}")
    select = ", ".join(
        f"$2::{c['type']} AS run" if c["attname"] == "run" else _quote_ident(c["attname"])
        for c in cols
    )
    order = " ORDER BY pub, seq" if {"pub", "seq"} <= set(names) else ""
    chunks: list[bytes] = []

    async def take(b: bytes) -> None:
        chunks.append(b)

    await conn.copy_from_query(
        f"SELECT {select} FROM {quote_table(table)} WHERE run = $1{order}",
        run_id,
        new_run_id,
        output=take,
        format="binary",
    )
    return names, b"".join(chunks)


async def measure_binary_reference(
    conns: list[Any],
    table: str,
    run_id: str,
    ref_run_id: str,
    batch: int,
    cpu: Callable[[], float] | None = None,
) -> BinaryReference:
    """Rows/s of pre-encoded binary COPYs of the run's rows, ``batch`` rows per lone COPY,
    spread round-robin over ``conns`` (each sends its share one after another; all
    start together).

    Inserts the rows marked ``run = ref_run_id`` and deletes them again (also
    when a COPY fails). Raises :class:`ReferenceSkipped` when there is nothing to
    measure or the rows cannot be marked. ``cpu`` (CPU seconds so far, e.g. of
    the PostgreSQL server and this process) is read just before and after the
    timed COPYs.
    """
    if not conns:
        raise ValueError("at least one connection is needed")
    columns, data = await encode_run_rows(conns[0], table, run_id, ref_run_id)
    streams = split_copy_binary(data, batch)
    if not streams:
        raise ReferenceSkipped("the run stored no rows")
    parts = table.split(".")
    name, schema = parts[-1], (parts[-2] if len(parts) > 1 else None)
    shares = [streams[i :: len(conns)] for i in range(len(conns))]

    async def send(conn: Any, share: list[bytes]) -> None:
        for s in share:
            await conn.copy_to_table(
                name, source=memoryview(s), columns=columns, schema_name=schema, format="binary"
            )

    sql_count = f"SELECT count(*) FROM {quote_table(table)} WHERE run = $1"
    cpu_s = None
    try:
        c0 = cpu() if cpu is not None else 0.0
        t0 = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as tg:  # a failed COPY cancels the others
                for c, sh in zip(conns, shares, strict=True):
                    tg.create_task(send(c, sh))
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from None
        elapsed = time.perf_counter() - t0
        if cpu is not None:
            cpu_s = cpu() - c0
        stored = int(await conns[0].fetchval(sql_count, ref_run_id))
    finally:
        await conns[0].execute(f"DELETE FROM {quote_table(table)} WHERE run = $1", ref_run_id)
    return BinaryReference(stored / max(elapsed, 1e-9), stored, len(streams), len(conns), cpu_s)
