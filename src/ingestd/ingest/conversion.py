"""Conversion of a closed batch: messages -> Groups of rows (+ a dead-letter group).

It runs at flush time, in chunks of :data:`CONVERT_CHUNK` with a yield to the
event loop between them, so receiving stays cheap and a big batch does not
stall the broker. A single-route table converts whole chunks with the route's
compiled RowBuilder (``Route.convert_many``) and falls back to the per-message
generated converter (``Route.convert``), which decides every RowError, only
for a chunk holding a bad message, a skip or a lookup miss.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ingestd.ingest import deadletter
from ingestd.ingest.lookups import LookupCache
from ingestd.ingest.routes import LookupMiss, Route, RowError, SkipRow

if TYPE_CHECKING:
    from ingestd._message import Message
from ingestd.ingest.writing import Group

# Rows converted between two yields to the event loop.
CONVERT_CHUNK = 1000


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
        route.keep,
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
    reload_lookup: Callable[[LookupCache, float], Awaitable[bool]] | None = None,
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
    their order. A lookup miss applies the lookup's ``on_miss`` only once the
    cache was read ``miss_wait_s`` after the message was received: until then
    ``reload_lookup(lookup, wall_time)`` waits and reloads it (rate-limited,
    lookups.py) and the message is converted again.
    """
    out = Converted()
    dead: list[tuple[Any, ...]] = []
    sink = _Sink(out, kind)
    # Lookups that missed in this batch: their `final` is decided per message.
    finals: list[LookupCache] = []
    failed: set[str] = set()  # lookups whose reload failed: misses are final
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
        i, miss = _convert_range(msgs, routes, i, end, sink, dead, finals, failed)
        if miss is not None:
            if reload_lookup is None:
                raise RuntimeError("lookup miss without a way to reload the lookup")
            # Bring the cache to miss_wait_s after this message's receipt, then
            # retry from the same message (a miss then applies on_miss).
            if not any(lk is miss for lk in finals):
                finals.append(miss)
            if not await reload_lookup(miss, msgs[i].received_at + miss.miss_wait_s):
                failed.add(miss.name)
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
    failed: set[str],
) -> tuple[int, LookupCache | None]:
    """Convert msgs[i:end] one by one. Returns (next index, lookup that missed or None).

    A miss of a lookup in ``finals`` applies on_miss when the cache is recent
    enough for the message (read ``miss_wait_s`` after its receipt) or its reload
    failed; otherwise it stops here for the caller to reload. Synchronous on
    purpose: the lookups' ``final`` flags are set only for its duration.
    """
    try:
        while i < end:
            msg = msgs[i]
            for lk in finals:
                lk.final = lk.name in failed or lk.loaded_wall >= msg.received_at + lk.miss_wait_s
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
    """Keep the last record per key, in their original order.

    A ``keep_when_missing`` column of the kept record that is NULL takes the
    value of the latest earlier record of its key that had one: what upserting
    the records one by one would have left (status then LWT in one batch keeps
    the status's energy).
    """
    if len(g.records) < 2:
        return
    idx = [g.columns.index(k) for k in g.key]
    last: dict[tuple[Any, ...], int] = {}
    for j, r in enumerate(g.records):
        last[tuple([r[k] for k in idx])] = j
    if len(last) == len(g.records):
        return
    keep = sorted(last.values())
    if g.keep:
        kidx = [g.columns.index(c) for c in g.keep]
        merged: dict[tuple[Any, ...], list[Any]] = {}
        for r in g.records:
            k = tuple([r[i] for i in idx])
            m = merged.get(k)
            if m is None:
                merged[k] = list(r)
                continue
            for ci, v in enumerate(r):
                if v is not None or ci not in kidx:
                    m[ci] = v
        g.records = [tuple(merged[tuple([g.records[j][i] for i in idx])]) for j in keep]
    else:
        g.records = [g.records[j] for j in keep]
    origins[:] = [origins[j] for j in keep]
