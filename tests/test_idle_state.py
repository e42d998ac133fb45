"""What an idle connection holds: the keepalive wheel, lazily made busy state, slots.

The memory figures themselves are benchmarks (docs/benchmarks.md, "Idle
connections"); here: the structure that makes them small, checked with real
clients (paho-mqtt 3.1.1 and 5.0, mosquitto_sub), and the wheel on its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from typing import Any

import pytest

from ingestd.broker.keepalive import KeepaliveWheel
from mqtt_clients import Client, raw_connect
from pg_fixtures import wait_for

WAIT = 20.0


class Due:
    """A KeepaliveClient that records its calls (and may register again)."""

    def __init__(self, wheel: KeepaliveWheel, again: float | None = None) -> None:
        self.wheel = wheel
        self.again = again
        self.calls: list[float] = []
        self.key = 0

    def keepalive_due(self) -> None:
        self.calls.append(time.monotonic())
        if self.again is not None:
            self.key = self.wheel.add(self, time.monotonic() + self.again)
            self.again = None


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT))


def test_wheel_calls_each_client_once_at_or_after_its_deadline() -> None:
    async def main() -> None:
        wheel = KeepaliveWheel(asyncio.get_running_loop(), tick=0.05)
        t0 = time.monotonic()
        late, early = Due(wheel), Due(wheel)
        wheel.add(late, t0 + 0.3)
        wheel.add(early, t0 + 0.1)  # earlier than the armed tick: the timer moves up
        while not late.calls:
            await asyncio.sleep(0.01)
        assert len(early.calls) == 1 and len(late.calls) == 1
        assert early.calls[0] >= t0 + 0.1 and late.calls[0] >= t0 + 0.3
        assert early.calls[0] < late.calls[0]
        assert len(wheel) == 0

    run(main())


def test_wheel_discard_and_re_add() -> None:
    async def main() -> None:
        wheel = KeepaliveWheel(asyncio.get_running_loop(), tick=0.05)
        gone, twice, marker = Due(wheel), Due(wheel, again=0.1), Due(wheel)
        now = time.monotonic()
        key = wheel.add(gone, now + 0.05)
        wheel.add(twice, now + 0.05)
        wheel.discard(gone, key)
        wheel.discard(gone, key)  # twice is harmless
        wheel.add(marker, now + 0.4)
        while not marker.calls:
            await asyncio.sleep(0.01)
        assert gone.calls == []
        assert len(twice.calls) == 2 and twice.calls[1] - twice.calls[0] >= 0.1 - 0.001
        wheel.close()
        assert len(wheel) == 0

    run(main())


def test_wheel_checks_a_crowded_tick_over_several_loop_turns() -> None:
    """2.5 chunks of connections due in one tick: each is checked once, one chunk per
    loop turn (other callbacks, such as other connections' I/O, run in between); one
    discarded while its tick is being worked through is not checked."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wheel = KeepaliveWheel(loop, tick=0.01, chunk=100)
        turns = [0]  # loop turns so far, counted by a callback that re-arms itself
        seen: list[int] = []  # the loop turn of each check
        victim: list[Due] = []

        class Turned(Due):
            def keepalive_due(self) -> None:
                super().keepalive_due()
                seen.append(turns[0])
                if len(seen) == 1:
                    # One not checked yet, discarded once its tick has begun.
                    victim.append(next(c for c in clients if c is not self))
                    wheel.discard(victim[0], victim[0].key)

        def count() -> None:
            turns[0] += 1
            if len(seen) < 249 and time.monotonic() < give_up:
                loop.call_soon(count)

        give_up = time.monotonic() + WAIT / 2
        clients = [Turned(wheel) for _ in range(250)]
        # One deadline for all (a deadline per add could straddle a tick boundary on
        # a busy machine and split them over two ticks).
        due = time.monotonic() + 0.01
        for c in clients:
            c.key = wheel.add(c, due)
        loop.call_soon(count)
        while len(seen) < 249 and time.monotonic() < give_up:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # nothing more comes
        assert [len(c.calls) for c in clients].count(1) == 249
        assert victim[0].calls == []
        assert len(wheel) == 0
        per_turn = [seen.count(t) for t in sorted(set(seen))]
        assert per_turn == [100, 100, 49]

    run(main())


def channels(srv: Any) -> list[Any]:
    return srv.call(lambda: list(srv.app.broker.connections))


def channel_of(srv: Any, client_id: str) -> Any:
    return srv.call(lambda: next(c for c in srv.app.broker.connections if c.client_id == client_id))


@pytest.mark.parametrize("version", [4, 5])
def test_busy_state_is_made_by_a_publish_and_dropped_when_idle(server: Any, version: int) -> None:
    sub = Client(server.port, version=version)
    sub.subscribe("idle/t", 1)
    # keepalive 1: the server checks it every 1.5 s (paho pings every second).
    pub = Client(server.port, version=version, keepalive=1)
    ch = channel_of(server, pub.client_id)
    # No __dict__: the per-connection objects are slotted.
    assert not hasattr(ch, "__dict__") and not hasattr(ch.port, "__dict__")
    pub.publish("idle/t", b"one", qos=1)
    assert sub.expect()[0].payload == b"one"
    assert server.call(lambda: ch.inbound is not None)  # busy: acks went through it
    # Nothing pending: a keepalive tick drops it; the connection stays up.
    wait_for(lambda: server.call(lambda: ch.inbound is None), "the inbound state dropped", WAIT)
    assert server.call(lambda: ch.state) == 1  # CONNECTED
    pub.publish("idle/t", b"two", qos=1)  # made again by the next PUBLISH
    assert sub.expect()[0].payload == b"two"
    pub.disconnect()
    sub.disconnect()


def test_keepalive_wheel_holds_only_open_connections(server: Any) -> None:
    wheel = server.app.broker.keepalive
    clients = [Client(server.port, version=4, keepalive=30) for _ in range(3)]
    never = Client(server.port, version=5, keepalive=0)  # no keepalive: not in the wheel
    wait_for(lambda: server.call(lambda: len(wheel)) == 3, "three wheel entries", WAIT)
    if shutil.which("mosquitto_sub"):
        # An independent client with a keepalive is in the wheel while it is connected.
        proc = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(server.port), "-t", "x", "-k", "20"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: server.call(lambda: len(wheel)) == 4, "mosquitto_sub in it", WAIT)
        finally:
            proc.terminate()
            proc.wait(WAIT)
        wait_for(lambda: server.call(lambda: len(wheel)) == 3, "mosquitto_sub gone", WAIT)
    for c in clients:
        c.disconnect()
    never.drop()
    wait_for(lambda: server.call(lambda: len(wheel)) == 0, "an empty wheel", WAIT)
    wait_for(lambda: not channels(server), "no channels", WAIT)


