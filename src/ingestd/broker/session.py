"""Session: the MQTT session state that outlives a network connection.

Theory of operation
-------------------
A Session is created by the first CONNECT with its client id and lives until
it expires (Session Expiry Interval after its connection ends; 0 = at once)
or a later CONNECT with Clean Start discards it. It holds:

* ``subscriptions`` — filter -> :class:`SubOptions`; the same entries are in
  the broker's :class:`SubscriptionTrie` with this session as subscriber.
* ``inflight`` — outbound QoS 1/2 deliveries sent and not yet completed,
  by packet id, in send order. Each is in one state:
  ``PUBLISH sent`` (waiting for PUBACK / PUBREC) or ``PUBREL sent`` (waiting
  for PUBCOMP). Its size never exceeds ``send_window`` (the client's Receive
  Maximum capped by our ``max_inflight``).
* ``queue`` — QoS 1/2 deliveries not yet sent: waiting for a free inflight
  slot, for the socket to drain, or for the client to come back. Bounded in
  memory by ``max_queued_messages`` / ``max_queued_bytes``, past which a
  session may borrow from the broker-wide :class:`QueuePool`
  (``mqtt.queue_pool_bytes``, shared by all sessions; ``pooled`` is what it
  holds, given back as its queue drains), so a burst stays in memory.
* ``overflow`` — the deliveries past those bounds, on disk
  (:class:`ingestd.broker.overflow.OverflowQueue`, made on first use; the
  broker's :class:`OverflowStore` holds the disk budget). Once it holds
  anything, every new QoS 1/2 delivery goes there too, so order is kept;
  ``pump`` refills ``queue`` from its head when ``queue`` runs empty. Past
  the disk budget a delivery is dropped and counted (``overflow_full``);
  without a store (``mqtt.overflow_max_bytes = 0``) one past the memory
  bound is dropped and counted (``session_queue_full``).
* ``inbound_qos2`` — packet ids of QoS 2 PUBLISHes received and PUBREC'd
  whose PUBREL has not arrived. A re-sent PUBLISH with such an id is not
  routed again (exactly once).

Transitions of an outbound delivery::

    deliver() ──(window full / offline / socket busy)──► queue ──(full, pool spent)──► overflow
        │                                                  │ pump()   ◄─(refill)─┘
        ▼                                                  ▼
    QoS 0: written (or dropped if the socket is over its bound)
    QoS 1: inflight[PUBLISH] ──PUBACK──► done
    QoS 2: inflight[PUBLISH] ──PUBREC──► inflight[PUBREL] ──PUBCOMP──► done

On resume (CONNECT with Clean Start 0 finding this session), every inflight
entry is re-sent: PUBLISH with DUP=1, PUBREL as is [MQTT-4.4.0-1]; then the
queue is pumped.

Durability: while a session is persistent (``expiry_interval != 0``) and the
broker has a store, each QoS 1/2 delivery is put in the store's journal when
it is accepted (sent, queued, or in the overflow) and taken out when it
completes (PUBACK, PUBCOMP, a refusing PUBREC) or is dropped (expired, too
large, past the overflow budget). The journal is
written behind, so after a crash the deliveries accepted more than one
``persistence.flush_interval_ms`` earlier come back queued, in order; ones
that had completed within that time may come back too (at least once).
With ``persistence.ack_after_journal`` the publisher's acknowledgement waits
for the journal (``deliver`` says whether it journaled), so every
acknowledged delivery comes back.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

from ingestd.broker.empty import NO_ENTRIES
from ingestd.broker.message import Message
from ingestd.mqtt.constants import Prop, Reason

if TYPE_CHECKING:
    from asyncio import TimerHandle

    from ingestd.broker.acl import ClientAcl
    from ingestd.broker.hooks import BrokerStats
    from ingestd.broker.overflow import OverflowQueue, OverflowStore, Taken

NEVER_EXPIRES = 0xFFFFFFFF
# Reason codes from 0x80 up are failures [MQTT-2.4].
_FIRST_FAILURE = int(Reason.UNSPECIFIED_ERROR)
# Records taken from the overflow per call while refilling the memory queue: the
# memory queue's byte bound may be passed by at most this many deliveries.
REFILL_BATCH = 64


class Outbound(Protocol):
    """Where a session's deliveries go while its client is connected (the
    client's :class:`ingestd.broker.channel.Channel`)."""

    def send_publish(
        self,
        message: Message,
        qos: int,
        retain: bool,
        sub_ids: list[int] | None,
        packet_id: int,
        dup: bool,
    ) -> bool:
        """Encode and queue one PUBLISH; False if it was dropped (QoS 0 over the
        outbound bound, or larger than the client's Maximum Packet Size)."""
        ...

    def send_pubrel(self, packet_id: int) -> None: ...

    def writable(self) -> bool:
        """False while the client's outbound bytes are over their bound."""
        ...


