"""Channel: one client's MQTT protocol state machine, with no socket.

Theory of operation
-------------------
States: ``AWAIT_CONNECT`` -> ``CONNECTED`` -> ``CLOSED``. Bytes from the
transport (``feed``) go to a sans-IO :class:`ingestd._codec.Decoder`; each
decoded packet is dispatched to an ``_on_<packet>`` method. Replies leave
through the channel's :class:`Port` (the transport: plain TCP's
``ingestd._epoll.Conn``, TLS's ``ingestd.transport.tcp.StreamConnection``, or
the WebSocket framing around one), so a test drives a Channel with bytes and a recording port alone
(``tests/test_channel.py``). The first packet must be CONNECT (the decoder
enforces it) and must arrive within ``connect_timeout``.

Any :class:`ProtocolError` (from the decoder or a session rule) closes this
connection only: a v5 client first gets DISCONNECT (CONNACK before the session
exists) carrying the error's reason code; one log line names the peer, the
client and the rule broken.

Writes: every outbound packet goes to ``port.send`` (the transport coalesces
them into one ``write`` per event-loop turn). While ``port.writable()`` is
False (outbound bytes over ``max_outbound_bytes``) QoS 0 deliveries are
dropped (counted) and QoS 1/2 wait in the session queue until the transport's
``resume_writing`` calls :meth:`Channel.resume_writing`, which pumps it. The
channel is the session's :class:`ingestd.broker.session.Outbound`.

Acknowledgements of inbound QoS 1/2 PUBLISH go through ``inbound``
(:class:`ingestd._inbound.Inbound`, compiled) in arrival order: an ack whose
message must first be made durable by an ingest route (``ack =
"after-commit"``) holds back the acks behind it, so PUBACKs leave in the order
the PUBLISHes came [MQTT-4.6.0-2]. If durability fails, no ack is sent and the
connection is closed: the client re-sends after reconnecting.

Fast path: a run of PUBLISH packets whose topics only ingest routes, or only
plain session subscriptions, take (QoS 0/1, no RETAIN) is handled by
``inbound.take`` in one call instead of ``_on_publish`` per packet (see
ext/ingestd/_inbound.pyx for the exact conditions); the first packet that does
not qualify, and everything after it that does not, goes through
``_on_publish``. A run of PUBACKs is applied in one call
(``take_pubacks``), then the session is pumped once.

Length: this file is over 600 lines because it is one state machine: every
packet handler reads and changes the same per-client state (state, session,
aliases, will, inbound acks), and keeping the transitions side by side is
what makes them reviewable against the specification.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from ingestd._codec import (
    PINGRESP,
    Connack,
    Decoder,
    Disconnect,
    Suback,
    Unsuback,
    encode,
    encode_ack,
    encode_publish,
)
from ingestd._inbound import Inbound, take_pubacks
from ingestd._trie import validate_topic_filter, validate_topic_name
from ingestd.broker.acl import WRITE, ClientAcl
from ingestd.broker.auth import Verdict, may_write_dollar, revoked_acl
from ingestd.broker.certs import certificate_username, identity_mode
from ingestd.broker.credentials import Credential
from ingestd.broker.hooks import ClientInfo
from ingestd.broker.limits import topic_over_limit
from ingestd.broker.message import Message
from ingestd.broker.session import NEVER_EXPIRES, Session, SubOptions, WillSpec
from ingestd.errors import ProtocolError
from ingestd.mqtt.constants import (
    SUBACK_V3_FAILURE,
    ConnackV3,
    PacketType,
    Prop,
    Reason,
    connack_v3_code,
)

if TYPE_CHECKING:
    from ingestd.broker.server import Broker

log = logging.getLogger("ingestd.broker")

AWAIT_CONNECT = 0
CONNECTED = 1
CLOSED = 2

# The listeners whose clients may present a certificate (app.py's transport names).
_TLS_TRANSPORTS = ("tls", "wss")

_PUBLISH = int(PacketType.PUBLISH)
_PUBACK = int(PacketType.PUBACK)
_PUBREC = int(PacketType.PUBREC)
_PUBREL = int(PacketType.PUBREL)
_PUBCOMP = int(PacketType.PUBCOMP)

_P_TOPIC_ALIAS = int(Prop.TOPIC_ALIAS)
_P_MESSAGE_EXPIRY = int(Prop.MESSAGE_EXPIRY_INTERVAL)
_P_SUB_ID = int(Prop.SUBSCRIPTION_IDENTIFIER)
_P_REASON_STRING = int(Prop.REASON_STRING)
# Reason codes from 0x80 up are failures [MQTT-2.4].
_FIRST_FAILURE = int(Reason.UNSPECIFIED_ERROR)


def _short_topic(max_length: int, max_levels: int) -> int:
    """The longest topic (in characters) no topic limit can refuse."""
    bound = max_length // 4 if max_length else 1 << 62
    return min(bound, max_levels - 1) if max_levels else bound


class Port(Protocol):
    """What a Channel writes through: its transport (implemented by
    ``ingestd._epoll.Conn`` and ``ingestd.transport.tcp.StreamConnection``; a
    recording fake in tests)."""

    peer: str  # "host:port" of the client, for log lines

    def send(self, data: bytes) -> None:
        """Queue bytes for the client (coalesced per event-loop turn)."""

    def write_now(self, data: bytes) -> None:
        """Write bytes ahead of anything queued (the CONNACK that refuses a client)."""

    def peer_certificate(self) -> dict[str, Any] | None:
        """The client's verified TLS certificate (``ssl`` ``getpeercert()``), or None."""
        ...

    def writable(self) -> bool:
        """False while the client's outbound bytes are over ``max_outbound_bytes``."""
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self, last: bytes = b"") -> None:
        """Write what is queued, then ``last``, and close the connection (idempotent)."""


