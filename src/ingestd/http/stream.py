"""``GET /api/stream?filter=...``: matching messages as server-sent events.

Each stream is a :class:`StreamSink`, an internal subscriber in the broker's
trie (as an ingest route is) for each of its filters. The router hands it
every matching message synchronously; ``deliver`` only appends to a bounded
deque (``http.stream_queue_messages``) and wakes the handler, so a stream
never slows the broker down. The handler writes what is waiting as one write
per wake-up; aiohttp's write waits while the socket's buffer is full, and
meanwhile the deque fills: past its bound further messages are dropped for
that stream only, counted (``ingestd_dropped_messages_total{reason="api_stream_slow"}``)
and announced to the client as an ``event: dropped`` with the count.

With a token tied to a user the user's ACL decides: a filter that can match
nothing the user may read is refused (403), and each message is checked with
``may_read`` (as for an MQTT subscriber). At most ``http.stream_max_clients``
streams are open at once (503 beyond). A comment line every
``KEEPALIVE_S`` keeps proxies from closing an idle stream; a client that
went away is noticed within ``CHECK_S`` (its subscriptions leave the trie);
one that takes nothing of a write for ``WRITE_TIMEOUT_S`` is cut off, and a
server stop cuts off those blocked in a write at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ingestd._trie import validate_topic_filter
from ingestd.broker.message import Message
from ingestd.http.app import ApiError
from ingestd.http.bodies import bad, busy, render_message

if TYPE_CHECKING:
    from ingestd.broker.acl import ClientAcl
    from ingestd.broker.hooks import BrokerStats
    from ingestd.http.api import Api

log = logging.getLogger("ingestd.http.api")

KEEPALIVE_S = 15.0
CHECK_S = 1.0
WRITE_TIMEOUT_S = 30.0
MAX_FILTERS = 16
DROP_REASON = "api_stream_slow"


class StreamSink:
    """The bounded queue of one stream (an internal subscriber; see the module doc)."""

    __slots__ = (
        "acl",
        "closed",
        "dropped",
        "event",
        "last",
        "limit",
        "queue",
        "stats",
        "transport",
        "writing",
    )

    def __init__(self, limit: int, acl: ClientAcl | None, stats: BrokerStats) -> None:
        self.queue: deque[Message] = deque()
        self.limit = limit
        self.acl = acl
        self.stats = stats
        self.dropped = 0
        self.closed = False
        # The client's connection, and whether the handler waits for it to take a write.
        self.transport: asyncio.BaseTransport | None = None
        self.writing = False
        self.event = asyncio.Event()
        # The message delivered last: one message matching two of our filters is one event.
        self.last: Message | None = None

    def deliver(self, message: Message) -> None:
        if message is self.last:
            return None
        self.last = message
        acl = self.acl
        if acl is not None and not acl.may_read(message.topic):
            return None
        if len(self.queue) >= self.limit:
            self.dropped += 1
            self.stats.drop(DROP_REASON)
            return None
        self.queue.append(message)
        self.event.set()
        return None

    def close(self) -> None:
        self.closed = True
        self.event.set()
        if self.writing and self.transport is not None:
            # A client that stopped reading would hold the handler (and the server's
            # graceful stop) in its write: cut it off.
            self.transport.abort()  # type: ignore[attr-defined]


class StreamRoutes:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.sinks: set[StreamSink] = set()

    def close(self) -> None:
        """Shutting down: every stream ends (its handler returns)."""
        for sink in self.sinks:
            sink.close()

    async def stream(self, request: web.Request) -> web.StreamResponse:
        api = self.api
        cfg = api.http
        filters = request.query.getall("filter", ["#"])
        if len(filters) > MAX_FILTERS:
            raise bad(f"filter: at most {MAX_FILTERS} filters per stream")
        acl = api.token_acl(request)
        for flt in filters:
            if not validate_topic_filter(flt) or flt.startswith("$share/"):
                raise bad(f"filter: {flt[:200]!r} is not a valid MQTT topic filter")
            if acl is not None and not acl.may_read_any(flt):
                raise ApiError(
                    403,
                    "forbidden",
                    f"user {api.token_user(request)!r} may read no topic of {flt!r}",
                )
        api._check_open()
        if len(self.sinks) >= cfg.stream_max_clients:
            raise busy(f"{len(self.sinks)} streams are open (http.stream_max_clients)", 5)
        broker = api.broker
        sink = StreamSink(cfg.stream_queue_messages, acl, broker.stats)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        self.sinks.add(sink)
        for flt in filters:
            broker.trie.subscribe(flt, sink, None)
        log.info("audit: stream filters=%r %s", filters, api._who(request))
        sent = 0
        try:
            await resp.prepare(request)
            sink.transport = request.transport
            await _write(sink, resp, f": ingestd stream of {json.dumps(filters)}\n\n".encode())
            reported = 0
            quiet_since = time.monotonic()
            while not sink.closed:
                try:
                    async with asyncio.timeout(CHECK_S):
                        await sink.event.wait()
                except TimeoutError:
                    # aiohttp does not cancel a handler whose client left: look every
                    # CHECK_S, so a gone client's subscriptions go within a second.
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break
                    if time.monotonic() - quiet_since >= KEEPALIVE_S:
                        await _write(sink, resp, b": keepalive\n\n")
                        quiet_since = time.monotonic()
                    continue
                quiet_since = time.monotonic()
                sink.event.clear()
                out = []
                now = time.monotonic()
                queue = sink.queue
                while queue:
                    m = queue.popleft()
                    if m.expires_at is not None and m.expired(now):
                        continue
                    out.append(_event("message", render_message(m, now)))
                    sent += 1
                if sink.dropped != reported:
                    out.append(
                        _event(
                            "dropped",
                            {"dropped": sink.dropped - reported, "total_dropped": sink.dropped},
                        )
                    )
                    reported = sink.dropped
                if out:
                    await _write(sink, resp, "".join(out).encode())
        except (ConnectionError, TimeoutError):
            # The client went away (aiohttp's reset errors are ConnectionErrors), or took
            # none of a write for WRITE_TIMEOUT_S (its connection is aborted).
            pass
        finally:
            for flt in filters:
                broker.trie.unsubscribe(flt, sink)
            self.sinks.discard(sink)
            log.info(
                "stream ended: filters=%r sent=%d dropped=%d %s",
                filters,
                sent,
                sink.dropped,
                api._who(request),
            )
        return resp


async def _write(sink: StreamSink, resp: web.StreamResponse, data: bytes) -> None:
    """One write; a client that takes nothing of it for WRITE_TIMEOUT_S is cut off, so a
    stalled reader does not keep its stream (and a slot of stream_max_clients) forever."""
    sink.writing = True
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await resp.write(data)
    except TimeoutError:
        if sink.transport is not None:
            sink.transport.abort()  # type: ignore[attr-defined]
        raise
    finally:
        sink.writing = False


def _event(kind: str, data: dict[str, Any]) -> str:
    # One line of JSON (json.dumps escapes newlines), so one data: field per event.
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