def test_server_sockets_have_tcp_nodelay(server: Any) -> None:
    """The transport sets TCP_NODELAY (the epoll one itself; uvloop and asyncio both do);
    we rely on it."""
    c = Client(server.port, version=4)
    ch = channel_of(server, c.client_id)

    def nodelay() -> int:
        if hasattr(ch.port, "fileno"):  # the epoll transport's Conn
            sock = socket.socket(fileno=os.dup(ch.port.fileno()))
            try:
                return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            finally:
                sock.close()
        sock = ch.port.transport.get_extra_info("socket")
        return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    assert server.call(nodelay) == 1
    c.disconnect()


def test_an_idle_connection_holds_no_decoder_nor_client_info(server: Any) -> None:
    """Past CONNECT a channel reads through the broker's shared decoder; it holds one of
    its own only while a read has ended inside a packet. Its ClientInfo is made when
    asked."""
    cid = b"nodecoder"
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    s = raw_connect(server.port, b"\x10" + bytes([len(body)]) + body)
    try:
        assert s.recv(4) == b"\x20\x02\x00\x00"
        ch = channel_of(server, "nodecoder")
        wait_for(lambda: server.call(lambda: ch.decoder is None), "no decoder of its own", WAIT)
        s.sendall(b"\xc0")  # the first byte of a PINGREQ
        wait_for(
            lambda: server.call(lambda: ch.decoder is not None and ch.decoder.buffered == 1),
            "a decoder holding the incomplete packet",
            WAIT,
        )
        s.sendall(b"\x00")  # ... and the rest
        assert s.recv(2) == b"\xd0\x00"  # PINGRESP
        wait_for(lambda: server.call(lambda: ch.decoder is None), "the decoder dropped", WAIT)
        info = server.call(lambda: ch.info)
        assert (info.client_id, info.protocol_version, info.clean_start, info.transport) == (
            "nodecoder",
            4,
            True,
            "tcp",
        )
        assert info.peer == f"127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


def test_idle_sessions_share_one_empty_map_until_written(server: Any) -> None:
    """Sessions start with the shared NO_ENTRIES as subscriptions and inflight; a
    subscription or a QoS 1 delivery gives the session its own dict, and the shared
    one stays empty."""
    from ingestd.broker.session import NO_ENTRIES

    # An idle client that never subscribes (the paho helper subscribes to a barrier).
    body = b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x09emptymaps"
    idle = raw_connect(server.port, b"\x10" + bytes([len(body)]) + body)
    assert idle.recv(4) == b"\x20\x02\x00\x00"
    sub = Client(server.port, version=5)
    sub.subscribe("shared/t", 1)
    pub = Client(server.port, version=4)
    pub.publish("shared/t", b"m", qos=1)
    assert sub.expect()[0].payload == b"m"

    def maps() -> tuple[bool, bool, bool, bool, int]:
        sessions = server.app.broker.sessions
        s, i = sessions[sub.client_id], sessions["emptymaps"]
        return (
            i.subscriptions is NO_ENTRIES,
            i.inflight is NO_ENTRIES,
            s.subscriptions is NO_ENTRIES,
            "shared/t" in s.subscriptions,
            len(NO_ENTRIES),
        )

    assert server.call(maps) == (True, True, False, True, 0)
    for c in (sub, pub):
        c.disconnect()
    idle.close()
