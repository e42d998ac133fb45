"""StreamConnection: one client socket (TCP or TLS), bytes in and bytes out.

Sockets only: this module knows nothing of MQTT. A listener creates one
:class:`StreamConnection` per accepted socket with a *channel factory*
(``ingestd.app`` passes one that builds an :class:`ingestd.broker.channel.Channel`);
once the socket is up the factory gets this object as the channel's port and
every received chunk goes to ``channel.feed(data)``. The WebSocket transport
wraps the same class around its framing transport, so both write the same way.

Writes: every outbound packet is appended to ``_out`` and written once per
event-loop turn (``_flush``), so a burst of deliveries costs one ``write``, or
at once when 64 KiB are waiting (a burst read in one turn then reaches the
kernel instead of counting against the connection's outbound bound). The
transport's buffer is bounded by ``max_outbound_bytes``: above it
``pause_writing`` marks the connection unwritable (``writable()`` is False) and
``resume_writing`` tells the channel, which pumps its session's queue.

Memory: an idle connection is this object (``__slots__``, no ``__dict__``), its
transport and its channel. The outbound list exists only while bytes wait for
the end of the loop turn (``_out`` is None otherwise), and nothing per
connection is a closure or a bound method: the channel factory is one object
per listener. TCP_NODELAY is not set here: uvloop and asyncio set it on every
TCP transport they create (``tests/test_transport_tcp.py`` checks it), and
asking for the socket would keep a socket object per connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

# Writes are coalesced per event-loop turn, but never more than this many bytes.
EAGER_FLUSH_BYTES = 65_536


class ChannelLike(Protocol):
    """What a transport drives: the protocol state machine of one client."""

    def feed(self, data: bytes) -> None: ...

    def resume_writing(self) -> None: ...

    def connection_lost(self) -> None: ...


class ByteCounter(Protocol):
    """Where the bytes handed to the kernel are counted (the broker's stats)."""

    bytes_sent: int


class StreamConnection(asyncio.Protocol):
    """An asyncio Protocol over one socket; the port its channel writes through."""

    __slots__ = (
        "_flush_scheduled",
        "_loop",
        "_new_channel",
        "_out",
        "_out_bytes",
        "_write_paused",
        "channel",
        "max_outbound_bytes",
        "peer",
        "stats",
        "transport",
        "transport_name",
    )

    def __init__(
        self,
        new_channel: Callable[[StreamConnection], ChannelLike],
        max_outbound_bytes: int,
        stats: ByteCounter,
        transport_name: str = "tcp",
    ) -> None:
        self._new_channel = new_channel
        self.max_outbound_bytes = max_outbound_bytes
        self.stats = stats
        self.transport_name = transport_name
        self.transport: Any = None  # asyncio/uvloop transport, or the WebSocket framing one
        self.channel: Any = None
        self.peer = "?"
        # Bytes queued this loop turn (None: nothing waiting; most connections, most turns).
        self._out: list[bytes] | None = None
        self._out_bytes = 0
        self._flush_scheduled = False
        self._write_paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = peer[0]
            self.peer = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        if hasattr(transport, "set_write_buffer_limits"):
            transport.set_write_buffer_limits(high=self.max_outbound_bytes)
        self.channel = self._new_channel(self)

    def data_received(self, data: bytes) -> None:
        self.channel.feed(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channel is not None:
            self.channel.connection_lost()
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.channel is not None:
            self.channel.resume_writing()

    # -- the port a channel writes through ----------------------------------

    def writable(self) -> bool:
        """True while the outbound bytes (ours not yet flushed + the transport's) are under the bound."""
        if self._write_paused or self.transport is None:
            return False
        return self._out_bytes + self.transport.get_write_buffer_size() < self.max_outbound_bytes

    def get_write_buffer_size(self) -> int:
        """Outbound bytes not yet on the wire: ours not yet flushed plus the transport's."""
        transport = self.transport
        size = self._out_bytes
        if transport is not None:
            size += transport.get_write_buffer_size()
        return size

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def send(self, data: bytes) -> None:
        """Queue ``data``; written this loop turn, or now if 64 KiB are waiting."""
        out = self._out
        if out is None:
            out = self._out = []
        out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= EAGER_FLUSH_BYTES:
            # Enough to fill a segment train: hand it to the kernel now rather than let
            # one loop turn's burst count against the connection's outbound bound.
            self._flush()
        elif not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def peer_certificate(self) -> dict[str, Any] | None:
        """The client's verified TLS certificate (``getpeercert()``'s dict), or None
        (plain TCP, or a TLS client that presented none)."""
        transport = self.transport
        if transport is None:
            return None
        cert = transport.get_extra_info("peercert")
        return cert or None

    def write_now(self, data: bytes) -> None:
        """Write ``data`` ahead of anything queued (a refusing CONNACK before close)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self, last: bytes = b"") -> None:
        """Write what is queued (then ``last``) and close the socket. Idempotent."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            out = self._out or []
            if last:
                out.append(last)
            if out:
                self.stats.bytes_sent += self._out_bytes
                transport.write(b"".join(out))
            transport.close()
        self._out = None
        self._out_bytes = 0

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = None
        n = self._out_bytes
        self._out_bytes = 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.stats.bytes_sent += n
        transport.write(out[0] if len(out) == 1 else b"".join(out))
