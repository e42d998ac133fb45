"""The acknowledgements one upstream connection owes, released in arrival order after commit.

Sans-IO: :class:`AckQueue` holds one entry per QoS 1/2 PUBLISH received from
the upstream broker (the future its rows wait on, or None) and hands back the
encoded PUBACK/PUBREC packets that may leave now, in the order the PUBLISHes
arrived, as the server side's ``Inbound`` does for local publishers. An entry
whose future failed stops the queue: that message (and everything after it)
is never acknowledged, and the connection is dropped so the upstream resends.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from ingestd._codec import encode_ack
from ingestd.mqtt.constants import PacketType

PUBACK = int(PacketType.PUBACK)
PUBREC = int(PacketType.PUBREC)


class AckFailed(Exception):
    """A message's durability future failed: it must not be acknowledged."""

    def __init__(self, packet_id: int, error: BaseException | None) -> None:
        super().__init__(f"packet {packet_id}: {error!r}")
        self.packet_id = packet_id
        self.error = error


class AckQueue:
    """Acks waiting for their futures, in arrival order.

    ``on_ready`` is called (from a future's done callback) when the head of the
    queue may have become releasable; the owner then calls :meth:`release`.
    One callback is added per distinct future (a batch future is shared by
    every message of the batch), not per message.
    """

    __slots__ = ("_on_ready", "_q", "_version", "_watched", "pending")

    def __init__(self, version: int, on_ready: Callable[[], None]) -> None:
        self._q: deque[tuple[asyncio.Future[Any] | None, int, int]] = deque()
        self._version = version
        self._on_ready = on_ready
        self._watched: asyncio.Future[Any] | None = None
        self.pending = 0  # entries not yet released (the acks we owe upstream)

    def __len__(self) -> int:
        return self.pending

    def add(self, fut: asyncio.Future[Any] | None, ack_type: int, packet_id: int) -> None:
        self._q.append((fut, ack_type, packet_id))
        self.pending += 1
        if fut is not None and fut is not self._watched and not fut.done():
            self._watched = fut
            fut.add_done_callback(self._done)

    def _done(self, _fut: asyncio.Future[Any]) -> None:
        self._on_ready()

    def release(self) -> bytes:
        """The acks that may be sent now, concatenated (b"" if none).

        Raises :class:`AckFailed` at the first entry whose future failed (or
        was cancelled); the acks before it are lost with the connection too,
        which only means the upstream redelivers them (at least once).
        """
        q = self._q
        out: list[bytes] = []
        v = self._version
        while q:
            fut, ack_type, pid = q[0]
            if fut is not None:
                if not fut.done():
                    break
                if fut.cancelled():
                    raise AckFailed(pid, None)
                err = fut.exception()
                if err is not None:
                    raise AckFailed(pid, err)
            q.popleft()
            self.pending -= 1
            out.append(encode_ack(ack_type, pid, 0, v))
        if not q:
            self._watched = None
        return b"".join(out)
