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

Code: :class:`Session`, :class:`Delivery`, :class:`SubOptions` and
:class:`QueuePool` are compiled (``ext/ingestd/_session.pyx``, typed in
``ingestd/_session.pyi``): they are on the per-delivery path, and the
connections' compiled fast path (``ext/ingestd/_inbound.pyx``) calls
``Session.deliver`` from C. This module keeps their contract (above), the
protocols they talk to, and the will.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from ingestd._session import (
    DELIVERY_OVERHEAD,
    NO_ENTRIES,
    REFILL_BATCH,
    Delivery,
    QueuePool,
    Session,
    SubOptions,
)
from ingestd.broker.message import Message
from ingestd.mqtt.constants import Prop

__all__ = [
    "DELIVERY_OVERHEAD",
    "NEVER_EXPIRES",
    "NO_ENTRIES",
    "REFILL_BATCH",
    "Delivery",
    "DeliveryJournal",
    "Outbound",
    "QueuePool",
    "Session",
    "SubOptions",
    "WillSpec",
]

NEVER_EXPIRES = 0xFFFFFFFF


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
