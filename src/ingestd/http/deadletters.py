"""/api/dead-letters: see what did not fit a route, and replay it after a fix.

``GET /api/dead-letters`` lists the newest dead letters (route, topic,
client, error, payload as text when it is UTF-8, else base64).

``POST /api/dead-letters/replay`` takes the oldest dead letters matching a
filter (route, time window, limit), feeds each to its route again (the
ingest engine's ``replay``: the broker and its subscribers are not
involved; every lookup is reloaded first), waits until they are committed
(or spooled), then deletes those
dead-letter rows, all inside one transaction that holds the rows
(``FOR UPDATE SKIP LOCKED``), so two replays never take the same row and a
failure deletes nothing. A message that still does not fit becomes a new
dead letter (with the new error). What a dead letter does not keep (the
username, MQTT 5 properties) is not replayed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from aiohttp import web

from ingestd._message import Message
from ingestd.http.app import ApiError
from ingestd.http.bodies import DEFAULT_LIMIT, MAX_LIMIT, bad, render_payload

log = logging.getLogger("ingestd.http.api")

REPLAY_FIELDS = ("route", "since", "until", "limit")


def _quote(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def _time(value: Any, where: str) -> dt.datetime:
    if not isinstance(value, str):
        raise bad(f"{where}: expected an ISO 8601 time string")
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise bad(f"{where}: {value[:60]!r} is not an ISO 8601 time") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _where(route: Any, since: Any, until: Any) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if route is not None:
        if not isinstance(route, str):
            raise bad("route: expected a string")
        args.append(route)
        clauses.append(f"route = ${len(args)}")
    if since is not None:
        args.append(_time(since, "since"))
        clauses.append(f"received_at >= ${len(args)}")
    if until is not None:
        args.append(_time(until, "until"))
        clauses.append(f"received_at < ${len(args)}")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _limit(value: Any, default: int = DEFAULT_LIMIT) -> int:
    if value is None:
        return default
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if type(value) is not int or not 1 <= value <= MAX_LIMIT:
        raise bad(f"limit: expected a whole number from 1 to {MAX_LIMIT}")
    return value


class DeadLetterRoutes:
    """The two routes; ``ingest`` is the IngestEngine (None: broker only, no database)."""

    def __init__(self, ingest: Any, request_timeout: float = 60.0) -> None:
        self.ingest = ingest
        self.replay_timeout = request_timeout

    def _engine(self) -> Any:
        if self.ingest is None or getattr(self.ingest, "database", None) is None:
            raise ApiError(503, "no_database", "ingestd runs without a database (--no-db)")
        return self.ingest

    def _table(self, engine: Any) -> str:
        return _quote(engine.config.ingest.dead_letter_table)

    async def list(self, request: web.Request) -> web.Response:
        engine = self._engine()
        q = request.query
        where, args = _where(q.get("route"), q.get("since"), q.get("until"))
        limit = _limit(q.get("limit"), 100)
        sql = (
            "SELECT received_at, route, topic, client_id, payload, error"
            f" FROM {self._table(engine)}{where} ORDER BY received_at DESC LIMIT {limit}"
        )
        rows = await engine.database.pool.fetch(sql, *args)
        out = [
            {
                "received_at": r["received_at"].isoformat() if r["received_at"] else None,
                "route": r["route"],
                "topic": r["topic"],
                "client_id": r["client_id"],
                "error": r["error"],
                **render_payload(bytes(r["payload"] or b"")),
            }
            for r in rows
        ]
        return web.json_response({"dead_letters": out})

    async def replay(self, request: web.Request, body: Any, who: str) -> web.Response:
        engine = self._engine()
        if not isinstance(body, dict):
            raise bad("body: expected a JSON object")
        unknown = sorted(set(body) - set(REPLAY_FIELDS))
        if unknown:
            raise bad(f"{unknown[0]}: unknown field (known: {', '.join(REPLAY_FIELDS)})")
        where, args = _where(body.get("route"), body.get("since"), body.get("until"))
        limit = _limit(body.get("limit"))
        table = self._table(engine)
        replayed: dict[str, int] = {}
        # A mapping row added since the miss is the usual reason for a replay.
        await engine.lookups.reload_all()
        async with engine.database.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT ctid, received_at, route, topic, client_id, payload"
                f" FROM {table}{where} ORDER BY received_at LIMIT {limit}"
                " FOR UPDATE SKIP LOCKED",
                *args,
            )
            by_route: dict[str, list[Message]] = {}
            unknown_routes: set[str] = set()
            taken = []
            for r in rows:
                route = r["route"]
                if route.startswith("spool:") or r["topic"].startswith("spool:"):
                    continue  # a spooled row PostgreSQL refused: no message to replay
                ts = r["received_at"].timestamp() if r["received_at"] else None
                msg = Message(
                    r["topic"], bytes(r["payload"] or b""), 1, False, {}, r["client_id"] or "",
                    None, ts,
                )  # fmt: skip
                by_route.setdefault(route, []).append(msg)
                taken.append((route, r["ctid"]))
            futures = []
            for route, msgs in by_route.items():
                try:
                    fut = engine.replay(route, msgs)
                except KeyError:
                    unknown_routes.add(route)
                    continue
                replayed[route] = len(msgs)
                if fut is not None:
                    futures.append(fut)
            try:
                async with asyncio.timeout(self.replay_timeout):
                    await asyncio.gather(*futures)
            except TimeoutError:
                raise ApiError(
                    504, "timeout", "replayed messages not committed in time; nothing deleted"
                ) from None
            except Exception as e:
                raise ApiError(503, "not_stored", f"replay failed, nothing deleted: {e}") from None
            ctids = [c for route, c in taken if route not in unknown_routes]
            if ctids:
                await conn.execute(f"DELETE FROM {table} WHERE ctid = ANY($1::tid[])", ctids)
        log.info(
            "audit: dead-letter replay %s skipped_unknown_routes=%s %s",
            replayed,
            sorted(unknown_routes),
            who,
        )
        return web.json_response(
            {
                "ok": True,
                "replayed": sum(replayed.values()),
                "by_route": replayed,
                "unknown_routes": sorted(unknown_routes),
            }
        )
