"""The compiled epoll transport (ingestd._epoll), its edges, with real sockets.

The hub runs on a uvloop loop in the test; the clients are plain loopback
sockets driven through the same loop (``loop.sock_*``), so nothing here waits
on a sleep: every wait is on a condition, with a generous deadline. A fake
channel records what the transport hands it. The broker over this transport
(paho, mosquitto clients) is at the end, and every other broker test runs over
it too (it is the default for ``server.listen``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from ingestd.config import ConfigError, load_config
from ingestd.transport.epoll import serve
from mqtt_clients import Client, raw_connect, recv_until_closed

WAIT = 20.0


class Stats:
    bytes_sent = 0


class Recorder:
    """A channel: records what the transport hands it; optionally answers each read."""

    answer: Callable[[Any, bytes], None] | None = None
    fail_on: bytes | None = None

    def __init__(self, port: Any) -> None:
        self.port = port
        self.peer = port.peer
        self.fed: list[bytes] = []
        self.resumed = 0
        self.lost = False
        made.append(self)

    def feed(self, data: bytes) -> None:
        if self.fail_on is not None and self.fail_on in data:
            raise RuntimeError("channel bug")
        self.fed.append(data)
        if self.answer is not None:
            self.answer(self.port, data)

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self) -> None:
        self.lost = True

    @property
    def received(self) -> bytes:
        return b"".join(self.fed)


made: list[Recorder] = []


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        made.clear()
        uvloop.run(asyncio.wait_for(test(), 120))

    return run


async def until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def start(channel: type[Recorder] = Recorder, bound: int = 1 << 20) -> tuple[Any, Stats, int]:
    stats = Stats()
    hub = serve(channel, bound, stats, "tcp", "127.0.0.1", 0)
    return hub, stats, hub.sockets[0].getsockname()[1]


async def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    return s


async def one_client(
    channel: type[Recorder] = Recorder, bound: int = 1 << 20, rcvbuf: int | None = None
) -> tuple[Any, Stats, socket.socket, Recorder]:
    """A hub with one connected client and that client's channel."""
    hub, stats, port = start(channel, bound)
    c = await connect(port, rcvbuf)
    await until(lambda: len(made) == 1, "the channel")
    return hub, stats, c, made[0]


async def recv_exactly(s: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(s, n - len(buf)), WAIT)
        assert chunk, f"closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


