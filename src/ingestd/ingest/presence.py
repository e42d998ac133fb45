"""Device presence: one row per client id, kept current from connection events.

Table (``presence.table``, default ``device_presence``)::

    client_id text PRIMARY KEY, username text, online boolean,
    connected_at timestamptz, last_seen timestamptz, disconnect_reason text,
    peer text, protocol_version smallint

The broker calls :meth:`Presence.connected` / :meth:`Presence.disconnected`
(through the engine, which is the BrokerListener) for every connection; the
reason is one of ``ingestd.broker.hooks.DISCONNECT_REASONS`` (``normal``,
``will``, ``connection_lost``, ``keepalive_timeout``, ``taken_over``, ...).
Events only update an in-memory dict (the latest state per client wins), and
a background task upserts the changed rows every ``flush_interval_ms`` in one
statement. While PostgreSQL is down the dict simply keeps merging (its size
is bounded by the number of distinct clients) and is written once it is back:
presence is state, not history, so it is not spooled.

``last_seen`` is the time of the last connect/disconnect, and, with
``touch_on_publish``, of the last message the client published to an ingest
route (refreshed per batch, so at most one update per client per flush).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from typing import TYPE_CHECKING, Any

from ingestd.ingest.pgtypes import quote_ident
from ingestd.ingest.schema import PRESENCE_COLUMNS

if TYPE_CHECKING:
    import asyncpg

    from ingestd.broker.hooks import ClientInfo

log = logging.getLogger("ingestd.ingest.presence")

_UTC = _dt.UTC
_fromts = _dt.datetime.fromtimestamp


class Presence:
    """Batches presence changes and upserts them periodically."""

    def __init__(self, table: str, flush_interval_s: float) -> None:
        self.table = table
        self.flush_interval = flush_interval_s
        # client_id -> full row (PRESENCE_COLUMNS order); full rows so a connect
        # and a disconnect merged into one flush still write a complete row.
        self._rows: dict[str, tuple[Any, ...]] = {}
        # client_id -> last publish time (epoch seconds), for touch_on_publish
        self._touched: dict[str, float] = {}
        # The rows a flush is writing (until it commits or fails).
        self._writing: dict[str, tuple[Any, ...]] = {}
        self._wake = asyncio.Event()
        self.writes = 0
        self.errors = 0
        cols = list(PRESENCE_COLUMNS)
        q = quote_ident(table)
        args = ", ".join(f"${i + 1}::{_sql(t)}[]" for i, t in enumerate(PRESENCE_COLUMNS.values()))
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[1:])
        self._upsert = (
            f"INSERT INTO {q} ({', '.join(cols)}) SELECT * FROM unnest({args}) "
            f"ON CONFLICT (client_id) DO UPDATE SET {sets}"
        )
        # Only move last_seen forward, and only for rows that exist.
        self._touch = (
            f"UPDATE {q} AS p SET last_seen = t.ts FROM unnest($1::text[], $2::timestamptz[]) AS t(cid, ts) "
            f"WHERE p.client_id = t.cid AND (p.last_seen IS NULL OR p.last_seen < t.ts)"
        )

    @property
    def pending(self) -> int:
        return len(self._rows) + len(self._touched)

    def pending_rows(self) -> dict[str, tuple[Any, ...]]:
        """Changes not yet written: client id -> row (``PRESENCE_COLUMNS`` order).

        Includes the rows of a flush still in progress (not yet committed). For
        reading on the event loop (``GET /api/devices``); callers must not change it."""
        if self._writing:
            return {**self._writing, **self._rows}
        return self._rows

    def connected(self, info: ClientInfo) -> None:
        t = _fromts(info.connected_at, _UTC)
        self._rows[info.client_id] = (
            info.client_id,
            info.username,
            True,
            t,
            t,
            None,
            info.peer,
            info.protocol_version,
        )

    def disconnected(self, info: ClientInfo, reason: str, now: float) -> None:
        self._rows[info.client_id] = (
            info.client_id,
            info.username,
            False,
            _fromts(info.connected_at, _UTC),
            _fromts(now, _UTC),
            reason,
            info.peer,
            info.protocol_version,
        )

    def touch(self, client_id: str, at: float) -> None:
        if client_id:
            old = self._touched.get(client_id)
            if old is None or at > old:
                self._touched[client_id] = at

    async def reset(self, pool: asyncpg.Pool) -> int:
        """Mark rows left online by a previous run offline; returns how many."""
        res = await pool.execute(
            f"UPDATE {quote_ident(self.table)} SET online = false, "
            f"disconnect_reason = 'server_restart' WHERE online"
        )
        return int(res.split()[-1]) if res else 0

    async def flush(self, pool: asyncpg.Pool) -> None:
        """Write pending changes. On failure they stay pending (merged with newer ones)."""
        rows, self._rows = self._rows, {}
        touched, self._touched = self._touched, {}
        self._writing = rows
        try:
            async with pool.acquire() as conn, conn.transaction():
                if rows:
                    await conn.execute(self._upsert, *zip(*rows.values(), strict=True))
                if touched:
                    await conn.execute(
                        self._touch, list(touched), [_fromts(v, _UTC) for v in touched.values()]
                    )
            self.writes += 1
        except BaseException:
            # Newer events (arrived while we were writing) win over the failed ones.
            for k, v in rows.items():
                self._rows.setdefault(k, v)
            for k, t in touched.items():
                if t > self._touched.get(k, 0.0):
                    self._touched[k] = t
            raise
        finally:
            self._writing = {}

    async def run(self, pool: asyncpg.Pool, backoff_max_s: float) -> None:
        """Flush every interval until cancelled; back off while the database is down."""
        delay = self.flush_interval
        while True:
            await asyncio.sleep(delay)
            if not self._rows and not self._touched:
                continue
            try:
                await self.flush(pool)
                delay = self.flush_interval
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.errors += 1
                delay = min(max(delay * 2, self.flush_interval), backoff_max_s)
                log.warning("presence update failed (%s); retrying in %.1fs", e, delay)


def _sql(t: str) -> str:
    from ingestd.ingest.pgtypes import SQL_TYPE

    return SQL_TYPE[t]
