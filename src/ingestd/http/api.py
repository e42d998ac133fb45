"""The JSON API under /api: publish, webhook ingest, retained messages, sessions,
devices and stats (:mod:`ingestd.http.devices`, :mod:`ingestd.http.stats`), device
commands and RPC (:mod:`ingestd.http.commands`), the live stream
(:mod:`ingestd.http.stream`).

Every message enters through ``Broker.publish`` exactly as an MQTT PUBLISH
does, so subscribers receive it and ingest routes store it. A QoS 1/2 message
is answered only after the future ``publish`` returns has completed (the rows
of every ``after-commit`` route committed); a failed future is a 503.
Bodies are validated whole before anything is published: a 400 publishes
nothing. A token tied to a user (``http.tokens``: ``{token, user}``, or a
``mqtt.credentials_table`` user's ``ingestd user token``) acts with that user's
ACL rights (``mqtt.acl_file`` and the table's topic prefix): write for publish,
webhook, commands and RPC; read for the stream and the retained listing;
sessions and dead letters need an admin (plain, configured) token. See docs/api.md for the routes and :mod:`ingestd.http.openapi`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from ingestd._trie import validate_topic_filter
from ingestd.broker.acl import ClientAcl
from ingestd.broker.message import Message
from ingestd.config.model import HttpConfig, TokenConfig
from ingestd.http.app import TOKEN_INDEX, TOKEN_USER, ApiError
from ingestd.http.bodies import (
    API_CLIENT_ID,
    DEFAULT_LIMIT,
    MAX_LIMIT,
    bad,
    parse_publish,
    parse_topic,
    parse_webhook_message,
    render_payload,
    render_properties,
)
from ingestd.http.commands import CommandRoutes
from ingestd.http.deadletters import DeadLetterRoutes
from ingestd.http.devices import DeviceRoutes
from ingestd.http.stats import stats_summary
from ingestd.http.stream import StreamRoutes

log = logging.getLogger("ingestd.http.api")

# -- the routes -----------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _limit(request: web.Request) -> int:
    text = request.query.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise bad(f"limit: expected a whole number from 1 to {MAX_LIMIT}, got {text!r}")
    return int(text)


RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Api:
    """The /api routes over one broker (``tokens``: bearer tokens, empty: open)."""

    def __init__(
        self,
        broker: Any,
        ingest: Any = None,
        tokens: list[str | TokenConfig] | None = None,
        http: HttpConfig | None = None,
        *,
        ingest_wait_s: float = 5.0,
    ) -> None:
        self.broker = broker
        self.ingest = ingest
        given = list(tokens or [])
        self.tokens = [t if isinstance(t, str) else t.token for t in given]
        # The user of each token (None: an admin token), by the index app.py records.
        self.token_users = [None if isinstance(t, str) else t.user for t in given]
        # With mqtt.credentials_table, the broker's Auth, which knows its users' API tokens;
        # the API then needs a bearer token even when http.tokens is empty.
        auth = getattr(broker, "auth", None)
        self.token_table: Any = auth if getattr(auth, "table_configured", False) else None
        self.http = http or HttpConfig()
        # http.ingest_wait_s: how long a webhook batch waits for a saturated engine.
        self.ingest_wait_s = ingest_wait_s
        self.webhook_refused = 0  # webhook requests answered 503 for saturation
        self.webhook_waiting = 0  # webhook requests waiting for room now
        self.request_timeout = 10.0
        # Why the API refuses every request (see check_exposure), or None.
        self.disabled: str | None = None
        self.dead = DeadLetterRoutes(ingest)
        self.devices = DeviceRoutes(broker, ingest)
        self.commands = CommandRoutes(self)
        self.streams = StreamRoutes(self)

    def close(self) -> None:
        """The server stops: streams end, waiting RPCs answer 503."""
        self.streams.close()
        self.commands.close()

    # -- tokens tied to users ---------------------------------------------------

    def token_user(self, request: web.Request) -> str | None:
        """The user of the request's token (None: an admin token, or no tokens)."""
        user: str | None = request.get(TOKEN_USER)
        if user is not None:
            return user
        index = request.get(TOKEN_INDEX)
        return None if index is None else self.token_users[index]

    def token_acl(self, request: web.Request) -> ClientAcl | None:
        """The ACL a user token acts under (None: no restriction, an admin token)."""
        user = self.token_user(request)
        if user is None:
            return None
        acl = self.broker.auth.client_acl(user, API_CLIENT_ID)
        if acl is None:
            # validate.py refuses user tokens without mqtt.acl_file; an ACL that was
            # since removed must not turn them into admin tokens.
            raise ApiError(403, "forbidden", f"no ACL is loaded for user {user!r}")
        return acl

    def _admin_only(self, request: web.Request) -> None:
        user = self.token_user(request)
        if user is not None:
            raise ApiError(
                403, "forbidden", f"{request.path} needs an admin token (this one is {user!r}'s)"
            )

    def check_exposure(self, host: str) -> None:
        """An open API on a listener reachable beyond this machine stays off.

        /metrics, /healthz and /readyz still serve (Prometheus and orchestrators
        scrape them on 0.0.0.0); every /api request answers 403 ``api_disabled``
        saying what to set, and start-up logs the same as a warning. Refusing
        the whole process instead would take the broker down for want of an
        optional feature. With ``mqtt.credentials_table`` the API is never open
        (every request needs a configured token or a table user's), so it serves.
        """
        if not self.tokens and self.token_table is None and not is_loopback_host(host):
            self.disabled = (
                f"the HTTP API is off: its listener {host or '*'!r} is reachable beyond this"
                " machine and http.tokens is empty; set a bearer token in http.tokens"
                " (INGESTD_HTTP__TOKENS), use mqtt.credentials_table and `ingestd user"
                " token`, or listen on 127.0.0.1"
            )
            log.warning("%s", self.disabled)

    def routes(self) -> list[tuple[str, str, RouteHandler]]:
        """(method, path, handler) of every API route; the OpenAPI document matches it."""
        return [
            ("POST", "/api/publish", self.publish),
            ("POST", "/api/ingest/webhook", self.webhook),
            ("GET", "/api/retained", self.list_retained),
            ("DELETE", "/api/retained/{topic:.+}", self.delete_retained),
            ("GET", "/api/sessions", self.list_sessions),
            ("DELETE", "/api/sessions/{client_id:.+}", self.delete_session),
            ("GET", "/api/devices", self.devices.list_devices),
            ("GET", "/api/devices/{client_id:.+}", self.devices.get_device),
            ("GET", "/api/stats", self.stats),
            ("GET", "/api/dead-letters", self.list_dead_letters),
            ("POST", "/api/dead-letters/replay", self.replay_dead_letters),
            ("POST", "/api/devices/{client_id}/commands/{name}", self.commands.command),
            ("POST", "/api/devices/{client_id}/rpc", self.commands.rpc),
            ("GET", "/api/stream", self.streams.stream),
            ("GET", "/api/openapi.json", self.openapi),
        ]

    def register(self, app: web.Application) -> None:
        for method, path, handler in self.routes():
            app.router.add_route(method, path, handler)

    # -- helpers ----------------------------------------------------------------

    async def _json_body(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            # A JSON content type also keeps browsers from posting here cross-site without
            # a CORS preflight (which this API never grants).
            raise ApiError(
                415,
                "unsupported_media_type",
                f"expected Content-Type: application/json, got {request.content_type!r}",
            )
        try:
            async with asyncio.timeout(self.request_timeout):
                raw = await request.read()
        except TimeoutError:
            raise ApiError(
                408, "request_timeout", f"body not received within {self.request_timeout:g} s"
            ) from None
        if not raw.strip():
            raise bad("body is empty; expected JSON", code="invalid_json")
        try:
            # msgspec decodes a webhook batch in about a third of json.loads' time
            # (docs/benchmarks.md); it refuses NaN/Infinity as well. The standard
            # decoder reads what msgspec refuses, to accept or name the error exactly.
            return _decode(raw)
        except msgspec.DecodeError:
            pass
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"body is not valid JSON: {e}", code="invalid_json") from None

    def _who(self, request: web.Request) -> str:
        index = request.get(TOKEN_INDEX)
        user = self.token_user(request)
        if request.get(TOKEN_USER) is not None:
            who = "token=table"
        else:
            who = f"token={'open' if index is None else index}"
        if user is not None:
            who += f" user={user!r}"
        return f"{who} peer={request.remote}"

    def _check_open(self) -> None:
        if self.broker.closing:
            raise ApiError(503, "shutting_down", "the broker is shutting down")

    async def _durable(self, futures: list[asyncio.Future[Any]], what: str) -> None:
        if not futures:
            return
        try:
            await asyncio.gather(*futures)
        except Exception as e:
            log.warning("api: %s was routed but not made durable: %s", what, e)
            raise ApiError(
                503,
                "not_durable",
                f"{what} was routed but an after-commit route failed to store it"
                f" ({type(e).__name__}: {e}); it may be retried",
            ) from None

    async def _settle(self, fut: asyncio.Future[Any] | None, qos: int, what: str) -> None:
        """Wait for a QoS 1/2 publish's durability future (503 if it fails); QoS 0: don't."""
        if fut is not None:
            if qos:
                await self._durable([fut], what)
            else:
                fut.add_done_callback(_consume)

    def _check_write(self, request: web.Request, topic: str) -> None:
        acl = self.token_acl(request)
        if acl is not None and not acl.may_publish(topic):
            raise ApiError(
                403, "forbidden", f"user {self.token_user(request)!r} may not publish to {topic!r}"
            )

    # -- POST /api/publish -------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        message = parse_publish(await self._json_body(request), username=self.token_user(request))
        self._check_write(request, message.topic)
        self._check_open()
        fut = self.broker.publish(message, None)
        log.info(
            "audit: publish topic=%r qos=%d retain=%s bytes=%d %s",
            message.topic,
            message.qos,
            message.retain,
            len(message.payload),
            self._who(request),
        )
        await self._settle(fut, message.qos, "the message")
        return web.json_response(
            {
                "ok": True,
                "topic": message.topic,
                "qos": message.qos,
                "retain": message.retain,
                "bytes": len(message.payload),
            }
        )

    # -- POST /api/ingest/webhook ------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if isinstance(body, list):
            messages = []
            for i, element in enumerate(body):
                try:
                    messages.append(parse_webhook_message(element, ""))
                except ApiError as e:
                    e.message = f"element {i}: {e.message}"
                    e.extra["index"] = i
                    raise
        else:
            messages = [parse_webhook_message(body, "")]
        for m in messages:
            self._check_write(request, m.topic)
        self._check_open()
        if self.ingest is not None:
            await self._room_for(len(messages))
            self._check_open()
        # One entry per batch future (the messages of a batch share it), not per message.
        futures: dict[int, asyncio.Future[Any]] = {}
        unwatched: dict[int, asyncio.Future[Any]] = {}
        publish = self.broker.publish
        for m in messages:
            fut = publish(m, None)
            if fut is not None:
                if m.qos:
                    futures[id(fut)] = fut
                elif id(fut) not in unwatched:
                    unwatched[id(fut)] = fut
                    fut.add_done_callback(_consume)
        log.info(
            "audit: webhook messages=%d bytes=%d first_topic=%r %s",
            len(messages),
            sum(len(m.payload) for m in messages),
            messages[0].topic if messages else None,
            self._who(request),
        )
        await self._durable(list(futures.values()), f"a batch of {len(messages)} messages")
        return web.json_response({"ok": True, "accepted": len(messages)})

    async def _room_for(self, n: int) -> None:
        """Backpressure: return once the ingest engine can take ``n`` more rows without
        passing its bound (ingest.max_pending_rows), waiting up to http.ingest_wait_s;
        else 503 with Retry-After. A batch larger than the bound itself goes when
        nothing is pending, so the webhook never takes pending rows past max(bound, one
        batch); nothing awaits between this check and the publishes, so concurrent
        requests cannot overshoot together."""
        pending = self.ingest.pending
        if pending.count == 0 or pending.count + n <= pending.bound:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ingest_wait_s
        self.webhook_waiting += 1
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        await pending.wait_released()
                except TimeoutError:
                    break
                if pending.count == 0 or pending.count + n <= pending.bound:
                    return
        finally:
            self.webhook_waiting -= 1
        self.webhook_refused += 1
        retry = max(1, math.ceil(self.ingest_wait_s))
        raise ApiError(
            503,
            "ingest_saturated",
            f"the ingest engine holds {pending.count} rows not yet committed (bound"
            f" ingest.max_pending_rows = {pending.bound}); a batch of {n} did not fit within"
            f" {self.ingest_wait_s:g} s. Nothing was published; retry after {retry} s",
            headers={"Retry-After": str(retry)},
        )

    # -- retained ----------------------------------------------------------------

    async def list_retained(self, request: web.Request) -> web.Response:
        flt = request.query.get("filter", "#")
        if not validate_topic_filter(flt) or flt.startswith("$share/"):
            raise bad(f"filter: {flt[:200]!r} is not a valid MQTT topic filter")
        limit = _limit(request)
        acl = self.token_acl(request)
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        truncated = False
        for m in self.broker.retained.match(flt):
            if m.expired(now) or (acl is not None and not acl.may_read(m.topic)):
                continue
            if len(out) == limit:
                truncated = True
                break
            out.append(
                {
                    "topic": m.topic,
                    "qos": m.qos,
                    **render_payload(m.payload),
                    "properties": render_properties(m, now),
                }
            )
        out.sort(key=lambda r: r["topic"])
        return web.json_response({"filter": flt, "messages": out, "truncated": truncated})

    async def delete_retained(self, request: web.Request) -> web.Response:
        topic = parse_topic(request.match_info["topic"], "topic")
        self._check_write(request, topic)
        existing = self.broker.retained.get(topic)
        if existing is None or existing.expired(time.monotonic()):
            raise ApiError(404, "not_found", f"no retained message on {topic!r}")
        self._check_open()
        # An empty retained PUBLISH deletes it [MQTT-3.3.1-6], in memory and in the store.
        fut = self.broker.publish(Message(topic, b"", 0, True, {}, API_CLIENT_ID), None)
        if fut is not None:
            fut.add_done_callback(_consume)
        log.info("audit: delete retained topic=%r %s", topic, self._who(request))
        return web.json_response({"ok": True, "topic": topic})

    # -- sessions ----------------------------------------------------------------

    async def list_sessions(self, request: web.Request) -> web.Response:
        self._admin_only(request)
        limit = _limit(request)
        prefix = request.query.get("prefix", "")
        out: list[dict[str, Any]] = []
        truncated = False
        for client_id in sorted(self.broker.sessions):
            if not client_id.startswith(prefix):
                continue
            if len(out) == limit:
                truncated = True
                break
            s = self.broker.sessions[client_id]
            out.append(
                {
                    "client_id": client_id,
                    "online": s.connection is not None,
                    "subscriptions": [
                        {"filter": f, "qos": o.qos} for f, o in sorted(s.subscriptions.items())
                    ],
                    "inflight": len(s.inflight),
                    "queued": len(s.queue) if s.queue else 0,
                    "expiry_interval": s.expiry_interval,
                }
            )
        return web.json_response({"sessions": out, "truncated": truncated})

    async def delete_session(self, request: web.Request) -> web.Response:
        self._admin_only(request)
        client_id = request.match_info["client_id"]
        session = self.broker.sessions.get(client_id)
        if session is None:
            raise ApiError(404, "not_found", f"no session for client id {client_id!r}")
        conn = session.connection
        if conn is None:
            raise ApiError(
                409, "offline", f"client {client_id!r} is offline: there is no connection to close"
            )
        conn.disconnect("administrative", 0x98, "administrative action")
        log.info("audit: disconnect client_id=%r %s", client_id, self._who(request))
        return web.json_response({"ok": True, "client_id": client_id, "disconnected": True})

    # -- dead letters ------------------------------------------------------------

    async def list_dead_letters(self, request: web.Request) -> web.Response:
        self._admin_only(request)
        return await self.dead.list(request)

    async def replay_dead_letters(self, request: web.Request) -> web.Response:
        self._admin_only(request)
        body = await self._json_body(request)
        self._check_open()
        return await self.dead.replay(request, body, self._who(request))

    # -- GET /api/stats -----------------------------------------------------------

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(stats_summary(self.broker, self.ingest))

    # -- GET /api/openapi.json ---------------------------------------------------

    async def openapi(self, request: web.Request) -> web.Response:
        from ingestd.http.openapi import openapi_document

        return web.json_response(openapi_document())


_decode = msgspec.json.Decoder().decode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a future's exception nobody awaits (QoS 0: not acknowledged on durability)."""
    if not fut.cancelled():
        fut.exception()
