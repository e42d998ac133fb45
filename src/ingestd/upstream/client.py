"""Upstream mode: ingestd as an MQTT client of another broker, feeding the same routes.

One :class:`Upstream` per ``[[upstream]]`` entry runs on the process's event
loop: it connects (TCP or TLS), sends CONNECT (3.1.1 or 5.0, our Receive
Maximum, Session Expiry), SUBSCRIBEs, keeps the connection alive with PINGREQ
and reconnects with exponential backoff and jitter. Each connection is one
:class:`UpstreamConnection` (an ``asyncio.Protocol`` over the compiled codec).

Each PUBLISH from the upstream becomes a :class:`Message` (``client_id`` is
the upstream's name: MQTT does not carry the original publisher's id;
``username`` is None) and goes through ``Broker.publish(message, None)``, so
the routes, dead letters and metrics behave as for a local PUBLISH; with
``local_publish = false`` only the ingest sinks get it. A QoS 1 message is
PUBACKed, a QoS 2 message PUBRECed, only once the future ``publish`` returned
has completed (every after-commit route committed or spooled the row), in
arrival order (:class:`~ingestd.upstream.acks.AckQueue`). A failed future
means no ack and a dropped connection: the upstream keeps the message and
redelivers it on the next connection (at least once; see docs/scaling.md).

Flow control: under MQTT 5 our Receive Maximum bounds what the upstream sends
unacknowledged; under 3.1.1 we stop reading while that many acks are pending.
While the ingest engine is saturated we stop reading too (as local publishers
are paused).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

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
)
from ingestd.broker.message import Message
from ingestd.broker.session import Session
from ingestd.config import UpstreamConfig
from ingestd.config.validate import upstream_password
from ingestd.errors import ConfigError, ProtocolError
from ingestd.mqtt.constants import PacketType, Prop
from ingestd.upstream.acks import PUBACK, PUBREC, AckFailed, AckQueue

if TYPE_CHECKING:
    from ingestd.broker.server import Broker

log = logging.getLogger("ingestd.upstream")

_PUBREL = int(PacketType.PUBREL)
_PUBCOMP = int(PacketType.PUBCOMP)
_P_TOPIC_ALIAS = int(Prop.TOPIC_ALIAS)
_P_SUB_ID = int(Prop.SUBSCRIPTION_IDENTIFIER)
_P_MESSAGE_EXPIRY = int(Prop.MESSAGE_EXPIRY_INTERVAL)
_P_SERVER_KEEP_ALIVE = int(Prop.SERVER_KEEP_ALIVE)
_P_REASON_STRING = int(Prop.REASON_STRING)


class UpstreamError(Exception):
    """A connection attempt failed or an established connection ended abnormally."""


def tls_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_file)
    if cfg.cert_file and cfg.key_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def publish_to_sinks(broker: Broker, message: Message) -> asyncio.Future[Any] | None:
    """``local_publish = false``: only the ingest sinks (no session, group or retained store)."""
    subs, _groups = broker.trie.match_all(message.topic)
    durable: list[asyncio.Future[Any]] = []
    for sub, _opts in subs:
        if type(sub) is not Session:
            fut = sub.deliver(message)
            if fut is not None and message.qos:
                durable.append(fut)
    if not durable:
        return None
    if len(durable) == 1:
        return durable[0]
    return asyncio.gather(*durable)


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream broker: CONNECT, SUBSCRIBE, PUBLISH in, acks out."""

    def __init__(self, up: Upstream) -> None:
        self.up = up
        cfg = up.config
        self.cfg = cfg
        self.loop = up.loop
        self.version = cfg.protocol
        # MQTT 5: the upstream is told our Maximum Packet Size (mqtt.max_packet_size) and
        # must not send more. 3.1.1 has no way to say it: the protocol's own limit applies
        # (refusing a packet there would only bring it back on every reconnect).
        self.max_packet_size = up.broker.config.mqtt.max_packet_size
        if cfg.protocol == 5:
            self.decoder = Decoder(server_side=False, max_packet_size=self.max_packet_size)
        else:
            self.decoder = Decoder(server_side=False)
        self.decoder.protocol_version = cfg.protocol
        self.transport: Any = None
        self.connack: asyncio.Future[Connack] = self.loop.create_future()
        self.suback: asyncio.Future[list[int]] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.acks = AckQueue(cfg.protocol, self._acks_ready)
        self.reason = "connection lost"  # why it ended, for the log
        self.keepalive = cfg.keepalive
        self._qos2: set[int] = set()  # QoS 2 ids PUBRECed or queued, awaiting PUBREL
        self._aliases: dict[int, str] = {}
        self._paused = False  # reading paused (flow control or ingest saturation)
        self._saturation_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_rx = self._last_tx = time.monotonic()
        self._publish = (
            up.broker.publish if cfg.local_publish else lambda m, _o: publish_to_sinks(up.broker, m)
        )

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: Any = transport
        self.transport = t
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        cfg = self.cfg
        props: dict[int, Any] = {}
        if self.version == 5:
            props[int(Prop.SESSION_EXPIRY_INTERVAL)] = cfg.session_expiry
            props[int(Prop.RECEIVE_MAXIMUM)] = cfg.receive_maximum
            props[int(Prop.MAXIMUM_PACKET_SIZE)] = self.max_packet_size
        self._write(
            encode(
                Connect(
                    protocol_level=self.version,
                    clean_start=cfg.clean_start,
                    keepalive=cfg.keepalive,
                    client_id=self.up.client_id,
                    username=cfg.username,
                    password=self.up.password.encode() if self.up.password is not None else None,
                    properties=props,
                ),
                self.version,
            )
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if exc is not None and self.reason == "connection lost":
            self.reason = f"connection lost: {exc}"
        err = UpstreamError(self.reason)
        for fut in (self.connack, self.suback):
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: the attempt logs it
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._last_rx = time.monotonic()
        try:
            packets = self.decoder.feed(data)
        except ProtocolError as e:
            packets = list(getattr(e, "packets", None) or [])
            self._handle(packets)
            self.fail(f"protocol error from upstream: {e}")
            return
        self._handle(packets)

    def _handle(self, packets: list[Any]) -> None:
        out: list[bytes] = []
        for p in packets:
            if self.transport is None:
                return  # failed on an earlier packet: the rest comes again after reconnecting
            tp = type(p)
            if tp is Publish:
                self._on_publish(p, out)
            elif tp is PubAck:
                if p.packet_type == _PUBREL:
                    self._qos2.discard(p.packet_id)
                    out.append(encode_ack(_PUBCOMP, p.packet_id, 0, self.version))
                # PUBACK/PUBREC/PUBCOMP: we never publish upstream; ignored.
            elif tp is Pingresp:
                pass
            elif tp is Connack:
                if not self.connack.done():
                    self.connack.set_result(p)
            elif tp is Suback:
                if not self.suback.done():
                    self.suback.set_result(list(p.reason_codes))
            elif tp is Disconnect:
                why = p.properties.get(_P_REASON_STRING) if p.properties else None
                self.reason = f"upstream sent DISCONNECT, reason code {p.reason_code:#04x}" + (
                    f" ({why})" if why else ""
                )
        if out:
            self._write(b"".join(out))
        if self.transport is None:
            return
        released = self._release()
        if released:
            self._write(released)
        self._flow()

    def _on_publish(self, p: Publish, out: list[bytes]) -> None:
        topic = p.topic
        props = p.properties
        expires_at = None
        if props:
            props = dict(props)
            alias = props.pop(_P_TOPIC_ALIAS, None)
            if alias is not None:
                if topic:
                    self._aliases[alias] = topic
                else:
                    topic = self._aliases.get(alias, "")
                    if not topic:
                        self.fail(f"upstream used unknown topic alias {alias}")
                        return
            props.pop(_P_SUB_ID, None)
            expiry = props.get(_P_MESSAGE_EXPIRY)
            if expiry is not None:
                expires_at = time.monotonic() + expiry
        qos = p.qos
        up = self.up
        up.messages_received += 1
        if qos == 2 and p.packet_id in self._qos2:
            # Routed once per connection: a re-sent PUBLISH with a pending id only gets PUBREC.
            self.acks.add(None, PUBREC, p.packet_id)
            return
        message = Message(topic, p.payload, qos, p.retain, props, up.name, None, None, expires_at)
        fut = self._publish(message, None)
        if qos == 0:
            return
        if qos == 2:
            self._qos2.add(p.packet_id)
        self.acks.add(fut, PUBACK if qos == 1 else PUBREC, p.packet_id)

    # -- acks and flow control -------------------------------------------------

    def _release(self) -> bytes:
        try:
            return self.acks.release()
        except AckFailed as e:
            self.up.ack_failures += 1
            self.fail(
                f"not acknowledging packet {e.packet_id}: its rows were not made durable"
                f" ({e.error!r}); dropping the connection so the upstream redelivers"
            )
            return b""

    def _acks_ready(self) -> None:
        if self.transport is None:
            return
        data = self._release()
        if data:
            self._write(data)
        self._flow()

    def _flow(self) -> None:
        """Pause reading past the ack bound (3.1.1) or while ingest is saturated; resume after."""
        t = self.transport
        if t is None:
            return
        broker = self.up.broker
        over = self.version != 5 and self.acks.pending >= self.cfg.receive_maximum
        if not self._paused:
            if over:
                self._paused = True
                self.up.read_pauses += 1
                t.pause_reading()
            elif broker.ingest_saturated():
                self._paused = self._saturation_paused = True
                t.pause_reading()
                broker.reading_paused(self)  # type: ignore[arg-type]  # calls resume_reading
        elif not self._saturation_paused and self.acks.pending <= self.cfg.receive_maximum // 2:
            self._paused = False
            t.resume_reading()

    def resume_reading(self) -> None:
        """The ingest engine drained (Broker's backpressure seam, as for a Channel)."""
        self._saturation_paused = False
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
            self._flow()

    # -- writing, keepalive, closing -------------------------------------------

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None:
            t.write(data)
            self._last_tx = time.monotonic()

    def start_keepalive(self, keepalive: int) -> None:
        self.keepalive = keepalive
        if keepalive:
            self._timer = self.loop.call_later(keepalive / 2, self._tick)

    def _tick(self) -> None:
        if self.transport is None:
            return
        now = time.monotonic()
        k = self.keepalive
        if now - self._last_rx > 1.5 * k:
            self.fail(f"no packet from upstream for {now - self._last_rx:.1f} s (keepalive {k} s)")
            return
        if now - self._last_tx >= k / 2:
            self._write(PINGREQ)
        self._timer = self.loop.call_later(k / 2, self._tick)

    def fail(self, reason: str) -> None:
        """Drop the connection without DISCONNECT (the upstream keeps unacked messages)."""
        self.reason = reason
        if self.transport is not None:
            self.transport.abort()

    def disconnect(self) -> None:
        """Graceful DISCONNECT (reason 0: the v5 upstream discards no will; we set none)."""
        t = self.transport
        if t is not None and not t.is_closing():
            self.reason = "disconnected by ingestd"
            t.write(encode(Disconnect(), self.version))
            t.close()

    # -- the handshake ---------------------------------------------------------

    async def handshake(self, timeout: float) -> Connack:
        try:
            ack = await asyncio.wait_for(asyncio.shield(self.connack), timeout)
        except TimeoutError:
            self.fail(f"no CONNACK within {timeout:g} s")
            raise UpstreamError(self.reason) from None
        if ack.reason_code:
            why = ack.properties.get(_P_REASON_STRING) if ack.properties else None
            self.fail(
                f"CONNACK refused, reason code {ack.reason_code:#04x}"
                + (f" ({why})" if why else "")
            )
            raise UpstreamError(self.reason)
        keepalive = self.cfg.keepalive
        if ack.properties:
            keepalive = ack.properties.get(_P_SERVER_KEEP_ALIVE, keepalive)
        self.start_keepalive(keepalive)
        subs = [
            # v5 Retain Handling 1: retained messages only for a new subscription (a resumed
            # session does not get them again on every reconnect).
            (flt, self.cfg.qos, False, False, 1 if self.version == 5 else 0)
            for flt in self.cfg.subscriptions
        ]
        self._write(encode(Subscribe(packet_id=1, subscriptions=subs), self.version))
        try:
            codes = await asyncio.wait_for(asyncio.shield(self.suback), timeout)
        except TimeoutError:
            self.fail(f"no SUBACK within {timeout:g} s")
            raise UpstreamError(self.reason) from None
        for flt, code in zip(self.cfg.subscriptions, codes, strict=False):
            if code >= 0x80:
                log.warning(
                    "upstream %s refused subscription %r: reason code %#04x",
                    self.up.name,
                    flt,
                    code,
                    extra={"event": "upstream_subscribe_refused", "upstream": self.up.name},
                )
        return ack


class Upstream:
    """One configured upstream broker: the reconnect loop and its counters (for metrics)."""

    def __init__(self, config: UpstreamConfig, broker: Broker, password: str | None = None) -> None:
        self.config = config
        # From password, password_file or password_env (read at start-up); never logged.
        self.password = password
        self.broker = broker
        self.loop = broker.loop
        self.name = config.name
        self.client_id = (
            config.client_id if config.client_id is not None else f"ingestd-{config.name}"
        )
        self.conn: UpstreamConnection | None = None
        self.connected = False
        # counters read by ingestd.metrics
        self.messages_received = 0
        self.connects = 0
        self.reconnects = 0  # connection attempts after the first
        self.ack_failures = 0
        # Reconnects of a persistent session (clean_start = false) that found no session
        # at the upstream: what it held for us while we were away is gone.
        self.sessions_lost = 0
        self.read_pauses = 0  # 3.1.1: reading stopped at receive_maximum pending acks
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ssl = tls_context(config) if config.tls else None

    @property
    def acks_pending(self) -> int:
        c = self.conn
        return 0 if c is None else c.acks.pending

    def start(self) -> None:
        self._task = self.loop.create_task(self._run(), name=f"upstream-{self.name}")

    async def _run(self) -> None:
        cfg = self.config
        delay = cfg.reconnect_min_s
        attempt = 0
        while not self._stopping:
            if attempt:
                self.reconnects += 1
            attempt += 1
            ok = await self._connect_once()
            if self._stopping:
                break
            if ok:
                delay = cfg.reconnect_min_s  # it was up: start the backoff over
            sleep = delay * random.uniform(0.5, 1.0)
            log.info(
                "upstream %s: reconnecting in %.1f s",
                self.name,
                sleep,
                extra={"event": "upstream_backoff", "upstream": self.name},
            )
            await asyncio.sleep(sleep)
            delay = min(delay * 2, cfg.reconnect_max_s)

    async def _connect_once(self) -> bool:
        """One connection: True if it got as far as subscribing."""
        cfg = self.config
        conn = UpstreamConnection(self)
        where = f"{cfg.host}:{cfg.port}"
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: conn,
                    cfg.host,
                    cfg.port,
                    ssl=self._ssl,
                    server_hostname=cfg.host if self._ssl is not None else None,
                ),
                cfg.connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as e:
            self.last_error = f"cannot connect to {where}: {e or type(e).__name__}"
            log.warning(
                "upstream %s: %s",
                self.name,
                self.last_error,
                extra={"event": "upstream_connect_failed", "upstream": self.name},
            )
            return False
        self.conn = conn
        try:
            ack = await conn.handshake(cfg.connect_timeout)
        except UpstreamError as e:
            self.last_error = str(e)
            log.warning(
                "upstream %s at %s: %s",
                self.name,
                where,
                e,
                extra={"event": "upstream_connect_failed", "upstream": self.name},
            )
            conn.fail(str(e))
            await conn.closed
            self.conn = None
            return False
        self.connected = True
        self.connects += 1
        log.info(
            "upstream connected: %s at %s client_id=%r protocol=%s session_present=%s"
            " subscriptions=%s",
            self.name,
            where,
            self.client_id,
            "5.0" if cfg.protocol == 5 else "3.1.1",
            ack.session_present,
            ",".join(cfg.subscriptions),
            extra={"event": "upstream_connect", "upstream": self.name, "peer": where},
        )
        if not cfg.clean_start and not ack.session_present and self.connects > 1:
            # We asked to resume and had a session before: the upstream has none. The
            # messages it was holding for us (queued while we were away, or in flight and
            # not yet acknowledged by us) are lost, unless another member of a $share
            # group got them. Causes: the session expired (session_expiry, the broker's own
            # limit), the broker restarted without persistence, or another client took
            # the client id over.
            self.sessions_lost += 1
            log.warning(
                "upstream %s at %s: the persistent session for client_id=%r was not found"
                " (session_present=0): messages the upstream held for us while we were away"
                " may have been lost (session expired, broker restarted without persistence,"
                " or the client id was used elsewhere)",
                self.name,
                where,
                self.client_id,
                extra={"event": "upstream_session_lost", "upstream": self.name},
            )
        await conn.closed
        self.connected = False
        self.conn = None
        self.last_error = conn.reason
        level = logging.INFO if self._stopping else logging.WARNING
        log.log(
            level,
            "upstream disconnected: %s at %s reason=%s acks_unsent=%d",
            self.name,
            where,
            conn.reason,
            conn.acks.pending,
            extra={"event": "upstream_disconnect", "upstream": self.name, "reason": conn.reason},
        )
        return True

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop reading, let pending acks go out (bounded), DISCONNECT, end the loop."""
        self._stopping = True
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn._paused = conn._saturation_paused = True  # nothing resumes it now
            conn.transport.pause_reading()
            deadline = time.monotonic() + timeout
            while conn.acks.pending and conn.transport is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            conn.disconnect()
            try:
                await asyncio.wait_for(asyncio.shield(conn.closed), 2.0)
            except TimeoutError:
                conn.fail("no close after DISCONNECT")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


class Upstreams:
    """Every configured upstream; started after the listeners, stopped first (App.extras)."""

    def __init__(self, configs: list[UpstreamConfig], broker: Broker) -> None:
        self.clients: list[Upstream] = []
        for i, c in enumerate(configs):
            password = upstream_password(c, f"upstream[{i}]")
            try:
                self.clients.append(Upstream(c, broker, password))
            except OSError as e:  # ssl.SSLError too
                raise ConfigError(
                    f"cannot load TLS files: {e}", key=f"upstream[{i}].ca_file"
                ) from None

    async def start(self) -> None:
        for c in self.clients:
            c.start()

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.clients))
