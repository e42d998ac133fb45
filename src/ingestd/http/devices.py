"""/api/devices: who is connected, when each device was last seen, and its state.

Three sources, freshest last:

1. the presence table (``presence.table``, :mod:`ingestd.ingest.presence`):
   one row per client id ever seen, written every ``presence.flush_interval_ms``;
2. the presence changes not yet written (``Presence.pending_rows``: the
   connects and disconnects of the last interval, or of an outage);
3. the broker's registry (``Broker.sessions``): a live connection is online
   whatever the table says, with its peer, protocol, keepalive and will.

Without a database (``--no-db``) or with presence off, the registry alone is
the list (sessions that exist now, online or offline).

Device state: a ``kind = "latest"`` route with ``device_state`` names a text
key column holding the device's MQTT client id (``Route.device_column``);
each listed device gets the rows of those tables whose column equals its
client id, as ``state: {table: [row, ...]}``.

Cost per request (the console polls): one index range scan of the presence
table (``client_id COLLATE "C"``, ``LIMIT``), one ``= ANY`` index lookup per
device-state table for the page's client ids, O(pending changes) in memory,
and O(page) registry look-ups. Registry-only mode walks the session dict
once (as ``/api/sessions`` does).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import heapq
import json
import uuid
from typing import Any

from aiohttp import web

from ingestd.http.app import ApiError
from ingestd.http.bodies import bad, render_payload

DEFAULT_DEVICES = 100
MAX_DEVICES = 1000
# Rows of one device-state table per device (a composite key can give several).
MAX_STATE_ROWS = 20
# Bytes of a will's payload shown by GET /api/devices/{client_id}.
WILL_PREVIEW = 256

LIST_PARAMS = ("online", "username", "client_id_prefix", "limit", "cursor")
PRESENCE_FIELDS = (
    "client_id",
    "username",
    "online",
    "connected_at",
    "last_seen",
    "disconnect_reason",
    "peer",
    "protocol_version",
)
_PROTOCOL = {3: "3.1", 4: "3.1.1", 5: "5.0"}
_UTC = dt.UTC


def _quote(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def jsonable(v: Any) -> Any:
    """A database value as JSON: times in ISO 8601, bytes in base64, jsonb parsed."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return str(v)


def _iso(t: Any) -> str | None:
    if t is None:
        return None
    if isinstance(t, int | float):
        t = dt.datetime.fromtimestamp(t, _UTC)
    return str(t.isoformat())


def _bool(text: str, name: str) -> bool:
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise bad(f"{name}: expected true or false, got {text[:40]!r}")


def _prefix_end(prefix: str) -> str | None:
    """The smallest string above every string starting with ``prefix`` (code point order)."""
    for i in range(len(prefix) - 1, -1, -1):
        c = ord(prefix[i]) + 1
        if c <= 0x10FFFF:
            return prefix[:i] + chr(0xE000 if 0xD800 <= c <= 0xDFFF else c)
    return None


def presence_page_sql(table: str, q: Any, limit: int) -> tuple[str, list[Any]]:
    """The query of one page of the presence table: ``limit + 1`` rows after the cursor,
    in byte order of client id (one range of the ``client_id COLLATE "C"`` index)."""
    cid = 'client_id COLLATE "C"'
    clauses: list[str] = []
    args: list[Any] = []

    def arg(v: Any) -> str:
        args.append(v)
        return f"${len(args)}"

    if "cursor" in q:
        clauses.append(f"{cid} > {arg(q['cursor'])}")
    prefix = q.get("client_id_prefix", "")
    if prefix:
        clauses.append(f"{cid} >= {arg(prefix)}")
        end = _prefix_end(prefix)
        if end is not None:
            clauses.append(f"{cid} < {arg(end)}")
        clauses.append(f"starts_with(client_id, {arg(prefix)})")
    if "username" in q:
        clauses.append(f"username = {arg(q['username'])}")
    if "online" in q:
        clauses.append(f"online = {arg(_bool(q['online'], 'online'))}")
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    sql = (
        f"SELECT {', '.join(PRESENCE_FIELDS)} FROM {_quote(table)}{where}"
        f" ORDER BY {cid} LIMIT {limit + 1}"
    )
    return sql, args