class DeliveryJournal(Protocol):
    """Where a persistent session's QoS 1/2 deliveries are kept until they complete.

    Implemented by the broker store (write-behind: both calls only record).
    ``put`` assigns ``d.seq``; ``done`` forgets it. A session that ends is
    forgotten whole through ``BrokerStore.session_deleted``.
    """

    def put(self, client_id: str, d: Delivery) -> None: ...

    def done(self, client_id: str, d: Delivery) -> None: ...

    def durable_future(self) -> asyncio.Future[None]:
        """Resolved once every put and done recorded so far is committed (never fails)."""
        ...


class SubOptions:
    """One subscription's options as granted."""

    __slots__ = ("no_local", "qos", "retain_as_published", "retain_handling", "sub_id")

    def __init__(
        self,
        qos: int,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        sub_id: int = 0,
    ) -> None:
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling
        self.sub_id = sub_id

    def __repr__(self) -> str:
        return (
            f"SubOptions(qos={self.qos}, nl={self.no_local}, rap={self.retain_as_published},"
            f" rh={self.retain_handling}, id={self.sub_id})"
        )


class Delivery:
    """One outbound QoS 1/2 delivery: a shared message plus this session's view of it."""

    __slots__ = ("message", "packet_id", "qos", "retain", "seq", "state", "sub_ids")

    # states
    QUEUED = 0
    PUBLISH_SENT = 1
    PUBREL_SENT = 2

    def __init__(self, message: Message, qos: int, retain: bool, sub_ids: list[int] | None) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        self.packet_id = 0
        self.state = Delivery.QUEUED
        # Its key in the broker store's delivery journal (0: not journaled).
        self.seq = 0


# Memory a queued delivery costs beyond its payload and topic bytes (the Delivery, the
# Message, the bytes and str headers, the deque slot): measured with tracemalloc over
# 100,000 queued 100-byte deliveries (537 bytes each, 134 of them payload and topic).
DELIVERY_OVERHEAD = 400


class QueuePool:
    """Broker-wide memory (``mqtt.queue_pool_bytes``) for sessions past their own queue
    bounds: a burst is held in memory while the pool has room, and only the rest goes to
    the disk overflow. Charged per delivery as payload + topic + DELIVERY_OVERHEAD."""

    __slots__ = ("max_bytes", "peak", "used")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0