async def recv_to_eof(s: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while True:
        chunk = await asyncio.wait_for(loop.sock_recv(s, 65536), WAIT)
        if not chunk:
            return bytes(buf)
        buf += chunk


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Echo(Recorder):
    def answer(self, port: Any, data: bytes) -> None:  # type: ignore[override]
        port.send(data.upper())


@in_loop
async def test_bytes_both_ways_and_writes_coalesced_per_turn() -> None:
    hub, stats, c, ch = await one_client()
    assert ch.peer == f"127.0.0.1:{c.getsockname()[1]}"
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(c, b"hello")
    await until(lambda: ch.received == b"hello", "the bytes read")
    ch.port.send(b"ab")
    ch.port.send(bytearray(b"cd"))
    ch.port.send(b"ef")
    assert ch.port.get_write_buffer_size() == 6  # queued until the end of the turn
    assert await recv_exactly(c, 6) == b"abcdef"
    assert ch.port.get_write_buffer_size() == 0 and stats.bytes_sent == 6
    assert ch.port.writable()
    c.close()
    await until(lambda: ch.lost, "connection_lost")
    await hub.wait_closed()


@in_loop
async def test_ipv6_listener_and_peer() -> None:
    hub = serve(Echo, 1 << 20, Stats(), "tcp", "::1", 0)
    port = hub.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    c = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    c.setblocking(False)
    await loop.sock_connect(c, ("::1", port))
    await until(lambda: len(made) == 1, "the channel")
    assert made[0].peer == f"[::1]:{c.getsockname()[1]}"
    await loop.sock_sendall(c, b"v6")
    assert await recv_exactly(c, 2) == b"V6"
    c.close()
    await hub.wait_closed()


@in_loop
async def test_slow_reader_makes_it_unwritable_until_drained() -> None:
    bound = 64 * 1024
    hub, stats, c, ch = await one_client(bound=bound, rcvbuf=4096)  # it reads nothing yet
    chunk = bytes(range(256)) * 64  # 16 KiB
    sent = 0
    while ch.port.writable():
        ch.port.send(chunk)
        sent += len(chunk)
        await asyncio.sleep(0)  # a loop turn: the hub hands what it can to the kernel
        assert sent < 64 * 1024 * 1024, "never became unwritable"
    assert ch.port.get_write_buffer_size() >= bound
    assert ch.resumed == 0
    # The client reads everything: the queue drains, resume_writing is called once.
    got = await recv_exactly(c, sent)
    assert got == chunk * (sent // len(chunk))
    await until(lambda: ch.resumed == 1, "resume_writing")
    assert ch.port.writable() and ch.port.get_write_buffer_size() == 0
    assert stats.bytes_sent == sent
    c.close()
    await hub.wait_closed()


@in_loop
async def test_peer_reset_with_bytes_pending() -> None:
    hub, _, c, ch = await one_client(bound=1 << 30, rcvbuf=4096)
    ch.port.send(b"x" * (4 << 20))  # more than the kernel buffers hold
    await until(lambda: ch.port.get_write_buffer_size() > 0, "bytes waiting for the peer")
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST
    await until(lambda: ch.lost, "connection_lost after the reset")
    assert ch.port.fileno() == -1 and ch.port.get_write_buffer_size() == 0
    assert hub.open_connections == 0
    await hub.wait_closed()


@in_loop
async def test_half_close_gets_the_answers_then_end_of_file() -> None:
    hub, _, port = start(Echo)
    c = await connect(port)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(c, b"abc")
    c.shutdown(socket.SHUT_WR)  # the client is done sending
    assert await recv_to_eof(c) == b"ABC"
    await until(lambda: made[0].lost, "connection_lost")
    assert made[0].received == b"abc"
    c.close()
    await hub.wait_closed()


@in_loop
async def test_close_while_bytes_pending_delivers_them_then_closes() -> None:
    hub, _, c, ch = await one_client(bound=1 << 30, rcvbuf=4096)
    body = os.urandom(2 << 20)
    ch.port.send(body)
    ch.port.close(b"LAST")
    assert ch.port.is_closing() and not ch.lost
    ch.port.send(b"after close")  # dropped
    assert await recv_to_eof(c) == body + b"LAST"
    await until(lambda: ch.lost, "connection_lost")
    assert hub.open_connections == 0
    c.close()
    await hub.wait_closed()


@in_loop
async def test_pause_and_resume_reading() -> None:
    hub, _, port = start()
    a = await connect(port)
    await until(lambda: len(made) == 1, "the first channel")
    b = await connect(port)
    await until(lambda: len(made) == 2, "the second channel")
    ca, cb = made
    ca.port.pause_reading()
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(a, b"held")
    await loop.sock_sendall(b, b"marker")  # sent after: on loopback, in the kernel after
    await until(lambda: cb.received == b"marker", "the unpaused connection's bytes")
    assert ca.fed == []  # paused: not read
    ca.port.resume_reading()
    await until(lambda: ca.received == b"held", "the held bytes")
    for s in (a, b):
        s.close()
    await until(lambda: ca.lost and cb.lost, "both lost")
    await hub.wait_closed()


@in_loop
async def test_many_connections_fd_reuse_and_no_fd_leak() -> None:
    before = open_fds()
    hub, _, port = start(Echo)
    loop = asyncio.get_running_loop()
    clients = [await connect(port) for _ in range(200)]
    for i, c in enumerate(clients):
        await loop.sock_sendall(c, b"c%d;" % i)
    for i, c in enumerate(clients):
        assert await recv_exactly(c, len(b"C%d;" % i)) == b"C%d;" % i
    assert hub.open_connections == 200
    first = made[0]
    old_fd = first.port.fileno()
    clients[0].close()
    await until(lambda: first.lost, "the first one lost")
    # The next connection gets the freed descriptor: a new Conn, its own bytes only.
    again = await connect(port)
    await until(lambda: len(made) == 201, "the new channel")
    new = made[200]
    assert new.port.fileno() == old_fd and new.port is not first.port
    await loop.sock_sendall(again, b"mine")
    assert await recv_exactly(again, 4) == b"MINE"
    assert new.received == b"mine" and first.received == b"c0;"
    for c in [*clients[1:], again]:
        c.close()
    await until(lambda: hub.open_connections == 0, "every connection closed")
    assert all(ch.lost for ch in made) and hub.connections() == []
    await hub.wait_closed()
    assert open_fds() == before


@in_loop
async def test_graceful_shutdown() -> None:
    before = open_fds()
    hub, _, port = start(Echo)
    loop = asyncio.get_running_loop()
    c = await connect(port)
    await until(lambda: len(made) == 1, "the channel")
    hub.close()  # no new connections ...
    late = socket.socket()
    late.setblocking(False)
    with pytest.raises(ConnectionRefusedError):
        await loop.sock_connect(late, ("127.0.0.1", port))
    late.close()
    await loop.sock_sendall(c, b"still")  # ... while the open one is served
    assert await recv_exactly(c, 5) == b"STILL"
    await hub.wait_closed()  # what is left is closed, connection_lost delivered
    assert made[0].lost
    assert await recv_to_eof(c) == b""
    c.close()
    assert open_fds() == before


@in_loop
async def test_a_failing_channel_closes_only_its_connection() -> None:
    class Failing(Echo):
        fail_on = b"boom"

    hub, _, port = start(Failing)
    loop = asyncio.get_running_loop()
    bad = await connect(port)
    good = await connect(port)
    await until(lambda: len(made) == 2, "two channels")
    await loop.sock_sendall(bad, b"boom")
    assert await recv_to_eof(bad) == b""
    await until(lambda: made[0].lost, "the failing one lost")
    await loop.sock_sendall(good, b"ok")
    assert await recv_exactly(good, 2) == b"OK"
    assert not made[1].lost
    for s in (bad, good):
        s.close()
    await hub.wait_closed()


@in_loop
async def test_write_to_a_closed_peer_ends_the_connection() -> None:
    hub, _, c, ch = await one_client()
    ch.port.pause_reading()  # it does not notice the end of file by reading
    c.close()
    # Writing until the kernel reports the peer gone (EPIPE / reset) closes it.
    for _ in range(1000):
        if ch.lost:
            break
        ch.port.send(b"x" * 1024)
        await asyncio.sleep(0.001)
    await until(lambda: ch.lost, "connection_lost after writing to a closed peer")
    assert hub.open_connections == 0
    await hub.wait_closed()


# -- the broker over it, with independent clients --------------------------------


def test_broker_serves_tcp_through_the_epoll_transport(server: Any) -> None:
    sub = Client(server.port, version=4)
    sub.subscribe("ep/#", 1)
    ch = server.call(lambda: next(iter(server.app.broker.connections)))
    assert type(ch.port).__name__ == "Conn" and ch.port.transport_name == "tcp"
    proc = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(server.port), "-t", "ep/1", "-m", "hi"],
        timeout=WAIT,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    m = sub.expect()[0]
    assert (m.topic, m.payload) == ("ep/1", b"hi")
    sub.disconnect()


def test_malformed_input_closes_only_that_connection(server: Any) -> None:
    sub = Client(server.port, version=5)
    sub.subscribe("mal/t", 0)
    # A valid 3.1.1 CONNECT, then a packet of reserved type 0.
    connect_packet = bytes.fromhex("101000044d5154540402003c0004") + b"bad1"
    bad = raw_connect(server.port, connect_packet + b"\x00\x00")
    assert recv_until_closed(bad).startswith(b"\x20\x02\x00\x00")  # CONNACK, then closed
    bad.close()
    pub = Client(server.port, version=4)
    pub.publish("mal/t", b"fine", qos=1)
    assert sub.expect()[0].payload == b"fine"
    pub.disconnect()
    sub.disconnect()


def test_asyncio_transport_still_selectable(server_factory: Any, tmp_path: Path) -> None:
    from conftest import make_config

    config = make_config(tmp_path)
    config.server.tcp_transport = "asyncio"
    srv = server_factory(config)
    c = Client(srv.port, version=5)
    c.subscribe("a/t", 1)
    c.publish("a/t", b"x", qos=1)
    assert c.expect()[0].payload == b"x"
    ch = srv.call(lambda: next(iter(srv.app.broker.connections)))
    assert type(ch.port).__name__ == "StreamConnection"
    c.disconnect()


def test_bad_tcp_transport_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\ntcp_transport = "kqueue"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(str(path))
    text = str(ei.value)
    assert "bad.toml" in text and "server.tcp_transport" in text and "kqueue" in text