def state_sql(table: str, column: str, columns: list[str]) -> str:
    """The rows of a device-state table for the client ids in ``$1``: at most
    MAX_STATE_ROWS per device, each found through the index on ``column``."""
    return (
        f"SELECT d.id AS _device, t.* FROM unnest($1::text[]) AS d(id)"
        f" CROSS JOIN LATERAL (SELECT {', '.join(_quote(c) for c in columns)}"
        f" FROM {_quote(table)} WHERE {_quote(column)} = d.id LIMIT {MAX_STATE_ROWS}) AS t"
    )


class DeviceRoutes:
    """``GET /api/devices`` and ``GET /api/devices/{client_id}`` over a broker and engine."""

    def __init__(self, broker: Any, ingest: Any) -> None:
        self.broker = broker
        self.ingest = ingest
        self._tables: dict[str, tuple[str, list[str]]] | None = None

    # -- sources ------------------------------------------------------------------

    def _pool(self) -> Any:
        """The asyncpg pool when the presence table is kept, else None."""
        engine = self.ingest
        if engine is None or getattr(engine, "presence", None) is None:
            return None
        database = getattr(engine, "database", None)
        return None if database is None else database.pool

    def _state_tables(self) -> dict[str, tuple[str, list[str]]]:
        """table -> (device column, its columns) of every device-state route."""
        if self._tables is not None:
            return self._tables
        out: dict[str, tuple[str, list[str]]] = {}
        compiled: Any = getattr(self.ingest, "compiled", None)
        for route in [] if compiled is None else compiled.routes:
            col = route.device_column
            if col is not None and route.table not in out:
                out[route.table] = (col, list(compiled.tables[route.table].columns))
        self._tables = out
        return out

    def _pending(self) -> dict[str, tuple[Any, ...]]:
        presence = getattr(self.ingest, "presence", None)
        return {} if presence is None else presence.pending_rows()

    def _live(self, device: dict[str, Any]) -> dict[str, Any]:
        """Overlay what the registry knows now on a presence row (or an empty one)."""
        session = self.broker.sessions.get(device["client_id"])
        conn = None if session is None else session.connection
        info = None if conn is None else conn.info
        if info is not None:
            last = device.get("last_seen")
            connected = _iso(info.connected_at)
            if last is None or dt.datetime.fromisoformat(last).timestamp() < info.connected_at:
                last = connected
            device.update(
                online=True,
                username=info.username,
                peer=info.peer,
                protocol_version=info.protocol_version,
                connected_at=connected,
                last_seen=last,
                disconnect_reason=None,
            )
        elif session is not None and device.get("online") is None:
            device.update(online=False, username=session.username)
        device["protocol"] = _PROTOCOL.get(device.get("protocol_version") or 0)
        return device

    @staticmethod
    def _unknown(client_id: str) -> dict[str, Any]:
        """A device the presence table does not know (yet): every field, None."""
        return {f: None for f in PRESENCE_FIELDS} | {"client_id": client_id}

    @staticmethod
    def _row(values: Any) -> dict[str, Any]:
        return {f: jsonable(v) for f, v in zip(PRESENCE_FIELDS, values, strict=True)}

    async def _state(self, pool: Any, client_ids: list[str]) -> dict[str, dict[str, list[Any]]]:
        """client id -> {table: [rows]} for the device-state tables."""
        out: dict[str, dict[str, list[Any]]] = {c: {} for c in client_ids}
        if pool is None or not client_ids:
            return out
        for table, (col, cols) in self._state_tables().items():
            for c in client_ids:
                out[c][table] = []
            for r in await pool.fetch(state_sql(table, col, cols), client_ids):
                out[r["_device"]][table].append({c: jsonable(r[c]) for c in cols})
        return out

    # -- GET /api/devices -----------------------------------------------------------

    async def list_devices(self, request: web.Request) -> web.Response:
        q = request.query
        for name in q:
            if name == "topic_prefix":
                raise bad(
                    "topic_prefix: not supported: ingestd does not record which topics each"
                    " client published to (that would cost on every PUBLISH); filter the"
                    " device-state tables instead (docs/api.md)"
                )
            if name not in LIST_PARAMS:
                raise bad(f"{name}: unknown query parameter (known: {', '.join(LIST_PARAMS)})")
        online = _bool(q["online"], "online") if "online" in q else None
        username = q.get("username")
        prefix = q.get("client_id_prefix", "")
        cursor = q.get("cursor")
        text = q.get("limit", str(DEFAULT_DEVICES))
        if not text.isdigit() or not 1 <= int(text) <= MAX_DEVICES:
            raise bad(f"limit: expected a whole number from 1 to {MAX_DEVICES}, got {text!r}")
        limit = int(text)

        def keep(cid: str, user: Any) -> bool:
            return (
                cid.startswith(prefix)
                and (cursor is None or cid > cursor)
                and (username is None or user == username)
            )

        pool = self._pool()
        more = False
        if pool is None:
            candidates = [
                self._live(self._unknown(c))
                for c in heapq.nsmallest(
                    limit + 1,
                    (c for c, s in self.broker.sessions.items() if keep(c, s.username)),
                )
            ]
        else:
            by_id = {r["client_id"]: r for r in await self._fetch_page(pool, q, limit)}
            last: str | None = None
            if len(by_id) > limit:
                # Table rows past the last one read are unknown: pending changes past it
                # wait for the next page.
                more = True
                last = max(by_id)
                by_id.pop(last)
            for cid, row in self._pending().items():
                if keep(cid, row[1]) and (last is None or cid < last):
                    by_id[cid] = self._row(row)
            candidates = [self._live(by_id[c]) for c in sorted(by_id)]
        page = candidates[:limit]
        more = more or len(candidates) > limit
        next_cursor = page[-1]["client_id"] if more and page else None
        devices = [d for d in page if online is None or d["online"] is online]
        state = await self._state(pool, [d["client_id"] for d in devices])
        for d in devices:
            d["state"] = state[d["client_id"]]
        return web.json_response({"devices": devices, "next": next_cursor}, dumps=_dumps)

    async def _fetch_page(self, pool: Any, q: Any, limit: int) -> list[dict[str, Any]]:
        sql, args = presence_page_sql(self.ingest.config.presence.table, q, limit)
        return [self._row(tuple(r)) for r in await pool.fetch(sql, *args)]

    # -- GET /api/devices/{client_id} -----------------------------------------------

    async def get_device(self, request: web.Request) -> web.Response:
        client_id = request.match_info["client_id"]
        pool = self._pool()
        device: dict[str, Any] | None = None
        if pool is not None:
            row = await pool.fetchrow(
                f"SELECT {', '.join(PRESENCE_FIELDS)} FROM"
                f" {_quote(self.ingest.config.presence.table)} WHERE client_id = $1",
                client_id,
            )
            if row is not None:
                device = self._row(tuple(row))
        pending = self._pending().get(client_id)
        if pending is not None:
            device = self._row(pending)
        session = self.broker.sessions.get(client_id)
        if device is None and session is None:
            raise ApiError(404, "not_found", f"no device with client id {client_id!r}")
        device = self._live(device or self._unknown(client_id))
        device.update(self._session_details(session))
        device["state"] = (await self._state(pool, [client_id]))[client_id]
        return web.json_response(device, dumps=_dumps)

    def _session_details(self, session: Any) -> dict[str, Any]:
        if session is None:
            return {"session": None, "subscriptions": [], "queued": None, "will": None}
        conn = session.connection
        info = None if conn is None else conn.info
        overflow = session.overflow
        # Online: the CONNECT's will (published if the connection ends abnormally);
        # offline: a will still waiting for its Will Delay Interval.
        will = conn.will if conn is not None else session.will
        return {
            "session": {
                "expiry_interval": session.expiry_interval,
                "clean_start": None if info is None else info.clean_start,
                "keepalive": None if conn is None else conn.keepalive,
                "transport": None if info is None else info.transport,
            },
            "subscriptions": [
                {
                    "filter": f,
                    "qos": o.qos,
                    "no_local": o.no_local,
                    "retain_as_published": o.retain_as_published,
                    "retain_handling": o.retain_handling,
                    "subscription_identifier": o.sub_id or None,
                }
                for f, o in sorted(session.subscriptions.items())
            ],
            "queued": {
                "inflight": len(session.inflight),
                "memory": len(session.queue) if session.queue else 0,
                "overflow": 0 if overflow is None else overflow.count,
            },
            "will": None
            if will is None
            else {
                "topic": will.topic,
                "qos": will.qos,
                "retain": will.retain,
                "delay": will.delay,
                "bytes": len(will.payload),
                "truncated": len(will.payload) > WILL_PREVIEW,
                **render_payload(will.payload[:WILL_PREVIEW]),
            },
        }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)
