"""``$SYS/ingestd/...``: broker statistics published as retained MQTT messages.

For dashboards that speak only MQTT (as Mosquitto's ``$SYS/broker/...``).
Every ``mqtt.sys_interval`` seconds (0: off) :class:`SysPublisher` publishes
each value that changed since its last publish (all of them the first time),
retained and QoS 0, through ``Broker.publish``, so the usual rules apply: a
``#`` or ``+/...`` filter does not match a ``$`` topic [MQTT-4.7.2-1], only a
filter starting with ``$SYS`` does, and ``mqtt.acl_file`` decides who may
read them (``topic read $SYS/#``). They are never written to PostgreSQL (the
router keeps ``$SYS/`` retained messages in memory only: they describe this
process). The topics are listed in ``SYS_TOPICS`` and in docs/api.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ingestd.broker.message import Message

if TYPE_CHECKING:
    from ingestd.broker.server import Broker

log = logging.getLogger("ingestd.broker")

PREFIX = "$SYS/ingestd/"
# The client id of what this module publishes (as a publisher's, in hooks and ingest).
SYS_CLIENT_ID = "$SYS"

# Topic (after PREFIX) -> what it holds; the order they are published in.
SYS_TOPICS = {
    "version": "ingestd version",
    "uptime": "seconds since start",
    "clients/connected": "connected clients",
    "clients/disconnected": "sessions kept for clients not connected",
    "clients/total": "sessions, connected or not",
    "messages/received": "PUBLISHes received from clients, all QoS",
    "messages/sent": "messages delivered to subscribers, all QoS",
    "messages/dropped": "deliveries dropped, every reason",
    "bytes/received": "bytes received from clients",
    "bytes/sent": "bytes sent to clients",
    "subscriptions/count": "subscriptions in the trie (ingest routes included)",
    "retained/count": "retained messages",
    "ingest/rows": "rows committed to PostgreSQL (from the spool too)",
    "ingest/pending_rows": "rows received and not yet committed",
    "ingest/dead_letters": "messages written to the dead-letter table",
}


def sys_values(broker: Broker, started: float, version: str) -> dict[str, str]:
    """Every $SYS value now, by topic (after PREFIX), as the text published."""
    st = broker.stats
    sessions = broker.sessions
    connected = sum(st.connections_current.values())
    # Every connected client has a session; the rest wait offline (O(1), not a scan).
    offline = max(0, len(sessions) - connected)
    out = {
        "version": version,
        "uptime": str(int(time.monotonic() - started)),
        "clients/connected": str(connected),
        "clients/disconnected": str(offline),
        "clients/total": str(len(sessions)),
        "messages/received": str(sum(st.messages_received)),
        "messages/sent": str(sum(st.messages_delivered)),
        "messages/dropped": str(sum(st.dropped.values())),
        "bytes/received": str(st.bytes_received),
        "bytes/sent": str(st.bytes_sent),
        "subscriptions/count": str(len(broker.trie)),
        "retained/count": str(len(broker.retained)),
    }
    ingest: Any = broker.ingest
    if ingest is not None:
        stats = ingest.stats
        out["ingest/rows"] = str(stats.rows_committed + stats.rows_replayed)
        out["ingest/pending_rows"] = str(ingest.pending_rows)
        out["ingest/dead_letters"] = str(stats.dead_letters)
    return out


class SysPublisher:
    """Publishes ``$SYS/ingestd/...`` every ``interval`` seconds (see the module docstring)."""

    def __init__(self, broker: Broker, interval: float, version: str) -> None:
        self.broker = broker
        self.interval = interval
        self.version = version
        self.started = time.monotonic()
        self.published = 0  # messages published (for tests and curiosity)
        self._last: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def publish_changed(self) -> int:
        """Publish every value that changed since the last call; returns how many."""
        n = 0
        for topic, text in sys_values(self.broker, self.started, self.version).items():
            if self._last.get(topic) == text:
                continue
            self._last[topic] = text
            message = Message(PREFIX + topic, text.encode(), 0, True, {}, SYS_CLIENT_ID)
            fut = self.broker.publish(message, None)
            if fut is not None:
                fut.add_done_callback(_consume)
            n += 1
        self.published += n
        return n

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sys-publisher")

    async def _run(self) -> None:
        while True:
            try:
                self.publish_changed()
            except Exception:
                log.exception("publishing $SYS statistics failed")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
