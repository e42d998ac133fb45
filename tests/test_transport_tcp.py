"""StreamConnection, the socket side of a client, with a fake transport and channel.

No MQTT here: the transport hands bytes to whatever channel its factory made
and writes what the channel sends, coalesced per event-loop turn.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

from ingestd.transport.tcp import EAGER_FLUSH_BYTES, StreamConnection


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0
        self.closed = False
        self.reading = True
        self.limits: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 1883) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = high

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class FakeChannel:
    def __init__(self, port: StreamConnection) -> None:
        self.port = port
        self.fed: list[bytes] = []
        self.resumed = 0
        self.lost = False

    def feed(self, data: bytes) -> None:
        self.fed.append(data)

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self) -> None:
        self.lost = True


class Stats:
    bytes_sent = 0


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on its own event loop (the stream schedules its flushes there)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def open_stream(bound: int = 1000) -> tuple[StreamConnection, FakeTransport, Stats]:
    stats = Stats()
    stream = StreamConnection(FakeChannel, bound, stats)
    transport = FakeTransport()
    stream.connection_made(transport)  # type: ignore[arg-type]
    return stream, transport, stats


@in_loop
async def test_bytes_in_go_to_the_channel_and_peer_is_named() -> None:
    stream, transport, _ = open_stream()
    assert stream.peer == "192.0.2.7:1883"
    assert transport.limits == 1000
    stream.data_received(b"\x10\x00")
    assert stream.channel.fed == [b"\x10\x00"]
    assert stream.channel.port is stream


@in_loop
async def test_writes_are_coalesced_per_loop_turn() -> None:
    stream, transport, stats = open_stream()
    stream.send(b"ab")
    stream.send(b"cd")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert transport.writes == [b"abcd"]
    assert stats.bytes_sent == 4


@in_loop
async def test_a_large_burst_is_written_at_once() -> None:
    stream, transport, _ = open_stream(bound=10 * EAGER_FLUSH_BYTES)
    stream.send(b"x" * (EAGER_FLUSH_BYTES - 1))
    assert transport.writes == []
    stream.send(b"y")
    assert [len(w) for w in transport.writes] == [EAGER_FLUSH_BYTES]


@in_loop
async def test_writable_counts_unflushed_and_transport_bytes() -> None:
    stream, transport, _ = open_stream(bound=100)
    assert stream.writable()
    stream.send(b"x" * 60)
    transport.buffered = 39
    assert stream.writable()
    assert stream.get_write_buffer_size() == 99
    transport.buffered = 40
    assert not stream.writable()
    transport.buffered = 0
    stream.pause_writing()
    assert not stream.writable()
    stream.resume_writing()
    assert stream.writable() and stream.channel.resumed == 1


@in_loop
async def test_close_flushes_then_writes_last_then_closes() -> None:
    stream, transport, stats = open_stream()
    stream.send(b"queued")
    stream.write_now(b"first")
    stream.close(b"last")
    assert transport.writes == [b"first", b"queuedlast"]
    assert transport.closed
    assert stats.bytes_sent == len(
        b"queued"
    )  # as before the split: the final packet is not counted
    stream.close(b"again")  # idempotent
    stream.send(b"late")
    await asyncio.sleep(0)
    assert transport.writes == [b"first", b"queuedlast"]


@in_loop
async def test_reading_pause_and_loss_reach_the_transport_and_channel() -> None:
    stream, transport, _ = open_stream()
    stream.pause_reading()
    assert not transport.reading
    stream.resume_reading()
    assert transport.reading
    channel = stream.channel
    stream.connection_lost(None)
    assert channel.lost and stream.transport is None
    assert not stream.writable()