class Session:
    """MQTT session state; see the module docstring for the state machine."""

    __slots__ = (
        "acl",
        "client_id",
        "connection",
        "device_vars",
        "expiry_handle",
        "expiry_interval",
        "inbound_qos2",
        "inflight",
        "journal",
        "max_queued_bytes",
        "max_queued_messages",
        "next_packet_id",
        "overflow",
        "overflow_store",
        "pool",
        "pooled",
        "queue",
        "queued_bytes",
        "send_window",
        "stats",
        "subscriptions",
        "user_known",
        "username",
        "will",
        "will_handle",
    )

    def __init__(
        self,
        client_id: str,
        stats: BrokerStats,
        max_queued_messages: int,
        max_queued_bytes: int,
        overflow_store: OverflowStore | None = None,
        pool: QueuePool | None = None,
    ) -> None:
        self.client_id = client_id
        self.stats = stats
        # The user name of its last connection (None: anonymous, or restored from the store).
        self.username: str | None = None
        self.user_known = True  # False: restored from a store row that did not keep it
        # The ACL its messages are read under (mqtt.acl_file; None: no ACL configured).
        # Set from its last connection (Auth.client_acl); the router checks it on
        # every delivery, so it also governs while the session is offline.
        self.acl: ClientAcl | None = None
        # The connected client's outbound side (None: offline).
        self.connection: Outbound | None = None
        # Both start as the shared NO_ENTRIES (an idle client holds no empty dicts).
        self.subscriptions: dict[str, SubOptions] = NO_ENTRIES
        # Plain dicts keep insertion (send) order; OrderedDict would cost more per session.
        self.inflight: dict[int, Delivery] = NO_ENTRIES
        # Created on first use: an empty deque costs ~760 bytes, and most sessions never queue.
        self.queue: deque[Delivery] | None = None
        self.queued_bytes = 0
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        # Where deliveries past the memory bound go (None: nowhere, they are dropped);
        # this session's queue in it is made on first use.
        self.overflow_store = overflow_store
        self.overflow: OverflowQueue | None = None
        # The broker-wide memory a session past its own bounds may borrow before the disk
        # (None: none), and how much of it this session holds (released as its queue drains).
        self.pool = pool
        self.pooled = 0
        # Made on demand (``qos2_ids``; an empty set costs 216 bytes, and an idle
        # connection's session needs none); its channel drops it again when idle.
        self.inbound_qos2: set[int] | None = None
        self.next_packet_id = 1
        self.send_window = 65_535
        self.expiry_interval = 0
        self.expiry_handle: TimerHandle | None = None
        # A will waiting for its Will Delay Interval after the connection ended.
        self.will: WillSpec | None = None
        self.will_handle: TimerHandle | None = None
        # The broker store's delivery journal (None: no store). While the session is
        # persistent (expiry_interval != 0) each QoS 1/2 delivery is journaled from the
        # moment it is accepted until it completes, so a crash does not lose it.
        self.journal: DeliveryJournal | None = None
        # Template variables of the last topic it published that matched a device
        # scheme's ``match``, by scheme index (devices.schemes; None: none learned).
        # Memory only: after a restart they are learned again from its next publish.
        self.device_vars: dict[int, dict[str, str]] | None = None

    # -- outbound ---------------------------------------------------------

    def deliver(
        self,
        message: Message,
        qos: int,
        retain: bool,
        sub_ids: list[int] | None,
        seq: int = 0,
    ) -> bool:
        """Deliver one message to this session at ``qos`` (already min'd with the grant).

        ``seq``: the delivery's journal key when it is restored from the journal.
        Returns True if the delivery was recorded in the journal just now.
        """
        conn = self.connection
        if qos == 0:
            if conn is None:
                # QoS 0 is not queued for offline sessions (as Mosquitto's default).
                return False
            if not conn.send_publish(message, 0, retain, sub_ids, 0, False):
                self.stats.drop("qos0_queue_full")
            return False
        if self.overflow:  # not empty: later deliveries wait behind it, in order
            return self._to_overflow(message, qos, retain, sub_ids, seq)
        d = Delivery(message, qos, retain, sub_ids)
        if seq:
            d.seq = seq
        if (
            conn is not None
            and not self.queue
            and len(self.inflight) < self.send_window
            and conn.writable()
        ):
            journaled = self._accepted(d)
            self._send_new(conn, d)
            return journaled
        size = len(message.payload) + len(message.topic)
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        if (
            len(queue) >= self.max_queued_messages
            or self.queued_bytes + size > self.max_queued_bytes
        ):
            # Past this session's own bounds: borrow from the broker-wide pool, else disk.
            pool = self.pool
            charge = size + DELIVERY_OVERHEAD
            if pool is None or pool.used + charge > pool.max_bytes:
                return self._to_overflow(message, qos, retain, sub_ids, seq)
            pool.used += charge
            if pool.used > pool.peak:
                pool.peak = pool.used
            self.pooled += charge
        journaled = self._accepted(d)
        queue.append(d)
        self.queued_bytes += size
        return journaled

    def _to_overflow(
        self,
        message: Message,
        qos: int,
        retain: bool,
        sub_ids: list[int] | None,
        seq: int,
    ) -> bool:
        """The memory queue is full (or the overflow is not empty): the delivery goes to
        disk, or is dropped and counted if there is no overflow or its budget is spent.
        No :class:`Delivery` is built unless the journal needs one (the hot path of a
        subscriber far behind its publishers)."""
        store = self.overflow_store
        journaled = False
        d: Delivery | None = None
        if store is not None:
            overflow = self.overflow
            if overflow is None:
                overflow = self.overflow = store.queue()
            if not seq and self.expiry_interval and self.journal is not None:
                # Journaled wherever it waits; its key goes into the record.
                d = Delivery(message, qos, retain, sub_ids)
                journaled = self._accepted(d)
                seq = d.seq
            if overflow.append(message, qos, retain, sub_ids, seq):
                return journaled
            self.stats.drop("overflow_full")
            store.refusal(self.client_id)
        else:
            self.stats.drop("session_queue_full")
        if seq and self.journal is not None:
            # A restored delivery that no longer fits, or one just put (the put and its
            # done cancel out in the journal's write-behind), leaves the journal.
            if d is None:
                d = Delivery(message, qos, retain, sub_ids)
                d.seq = seq
            self._done(d)
        return False

    def _refill(self) -> deque[Delivery]:
        """Move deliveries from the overflow's head into the (empty) memory queue, up to
        its bounds (bytes: passed by at most REFILL_BATCH deliveries)."""
        overflow = self.overflow
        assert overflow is not None
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        limit = self.max_queued_messages
        while overflow.count and len(queue) < limit and self.queued_bytes < self.max_queued_bytes:
            if not self._enqueue_taken(overflow.take(min(REFILL_BATCH, limit - len(queue)))):
                break  # pragma: no cover - a segment lost under us (logged by take)
        return queue

    def take_overflow(self) -> None:
        """Move the whole overflow into the memory queue, past its bounds (a graceful
        stop saving pending deliveries reads them from there)."""
        overflow = self.overflow
        if overflow:
            self._enqueue_taken(overflow.take(overflow.count))

    def _enqueue_taken(self, taken: list[Taken]) -> int:
        """Append deliveries taken from the overflow to the memory queue; how many."""
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        for message, qos, retain, sub_ids, seq in taken:
            d = Delivery(message, qos, retain, sub_ids)
            d.seq = seq
            queue.append(d)
            self.queued_bytes += len(message.payload) + len(message.topic)
        return len(taken)

    def _accepted(self, d: Delivery) -> bool:
        """Journal a new QoS 1/2 delivery of a persistent session (restored ones already are)."""
        if not d.seq and self.expiry_interval and self.journal is not None:
            self.journal.put(self.client_id, d)
            return True
        return False

    def _done(self, d: Delivery) -> None:
        """A delivery completed or was dropped: it leaves the journal."""
        if d.seq and self.journal is not None:
            self.journal.done(self.client_id, d)

    def _alloc_packet_id(self) -> int:
        pid = self.next_packet_id
        inflight = self.inflight
        # At most send_window (<= 65535) ids are in use, so a free one exists.
        while pid in inflight:
            pid = pid + 1 if pid < 65_535 else 1
        self.next_packet_id = pid + 1 if pid < 65_535 else 1
        return pid

    def _send_new(self, conn: Outbound, d: Delivery) -> None:
        pid = self._alloc_packet_id()
        d.packet_id = pid
        d.state = Delivery.PUBLISH_SENT
        if conn.send_publish(d.message, d.qos, d.retain, d.sub_ids, pid, False):
            inflight = self.inflight
            if inflight is NO_ENTRIES:
                inflight = self.inflight = {}
            inflight[pid] = d
        else:
            # Too large for the client's Maximum Packet Size; dropped and counted there.
            self._done(d)

    def pump(self) -> None:
        """Move queued deliveries into the inflight window while the socket accepts them."""
        conn = self.connection
        if conn is None:
            return
        queue = self.queue
        now = time.monotonic()
        while len(self.inflight) < self.send_window and conn.writable():
            if not queue:
                if not self.overflow:
                    break
                queue = self._refill()
            d = queue.popleft()
            size = len(d.message.payload) + len(d.message.topic)
            self.queued_bytes -= size
            if self.pooled:  # give back what the pool lent for the queue's excess
                give = size + DELIVERY_OVERHEAD
                if give > self.pooled:
                    give = self.pooled
                self.pooled -= give
                self.pool.used -= give  # type: ignore[union-attr]  # pooled implies a pool
            if d.message.expired(now):
                self.stats.drop("expired")
                self._done(d)
                continue
            self._send_new(conn, d)

    def resend_inflight(self) -> None:
        """On session resume: re-send unacknowledged PUBLISH (DUP=1) and PUBREL in order."""
        conn = self.connection
        assert conn is not None
        now = time.monotonic()
        for pid, d in list(self.inflight.items()):
            if d.state == Delivery.PUBREL_SENT:
                conn.send_pubrel(pid)
            elif d.message.expired(now) and d.qos == 1:
                # [MQTT-3.3.2-5] expired messages are not delivered; QoS 2 PUBLISH already
                # sent once must complete its flow, so only QoS 1 is discarded here.
                del self.inflight[pid]
                self.stats.drop("expired")
                self._done(d)
            else:
                conn.send_publish(d.message, d.qos, d.retain, d.sub_ids, pid, True)

    def on_puback(self, packet_id: int) -> bool:
        d = self.inflight.get(packet_id)
        if d is None or d.qos != 1:
            return False
        del self.inflight[packet_id]
        self._done(d)
        self.pump()
        return True

    def on_pubrec(self, packet_id: int, reason_code: int) -> bool:
        d = self.inflight.get(packet_id)
        if d is None or d.qos != 2 or d.state != Delivery.PUBLISH_SENT:
            return d is not None and d.state == Delivery.PUBREL_SENT
        if reason_code >= _FIRST_FAILURE:
            # The receiver refused it: the flow ends here [MQTT-4.3.3].
            del self.inflight[packet_id]
            self._done(d)
            self.pump()
            return True
        d.state = Delivery.PUBREL_SENT
        return True

    def on_pubcomp(self, packet_id: int) -> bool:
        d = self.inflight.get(packet_id)
        if d is None or d.state != Delivery.PUBREL_SENT:
            return False
        del self.inflight[packet_id]
        self._done(d)
        self.pump()
        return True

    def clear_pending(self) -> None:
        """Drop every queued and inflight delivery (the session is being discarded)."""
        self.inflight.clear()
        self.queue = None
        self.queued_bytes = 0
        if self.pooled:
            assert self.pool is not None
            self.pool.used -= self.pooled
            self.pooled = 0
        if self.overflow is not None:
            self.overflow.discard()  # its files go now
            self.overflow = None
        if self.inbound_qos2 is not None:
            self.inbound_qos2.clear()  # (the object stays: a connection's Inbound shares it)

    def qos2_ids(self) -> set[int]:
        """``inbound_qos2``, made if it does not exist yet."""
        ids = self.inbound_qos2
        if ids is None:
            ids = self.inbound_qos2 = set()
        return ids

    def cancel_timers(self) -> None:
        if self.expiry_handle is not None:
            self.expiry_handle.cancel()
            self.expiry_handle = None
        if self.will_handle is not None:
            self.will_handle.cancel()
            self.will_handle = None

    def __repr__(self) -> str:
        state = "online" if self.connection is not None else "offline"
        return f"<Session {self.client_id!r} {state} subs={len(self.subscriptions)} inflight={len(self.inflight)} queued={len(self.queue or ())} overflow={len(self.overflow or ())}>"