class Channel:
    """One client's MQTT session protocol (TCP, TLS or WebSocket feed it the same way).

    Memory: every connection has one, idle ones included, so it has ``__slots__``
    (no instance ``__dict__``; with its ~35 fields one would cost ~1.5 KB), holds no
    bound method (the garbage collector tracks each, and a full collection's cost
    grows with the tracked objects of every idle connection), and no timer of its
    own: its connect timeout, then its keepalive, is one entry in the broker's
    :class:`~ingestd.broker.keepalive.KeepaliveWheel`. The inbound ack state
    (``inbound``) exists while the client publishes, a decoder of its own only
    while a read ended inside a packet, ``info`` is made when asked; the Topic
    Alias maps only for MQTT 5 (outbound: a client that allows aliases).
    """

    __slots__ = (
        "_client_alias_max",
        "_client_max_packet",
        "_connect_bits",
        "_connected_at",
        "_device_topic",
        "_devices",
        "_held",
        "_inbound_aliases",
        "_ka_key",
        "_outbound_aliases",
        "_read_paused",
        "_short_topic",
        "acl",
        "broker",
        "cfg",
        "client_id",
        "credential",
        "decoder",
        "inbound",
        "keepalive",
        "last_rx",
        "peer",
        "port",
        "session",
        "state",
        "stats",
        "transport_name",
        "username",
        "version",
        "will",
    )

    def __init__(self, broker: Broker, port: Port, transport_name: str = "tcp") -> None:
        self.broker = broker
        self.cfg = broker.config.mqtt
        self.stats = broker.stats
        self.transport_name = transport_name
        # Until CONNECT, and while a read ended inside a packet (None otherwise: see feed).
        self.decoder: Decoder | None = Decoder(
            server_side=True, max_packet_size=self.cfg.max_packet_size
        )
        self.port = port
        self.state = AWAIT_CONNECT
        self.version = 0
        self.client_id = ""
        self.username: str | None = None
        self.peer = port.peer
        self.session: Session | None = None
        self.will: WillSpec | None = None
        # Set at CONNECT: when (time.time()), and protocol level | 8 if clean start (a
        # small int, no object of its own); ``info`` is made from them when asked.
        self._connected_at: float | None = None
        self._connect_bits = 0
        # What this client may read and write (mqtt.acl_file; None: no ACL configured).
        self.acl: ClientAcl | None = None
        # While a CONNECT's password is checked (in a thread): the packets that came
        # after it, handled once it is accepted.
        self._held: list[Any] | None = None
        # The credential it logged in with (None: no password checked); the broker
        # disconnects it when that credential is no longer in force (Auth.in_force).
        self.credential: Credential | None = None
        self.keepalive = 0
        self.last_rx = time.monotonic()
        # Its tick in broker.keepalive (0: not in the wheel): the connect timeout until
        # CONNECT, then the keepalive.
        self._ka_key = 0
        self._read_paused = False
        # devices.schemes that learn variables from published topics (None: none do),
        # and the last topic handed to it (a device repeating one topic costs one compare).
        self._devices = broker.device_learner
        self._device_topic = ""
        # Inbound QoS 1/2 acks in arrival order, and the ingest fast path. A durability
        # future is watched once (the messages of one ingest batch share it), so one
        # callback per batch and connection releases them all. Busy state: made by the
        # first PUBLISH (``_busy``), dropped at a keepalive tick with nothing pending.
        self.inbound: Inbound | None = None
        # MQTT 5 only (made at CONNECT): 3.1.1 has no topic aliases.
        self._inbound_aliases: dict[int, str] | None = None
        self._outbound_aliases: dict[str, int] | None = None  # made at CONNECT if allowed
        self._client_alias_max = 0
        self._client_max_packet = 0  # 0: no limit beyond the protocol's
        # A topic of at most this many characters is within mqtt.max_topic_length (a
        # character is at most 4 UTF-8 bytes) and max_topic_levels (n levels take n - 1
        # characters "/"): one len() decides a PUBLISH's topic limits in the common case.
        self._short_topic = _short_topic(self.cfg.max_topic_length, self.cfg.max_topic_levels)
        self.broker.connection_opened(self)
        # The connect timeout is a wheel entry too (keepalive_due before CONNECT).
        self._ka_key = broker.keepalive.add(self, time.monotonic() + self.cfg.connect_timeout)

    @property
    def info(self) -> ClientInfo | None:
        """What listeners and hooks are told about this client (None before CONNECT
        was accepted); made when asked, so an idle connection holds no ClientInfo."""
        at = self._connected_at
        if at is None:
            return None
        bits = self._connect_bits
        return ClientInfo(
            client_id=self.client_id,
            username=self.username,
            peer=self.peer,
            protocol_version=bits & 7,
            connected_at=at,
            clean_start=bool(bits & 8),
            transport=self.transport_name,
        )

    @property
    def transport(self) -> Any:
        """The port, under the name metrics read (``transport.get_write_buffer_size()``)."""
        return self.port

    def writable(self) -> bool:
        """False while the client's outbound bytes are over their bound (the port's)."""
        return self.port.writable()

    # -- from the transport -----------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the client: decode, then the fast path or one handler per packet."""
        if self.state == CLOSED:
            return
        self.last_rx = time.monotonic()
        self.stats.bytes_received += len(data)
        decoder = self.decoder
        shared = decoder is None
        if decoder is None:
            # CONNECTED, no incomplete packet held: the broker's shared decoder for this
            # protocol; the tail of an incomplete packet gets a decoder of its own.
            decoder = self.broker.decoders[self.version]
        try:
            packets = decoder.feed(data)
            if shared and decoder.buffered:
                self.decoder = decoder.detach()
        except ProtocolError as exc:
            if shared:
                decoder.reset()  # ready for the next connection's bytes
            # The packets before the malformed one count as if they had come in an
            # earlier read (a CONNECT is answered, a PUBLISH routed), then we close.
            if self._held is None and exc.packets:
                try:
                    self._handle(exc.packets, 0)
                except ProtocolError as earlier:
                    exc = earlier
                if self.state == CLOSED:
                    return
            elif self._held is not None:
                self._held.extend(exc.packets)
            held = self._held
            if held is not None:
                # A CONNECT waits for its password check: the error waits with it, last
                # in the held list (raised once the CONNECT is decided).
                if held and isinstance(held[-1], ProtocolError):
                    held[-1] = exc
                else:
                    held.append(exc)
                return
            self._protocol_error(exc)
            return
        try:
            if self._held is not None:
                self._held.extend(packets)  # the CONNECT is still being authenticated
                return
            self._handle(packets, 0)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if self.state == CLOSED or self._held is not None:
            return
        if self.decoder is not None and self.state == CONNECTED and not self.decoder.buffered:
            self.decoder = None  # past CONNECT with nothing incomplete: reads share one
        inbound = self.inbound
        if not self._read_paused and (
            (inbound is not None and inbound.ack_count > self.cfg.receive_maximum)
            or self.broker.ingest_saturated()
        ):
            self.pause_reading()

    def _handle(self, packets: list[Any], i: int) -> None:
        """Handle ``packets`` from index ``i``: the fast path or one handler per packet."""
        inbound = self.inbound
        n = len(packets)
        while i < n:
            if inbound is not None:
                i = inbound.take(packets, i)  # the run of ingest-only PUBLISHes from i, if any
                if i == n:
                    break
            packet = packets[i]
            i += 1
            ptype = packet.packet_type
            if ptype == _PUBLISH:
                if inbound is None and self.state == CONNECTED:
                    # The first PUBLISH since idle: make the busy state, then offer this
                    # packet to the fast path like every other.
                    inbound = self._busy()
                    i -= 1
                    continue
                self._on_publish(packet)
            elif ptype == _PUBACK and self.state == CONNECTED:
                i = self._on_pubacks(packets, i - 1)
            else:
                self._dispatch_control(ptype, packet)
                if self._held is not None:
                    # CONNECT waits for its password check: the rest waits with it.
                    self._held.extend(packets[i:])
                    return
            if self.state == CLOSED:
                return

    def connection_lost(self) -> None:
        """The transport is gone (closed by either side)."""
        self._close("connection_lost")
        self.broker.connection_gone(self)

    def resume_writing(self) -> None:
        """The transport drained below its bound: move queued deliveries out."""
        if self.session is not None and self.session.connection is self:
            self.session.pump()

    # -- flow control ---------------------------------------------------

    def pause_reading(self) -> None:
        if not self._read_paused and self.state != CLOSED:
            self._read_paused = True
            self.port.pause_reading()
            self.broker.reading_paused(self)

    def resume_reading(self) -> None:
        """Resume if nothing still holds this connection back."""
        if not self._read_paused or self.state == CLOSED:
            return
        inbound = self.inbound
        if (
            inbound is not None and inbound.ack_count > self.cfg.receive_maximum
        ) or self.broker.ingest_saturated():
            return
        self._read_paused = False
        self.port.resume_reading()

    # -- writing (the session's Outbound) ---------------------------------

    def send_publish(
        self,
        message: Message,
        qos: int,
        retain: bool,
        sub_ids: list[int] | None,
        packet_id: int,
        dup: bool,
    ) -> bool:
        """Encode and queue one PUBLISH to this client. False if it was dropped."""
        if qos == 0 and not self.writable():
            return False
        topic = message.topic
        if self.version == 5:
            props = message.properties
            if sub_ids or message.expires_at is not None or self._client_alias_max:
                props = dict(props)
                if sub_ids:
                    props[_P_SUB_ID] = sub_ids
                if message.expires_at is not None:
                    props[_P_MESSAGE_EXPIRY] = message.remaining_expiry(time.monotonic())
            new_alias = 0
            aliases = self._outbound_aliases
            if aliases is not None:
                alias = aliases.get(topic)
                if alias is not None:
                    props[_P_TOPIC_ALIAS] = alias
                    topic = ""
                elif len(aliases) < self._client_alias_max:
                    new_alias = len(aliases) + 1
                    props[_P_TOPIC_ALIAS] = new_alias
            data = encode_publish(topic, message.payload, qos, retain, dup, packet_id, props, 5)
            if self._client_max_packet and len(data) > self._client_max_packet:
                # [MQTT-3.1.2-25] never send a packet larger than the client's Maximum Packet Size.
                self.stats.drop("packet_too_large")
                return False
            if new_alias and aliases is not None:
                aliases[topic] = new_alias
        else:
            data = encode_publish(topic, message.payload, qos, retain, dup, packet_id, None, 4)
        self.port.send(data)
        self.stats.messages_delivered[qos] += 1
        return True

    def send_pubrel(self, packet_id: int) -> None:
        self.port.send(encode_ack(_PUBREL, packet_id, 0, self.version))

    def plain_port(self) -> tuple[Port, int, int, list[int]] | None:
        """What the compiled session needs to write this client's PUBLISHes itself
        (``ingestd._session``: as :meth:`send_publish` for one without subscription
        identifiers, expiry or MQTT 5 properties): the port, protocol version, the
        client's Maximum Packet Size (0: none) and the delivered counters. None while
        this client takes outbound Topic Aliases: every PUBLISH then goes through
        :meth:`send_publish`. Asked once per session attach (after CONNECT set both)."""
        if self._outbound_aliases is not None:
            return None
        version = 5 if self.version == 5 else 4
        return self.port, version, self._client_max_packet, self.stats.messages_delivered

    # -- closing --------------------------------------------------------

    def disconnect(self, reason: str, reason_code: int, reason_string: str | None = None) -> None:
        """Close this connection from the server side (v5: DISCONNECT with ``reason_code`` first)."""
        self._close(reason, reason_code, reason_string)

    def _close(
        self, reason: str, reason_code: int | None = None, reason_string: str | None = None
    ) -> None:
        """Idempotent end of the connection: detach the session, then close the socket."""
        if self.state == CLOSED:
            return
        was_connected = self.state == CONNECTED
        self.state = CLOSED
        if self._ka_key:
            self.broker.keepalive.discard(self, self._ka_key)
            self._ka_key = 0
        if self.inbound is not None:
            self.inbound.clear()
        last = b""
        if reason_code is not None and self.version == 5 and was_connected:
            props = {}
            if reason_string:
                props[_P_REASON_STRING] = reason_string
            last = encode(Disconnect(reason_code=reason_code, properties=props), 5)
            if props and self._client_max_packet and len(last) > self._client_max_packet:
                # [MQTT-3.14.2-3] no Reason String that would pass the client's maximum.
                last = encode(Disconnect(reason_code=reason_code), 5)
        self.port.close(last)
        if was_connected:
            self.broker.connection_closed(self, reason)

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.stats.protocol_errors += 1
        log.warning(
            "closing %s (client %r): %s (reason 0x%02X)",
            self.peer,
            self.client_id,
            exc,
            exc.reason_code,
        )
        if self.state == AWAIT_CONNECT:
            # Before a session exists the answer is a CONNACK [MQTT-3.2.2-?]; 3.1.1 clients
            # get one only for an unsupported protocol level (return code 1).
            if exc.reason_code == Reason.UNSUPPORTED_PROTOCOL_VERSION:
                self.port.write_now(
                    encode(Connack(reason_code=ConnackV3.UNACCEPTABLE_PROTOCOL_VERSION), 4)
                )
            elif self.decoder is not None and self.decoder.protocol_version == 5:
                self.port.write_now(encode(Connack(reason_code=exc.reason_code), 5))
        self._close("protocol_error", exc.reason_code, str(exc))

    def _connect_timeout(self) -> None:
        if self.state == AWAIT_CONNECT:
            log.info("closing %s: no CONNECT within %.0f s", self.peer, self.cfg.connect_timeout)
            self._close("protocol_error")

    def keepalive_due(self) -> None:
        """The keepalive wheel's tick for this connection came (the KeepaliveClient):
        its keepalive deadline, or before CONNECT its connect timeout."""
        self._ka_key = 0
        if self.state == AWAIT_CONNECT:
            self._connect_timeout()
            return
        self._keepalive_check()

    def _keepalive_check(self) -> None:
        if self._ka_key:
            self.broker.keepalive.discard(self, self._ka_key)
            self._ka_key = 0
        if self.state != CONNECTED:
            return
        inbound = self.inbound
        if inbound is not None and not inbound.ack_count:
            # Nothing waits for an ack: drop the busy state (ack queue, fast-path topic
            # cache); the next PUBLISH makes it again.
            inbound.clear()
            self.inbound = None
        session = self.session
        if (
            self.inbound is None
            and session is not None
            and session.connection is self
            and session.inbound_qos2 is not None
            and not session.inbound_qos2
        ):
            session.inbound_qos2 = None  # no QoS 2 exchange open: made again on demand
        limit = self.keepalive * 1.5
        idle = time.monotonic() - self.last_rx
        if idle >= limit:
            log.info(
                "closing %s (client %r): keepalive %d s exceeded (%.1f s idle)",
                self.peer,
                self.client_id,
                self.keepalive,
                idle,
            )
            self._close("keepalive_timeout", Reason.KEEP_ALIVE_TIMEOUT)
        else:
            self._ka_key = self.broker.keepalive.add(self, self.last_rx + limit)

    # -- packet handlers --------------------------------------------------

    def _dispatch_control(self, ptype: int, packet: Any) -> None:
        if self.state == AWAIT_CONNECT:
            if ptype != PacketType.CONNECT:
                raise ProtocolError(
                    "first packet must be CONNECT [MQTT-3.1.0-1]", Reason.PROTOCOL_ERROR
                )
            self._on_connect(packet)
        elif ptype == _PUBACK:
            assert self.session is not None
            self.session.on_puback(packet.packet_id)
        elif ptype == _PUBREC:
            assert self.session is not None
            if self.session.on_pubrec(packet.packet_id, packet.reason_code):
                if packet.reason_code < _FIRST_FAILURE:
                    self.send_pubrel(packet.packet_id)
            elif self.version == 5:
                self.port.send(
                    encode_ack(_PUBREL, packet.packet_id, Reason.PACKET_IDENTIFIER_NOT_FOUND, 5)
                )
            else:
                self.send_pubrel(packet.packet_id)
        elif ptype == _PUBREL:
            self._on_pubrel(packet)
        elif ptype == _PUBCOMP:
            assert self.session is not None
            self.session.on_pubcomp(packet.packet_id)
        elif ptype == PacketType.SUBSCRIBE:
            self._on_subscribe(packet)
        elif ptype == PacketType.UNSUBSCRIBE:
            self._on_unsubscribe(packet)
        elif ptype == PacketType.PINGREQ:
            self.port.send(PINGRESP)
        elif ptype == PacketType.DISCONNECT:
            self._on_disconnect(packet)
        elif ptype == PacketType.CONNECT:
            raise ProtocolError(
                "a second CONNECT is a protocol error [MQTT-3.1.0-2]", Reason.PROTOCOL_ERROR
            )
        elif ptype == PacketType.AUTH:
            raise ProtocolError(
                "AUTH without an authentication method in CONNECT [MQTT-4.12.0-1]",
                Reason.PROTOCOL_ERROR,
            )
        else:  # pragma: no cover - the decoder rejects server-to-client packets
            raise ProtocolError(f"unexpected packet type {ptype}", Reason.PROTOCOL_ERROR)

    def _on_pubacks(self, packets: list[Any], i: int) -> int:
        """The run of PUBACKs at ``packets[i]``: each completes its delivery (as
        ``Session.on_puback``), then the session is pumped once for the whole run."""
        session = self.session
        assert session is not None
        i, acked, journaled = take_pubacks(packets, i, session.inflight)
        if acked:
            session.acked(journaled)
        return i

    def _refuse_connect(self, reason_code: int, why: str) -> None:
        log.info(
            "refusing CONNECT from %s (client %r, user %r): %s",
            self.peer,
            self.client_id,
            self.username,
            why,
        )
        if self.version == 5:
            props = {_P_REASON_STRING: why}
            data = encode(Connack(reason_code=reason_code, properties=props), 5)
            if self._client_max_packet and len(data) > self._client_max_packet:
                # [MQTT-3.2.2-19] no Reason String that would pass the client's maximum.
                data = encode(Connack(reason_code=reason_code), 5)
            self.port.write_now(data)
        else:
            self.port.write_now(encode(Connack(reason_code=connack_v3_code(reason_code)), 4))
        self._close("protocol_error")

    def _on_connect(self, p: Any) -> None:
        self.version = 5 if p.protocol_level == 5 else 4
        if self._ka_key:  # the connect timeout
            self.broker.keepalive.discard(self, self._ka_key)
            self._ka_key = 0
        props = p.properties
        self.client_id = p.client_id
        self.username = p.username
        # Known before any refusal: a refusing CONNACK must fit it too.
        self._client_max_packet = props.get(Prop.MAXIMUM_PACKET_SIZE, 0)
        if Prop.AUTHENTICATION_METHOD in props:
            self._refuse_connect(
                Reason.BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported"
            )
            return
        assigned = None
        if not p.client_id:
            if self.version < 5 and not p.clean_start:
                # [MQTT-3.1.3-8] an empty id needs clean session 1 in 3.1.1.
                self._refuse_connect(
                    Reason.CLIENT_IDENTIFIER_NOT_VALID, "empty client id needs clean session"
                )
                return
            assigned = self.client_id = self.broker.registry.assign_client_id()
        limit = self.broker.admit(self)
        if limit is not None:
            self._refuse_connect(Reason.QUOTA_EXCEEDED, limit)
            return
        auth = self.broker.auth
        if auth.refused_peer(self.peer):
            auth.rate_limited()
            self._refuse_connect(
                Reason.CONNECTION_RATE_EXCEEDED, "too many failed logins from this address"
            )
            return
        # What a TLS client's user name comes from (its certificate), or None (CONNECT).
        cert_identity = (
            identity_mode(self.broker.config.server)
            if self.transport_name in _TLS_TRANSPORTS
            else None
        )
        if cert_identity is not None:
            # The user name is the certificate's (server.tls_use_identity_as_username /
            # _subject_): CONNECT's user name and password are ignored, as in Mosquitto.
            name = certificate_username(self.port.peer_certificate(), cert_identity)
            if name is None:
                self._refuse_connect(
                    auth.certificate_refused(self.peer),
                    f"no client certificate with a {cert_identity} to take as user name",
                )
                return
            self.username = name
            self._on_connect_authenticated(p, assigned, Verdict(0))
            return
        quick = auth.check_anonymous(p.username, self.peer)
        if quick is None:
            # A password to check: in a thread. Nothing after this CONNECT is handled,
            # and nothing more is read, until it is decided.
            self._held = []
            self.pause_reading()
            task = self.broker.loop.create_task(
                auth.authenticate(p.username, p.password, self.peer, self.client_id)
            )
            self.broker.auth_tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(lambda t: self._authenticated(p, assigned, t))
            return
        self._on_connect_authenticated(
            p, assigned, Verdict(quick, "not authorized (no user name)" if quick else "")
        )

    def _authenticated(self, p: Any, assigned: str | None, task: asyncio.Task[Verdict]) -> None:
        """The password check of a CONNECT ended: go on with it, then what came after."""
        held = self._held or []
        self._held = None
        self.broker.auth_tasks.discard(task)
        if self.state == CLOSED or task.cancelled():
            return
        try:
            verdict = task.result()
        except Exception:
            log.exception("password check failed for %s", self.peer)
            verdict = Verdict(Reason.UNSPECIFIED_ERROR, "authentication failed")
        error = held.pop() if held and isinstance(held[-1], ProtocolError) else None
        try:
            self._on_connect_authenticated(p, assigned, verdict)
            if self.state == CONNECTED and held:
                self._handle(held, 0)
            if error is not None and self.state != CLOSED:
                raise error
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if self.state != CLOSED:
            self.resume_reading()

    def _on_connect_authenticated(self, p: Any, assigned: str | None, verdict: Verdict) -> None:
        cfg = self.cfg
        props = p.properties
        if verdict.reason:
            self._refuse_connect(verdict.reason, verdict.why or "authentication failed")
            return
        auth = self.broker.auth
        cred = verdict.credential
        if cred is not None and not auth.in_force(self.username or "", self.client_id, cred):
            # Disabled, deleted or changed while its password was being checked.
            self._refuse_connect(Reason.SERVER_UNAVAILABLE, "credentials changed; try again")
            return
        self.credential = cred
        self.acl = acl = auth.client_acl(self.username, self.client_id)
        will = p.will
        if will is not None:
            if not validate_topic_name(will.topic):
                self._refuse_connect(Reason.TOPIC_NAME_INVALID, "invalid will topic")
                return
            over = topic_over_limit(will.topic, cfg.max_topic_length, cfg.max_topic_levels)
            if over is not None:
                self._topic_limit(over, "will topic", will.topic)
                self._refuse_connect(
                    Reason.TOPIC_NAME_INVALID, f"will topic over mqtt.{over} ({self._bound(over)})"
                )
                return
            if will.retain and not cfg.retain_available:
                self._refuse_connect(Reason.RETAIN_NOT_SUPPORTED, "retain is not available")
                return
            if not auth.may_publish(acl, will.topic):
                self.stats.acl_denied_publish += 1
                self._refuse_connect(
                    Reason.NOT_AUTHORIZED,
                    f"the ACL does not let it publish its will to {will.topic!r}",
                )
                return
        # Session Expiry: v5 asks for it (default 0); 3.1.1 clean session 0 means "keep".
        if self.version == 5:
            asked = props.get(Prop.SESSION_EXPIRY_INTERVAL, 0)
            expiry = asked if asked == NEVER_EXPIRES else min(asked, cfg.max_session_expiry)
            if asked == NEVER_EXPIRES and cfg.max_session_expiry < NEVER_EXPIRES:
                expiry = cfg.max_session_expiry
        else:
            asked = expiry = 0 if p.clean_start else cfg.persistent_session_expiry
        keepalive = p.keepalive
        server_keepalive = None
        if self.version == 5 and (
            keepalive > cfg.max_keepalive or (keepalive == 0 and cfg.max_keepalive < 65_535)
        ):
            keepalive = server_keepalive = cfg.max_keepalive
        self.keepalive = keepalive
        self._client_alias_max = props.get(Prop.TOPIC_ALIAS_MAXIMUM, 0)
        if self.version == 5:
            self._inbound_aliases = {}
        if self._client_alias_max:
            self._outbound_aliases = {}
        if self.decoder is not None:
            self.decoder.max_packet_size = cfg.max_packet_size

        clean_start = p.clean_start
        if acl is not None and not clean_start:
            old = self.broker.registry.sessions.get(self.client_id)
            if old is not None and (not old.user_known or old.username != self.username):
                # Another user's session (its subscriptions, its queued messages, read
                # under that user's ACL) is not handed over: this client starts clean.
                clean_start = True
        session, present = self.broker.registry.attach(self, self.client_id, clean_start)
        self.session = session
        session.username = self.username
        session.user_known = True
        session.acl = acl
        session.expiry_interval = expiry
        session.send_window = min(props.get(Prop.RECEIVE_MAXIMUM, 65_535), cfg.max_inflight)
        self.will = WillSpec(will, self.client_id, self.username) if will is not None else None
        self.state = CONNECTED

        if self.version == 5:
            cprops: dict[int, Any] = {
                int(Prop.RECEIVE_MAXIMUM): cfg.receive_maximum,
                int(Prop.MAXIMUM_PACKET_SIZE): cfg.max_packet_size,
                int(Prop.TOPIC_ALIAS_MAXIMUM): cfg.topic_alias_maximum,
            }
            if assigned is not None:
                cprops[int(Prop.ASSIGNED_CLIENT_IDENTIFIER)] = assigned
            if server_keepalive is not None:
                cprops[int(Prop.SERVER_KEEP_ALIVE)] = server_keepalive
            if expiry != asked:
                cprops[int(Prop.SESSION_EXPIRY_INTERVAL)] = expiry
            if not cfg.retain_available:
                cprops[int(Prop.RETAIN_AVAILABLE)] = 0
            self.port.send(
                encode(Connack(session_present=present, reason_code=0, properties=cprops), 5)
            )
        else:
            self.port.send(encode(Connack(session_present=present, reason_code=0), 4))
        if keepalive:
            self._ka_key = self.broker.keepalive.add(self, time.monotonic() + keepalive * 1.5)
        self._connect_bits = p.protocol_level | (8 if p.clean_start else 0)
        self._connected_at = time.time()
        self.broker.client_connected(self)
        if present:
            session.resend_inflight()
            session.pump()

    def _busy(self) -> Inbound:
        """The inbound state of a CONNECTED connection that publishes (made on demand)."""
        inbound = self.inbound
        if inbound is None:
            inbound = self.inbound = Inbound(self._ack_ready, self.port.send)
            if self.broker.config.ingest.fast_path and self.session is not None:
                self._attach_fast_path(self.session)
        return inbound

    def _attach_fast_path(self, session: Session) -> None:
        """Let ``inbound.take`` handle runs of ingest-only PUBLISHes (now CONNECTED).

        With an ACL the classifier is wrapped for this connection: a topic the
        client may not write is "not for the fast path" (None), so it goes to
        ``_on_publish``, which refuses it. The classification cache lives in this
        connection's ``Inbound`` (never shared), and attaching again drops it.
        """
        classify = self.broker.router.classify  # one bound method for all connections
        acl = self.acl
        if acl is not None:
            target = classify
            may_publish = acl.may_publish

            def classify(topic: str) -> Any:
                return target(topic) if may_publish(topic) else None

        assert self.inbound is not None
        devices = self._devices
        if devices is not None:
            # The fast path asks once per topic (until the trie changes): the device
            # schemes learn the topic's variables then, never per message.
            classified = classify

            def classify(topic: str) -> Any:
                t = classified(topic)
                if t is not None:
                    session.device_vars = devices.learn(session.device_vars, topic)
                return t

        self.inbound.attach(
            self.version,
            self.cfg.receive_maximum,
            self.broker.trie,
            classify,
            self.client_id,
            self.username,
            session.qos2_ids(),
            self.stats,
            self._inbound_aliases,
            self.cfg.topic_alias_maximum,
            self.cfg.max_topic_length,
            self.cfg.max_topic_levels,
        )

    def _on_publish(self, p: Any) -> None:
        if self.state != CONNECTED:
            raise ProtocolError(
                "first packet must be CONNECT [MQTT-3.1.0-1]", Reason.PROTOCOL_ERROR
            )
        topic = p.topic
        props = p.properties
        expires_at = None
        if props:
            alias = props.get(_P_TOPIC_ALIAS)
            if alias is not None:
                if alias > self.cfg.topic_alias_maximum:
                    raise ProtocolError(
                        f"topic alias {alias} exceeds our Topic Alias Maximum"
                        f" {self.cfg.topic_alias_maximum} [MQTT-3.3.2-9]",
                        Reason.TOPIC_ALIAS_INVALID,
                    )
                aliases = self._inbound_aliases
                assert aliases is not None  # made at CONNECT for MQTT 5 (3.1.1 has no props)
                if topic:
                    aliases[alias] = topic
                else:
                    known = aliases.get(alias)
                    if known is None:
                        raise ProtocolError(
                            f"topic alias {alias} used before it was set [MQTT-3.3.4-?]",
                            Reason.PROTOCOL_ERROR,
                        )
                    topic = known
                props = dict(props)
                del props[_P_TOPIC_ALIAS]
            expiry = props.get(_P_MESSAGE_EXPIRY)
            if expiry is not None:
                expires_at = time.monotonic() + expiry
        if p.retain and not self.cfg.retain_available:
            raise ProtocolError(
                "retain is not available [MQTT-3.3.1-?]", Reason.RETAIN_NOT_SUPPORTED
            )
        qos = p.qos
        self.stats.messages_received[qos] += 1
        session = self.session
        assert session is not None
        if len(topic) > self._short_topic:
            cfg = self.cfg
            over = topic_over_limit(topic, cfg.max_topic_length, cfg.max_topic_levels)
            if over is not None:
                self._topic_limit(over, "PUBLISH to", topic)
                self._refuse_publish(p, topic, Reason.TOPIC_NAME_INVALID)
                return
        acl = self.acl  # mqtt.acl_file: None when no ACL is configured
        if acl is not None:
            bits = acl.decided.get(topic)  # acl.may_publish, inlined
            if bits is None:
                bits = acl.access(topic)
            if not bits & WRITE:
                self.stats.acl_denied_publish += 1
                log.debug("client %r may not publish to %r: dropped", self.client_id, topic)
                self._refuse_publish(p, topic, Reason.NOT_AUTHORIZED)
                return
        elif topic[0] == "$" and not may_write_dollar(topic):
            # No acl_file, and still no client writes $SYS (the broker's statistics).
            self.stats.acl_denied_publish += 1
            log.debug("client %r may not publish to %r: dropped", self.client_id, topic)
            self._refuse_publish(p, topic, Reason.NOT_AUTHORIZED)
            return
        if self._devices is not None and topic != self._device_topic:
            self._device_topic = topic
            session.device_vars = self._devices.learn(session.device_vars, topic)
        message = Message(
            topic, p.payload, qos, p.retain, props, self.client_id, self.username, None, expires_at
        )
        if qos == 0:
            self.broker.router.publish(message, session)
            return
        pid = p.packet_id
        qos2 = session.inbound_qos2
        if qos == 2 and qos2 is not None and pid in qos2:
            # QoS 2 is routed once: a re-sent PUBLISH with a pending id only gets PUBREC again.
            self._queue_ack(None, _PUBREC, pid, 2)
            return
        if (
            self.version == 5
            and self._busy().pending_qos1 + len(qos2 or ()) >= self.cfg.receive_maximum
        ):
            raise ProtocolError(
                "more unacknowledged QoS 1/2 PUBLISH than our Receive Maximum [MQTT-3.3.4-9]",
                Reason.RECEIVE_MAXIMUM_EXCEEDED,
            )
        if qos == 1:
            durable = self.broker.router.publish(message, session)
            self._queue_ack(durable, _PUBACK, pid, 1)
        else:
            session.qos2_ids().add(pid)
            durable = self.broker.router.publish(message, session)
            self._queue_ack(durable, _PUBREC, pid, 2)

    def _refuse_publish(self, p: Any, topic: str, reason: int) -> None:
        """A PUBLISH the ACL (or a topic limit) does not allow: never routed (nor
        ingested), the connection kept. As Mosquitto for the ACL: v5 PUBACK/PUBREC
        ``reason`` (0x87, 0x90); 3.1.1 the plain PUBACK/PUBREC (it has no failure
        code [MQTT-3.3.5-2]), so the client does not re-send it."""
        qos = p.qos
        if qos == 0:
            return
        pid = p.packet_id
        ptype = _PUBACK if qos == 1 else _PUBREC
        # In arrival order behind acks still held for durability [MQTT-4.6.0-2]. 3.1.1:
        # a PUBREL follows a PUBREC; _on_pubrel answers PUBCOMP for an id it does not hold.
        ack = self._busy().queue(None, ptype, pid, qos, reason if self.version == 5 else 0)
        if ack is not None:
            self.port.send(ack)

    def _bound(self, key: str) -> str:
        return f"{getattr(self.cfg, key)}{' bytes' if key == 'max_topic_length' else ''}"

    def _topic_limit(self, key: str, what: str, topic: str) -> None:
        """Count and log (rate-limited) a topic over mqtt.max_topic_length / _levels."""
        shown = topic if len(topic) <= 200 else f"{topic[:200]}... ({len(topic)} characters)"
        self.broker.limits.hit(
            key,
            f"client {self.client_id!r} (user {self.username!r}, {self.peer}): {what}"
            f" {shown!r} refused, over {self._bound(key)}",
        )

    def revoke(self) -> None:
        """Its credential was disabled, deleted or changed: nothing more is read or written
        for it (its will included), and it is closed with v5 DISCONNECT 0x98
        Administrative action (docs/security.md says why not 0x87)."""
        if self.state != CONNECTED:
            return
        self.acl = acl = revoked_acl(self.client_id)
        session = self.session
        if session is not None and session.connection is self:
            session.acl = acl
        self.stats.credentials_revoked += 1
        log.warning(
            "disconnecting %s (client %r, user %r): credentials revoked",
            self.peer,
            self.client_id,
            self.username,
        )
        self._close("credentials_revoked", Reason.ADMINISTRATIVE_ACTION, "credentials revoked")

    def refresh_acl(self) -> None:
        """The ACL file was reloaded: take this client's new ACL (session and fast path too)."""
        if self.state != CONNECTED:
            return
        self.acl = acl = self.broker.auth.client_acl(self.username, self.client_id)
        session = self.session
        if session is not None and session.connection is self:
            session.acl = acl
            if self.inbound is not None and self.inbound.enabled:
                self._attach_fast_path(session)

    def _queue_ack(self, fut: asyncio.Future[Any] | None, ptype: int, pid: int, qos: int) -> None:
        ack = self._busy().queue(fut, ptype, pid, qos)
        if ack is not None:
            self.port.send(ack)

    def _ack_ready(self, _fut: asyncio.Future[Any]) -> None:
        """A durability future completed: send every ack it (and those done before) frees."""
        if self.state == CLOSED or self.inbound is None:
            return  # (None: its acks were released by an earlier future's callback)
        # Every ack at the head whose future is done leaves now, in order, as one write.
        out, failed = self.inbound.release()
        if out:
            self.port.send(out)
        if failed is not None:
            # Not durable: withhold the ack and drop the connection so the client
            # re-sends (at least once). A QoS 2 id must be routable again.
            fut, pid, qos = failed
            if qos == 2 and self.session is not None and self.session.inbound_qos2 is not None:
                self.session.inbound_qos2.discard(pid)
            log.warning(
                "closing %s (client %r): message could not be stored: %s",
                self.peer,
                self.client_id,
                None if fut.cancelled() else fut.exception(),
            )
            self._close("overloaded", Reason.UNSPECIFIED_ERROR, "message could not be stored")
            return
        if self._read_paused:
            self.resume_reading()

    def _on_pubrel(self, p: Any) -> None:
        session = self.session
        assert session is not None
        qos2 = session.inbound_qos2
        if qos2 is not None and p.packet_id in qos2:
            # Still waiting for durability of this id? Its PUBREC was sent only after it,
            # so a PUBREL can only follow a durable message.
            qos2.discard(p.packet_id)
            self.port.send(encode_ack(_PUBCOMP, p.packet_id, 0, self.version))
        else:
            code = Reason.PACKET_IDENTIFIER_NOT_FOUND if self.version == 5 else 0
            self.port.send(encode_ack(_PUBCOMP, p.packet_id, code, self.version))

    def _on_subscribe(self, p: Any) -> None:
        session = self.session
        assert session is not None
        ids = p.properties.get(_P_SUB_ID)
        sub_id = ids[0] if ids else 0
        codes: list[int] = []
        retained: list[tuple[str, SubOptions]] = []
        v5 = self.version == 5
        failure = Reason.TOPIC_FILTER_INVALID if v5 else SUBACK_V3_FAILURE
        cfg = self.cfg
        max_subs = cfg.max_subscriptions_per_client
        for flt, qos, no_local, rap, rh in p.subscriptions:
            if not validate_topic_filter(flt):
                codes.append(failure)
                continue
            over = topic_over_limit(flt, cfg.max_topic_length, cfg.max_topic_levels)
            if over is not None:
                # 0x8F: "correctly formed but not allowed for this Client".
                self._topic_limit(over, "SUBSCRIBE to", flt)
                codes.append(failure)
                continue
            if (
                max_subs
                and len(session.subscriptions) >= max_subs
                and flt not in session.subscriptions
            ):
                self.broker.limits.hit(
                    "max_subscriptions_per_client",
                    f"client {self.client_id!r} (user {self.username!r}, {self.peer}) may not"
                    f" subscribe to {flt!r}: it holds {max_subs} subscriptions",
                )
                codes.append(Reason.QUOTA_EXCEEDED if v5 else SUBACK_V3_FAILURE)
                continue
            shared = flt.startswith("$share/")
            if shared and no_local:
                raise ProtocolError(
                    "No Local must not be set on a shared subscription [MQTT-3.8.3-4]",
                    Reason.PROTOCOL_ERROR,
                )
            if not self.broker.auth.may_subscribe(self.acl, flt):
                codes.append(Reason.NOT_AUTHORIZED if v5 else SUBACK_V3_FAILURE)
                continue
            granted = min(qos, 2)
            opts = SubOptions(granted, no_local, rap, rh, sub_id)
            existed = self.broker.registry.subscribe(session, flt, opts)
            codes.append(granted)
            if not shared and (rh == 0 or (rh == 1 and not existed)):
                retained.append((flt, opts))
        self.port.send(encode(Suback(packet_id=p.packet_id, reason_codes=codes), self.version))
        # Retained messages go after the SUBACK [MQTT-3.8.4-4 ordering], as they would be
        # delivered to a new subscription: RETAIN set [MQTT-3.3.1-8].
        if retained:
            now = time.monotonic()
            acl = self.acl
            for flt, opts in retained:
                ids_ = [opts.sub_id] if opts.sub_id else None
                for msg in self.broker.retained.match(flt):
                    if msg.expired(now):
                        continue
                    if acl is not None and not acl.may_read(msg.topic):
                        self.stats.acl_denied_read += 1
                        continue
                    session.deliver(msg, min(msg.qos, opts.qos), True, ids_)

    def _on_unsubscribe(self, p: Any) -> None:
        session = self.session
        assert session is not None
        codes = [
            0 if self.broker.registry.unsubscribe(session, flt) else Reason.NO_SUBSCRIPTION_EXISTED
            for flt in p.topic_filters
        ]
        self.port.send(encode(Unsuback(packet_id=p.packet_id, reason_codes=codes), self.version))

    def _on_disconnect(self, p: Any) -> None:
        session = self.session
        assert session is not None
        if self.version == 5:
            new_expiry = p.properties.get(Prop.SESSION_EXPIRY_INTERVAL)
            if new_expiry is not None:
                if session.expiry_interval == 0 and new_expiry != 0:
                    raise ProtocolError(
                        "Session Expiry Interval set in DISCONNECT after 0 in CONNECT"
                        " [MQTT-3.14.2-2]",
                        Reason.PROTOCOL_ERROR,
                    )
                session.expiry_interval = min(new_expiry, self.cfg.max_session_expiry)
        if p.reason_code == Reason.DISCONNECT_WITH_WILL_MESSAGE:
            self._close("will")
        else:
            # A normal DISCONNECT discards the will [MQTT-3.1.2-10].
            self.will = None
            self._close("normal")
