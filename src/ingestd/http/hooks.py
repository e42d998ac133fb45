"""Event hooks (``[[hooks]]``): broker events POSTed as JSON to HTTP endpoints.

Theory of operation
-------------------
The broker never waits for a hook. Its event points (a client connected or
disconnected, a will published, a subscribe or unsubscribe: ``Broker.events``,
an :class:`ingestd.broker.hooks.EventListener`) and, for ``message.published``,
a :class:`MessageHookSink` per topic filter in the broker's trie, call
:meth:`Hook.enqueue`, which appends to the hook's ``deque`` in O(1) or, when
``max_queue`` events already wait, drops the event and counts it. Nothing is
rendered then: a lifecycle event is the dict the broker built, a message is the
routed :class:`Message` (shared, read-only).

One task per hook (:meth:`Hook.run`) takes up to ``batch_max`` waiting events,
renders them and POSTs them as one JSON array. A POST that fails (connection
error, timeout, 408, 429 or 5xx) is tried again ``retries`` times with a
doubling backoff; another 4xx is not (the endpoint refused the events). Either
way the batch is then counted as failed and the next one goes: a dead endpoint
costs the broker nothing but the hook's queue, whose overflow is counted as
dropped. Events leave in the order they were queued; at least once is not
promised (a failed batch is not kept), at most once is (a batch is never sent
twice except by a retry of a POST whose answer was lost).

Counters per hook (``ingestd_hook_*{hook}``): events queued, sent, failed,
dropped, POST retries, and the queue's depth. At a graceful stop each hook
gets ``STOP_DRAIN_S`` seconds to send what waits; the rest is counted as dropped.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import aiohttp
import msgspec

from ingestd.broker.message import Message
from ingestd.config import HookConfig
from ingestd.config.validate import hook_filters
from ingestd.http.bodies import render_payload, render_properties

log = logging.getLogger("ingestd.hooks")

# Seconds each hook may take at a graceful stop to send its queued events.
STOP_DRAIN_S = 5.0
# At most one warning per hook in this many seconds (a dead endpoint must not flood the log).
WARN_EVERY_S = 10.0

_encode = msgspec.json.Encoder().encode


def render_event(item: Message | dict[str, Any]) -> dict[str, Any]:
    """One queued event as the JSON object POSTed (see docs/api.md, "Event hooks")."""
    if isinstance(item, Message):
        out: dict[str, Any] = {
            "event": "message.published",
            "ts": item.received_at,
            "client_id": item.client_id,
            "username": item.username,
            "topic": item.topic,
            "qos": item.qos,
            "retain": item.retain,
            **render_payload(item.payload),
        }
        props = render_properties(item, time.monotonic())
        if props:
            out["properties"] = props
        return out
    payload = item.get("payload")
    if isinstance(payload, bytes):
        item = dict(item)
        del item["payload"]
        item.update(render_payload(payload))
    return item


class Hook:
    """One ``[[hooks]]`` entry: its bounded queue, its counters and its sender task."""

    def __init__(self, config: HookConfig) -> None:
        self.config = config
        self.name = config.name
        self.events = frozenset(config.events)
        self.queue: collections.deque[Message | dict[str, Any]] = collections.deque()
        self.max_queue = config.max_queue
        self.headers = {"Content-Type": "application/json", **config.headers}
        # Counters (read by the metrics collector).
        self.queued = 0  # events accepted into the queue
        self.sent = 0  # events in a POST answered 2xx
        self.failed = 0  # events in a POST that failed after its retries
        self.dropped = 0  # events refused by a full queue (or left at stop)
        self.retries = 0  # POSTs tried again
        self.in_flight = 0  # events of the POST under way
        self._wake: asyncio.Future[None] | None = None
        self._last_warning = 0.0

    def enqueue(self, item: Message | dict[str, Any]) -> None:
        """Queue one event, or drop and count it when the queue is full. O(1), never blocks."""
        q = self.queue
        if len(q) >= self.max_queue:
            self.dropped += 1
            return
        q.append(item)
        self.queued += 1
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def depth(self) -> int:
        """Events waiting or being sent."""
        return len(self.queue) + self.in_flight

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Send the queued events, ``batch_max`` per POST, until cancelled."""
        loop = asyncio.get_running_loop()
        q = self.queue
        batch_max = self.config.batch_max
        while True:
            if not q:
                self._wake = loop.create_future()
                try:
                    await self._wake
                finally:
                    self._wake = None
                continue
            n = min(len(q), batch_max)
            batch = [q.popleft() for _ in range(n)]
            self.in_flight = n
            try:
                body = _encode([render_event(item) for item in batch])
                ok = await self._post(session, body, n)
            except Exception:
                log.exception("hook %s: sending %d events failed", self.name, n)
                ok = False
            finally:
                self.in_flight = 0
            if ok:
                self.sent += n
            else:
                self.failed += n

    async def _post(self, session: aiohttp.ClientSession, body: bytes, n: int) -> bool:
        cfg = self.config
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        delay = cfg.retry_initial_ms / 1000.0
        for attempt in range(cfg.retries + 1):
            if attempt:
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.retry_max_ms / 1000.0)
            try:
                async with session.post(
                    cfg.url, data=body, headers=self.headers, timeout=timeout
                ) as resp:
                    status = resp.status
                    await resp.read()
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                self._warn(f"POST of {n} events to {cfg.url} failed: {why}")
                continue
            if 200 <= status < 300:
                return True
            self._warn(f"POST of {n} events to {cfg.url} answered {status}")
            if status < 500 and status not in (408, 429):
                return False  # the endpoint refuses these events: trying again will not help
        return False

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning("hook %s: %s", self.name, text)