class WillSpec:
    """A CONNECT's will, kept until the connection ends abnormally (and its delay passes)."""

    __slots__ = (
        "client_id",
        "delay",
        "payload",
        "properties",
        "qos",
        "retain",
        "topic",
        "username",
    )

    def __init__(self, will: object, client_id: str, username: str | None) -> None:
        props = dict(will.properties)  # type: ignore[attr-defined]
        # Will Delay Interval is a CONNECT-only property: it is not forwarded.
        self.delay: int = props.pop(Prop.WILL_DELAY_INTERVAL, 0)
        self.topic: str = will.topic  # type: ignore[attr-defined]
        self.payload: bytes = will.payload  # type: ignore[attr-defined]
        self.qos: int = will.qos  # type: ignore[attr-defined]
        self.retain: bool = will.retain  # type: ignore[attr-defined]
        self.properties: dict = props
        self.client_id = client_id
        self.username = username

    def to_message(self) -> Message:
        """The message to publish now; Message Expiry starts counting at publication."""
        expiry = self.properties.get(Prop.MESSAGE_EXPIRY_INTERVAL)
        return Message(
            self.topic,
            self.payload,
            self.qos,
            self.retain,
            self.properties,
            self.client_id,
            self.username,
            expires_at=None if expiry is None else time.monotonic() + expiry,
        )
