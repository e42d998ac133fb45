"""Device commands and RPC: ``POST /api/devices/{client_id}/commands/{name}`` and ``.../rpc``.

A device's topics come from the first ``[[devices.schemes]]`` entry that can
fill them (:mod:`ingestd.config.devices`): variables from the client id, or
learned by the broker from the last topic the client published that matched
the scheme's ``match`` (``Session.device_vars``).

A command is published as ``POST /api/publish`` would (``$api``), then the
answer says what became of it for the device's session: ``delivered`` (handed
to its connection), ``queued`` (QoS 1/2 for an offline persistent session),
``not_subscribed``, ``no_session``, ``dropped`` (QoS 0 to an offline session)
or ``not_permitted`` (the device's ACL does not let it read the topic).

An RPC waits for the device's reply. MQTT 5 devices get a Response Topic
``<http.rpc_response_prefix>/<client id>/<request id>`` and Correlation Data
(the request id); MQTT 3.1.1 devices get the request id in a field of the JSON
object payload (``rpc_correlation_field``) and answer on the scheme's
``rpc_response_topic`` with the same field. For each waiting request a
:class:`ReplyWaiter` is subscribed in the broker's trie on the reply topic
(exact, no wildcard) and removed when the request ends (reply, timeout,
client gone, shutdown). At most ``http.rpc_max_pending`` wait at once; past
that 503 ``busy``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import TYPE_CHECKING

from aiohttp import web

from ingestd.broker.acl import topic_matches
from ingestd.broker.message import Message
from ingestd.config.devices import DeviceScheme, fill, level_error
from ingestd.http.app import ApiError
from ingestd.http.bodies import (
    API_CLIENT_ID,
    bad,
    busy,
    json_bytes,
    parse_publish,
    render_message,
)
from ingestd.mqtt.constants import Prop

if TYPE_CHECKING:
    from ingestd.broker.session import Session
    from ingestd.http.api import Api

log = logging.getLogger("ingestd.http.api")

_P_RESPONSE_TOPIC = int(Prop.RESPONSE_TOPIC)
_P_CORRELATION_DATA = int(Prop.CORRELATION_DATA)
_P_USER_PROPERTY = int(Prop.USER_PROPERTY)


class ReplyWaiter:
    """An internal subscriber on one reply topic: completes ``future`` with the first
    message that carries its correlation (v5 Correlation Data, or the JSON field)."""

    __slots__ = ("correlation", "field", "future", "mismatched", "topic")

    def __init__(self, topic: str, correlation: str, field: str | None) -> None:
        self.topic = topic
        self.correlation = correlation
        self.field = field  # None: MQTT 5 Correlation Data
        self.future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.mismatched = 0

    def deliver(self, message: Message) -> None:
        if self.future.done():
            return None
        if self._matches(message):
            self.future.set_result(message)
        else:
            self.mismatched += 1
        return None

    def _matches(self, message: Message) -> bool:
        if self.field is None:
            data = (message.properties or {}).get(_P_CORRELATION_DATA)
            return data == self.correlation.encode()
        try:
            obj = json.loads(message.payload)
        except ValueError:
            return False
        return isinstance(obj, dict) and obj.get(self.field) == self.correlation


class CommandRoutes:
    """The handlers; ``api`` gives the broker, the body reader, auth and audit."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.pending: dict[str, ReplyWaiter] = {}

    def close(self) -> None:
        """Shutting down: every waiting RPC answers 503."""
        for w in self.pending.values():
            if not w.future.done():
                w.future.set_exception(
                    ApiError(503, "shutting_down", "the broker is shutting down")
                )

    # -- resolving a device's topics --------------------------------------------

    def _resolve(
        self, client_id: str, which: str, name: str | None = None
    ) -> tuple[DeviceScheme, dict[str, str], str]:
        """(scheme, variables, topic) of the first scheme that can fill ``which``."""
        broker = self.api.broker
        session = broker.sessions.get(client_id)
        learned = session.device_vars if session is not None else None
        tried = []
        for scheme in broker.devices.schemes:
            values = scheme.variables(client_id, learned)
            if values is None:
                tried.append(scheme.name)
                continue
            template: str = getattr(scheme, which)
            if name is not None:
                values["name"] = name
            used = template
            if which == "rpc_request_topic":
                used += scheme.rpc_response_topic or ""
            for var, value in values.items():
                why = level_error(value)
                if why is not None and f"{{{var}}}" in used:
                    raise ApiError(
                        422,
                        "invalid_variable",
                        f"{{{var}}} = {value!r} cannot go in the topic {template!r}"
                        f" (scheme {scheme.name!r}): {why}",
                        variable=var,
                    )
            return scheme, values, fill(template, values)
        schemes = ", ".join(repr(t) for t in tried)
        if session is None:
            raise ApiError(
                404,
                "device_unknown",
                f"no session for client id {client_id!r}, and no device scheme ({schemes})"
                " makes its topics from the client id alone",
            )
        raise ApiError(
            409,
            "variables_unknown",
            f"client {client_id!r} has not published a topic that gives the variables of"
            f" any device scheme ({schemes}) since it was created; it must publish on its"
            " scheme's match topic first",
        )

    # -- POST /api/devices/{client_id}/commands/{name} ----------------------------

    async def command(self, request: web.Request) -> web.Response:
        api = self.api
        client_id = request.match_info["client_id"]
        name = request.match_info["name"]
        why = level_error(name)
        if why is not None:
            raise bad(f"command name {name!r}: {why}")
        body = await api._json_body(request)
        scheme, _values, topic = self._resolve(client_id, "command_topic", name)
        message = parse_publish(
            body, topic=topic, default_qos=scheme.qos, username=api.token_user(request)
        )
        if "{name}" not in scheme.command_topic:
            # The topic does not carry the command's name: MQTT 5 devices read it here.
            props = message.properties
            props[_P_USER_PROPERTY] = [*props.get(_P_USER_PROPERTY, []), ("command", name)]
        api._check_write(request, topic)
        api._check_open()
        session = api.broker.sessions.get(client_id)
        delivery = _delivery(session, topic, message.qos)
        fut = api.broker.publish(message, None)
        log.info(
            "audit: command client_id=%r name=%r topic=%r qos=%d delivery=%s bytes=%d %s",
            client_id,
            name,
            topic,
            message.qos,
            delivery,
            len(message.payload),
            api._who(request),
        )
        await api._settle(fut, message.qos, "the command")
        return web.json_response(
            {
                "ok": True,
                "client_id": client_id,
                "command": name,
                "scheme": scheme.name,
                "topic": topic,
                "qos": message.qos,
                "retain": message.retain,
                "delivery": delivery,
            }
        )

    # -- POST /api/devices/{client_id}/rpc ----------------------------------------

    async def rpc(self, request: web.Request) -> web.Response:
        api = self.api
        cfg = api.http
        client_id = request.match_info["client_id"]
        body = await api._json_body(request)
        if not isinstance(body, dict):
            raise bad("body: expected a JSON object")
        timeout_ms = body.get("timeout_ms", cfg.rpc_timeout_default_ms)
        if type(timeout_ms) is not int or not 1 <= timeout_ms <= cfg.rpc_timeout_max_ms:
            raise bad(
                f"timeout_ms: expected whole milliseconds from 1 to {cfg.rpc_timeout_max_ms}"
                f" (http.rpc_timeout_max_ms), got {json.dumps(timeout_ms)[:50]}"
            )
        props = body.get("properties")
        if isinstance(props, dict) and ("response_topic" in props or "correlation_data" in props):
            raise bad("properties: response_topic and correlation_data are set by the RPC itself")
        scheme, values, topic = self._resolve(client_id, "rpc_request_topic")
        message = parse_publish(
            body,
            topic=topic,
            default_qos=scheme.qos,
            extra=("timeout_ms",),
            username=api.token_user(request),
        )
        api._check_write(request, topic)
        session = api.broker.sessions.get(client_id)
        conn = session.connection if session is not None else None
        if conn is None:
            raise ApiError(
                409, "offline", f"client {client_id!r} is not connected: an RPC needs a reply"
            )
        api._check_open()
        if len(self.pending) >= cfg.rpc_max_pending:
            raise busy(
                f"{len(self.pending)} RPCs already wait for replies (http.rpc_max_pending)", 1
            )
        request_id = os.urandom(12).hex()
        version = getattr(conn, "version", 5)
        if scheme.rpc_style == "properties" and version != 5:
            raise ApiError(
                422,
                "rpc_unsupported",
                f"client {client_id!r} speaks MQTT 3.1.1 and device scheme {scheme.name!r}"
                ' has rpc_style = "properties" (MQTT 5 only)',
            )
        if version == 5 and scheme.rpc_style != "json":
            reply_topic = f"{cfg.rpc_response_prefix}/{client_id}/{request_id}"
            if level_error(client_id) is not None:
                raise ApiError(
                    422,
                    "invalid_variable",
                    f"client id {client_id!r} cannot be a level of the reply topic",
                    variable="client_id",
                )
            message.properties[_P_RESPONSE_TOPIC] = reply_topic
            message.properties[_P_CORRELATION_DATA] = request_id.encode()
            waiter = ReplyWaiter(reply_topic, request_id, None)
        else:
            if scheme.rpc_response_topic is None:
                raise ApiError(
                    422,
                    "rpc_unsupported",
                    f"client {client_id!r} speaks MQTT 3.1.1 (no response topic property) and"
                    f" device scheme {scheme.name!r} sets no rpc_response_topic",
                )
            try:
                obj = json.loads(message.payload) if message.payload else {}
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                raise bad(
                    "payload: an RPC answered through a JSON field (MQTT 3.1.1 devices,"
                    ' rpc_style = "json") must be a JSON object'
                    f" (its {scheme.rpc_correlation_field!r} field carries the request id)"
                )
            obj[scheme.rpc_correlation_field] = request_id
            message = Message(
                topic,
                json_bytes(obj),
                message.qos,
                message.retain,
                message.properties,
                API_CLIENT_ID,
                message.username,
                None,
                message.expires_at,
            )
            reply_topic = fill(scheme.rpc_response_topic, values)
            waiter = ReplyWaiter(reply_topic, request_id, scheme.rpc_correlation_field)
        trie = api.broker.trie
        self.pending[request_id] = waiter
        trie.subscribe(reply_topic, waiter, None)
        try:
            fut = api.broker.publish(message, None)
            log.info(
                "audit: rpc client_id=%r request_id=%s topic=%r reply_topic=%r timeout_ms=%d %s",
                client_id,
                request_id,
                topic,
                reply_topic,
                timeout_ms,
                api._who(request),
            )
            started = time.monotonic()
            await api._settle(fut, message.qos, "the request")
            try:
                async with asyncio.timeout(timeout_ms / 1000):
                    reply = await waiter.future
            except TimeoutError:
                raise ApiError(
                    504,
                    "rpc_timeout",
                    f"no reply from {client_id!r} on {reply_topic!r} within {timeout_ms} ms"
                    + (
                        f" ({waiter.mismatched} message(s) there carried another correlation)"
                        if waiter.mismatched
                        else ""
                    ),
                    request_id=request_id,
                ) from None
        finally:
            trie.unsubscribe(reply_topic, waiter)
            del self.pending[request_id]
        return web.json_response(
            {
                "ok": True,
                "client_id": client_id,
                "request_id": request_id,
                "request_topic": topic,
                "reply_topic": reply_topic,
                "elapsed_ms": round((time.monotonic() - started) * 1000, 3),
                "reply": render_message(reply, time.monotonic()),
            }
        )


def _delivery(session: Session | None, topic: str, qos: int) -> str:
    """What routing ``topic`` at ``qos`` does for ``session`` (decided before publishing)."""
    if session is None:
        return "no_session"
    granted = -1
    for flt, opts in session.subscriptions.items():
        if flt.startswith("$share/"):
            flt = flt.split("/", 2)[2] if flt.count("/") >= 2 else flt
        if topic_matches(flt, topic):
            granted = max(granted, opts.qos)
    if granted < 0:
        return "not_subscribed"
    if session.acl is not None and not session.acl.may_read(topic):
        return "not_permitted"
    if session.connection is not None:
        return "delivered"
    return "queued" if min(granted, qos) > 0 else "dropped"
