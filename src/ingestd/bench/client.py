"""One benchmark MQTT client on asyncio/uvloop, built on ``ingestd._codec``.

Publishing is pipelined: a publisher writes a whole batch of PUBLISH packets
in one ``transport.write`` per event-loop turn. The packets come from one
template made by ``encode_publish`` in which only the packet id and the
16-byte payload header (publisher, sequence, send time) are patched, so the
generator spends a few hundred nanoseconds per message. The ingest
scenario's JSON payloads differ in content: with a message count they are
encoded before the run (:class:`PreEncoded`, so building ~1.5 us of JSON per
message does not take CPU from the broker and PostgreSQL on the same cores),
otherwise ``publish_each`` encodes each batch as it goes; either way a batch
is one write. Successful acks of one read are accounted together. QoS 1/2 publishing
is bounded by an in-flight window (``--inflight``, capped by the server's
Receive Maximum under MQTT 5). Receiving decodes with the compiled
``Decoder`` and marks each (publisher, sequence) in a
:class:`~ingestd.bench.accounting.SeqTracker`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from array import array
from collections.abc import Iterable
from itertools import islice
from typing import Any

from ingestd._codec import (
    PINGREQ,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    Pingresp,
    PubAck,
    Publish,
    Suback,
    Subscribe,
    encode,
    encode_ack,
    encode_publish,
)
from ingestd.bench.accounting import HEADER, HEADER_SIZE, LatencySampler, SeqTracker
from ingestd.bench.net import connect_from
from ingestd.mqtt.constants import PacketType, Prop

_PUBACK = int(PacketType.PUBACK)
_PUBREC = int(PacketType.PUBREC)
_PUBREL = int(PacketType.PUBREL)
_PUBCOMP = int(PacketType.PUBCOMP)
_PID = struct.Struct(">H")
# A paced publisher's shortest sleep: uvloop rounds a timer under its 1 ms resolution
# down to zero, so sleeping until the next message (0.5 ms at 2,000/s) would spin.
PACING_TICK_S = 0.001


class BenchError(Exception):
    """A benchmark client could not do its job (refused, disconnected, protocol error)."""


def publish_template(
    topic: str, payload_size: int, qos: int, version: int
) -> tuple[bytes, int, int]:
    """(packet bytes, payload offset, packet-id offset or -1) of one PUBLISH to patch.

    The packet id's position is found by encoding the packet with two
    different ids and comparing, so it follows whatever the codec produces.
    """
    if payload_size < HEADER_SIZE:
        raise ValueError(f"payload size must be at least {HEADER_SIZE} bytes")
    payload = bytes(payload_size)
    a = encode_publish(topic, payload, qos, False, False, 1 if qos else 0, None, version)
    payload_off = len(a) - payload_size
    if not qos:
        return a, payload_off, -1
    b = encode_publish(topic, payload, qos, False, False, 0x0302, None, version)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    if len(a) != len(b) or len(diff) != 2 or diff[1] != diff[0] + 1:
        raise BenchError("cannot locate the packet id in an encoded PUBLISH")
    return a, payload_off, diff[0]


class PreEncoded:
    """A publisher's PUBLISH packets built before the run (``publish_each`` sends them).

    Packet ids are those ``publish_each`` gives: sequence number mod 65535, plus one.
    """

    __slots__ = ("packets", "qos", "topic", "version")

    def __init__(self, topic: str, payloads: Iterable[bytes], qos: int, version: int) -> None:
        self.topic = topic
        self.qos = qos
        self.version = version
        self.packets = [
            encode_publish(
                topic, payload, qos, False, False, seq % 65535 + 1 if qos else 0, None, version
            )
            for seq, payload in enumerate(payloads)
        ]


class BenchClient(asyncio.Protocol):
    """An MQTT client that publishes a numbered stream and/or accounts what it receives."""

    def __init__(
        self,
        client_id: str,
        version: int,
        *,
        keepalive: int = 60,
        publishers: int = 0,
        track: bool = False,
        latency_cap: int = 1_000_000,
        persistent: bool = False,
        username: str | None = None,
    ) -> None:
        self.client_id = client_id
        self.username = username
        self.persistent = persistent
        self.version = version
        self.keepalive = keepalive
        self.loop = asyncio.get_running_loop()
        self.decoder = Decoder(server_side=False)
        self.decoder.protocol_version = version
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[Any] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.error: BaseException | None = None
        self.server_receive_max = 65535
        # flow control of our writes
        self._write_ok: asyncio.Future[None] | None = None
        self._paused = False
        # acknowledgements of our publishes
        self.inflight = 0
        self.acked = 0
        self.rejected = 0
        self._window_waiter: asyncio.Future[None] | None = None
        self._wake_at = 0
        self._send_ns = array("q")  # send time by packet id (an array: nothing to scan)
        self.ack_latency = LatencySampler(latency_cap)
        self._suback: asyncio.Future[list[int]] | None = None
        self._pings_sent = 0
        self._pings_answered = 0
        self._ping_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._ping_timer: asyncio.TimerHandle | None = None
        # receiving
        self.tracker = SeqTracker(publishers) if track else None
        self.latency = LatencySampler(latency_cap)
        self.foreign = 0  # PUBLISHes without our header
        self.first_rx_ns = 0
        self.last_rx_ns = 0
        self.sent = 0
        self.window_wait_ns = 0  # waiting for a full window: what fell due goes out late

    # -- connecting -------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        client_id: str,
        version: int,
        *,
        timeout: float = 30.0,
        source: str | None = None,
        **kw: Any,
    ) -> BenchClient:
        """Connect TCP (from address ``source`` if given), send CONNECT, wait for a
        successful CONNACK."""
        loop = asyncio.get_running_loop()
        try:
            if source:
                sock = await asyncio.wait_for(connect_from(source, host, port), timeout)
                conn = loop.create_connection(lambda: cls(client_id, version, **kw), sock=sock)
            else:
                conn = loop.create_connection(lambda: cls(client_id, version, **kw), host, port)
            _, proto = await asyncio.wait_for(conn, timeout)
        except (OSError, TimeoutError) as e:
            raise BenchError(f"cannot connect to {host}:{port}: {e}") from None
        assert isinstance(proto, BenchClient)
        await proto._handshake(timeout)
        return proto

    async def _handshake(self, timeout: float) -> None:
        self.write(
            encode(
                Connect(
                    protocol_level=self.version,
                    clean_start=not self.persistent,
                    keepalive=self.keepalive,
                    client_id=self.client_id,
                    username=self.username,
                    properties=(
                        {int(Prop.SESSION_EXPIRY_INTERVAL): 3600}
                        if self.persistent and self.version == 5
                        else {}
                    ),
                ),
                self.version,
            )
        )
        try:
            ack = await asyncio.wait_for(asyncio.shield(self.connack), timeout)
        except TimeoutError:
            self.abort()
            raise BenchError(f"{self.client_id}: no CONNACK within {timeout:g} s") from None
        if ack.reason_code != 0:
            self.abort()
            raise BenchError(f"{self.client_id}: CONNACK refused, code {ack.reason_code:#x}")
        rm = ack.properties.get(Prop.RECEIVE_MAXIMUM) if ack.properties else None
        if rm:
            self.server_receive_max = int(rm)
        if self.keepalive:
            self._ping_timer = self.loop.call_later(self.keepalive / 2, self._keepalive_ping)

    async def subscribe(self, topic_filter: str, qos: int, timeout: float = 30.0) -> None:
        self._suback = self.loop.create_future()
        self.write(
            encode(
                Subscribe(packet_id=1, subscriptions=[(topic_filter, qos, False, False, 0)]),
                self.version,
            )
        )
        try:
            codes = await asyncio.wait_for(self._suback, timeout)
        except TimeoutError:
            raise BenchError(f"{self.client_id}: no SUBACK within {timeout:g} s") from None
        if not codes or codes[0] >= 0x80:
            raise BenchError(f"{self.client_id}: subscription to {topic_filter!r} refused: {codes}")

    def _keepalive_ping(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._pings_sent += 1
        self.write(PINGREQ)
        self._ping_timer = self.loop.call_later(self.keepalive / 2, self._keepalive_ping)

    async def ping(self, timeout: float = 60.0) -> None:
        """PINGREQ and wait for its PINGRESP: the server has read all we wrote before it."""
        self._pings_sent += 1
        fut: asyncio.Future[None] = self.loop.create_future()
        self._ping_waiters.append((self._pings_sent, fut))
        self.write(PINGREQ)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise BenchError(f"{self.client_id}: no PINGRESP within {timeout:g} s") from None

    async def disconnect(self) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(encode(Disconnect(), self.version))
            t.close()
        if not self.closed.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), 5)
            except TimeoutError:
                self.abort()

    def abort(self) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        t: Any = transport
        self.transport = t
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        t.set_write_buffer_limits(high=256 * 1024)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        err = BenchError(f"{self.client_id}: connection lost" + (f" ({exc})" if exc else ""))
        if self.error is None and exc is not None:
            self.error = err
        for fut in (self.connack, self._suback, self._write_ok, self._window_waiter):
            if fut is not None and not fut.done():
                fut.set_exception(self.error or err)
        for _, fut in self._ping_waiters:
            if not fut.done():
                fut.set_exception(self.error or err)
        self._ping_waiters.clear()
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        w, self._write_ok = self._write_ok, None
        if w is not None and not w.done():
            w.set_result(None)

    def write(self, data: bytes | bytearray) -> None:
        t = self.transport
        if t is None:
            raise self.error or BenchError(f"{self.client_id}: not connected")
        t.write(data)

    async def writable(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        while self._paused:
            if self.transport is None:
                raise self.error or BenchError(f"{self.client_id}: connection lost")
            if self._write_ok is None:
                self._write_ok = self.loop.create_future()
            await self._write_ok

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except Exception as e:  # ProtocolError from the codec
            self.error = BenchError(f"{self.client_id}: bad data from server: {e}")
            self.abort()
            return
        now = time.monotonic_ns()
        out: list[bytes] | None = None
        acked: list[int] = []  # packet ids of successful PUBACK/PUBCOMP, accounted at once
        version = self.version
        for p in packets:
            tp = type(p)
            if tp is Publish:
                if self.tracker is not None:
                    payload = p.payload
                    if len(payload) >= HEADER_SIZE:
                        pub, seq, t = HEADER.unpack_from(payload)
                        self.tracker.mark(pub, seq)
                        self.latency.add((now - t) // 1000)
                    else:
                        self.foreign += 1
                else:
                    self.foreign += 1
                if not self.first_rx_ns:
                    self.first_rx_ns = now
                self.last_rx_ns = now
                q = p.qos
                if q:
                    if out is None:
                        out = []
                    out.append(encode_ack(_PUBACK if q == 1 else _PUBREC, p.packet_id, 0, version))
            elif tp is PubAck:
                pt = p.packet_type
                pid = p.packet_id
                if pt in (_PUBACK, _PUBCOMP):
                    if p.reason_code < 0x80:
                        acked.append(pid)
                    else:
                        self._ack(pid, p.reason_code, now)
                elif pt == _PUBREC:
                    if p.reason_code >= 0x80:
                        self._ack(pid, p.reason_code, now)
                    else:
                        if out is None:
                            out = []
                        out.append(encode_ack(_PUBREL, pid, 0, version))
                elif pt == _PUBREL:
                    if out is None:
                        out = []
                    out.append(encode_ack(_PUBCOMP, pid, 0, version))
            elif tp is Pingresp:
                self._pings_answered += 1
                while self._ping_waiters and self._ping_waiters[0][0] <= self._pings_answered:
                    _, fut = self._ping_waiters.pop(0)
                    if not fut.done():
                        fut.set_result(None)
            elif tp is Connack:
                if not self.connack.done():
                    self.connack.set_result(p)
            elif tp is Suback:
                if self._suback is not None and not self._suback.done():
                    self._suback.set_result(list(p.reason_codes))
            elif tp is Disconnect:
                self.error = BenchError(
                    f"{self.client_id}: server sent DISCONNECT, code {p.reason_code:#x}"
                )
        if acked:
            self._acked(acked, now)
        if out is not None and self.transport is not None:
            self.transport.write(b"".join(out))

    def _ack(self, pid: int, reason: int, now: int) -> None:
        if reason >= 0x80:
            self.rejected += 1
        else:
            self.acked += 1
            self.ack_latency.add((now - self._send_ns[pid]) // 1000)
        self.inflight -= 1
        self._wake()

    def _acked(self, pids: list[int], now: int) -> None:
        """Successful acks of one read: one latency sample each, accounted together."""
        send_ns = self._send_ns
        self.ack_latency.add_many([(now - send_ns[pid]) // 1000 for pid in pids])
        self.acked += len(pids)
        self.inflight -= len(pids)
        self._wake()

    def _wake(self) -> None:
        w = self._window_waiter
        if w is not None and self.inflight <= self._wake_at:
            self._window_waiter = None
            if not w.done():
                w.set_result(None)

    async def _wait_window(self, low: int) -> None:
        """Wait until at most ``low`` publishes are unacknowledged.

        Waking at a low-water mark rather than at every ack lets the publisher
        refill the window with one batch (one write) instead of one packet per
        ack, which matters against brokers that send each ack in its own segment.
        """
        if self.transport is None:
            raise self.error or BenchError(f"{self.client_id}: connection lost")
        self._wake_at = low
        self._window_waiter = w = self.loop.create_future()
        await w

    # -- publishing --------------------------------------------------------------

    async def _room(self, n: int, qos: int, window: int, low_water: int) -> int:
        """How many of ``n`` packets may be written now; 0 after waiting (ask again).

        At QoS 1/2 a full window waits until it drains to ``low_water`` (one
        refill write instead of one per ack); a paused transport waits until
        it is writable.
        """
        if qos:
            free = window - self.inflight
            if free <= 0:
                t = time.monotonic_ns()
                await self._wait_window(low_water)
                self.window_wait_ns += time.monotonic_ns() - t
                return 0
            if free < n:
                n = free
        if self._paused:
            await self.writable()
            return 0
        return n

    async def publish_stream(
        self,
        pub_index: int,
        topic: str,
        qos: int,
        payload_size: int,
        *,
        count: int | None,
        deadline_ns: int | None,
        rate: float | None,
        window: int,
        batch: int = 64,
    ) -> None:
        """Publish sequence numbers 0, 1, ... until ``count`` or ``deadline_ns``.

        ``rate`` (messages/s) paces the stream; ``window`` bounds QoS 1/2
        publishes not yet acknowledged. Returns after every publish is
        acknowledged (QoS 1/2) and a PINGREQ round trip (all QoS).
        """
        tpl, poff, pidoff = publish_template(topic, payload_size, qos, self.version)
        tpl_b = bytearray(tpl)
        size = len(tpl)
        pack = HEADER.pack_into
        pack_pid = _PID.pack_into
        if qos and not self._send_ns:
            self._send_ns = array("q", bytes(8 * 65536))
        send_ns = self._send_ns
        window = max(1, min(window, self.server_receive_max)) if qos else 0
        low_water = window - min(batch, max(1, window // 2))
        clock = time.monotonic_ns
        t_start = clock()
        seq = 0
        while True:
            if count is not None and seq >= count:
                break
            now = clock()
            if deadline_ns is not None and now >= deadline_ns:
                break
            n = batch
            if count is not None and count - seq < n:
                n = count - seq
            if rate:
                elapsed = (now - t_start) / 1e9
                due = int(elapsed * rate) + 1 - seq
                if due <= 0:
                    await asyncio.sleep(max(PACING_TICK_S, (seq - elapsed * rate) / rate))
                    continue
                if due < n:
                    n = due
            n = await self._room(n, qos, window, low_water)
            if not n:
                continue
            buf = tpl_b * n
            if qos:
                for i in range(n):
                    off = i * size
                    s = seq + i
                    pid = s % 65535 + 1
                    pack(buf, off + poff, pub_index, s, now)
                    pack_pid(buf, off + pidoff, pid)
                    send_ns[pid] = now
                self.inflight += n
            else:
                for i in range(n):
                    pack(buf, i * size + poff, pub_index, seq + i, now)
            seq += n
            self.sent = seq
            self.write(buf)
            await asyncio.sleep(0)
        while self.inflight > 0:
            await self._wait_window(0)
        await self.ping()

    async def publish_each(
        self,
        topic: str,
        payloads: Iterable[bytes] | PreEncoded,
        qos: int,
        *,
        window: int,
        batch: int = 64,
    ) -> None:
        """Publish each payload of an iterable (the ingest scenario's JSON), pipelined.

        Like :meth:`publish_stream`: up to ``batch`` PUBLISH packets (at QoS
        1/2 no more than the free window) are encoded, joined and written at
        once, with one send timestamp per batch for the ack latency, and a full
        window is refilled when it drains to the same low-water mark. The
        iterable decides when to stop (message count or deadline); it is never
        asked for more payloads than the next batch sends. :class:`PreEncoded`
        packets (built before the run) are sent as they are. Returns after every
        publish is acknowledged (QoS 1/2) and a PINGREQ round trip (all QoS).
        """
        version = self.version
        if isinstance(payloads, PreEncoded):
            if payloads.qos != qos or payloads.version != version or payloads.topic != topic:
                raise ValueError("pre-encoded packets for another topic, QoS or version")
            it: Any = None
        else:
            it = iter(payloads)
        if qos and not self._send_ns:
            self._send_ns = array("q", bytes(8 * 65536))
        send_ns = self._send_ns
        window = max(1, min(window, self.server_receive_max)) if qos else 0
        low_water = window - min(batch, max(1, window // 2))
        clock = time.monotonic_ns
        seq = 0
        while True:
            n = await self._room(batch, qos, window, low_water)
            if not n:
                continue
            if isinstance(payloads, PreEncoded):
                packets = payloads.packets[seq : seq + n]
            elif qos:
                packets = [
                    encode_publish(
                        topic, payload, qos, False, False, (seq + k) % 65535 + 1, None, version
                    )
                    for k, payload in enumerate(islice(it, n))
                ]
            else:
                packets = [
                    encode_publish(topic, payload, 0, False, False, 0, None, version)
                    for payload in islice(it, n)
                ]
            if not packets:
                break
            first = seq
            seq += len(packets)
            if qos:
                now = clock()
                for s in range(first, seq):
                    send_ns[s % 65535 + 1] = now
                self.inflight += seq - first
            self.sent = seq
            self.write(b"".join(packets))
            if len(packets) < n:
                break  # the iterable is exhausted
            await asyncio.sleep(0)
        while self.inflight > 0:
            await self._wait_window(0)
        await self.ping()
