"""The seams between the broker and what plugs into it (ingest, metrics, persistence,
event hooks).

The broker owns the client channels, sessions and the subscription trie. Ingest
routes are subscribers in that same trie: the broker calls
:meth:`MessageSink.deliver` for every message whose topic matches a sink's
filter, once per sink per message. Event hooks (``[[hooks]]``) take lifecycle
events through :class:`EventListener` and messages as sinks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ingestd.broker.message import Message
from ingestd.broker.session import DeliveryJournal


class MessageSink(Protocol):
    """An internal subscriber (an ingest route) registered with ``Broker.add_sink``."""

    def deliver(self, message: Message) -> asyncio.Future[None] | None:
        """Take one message.

        Return a future that completes when the message is durable (committed
        to PostgreSQL or fsync'd to the spool) if the publisher's
        acknowledgement must wait for it (``ack = "after-commit"`` and
        QoS >= 1), else None. The future fails only if the message could not
        be made durable; the broker then does not acknowledge it (the client
        will retry). Must not block.
        """
        ...


@runtime_checkable
class RunSink(Protocol):
    """A sink whose messages may take the connections' fast path (ingest routes).

    For a topic whose every subscriber is a RunSink, a connection hands a run of
    messages straight to ``batch_run`` (an :class:`ingestd._inbound.BatchRun`
    shared by the routes of one table) instead of calling ``deliver`` per
    message: the same messages, in the same order, the same durability futures.
    """

    batch_run: Any
    route: Any
    durable: bool

    def deliver(self, message: Message) -> asyncio.Future[None] | None: ...


@dataclass(slots=True)
class ClientInfo:
    """What the broker tells its listeners about one connection."""

    client_id: str
    username: str | None
    peer: str
    protocol_version: int
    connected_at: float  # time.time()
    clean_start: bool = True
    transport: str = "tcp"


# Why a connection ended, as given to BrokerListener.on_client_disconnected.
DISCONNECT_REASONS = (
    "normal",  # DISCONNECT 0x00 from the client
    "will",  # DISCONNECT 0x04 (disconnect with will) from the client
    "connection_lost",  # socket closed without DISCONNECT: the will is published
    "keepalive_timeout",
    "taken_over",
    "protocol_error",
    "server_shutdown",
    "overloaded",  # dropped by the server (e.g. outbound queue policy)
)


class BrokerListener(Protocol):
    """Connection lifecycle events (device presence, metrics)."""

    def on_client_connected(self, info: ClientInfo) -> None: ...

    def on_client_disconnected(
        self, info: ClientInfo, reason: str, will_published: bool
    ) -> None: ...


class EventListener(Protocol):
    """Broker events for the ``[[hooks]]`` (``Broker.events``): must only enqueue.

    ``events`` is the set of event names some hook wants; the broker builds an
    event's fields (a new dict, never changed afterwards) and calls
    :meth:`on_event` only for those. Names: ``client.connected``,
    ``client.disconnected``, ``will.published``, ``session.subscribed``,
    ``session.unsubscribed`` (``message.published`` goes through sinks).
    """

    events: frozenset[str]

    def on_event(self, event: str, fields: dict[str, Any]) -> None: ...


@dataclass
class BrokerStats:
    """Plain integer counters on the hot path; exposed by a custom Prometheus collector.

    Indexes by QoS are lists of three ints. Nothing here allocates per message.
    """

    connections_total: dict[int, int] = field(default_factory=lambda: {3: 0, 4: 0, 5: 0})
    connections_current: dict[int, int] = field(default_factory=lambda: {3: 0, 4: 0, 5: 0})
    messages_received: list[int] = field(default_factory=lambda: [0, 0, 0])
    messages_delivered: list[int] = field(default_factory=lambda: [0, 0, 0])
    bytes_received: int = 0
    bytes_sent: int = 0
    # drops by reason: "qos0_queue_full", "session_queue_full", "expired", "packet_too_large", "no_subscribers"
    dropped: dict[str, int] = field(default_factory=dict)
    protocol_errors: int = 0
    # PUBLISHes handled by the compiled ingest fast path (counted once per run).
    messages_fast_path: int = 0
    # CONNECTs refused for their credentials (or while their peer cools down).
    auth_failures: int = 0
    # PUBLISHes (and wills) refused by the ACL; deliveries the ACL withheld.
    acl_denied_publish: int = 0
    acl_denied_read: int = 0
    # CONNECTs refused by a limit, by its config key ("max_connections", ...).
    limits_hit: dict[str, int] = field(default_factory=dict)
    # Connections closed because the credential they logged in with was revoked.
    credentials_revoked: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass(slots=True)
class StoredSession:
    """A session as persisted: enough to rebuild it offline after a restart."""

    client_id: str
    expiry_interval: int
    # filter -> (qos, no_local, retain_as_published, retain_handling, subscription id)
    subscriptions: dict[str, tuple[int, bool, bool, int, int]]
    # time.time() when its connection ended (None: it was online at the snapshot)
    disconnected_at: float | None
    # undelivered QoS 1/2 messages, inflight first then queued:
    # (topic, payload, qos, retain, properties, subscription ids or None)
    pending: list[tuple[str, bytes, int, bool, dict, list[int] | None]] = field(
        default_factory=list
    )
    # journaled deliveries in order: (journal key, message, qos, retain, subscription ids)
    journal: list[tuple[int, Message, int, bool, list[int] | None]] = field(default_factory=list)
    # the user name of its last connection (None: anonymous), if known (rows written
    # before it was stored do not have it)
    username: str | None = None
    user_known: bool = False


class BrokerStore(DeliveryJournal, Protocol):
    """Durable state of the broker across restarts: retained messages, sessions and
    (as the :class:`DeliveryJournal`) their undelivered QoS 1/2 messages.

    The broker calls the sync methods on the hot path: they must only enqueue
    (write-behind) and never block. ``save_sessions`` runs once at shutdown,
    ``load`` once at start-up before any listener accepts connections.
    """

    def retained_set(self, message: Message) -> None: ...

    def retained_delete(self, topic: str) -> None: ...

    def session_saved(self, session: StoredSession) -> None: ...

    def session_deleted(self, client_id: str) -> None:
        """The session ended: its row and its journaled deliveries go."""

    def journal_drop(self, client_id: str) -> None:
        """Forget every journaled delivery of the client (the journal was turned off)."""

    async def load(self) -> tuple[list[Message], list[StoredSession]]: ...

    async def save_sessions(self, sessions: list[StoredSession]) -> None: ...

    async def close(self) -> None: ...
