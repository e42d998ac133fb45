"""Lookup tables kept in memory (LookupCache) and their loading (LookupLoader).

A route column ``lookup.<lookup>.<column>`` reads a LookupCache. A miss
applies the lookup's ``on_miss`` only once the cache reflects the table as of
``miss_wait_s`` after the message was received: until then the conversion asks
:meth:`LookupLoader.reload_for` to wait for that moment and reload (at most
every ``miss_refresh_s``, concurrent batches sharing one reload) and retries.
So a mapping row inserted before the message, or up to ``miss_wait_s`` after
it, is found; a batch with a miss is delayed by at most about
``miss_wait_s + miss_refresh_s`` plus one reload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ingestd.ingest.pgtypes import quote_ident

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("ingestd.ingest")


@dataclass
class LookupCache:
    """A lookup table kept in memory: key tuple -> tuple of value columns.

    Loaded whole at start, reloaded every ``refresh_s`` and, on a miss, at
    most every ``miss_refresh_s`` (the engine does the loading; see engine.py).
    """

    name: str
    table: str
    key_columns: tuple[str, ...]
    key_types: tuple[str, ...]
    value_columns: tuple[str, ...]
    value_types: tuple[str, ...]
    refresh_s: float
    miss_refresh_s: float
    on_miss: str
    # A miss is final only when the cache was loaded this long after the message
    # was received (a mapping row added moments later is still found).
    miss_wait_s: float = 2.0
    # key column -> its source spec (evaluated in the context of each route using the lookup)
    key_specs: dict[str, Any] = field(default_factory=dict)
    data: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)
    loaded_at: float = 0.0  # time.monotonic() of the last successful load
    # time.time() when the last successful load started: the cache holds every row
    # committed before it (messages' received_at is wall-clock time too).
    loaded_wall: float = 0.0
    miss_reloaded_at: float = 0.0  # time.monotonic() of the last reload caused by a miss
    # While False, a miss raises LookupMiss (the engine waits, reloads and retries);
    # True (the cache is recent enough for the message at hand) applies on_miss.
    final: bool = False

    def select_sql(self) -> str:
        cols = ", ".join(quote_ident(c) for c in (*self.key_columns, *self.value_columns))
        return f"SELECT {cols} FROM {quote_ident(self.table)}"

    def replace(self, rows: Sequence[Sequence[Any]]) -> None:
        n = len(self.key_columns)
        self.data = {tuple(r[:n]): tuple(r[n:]) for r in rows}


class ReloadCounter(Protocol):
    """Where the loader counts its loads (the engine's IngestStats)."""

    lookup_reloads: int


class LookupLoader:
    """Loads the lookups from PostgreSQL: at start, every ``refresh_s``, and after misses."""

    def __init__(self, lookups: list[LookupCache], stats: ReloadCounter) -> None:
        self._lookups = lookups
        self._pool: asyncpg.Pool | None = None
        self._stats = stats
        self._reloads: dict[str, asyncio.Future[bool]] = {}

    async def load_all(self, pool: asyncpg.Pool) -> None:
        """Load every lookup from ``pool`` (start-up; errors propagate); later loads use it too."""
        self._pool = pool
        for lk in self._lookups:
            await self._load(lk)

    async def _load(self, lk: LookupCache) -> None:
        assert self._pool is not None, "load_all() first"
        started = time.time()
        rows = await self._pool.fetch(lk.select_sql())
        lk.replace([tuple(r) for r in rows])
        lk.loaded_at = time.monotonic()
        lk.loaded_wall = started
        self._stats.lookup_reloads += 1

    async def reload_for(self, lk: LookupCache, need_wall: float) -> bool:
        """Bring the cache to the table as of ``need_wall`` (``time.time()``) or later.

        Waits until ``need_wall``, then reloads, at most every ``miss_refresh_s``
        (waiting for the throttle rather than giving up: a miss must not lose a
        message because another miss reloaded a moment ago); concurrent callers
        share one reload. False when a reload failed (the caller applies on_miss).
        """
        while lk.loaded_wall < need_wall:
            running = self._reloads.get(lk.name)
            if running is not None and not running.done():
                await asyncio.shield(running)
                if running.result() is False:
                    return False
                continue
            delay = max(
                need_wall - time.time(),
                lk.miss_reloaded_at + lk.miss_refresh_s - time.monotonic()
                if lk.miss_reloaded_at
                else 0.0,
            )
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            lk.miss_reloaded_at = time.monotonic()
            task = asyncio.ensure_future(self._reload_logged(lk))
            self._reloads[lk.name] = task
            if not await asyncio.shield(task):
                return False
        return True

    async def reload_all(self) -> None:
        """Reload every lookup now, whatever its rate limits (before a dead-letter replay:
        the mapping row that was missing is usually why the replay was asked for)."""
        for lk in self._lookups:
            await self._reload_logged(lk)

    async def _reload_logged(self, lk: LookupCache) -> bool:
        try:
            await self._load(lk)
        except Exception as e:
            # Keep the stale cache; the miss applies on_miss.
            log.warning("lookup %s: reload failed: %s", lk.name, e)
            return False
        return True

    async def refresh_forever(self) -> None:
        """Reload each lookup every ``refresh_s`` (a background task; errors are logged)."""
        lookups = self._lookups
        tick = min(lk.refresh_s for lk in lookups)
        while True:
            await asyncio.sleep(min(tick, 5.0))
            now = time.monotonic()
            for lk in lookups:
                if now - lk.loaded_at >= lk.refresh_s:
                    try:
                        await self._load(lk)
                    except Exception as e:
                        lk.loaded_at = now  # retry at the next period
                        log.warning("lookup %s: refresh failed: %s", lk.name, e)