class MessageHookSink:
    """A hook's subscriber in the broker's trie for one ``message.published`` filter.

    A message matching several filters of one hook is queued once (the router
    hands one message to every matching sink within one ``publish`` call).
    """

    __slots__ = ("_last", "hook")

    def __init__(self, hook: Hook) -> None:
        self.hook = hook
        self._last: Message | None = None

    def deliver(self, message: Message) -> None:
        if message is not self._last:
            self._last = message
            self.hook.enqueue(message)

    def __repr__(self) -> str:
        return f"<MessageHookSink {self.hook.name}>"


class EventHooks:
    """Every configured hook: the broker's :class:`EventListener`, the message sinks,
    and the sender tasks (``start`` / ``stop``)."""

    def __init__(self, configs: list[HookConfig]) -> None:
        self.hooks = [Hook(c) for c in configs]
        by_event: dict[str, list[Hook]] = {}
        for hook in self.hooks:
            for event in hook.events:
                if event != "message.published":
                    by_event.setdefault(event, []).append(hook)
        self._by_event = by_event
        # The broker builds an event only if some hook wants it.
        self.events = frozenset(by_event)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        fields = {"event": event, "ts": time.time(), **fields}
        for hook in self._by_event.get(event, ()):
            hook.enqueue(fields)

    def sinks(self) -> list[tuple[str, MessageHookSink]]:
        """(topic filter, sink) for every hook's message.published filters."""
        out = []
        for hook in self.hooks:
            if "message.published" in hook.events:
                sink = MessageHookSink(hook)
                for flt in hook_filters(hook.config.filter):
                    out.append((flt, sink))
        return out

    async def start(self) -> None:
        # One client session (connection pool) for all hooks; each hook has at most one
        # POST under way, so a hung endpoint holds one connection.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), headers={"User-Agent": "ingestd-hooks"}
        )
        self._tasks = [
            asyncio.get_running_loop().create_task(h.run(self._session), name=f"hook-{h.name}")
            for h in self.hooks
        ]

    async def stop(self) -> None:
        """Give each hook ``STOP_DRAIN_S`` to send what waits, then stop; the rest is dropped."""
        deadline = time.monotonic() + STOP_DRAIN_S
        while any(h.depth for h in self.hooks) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("hook task failed")
        self._tasks = []
        for hook in self.hooks:
            left = hook.depth
            if left:
                hook.dropped += left
                hook.queue.clear()
                log.warning("hook %s: %d events not sent at shutdown", hook.name, left)
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = ["EventHooks", "Hook", "MessageHookSink", "render_event"]
