"""KeepaliveWheel: one timer for the keepalive of every connection.

A connection with a keepalive must be closed once it has been silent for one
and a half keepalive periods [MQTT-3.1.2-24]. A timer per connection costs
about 600 bytes with uvloop (its TimerHandle, the libuv timer, a bound
method) for every idle client; here all of them share one event-loop timer.

Deadlines are rounded up to whole ticks (``tick`` seconds, default 1 s): the
wheel keeps, per tick, the set of connections due then, and one ``call_later``
for the earliest tick that has any. When a tick comes, each of its
connections is asked (``keepalive_due()``) and either closes or registers its
next deadline (``add`` again): a connection that keeps talking is checked
about once per 1.5 keepalive periods, never per packet. A connection leaves
its tick when it closes (``discard``), so the wheel holds nothing for closed
connections. A connection is closed at most one tick later than its exact
deadline.

Connections that connected together fall due together (10,000 clients that
reconnect after an outage share a tick or two), and checking 10,000 in one
loop turn would stall every delivery behind it for tens of milliseconds. A
timer callback checks at most ``chunk`` connections (default 256, well under
a millisecond); the rest stay in their tick's set, where ``discard`` still
finds them, and a timer one millisecond later goes on with them, after the
loop has polled for I/O. (Not ``call_soon`` or a zero timer: uvloop runs those
before its next poll, so the chunks would run back to back.)
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from typing import Protocol

# The pause between two chunks of one crowded tick: uvloop's shortest timer that
# fires after the loop has polled for I/O.
CONTINUE_AFTER_S = 0.001


class KeepaliveClient(Protocol):
    """What the wheel calls when a connection's tick comes (a broker Channel)."""

    def keepalive_due(self) -> None: ...


class KeepaliveWheel:
    """Connections by the tick of their next keepalive check; one timer for all."""

    __slots__ = ("_armed", "_canon", "_handle", "_keys", "_loop", "_slots", "chunk", "tick")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, tick: float = 1.0, chunk: int = 256
    ) -> None:
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self._loop = loop
        self.tick = tick
        self.chunk = chunk
        self._slots: dict[int, set[KeepaliveClient]] = {}
        self._keys: list[int] = []  # heap of the ticks in _slots (and stale ones)
        # One int object per tick in _slots, returned to every client due then: each
        # keeps it as its key (math.ceil makes a new 32-byte int per call otherwise).
        self._canon: dict[int, int] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0  # the tick _handle fires at

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots.values())

    def add(self, client: KeepaliveClient, deadline: float) -> int:
        """Check ``client`` at ``deadline`` (``time.monotonic()`` seconds) or up to one
        tick later; returns the tick to :meth:`discard` it from."""
        key = math.ceil(deadline / self.tick)
        due = self._slots.get(key)
        if due is None:
            due = self._slots[key] = set()
            self._canon[key] = key
            heapq.heappush(self._keys, key)
            if self._handle is None or key < self._armed:
                self._arm(key)
        else:
            key = self._canon[key]
        due.add(client)
        return key

    def discard(self, client: KeepaliveClient, key: int) -> None:
        """Forget ``client`` (registered at tick ``key``); nothing if it is not there."""
        due = self._slots.get(key)
        if due is not None:
            due.discard(client)

    def close(self) -> None:
        """Cancel the timer and forget every connection (the broker stops)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._slots.clear()
        self._canon.clear()
        self._keys.clear()

    def _arm(self, key: int, min_delay: float = 0.0) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = key
        delay = max(min_delay, key * self.tick - time.monotonic())
        self._handle = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        keys = self._keys
        slots = self._slots
        now = time.monotonic()
        budget = self.chunk
        due: set[KeepaliveClient] | None = None
        while keys and keys[0] * self.tick <= now:
            key = keys[0]
            due = slots.get(key)
            while due and budget:
                budget -= 1
                # Closes the connection or adds it again at a later tick (> now).
                due.pop().keepalive_due()
            if due:
                break  # chunk done: the rest of this tick after the next I/O poll
            slots.pop(key, None)
            self._canon.pop(key, None)
            heapq.heappop(keys)
        while keys and keys[0] not in slots:
            heapq.heappop(keys)  # a tick whose set was already taken
        if keys:
            # A tick not yet worked through (``due`` left over): after the next I/O poll.
            self._arm(keys[0], CONTINUE_AFTER_S if due else 0.0)
