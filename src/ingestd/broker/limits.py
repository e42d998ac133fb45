"""Limits: where a configured bound refuses something, counted and logged in one way.

Every hit of a limit (``mqtt.max_connections``, ``max_topic_length``,
``max_subscriptions_per_client``, ``max_retained_per_tree``, ...) counts in
``BrokerStats.limits_hit[key]`` (``ingestd_limits_hit_total{limit=key}``) and
logs a warning line. A client that keeps hitting a limit (a device publishing
to a too-long topic in a loop) must not flood the log: at most one line per
limit per :data:`LOG_INTERVAL` seconds is written, and the next one says how
many hits it did not log.

:func:`topic_over_limit` is the one check of a topic name or filter against
``mqtt.max_topic_length`` / ``max_topic_levels``; the compiled fast path
(``ext/ingestd/_inbound.pyx``) makes the same decision when it classifies a topic.
"""

from __future__ import annotations

import logging
import time

from ingestd.broker.hooks import BrokerStats

log = logging.getLogger("ingestd.broker")

# Seconds between two log lines about one limit.
LOG_INTERVAL = 10.0

MAX_TOPIC_LENGTH = "max_topic_length"
MAX_TOPIC_LEVELS = "max_topic_levels"


def topic_over_limit(topic: str, max_length: int, max_levels: int) -> str | None:
    """Which limit ``topic`` (a name or a filter) passes, or None (0: no limit).

    The length is in UTF-8 bytes, as on the wire; it is encoded only when its
    characters alone cannot decide (a character is 1 to 4 bytes).
    """
    if max_length:
        n = len(topic)
        if n > max_length or (n * 4 > max_length and len(topic.encode()) > max_length):
            return MAX_TOPIC_LENGTH
    if max_levels and topic.count("/") >= max_levels:
        return MAX_TOPIC_LEVELS
    return None


class LimitLog:
    """Counts each limit hit and logs it, at most one line per limit per interval."""

    def __init__(self, stats: BrokerStats, interval: float = LOG_INTERVAL) -> None:
        self.stats = stats
        self.interval = interval
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def hit(self, key: str, what: str) -> None:
        """Count one hit of ``mqtt.<key>``; ``what`` says who hit it and what was refused."""
        hits = self.stats.limits_hit
        hits[key] = hits.get(key, 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(key)
        if last is not None and now - last < self.interval:
            self._unlogged[key] = self._unlogged.get(key, 0) + 1
            return
        self._logged_at[key] = now
        unlogged = self._unlogged.pop(key, 0)
        log.warning(
            "limit mqtt.%s: %s%s",
            key,
            what,
            f" ({unlogged} more hits of it not logged since the last line)" if unlogged else "",
        )
