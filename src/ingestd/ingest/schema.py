"""DDL for the configured tables, and checks that existing tables fit.

``ensure_schema`` creates what is missing (``CREATE TABLE IF NOT EXISTS``,
``CREATE INDEX IF NOT EXISTS``) and verifies what exists: every column a route
writes must be there with a compatible type, ``latest`` tables need a unique
index on exactly their key columns (``ON CONFLICT`` needs it), and a NOT NULL
column without a default that some route does not write would make every
COPY fail. A mismatch raises :class:`ingestd.errors.DatabaseError` naming the
table and column, with the ``ALTER TABLE`` that would fix it where there is one.
ingestd never alters or drops an existing table itself.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from ingestd.errors import DatabaseError
from ingestd.ingest.pgtypes import SQL_TYPE, quote_ident
from ingestd.ingest.routes import CompiledConfig, IndexDef, TableSpec

if TYPE_CHECKING:
    import asyncpg

    from ingestd.config import Config

# Columns of the dead-letter table, in COPY order.
DEAD_LETTER_COLUMNS: dict[str, str] = {
    "received_at": "timestamptz",
    "route": "text",
    "topic": "text",
    "client_id": "text",
    "payload": "bytea",
    "error": "text",
}

# Columns of the presence table, in upsert order.
PRESENCE_COLUMNS: dict[str, str] = {
    "client_id": "text",
    "username": "text",
    "online": "boolean",
    "connected_at": "timestamptz",
    "last_seen": "timestamptz",
    "disconnect_reason": "text",
    "peer": "text",
    "protocol_version": "smallint",
}

# Types an existing column may have for a configured type (binary COPY must
# be able to encode our Python value with the existing column's codec).
_COMPATIBLE: dict[str, tuple[str, ...]] = {
    "double precision": ("double precision",),
    "real": ("real", "double precision"),
    "bigint": ("bigint", "numeric"),
    "integer": ("integer", "bigint", "numeric"),
    "smallint": ("smallint", "integer", "bigint", "numeric"),
    "numeric": ("numeric",),
    "text": ("text", "character varying", "character"),
    "boolean": ("boolean",),
    "timestamptz": ("timestamp with time zone",),
    "jsonb": ("jsonb", "json"),
    "bytea": ("bytea",),
}


def dead_letter_spec(name: str) -> TableSpec:
    return TableSpec(
        name,
        "append",
        (),
        dict(DEAD_LETTER_COLUMNS),
        [IndexDef(("received_at",), method="brin")],
        "ingest.dead_letter_table",
    )


def presence_spec(name: str) -> TableSpec:
    return TableSpec(
        name,
        "latest",
        ("client_id",),
        dict(PRESENCE_COLUMNS),
        [
            IndexDef(("online",)),
            # GET /api/devices pages and filters by client id in byte order (a prefix is
            # then one range of this index, whatever the database's default collation).
            IndexDef(("client_id",), name=f"{name.split('.')[-1]}_client_id_c_idx", collate="C"),
            IndexDef(("username",)),
        ],
        "presence.table",
    )


def all_tables(cfg: Config, compiled: CompiledConfig) -> list[TableSpec]:
    """Every table ingest writes or reads: routes, lookups, dead letters, presence."""
    specs = list(compiled.tables.values())
    specs.append(dead_letter_spec(cfg.ingest.dead_letter_table))
    if cfg.presence.enabled:
        specs.append(presence_spec(cfg.presence.table))
    return specs


def index_name(table: str, idx: IndexDef) -> str:
    if idx.name:
        return idx.name
    base = table.split(".")[-1] + "_" + "_".join(idx.columns) + "_idx"
    if len(base) > 63:
        # PostgreSQL truncates at 63 bytes; keep names distinct with a hash.
        h = hashlib.sha1(base.encode()).hexdigest()[:8]
        base = base[:54] + "_" + h
    return base


def table_ddl(spec: TableSpec) -> list[str]:
    """``CREATE TABLE IF NOT EXISTS`` and ``CREATE INDEX IF NOT EXISTS`` statements."""
    cols = [f"{quote_ident(c)} {SQL_TYPE[t]}" for c, t in spec.columns.items()]
    if spec.key:
        cols.append(f"PRIMARY KEY ({', '.join(quote_ident(k) for k in spec.key)})")
    stmts = [
        f"CREATE TABLE IF NOT EXISTS {quote_ident(spec.name)} (\n    "
        + ",\n    ".join(cols)
        + "\n)"
    ]
    for idx in spec.indexes:
        using = f" USING {idx.method}" if idx.method != "btree" else ""
        collate = f" COLLATE {quote_ident(idx.collate)}" if idx.collate else ""
        stmts.append(
            f"CREATE {'UNIQUE ' if idx.unique else ''}INDEX IF NOT EXISTS "
            f"{quote_ident(index_name(spec.name, idx))} ON {quote_ident(spec.name)}{using} "
            f"({', '.join(quote_ident(c) + collate for c in idx.columns)})"
        )
    return stmts


def schema_sql(cfg: Config, compiled: CompiledConfig) -> str:
    """All DDL as one script (what ``ingestd db init --print`` would show)."""
    return "".join(s + ";\n\n" for spec in all_tables(cfg, compiled) for s in table_ddl(spec))


_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, NULL), a.attnotnull,
       (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS has_default
FROM pg_attribute a
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_UNIQUE_SQL = """
SELECT array_agg(a.attname::text ORDER BY k.ord)
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1::regclass AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
GROUP BY i.indexrelid
"""


async def verify_table(conn: Any, spec: TableSpec, written: set[str] | None = None) -> None:
    """Raise DatabaseError if the existing table ``spec.name`` cannot take our rows.

    ``written``: columns every writer provides (NOT NULL columns outside it need a default).
    """
    qname = quote_ident(spec.name)
    rows = await conn.fetch(_COLUMNS_SQL, qname)
    have = {r[0]: (r[1], r[2], r[3]) for r in rows}
    for col, typ in spec.columns.items():
        want = SQL_TYPE[typ]
        if col not in have:
            raise DatabaseError(
                f"table {spec.name} exists but has no column {col} ({want}); "
                f"add it with: ALTER TABLE {qname} ADD COLUMN {quote_ident(col)} {want}"
            )
        actual = have[col][0]
        if actual not in _COMPATIBLE[typ]:
            raise DatabaseError(
                f"column {spec.name}.{col} is {actual} but the configuration writes {want} "
                f"(compatible: {', '.join(_COMPATIBLE[typ])}); change the column type in the "
                f"configuration or: ALTER TABLE {qname} ALTER COLUMN {quote_ident(col)} TYPE {want} "
                f"USING {quote_ident(col)}::{want}"
            )
    provided = set(spec.columns) if written is None else written
    for col, (_t, notnull, has_default) in have.items():
        if notnull and not has_default and col not in provided:
            raise DatabaseError(
                f"column {spec.name}.{col} is NOT NULL without a default, and "
                f"{'some route does' if written is not None else 'ingestd does'} not write it; "
                f"give it a default or: ALTER TABLE {qname} ALTER COLUMN {quote_ident(col)} DROP NOT NULL"
            )
    if spec.key:
        uniques = [tuple(r[0]) for r in await conn.fetch(_UNIQUE_SQL, qname)]
        if not any(set(u) == set(spec.key) for u in uniques):
            raise DatabaseError(
                f"table {spec.name} needs a primary key or unique index on ({', '.join(spec.key)}) "
                f"for its 'latest' upserts; add one with: ALTER TABLE {qname} ADD PRIMARY KEY "
                f"({', '.join(quote_ident(k) for k in spec.key)})"
            )


async def ensure_schema(
    pool: asyncpg.Pool, cfg: Config, compiled: CompiledConfig, *, create: bool = True
) -> list[str]:
    """Create missing tables and indexes, verify existing ones. Returns the statements run.

    With ``create=False`` only verifies (a missing table is an error).
    """
    written = _columns_written_by_every_route(compiled)
    executed: list[str] = []
    async with pool.acquire() as conn:
        for spec in all_tables(cfg, compiled):
            exists = await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL", quote_ident(spec.name)
            )
            if exists:
                await verify_table(conn, spec, written.get(spec.name))
            elif not create:
                raise DatabaseError(f"table {spec.name} does not exist (run `ingestd db init`)")
            if create:
                # A lock per table name so two processes starting together do not
                # race on CREATE TABLE IF NOT EXISTS (it is not concurrency-safe).
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", spec.name)
                    for stmt in table_ddl(spec):
                        await conn.execute(stmt)
                        executed.append(stmt)
    return executed


def _columns_written_by_every_route(compiled: CompiledConfig) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in compiled.routes:
        cols = set(r.column_names)
        out[r.table] = cols if r.table not in out else out[r.table] & cols
    return out


async def init_database(cfg: Config) -> list[str]:
    """``ingestd db init``: start/connect the database, create and verify every table.

    Returns the statements executed. Raises DatabaseError (unreachable server,
    a table that does not fit) and ConfigError (invalid routes).
    """
    from ingestd.db import Database
    from ingestd.ingest.routes import compile_config

    compiled = compile_config(cfg)
    db = await Database.start(cfg)
    try:
        return await ensure_schema(db.pool, cfg, compiled)
    finally:
        await db.close()
