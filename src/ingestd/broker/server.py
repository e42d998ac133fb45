"""Broker: the parts of the MQTT broker, composed (one per process).

One Broker per process, owned by :class:`ingestd.app.App`. It holds every
piece of mutable broker state (no module globals), each in the part whose job
it is:

* ``registry`` — :class:`SessionRegistry`: client id -> :class:`Session`
  (online and offline), attach and takeover, wills, expiry, persistence;
* ``router`` — :class:`Router`: the one :class:`SubscriptionTrie` (``trie``;
  network sessions and ingest sinks side by side) and message routing;
* ``retained`` — the :class:`RetainedStore`;
* ``overflow`` — the :class:`OverflowStore` (None when ``mqtt.overflow_max_bytes``
  is 0): every session's deliveries past its memory queue, on disk, one budget;
* ``auth`` — :class:`Auth`: who may connect, subscribe and publish;
* ``connections`` — every open :class:`Channel` (also before CONNECT);
* ingest backpressure: while the ingest engine is saturated every channel
  that read a PUBLISH stops reading until it drains.

Its public names (``publish``, ``add_sink``, ``store``, ``sessions``...) are
what the ingest engine, the app and the metrics use; they delegate to the parts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ingestd._codec import Decoder
from ingestd._trie import SubscriptionTrie
from ingestd.broker.auth import Auth, is_deny_all, peer_address
from ingestd.broker.credentials import TableSnapshot
from ingestd.broker.hooks import (
    BrokerListener,
    BrokerStats,
    BrokerStore,
    EventListener,
    MessageSink,
    StoredSession,
)
from ingestd.broker.keepalive import KeepaliveWheel
from ingestd.broker.limits import LimitLog
from ingestd.broker.message import Message
from ingestd.broker.overflow import OverflowStore
from ingestd.broker.registry import SessionRegistry
from ingestd.broker.retained import RetainedStore
from ingestd.broker.router import Router
from ingestd.broker.session import DeliveryJournal, QueuePool, Session
from ingestd.config import Config
from ingestd.config.devices import DeviceSchemes, compile_schemes
from ingestd.mqtt.constants import Reason

if TYPE_CHECKING:
    from ingestd.broker.channel import Channel

log = logging.getLogger("ingestd.broker")

_PROTOCOL_NAMES = {3: "3.1", 4: "3.1.1", 5: "5.0"}


class Broker:
    """The MQTT broker shared by every listener: its parts and the seams to plugins."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_running_loop()
        self.stats = BrokerStats()
        self.trie = SubscriptionTrie()
        m = config.mqtt
        self.retained = RetainedStore(
            m.max_retained_messages, m.max_retained_per_tree, m.retained_tree_levels
        )
        # Every limit hit is counted and logged (rate-limited) through this one.
        self.limits = LimitLog(self.stats)
        self.router = Router(self.trie, self.retained, self.stats, self.limits)
        self.registry = SessionRegistry(config.mqtt, self.loop, self.stats, self.router)
        # One disk budget for every session's deliveries past its memory queue; files a
        # previous process left are removed now (they are never valid after a restart).
        self.overflow: OverflowStore | None = None
        if m.overflow_max_bytes > 0:
            directory = m.overflow_dir or os.path.join(config.server.data_dir, "overflow")
            self.overflow = OverflowStore(directory, m.overflow_max_bytes)
            self.overflow.start()
        self.registry.overflow = self.overflow
        # Memory shared by sessions past their own queue bounds, before the disk.
        self.pool: QueuePool | None = QueuePool(m.queue_pool_bytes) if m.queue_pool_bytes else None
        self.registry.pool = self.pool
        self.auth = Auth(config.mqtt, self.stats)
        # devices.schemes: the channels learn their clients' template variables with it
        # (None when no scheme learns from topics: nothing to do per publish).
        self.devices: DeviceSchemes = compile_schemes(config)
        self.device_learner: DeviceSchemes | None = self.devices if self.devices.learns else None
        self.connections: set[Channel] = set()
        # The decoders CONNECTED channels read through while they hold no incomplete
        # packet (by protocol version 4 / 5): an idle connection holds none of its own.
        self.decoders: dict[int, Decoder] = {
            v: Decoder.for_connection(v, m.max_packet_size) for v in (4, 5)
        }
        # Every CONNECTED channel's keepalive deadline, on one timer.
        self.keepalive = KeepaliveWheel(self.loop)
        # CONNECTED channels per peer host (mqtt.max_connections_per_peer).
        self._per_peer: dict[str, int] = {}
        self.listeners: list[BrokerListener] = []
        self._ingest: Any = None  # object with .saturated and wait_not_saturated()
        self._paused: set[Channel] = set()
        # CONNECT password checks under way (the loop keeps only weak references to tasks).
        self.auth_tasks: set[asyncio.Task[Any]] = set()
        self._resume_task: asyncio.Task[None] | None = None
        self.closing = False

    # -- persistence settings (shared by the router and the registry) -------

    @property
    def store(self) -> BrokerStore | None:
        """Where retained messages and persistent sessions are written behind."""
        return self.registry.store

    @store.setter
    def store(self, store: BrokerStore | None) -> None:
        self.registry.store = self.router.store = store

    @property
    def journal(self) -> DeliveryJournal | None:
        """Where persistent sessions journal their QoS 1/2 deliveries (the store, unless
        persistence.session_journal is off: then only a graceful stop saves them)."""
        return self.registry.journal

    @journal.setter
    def journal(self, journal: DeliveryJournal | None) -> None:
        self.registry.journal = self.router.journal = journal

    @property
    def ack_after_journal(self) -> bool:
        """persistence.ack_after_journal: a PUBLISH a persistent session journaled is
        acknowledged once the journal is committed (publish returns its future)."""
        return self.router.ack_after_journal

    @ack_after_journal.setter
    def ack_after_journal(self, on: bool) -> None:
        self.router.ack_after_journal = on

    @property
    def events(self) -> EventListener | None:
        """Where lifecycle events go for the ``[[hooks]]`` (None: no hook wants any)."""
        return self.registry.events

    @events.setter
    def events(self, events: EventListener | None) -> None:
        self.registry.events = events

    @property
    def sessions(self) -> dict[str, Session]:
        """Every session by client id (the registry's)."""
        return self.registry.sessions

    # -- plumbing for plugins ---------------------------------------------

    def add_sink(self, topic_filter: str, sink: MessageSink) -> None:
        """Register an internal subscriber (an ingest route) for ``topic_filter``."""
        self.router.add_sink(topic_filter, sink)

    def remove_sinks(self) -> None:
        self.router.remove_sinks()

    @property
    def ingest(self) -> Any:
        """The ingest engine (None without a database): read by $SYS and the webhook."""
        return self._ingest

    def set_ingest(self, ingest: Any) -> None:
        """The ingest engine whose ``saturated`` flag pauses publishers (backpressure)."""
        self._ingest = ingest

    def add_listener(self, listener: BrokerListener) -> None:
        self.listeners.append(listener)

    def publish(self, message: Message, origin: Session | None) -> asyncio.Future[Any] | None:
        """Route one message (see :meth:`Router.publish`)."""
        return self.router.publish(message, origin)

    # -- channels -----------------------------------------------------------

    def connection_opened(self, conn: Channel) -> None:
        self.connections.add(conn)

    def connection_gone(self, conn: Channel) -> None:
        self.connections.discard(conn)
        self._paused.discard(conn)

    def admit(self, conn: Channel) -> str | None:
        """None to accept a CONNECT, else which limit refuses it (and why, for the log).

        A client taking over its own live session is not counted twice."""
        m = self.config.mqtt
        if not (m.max_connections or m.max_connections_per_peer):
            return None
        old = self.registry.sessions.get(conn.client_id)
        old_conn = old.connection if old is not None else None
        host = peer_address(conn.peer)
        if (
            m.max_connections
            and old_conn is None
            and sum(self.stats.connections_current.values()) >= m.max_connections
        ):
            return self._limit("max_connections", conn, m.max_connections)
        if m.max_connections_per_peer:
            replacing = old_conn is not None and peer_address(getattr(old_conn, "peer", "")) == host
            if not replacing and self._per_peer.get(host, 0) >= m.max_connections_per_peer:
                return self._limit("max_connections_per_peer", conn, m.max_connections_per_peer)
        return None

    def _limit(self, key: str, conn: Channel, bound: int) -> str:
        why = f"connection limit reached (mqtt.{key} = {bound})"
        self.limits.hit(
            key, f"refusing CONNECT from {conn.peer} (client {conn.client_id!r}): {why}"
        )
        return why

    def client_connected(self, conn: Channel) -> None:
        info = conn.info  # made when asked: once here
        v = conn.version if info is None else info.protocol_version
        host = peer_address(conn.peer)
        self._per_peer[host] = self._per_peer.get(host, 0) + 1
        if self.config.server.log_connections:
            log.info(
                "client connected: id=%r user=%r peer=%s protocol=%s clean_start=%s"
                " keepalive=%d transport=%s",
                conn.client_id,
                conn.username,
                conn.peer,
                _PROTOCOL_NAMES.get(v, v),
                info.clean_start if info is not None else None,
                conn.keepalive,
                conn.transport_name,
                extra={
                    "event": "connect",
                    "client_id": conn.client_id,
                    "username": conn.username,
                    "peer": conn.peer,
                    "protocol": _PROTOCOL_NAMES.get(v, v),
                    "keepalive": conn.keepalive,
                },
            )
        self.stats.connections_total[v] = self.stats.connections_total.get(v, 0) + 1
        self.stats.connections_current[v] = self.stats.connections_current.get(v, 0) + 1
        for listener in self.listeners:
            try:
                listener.on_client_connected(info)  # type: ignore[arg-type]
            except Exception:
                log.exception("listener failed on connect")
        events = self.registry.events
        if events is not None and "client.connected" in events.events and info is not None:
            events.on_event(
                "client.connected",
                {
                    "client_id": info.client_id,
                    "username": info.username,
                    "peer": info.peer,
                    "protocol": _PROTOCOL_NAMES.get(v, v),
                    "clean_start": info.clean_start,
                    "keepalive": conn.keepalive,
                    "transport": info.transport,
                    "connected_at": info.connected_at,
                },
            )

    def connection_closed(self, conn: Channel, reason: str) -> None:
        """A CONNECTED channel ended: wills, session expiry, presence."""
        info = conn.info
        if info is not None:
            host = peer_address(info.peer)
            left = self._per_peer.get(host, 1) - 1
            if left > 0:
                self._per_peer[host] = left
            else:
                self._per_peer.pop(host, None)
            v = info.protocol_version
            self.stats.connections_current[v] = self.stats.connections_current.get(v, 1) - 1
        will_published = self.registry.connection_closed(conn, reason)
        if info is not None and self.config.server.log_connections:
            log.info(
                "client disconnected: id=%r peer=%s reason=%s will_published=%s",
                info.client_id,
                info.peer,
                reason,
                will_published,
                extra={
                    "event": "disconnect",
                    "client_id": info.client_id,
                    "peer": info.peer,
                    "reason": reason,
                    "will_published": will_published,
                },
            )
        if info is not None:
            for listener in self.listeners:
                try:
                    listener.on_client_disconnected(info, reason, will_published)
                except Exception:
                    log.exception("listener failed on disconnect")
            events = self.registry.events
            if events is not None and "client.disconnected" in events.events:
                events.on_event(
                    "client.disconnected",
                    {
                        "client_id": info.client_id,
                        "username": info.username,
                        "peer": info.peer,
                        "protocol": _PROTOCOL_NAMES.get(info.protocol_version),
                        "reason": reason,
                        "will_published": will_published,
                        "connected_at": info.connected_at,
                    },
                )

    # -- backpressure from ingest -------------------------------------------

    def ingest_saturated(self) -> bool:
        ingest = self._ingest
        return ingest is not None and ingest.saturated

    def reading_paused(self, conn: Channel) -> None:
        self._paused.add(conn)
        if self.ingest_saturated() and self._resume_task is None:
            self._resume_task = self.loop.create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        try:
            await self._ingest.wait_not_saturated()
        finally:
            self._resume_task = None
        for conn in list(self._paused):
            self._paused.discard(conn)
            conn.resume_reading()

    # -- credentials and ACL ----------------------------------------------------

    def reload_auth(self) -> bool:
        """SIGHUP: re-read the password and ACL files (a bad one is logged and kept), then
        re-decide every client (:meth:`recheck_clients`). True if both files were reloaded.
        """
        ok = self.auth.reload()
        self.recheck_clients(None)
        return ok

    def credentials_changed(self, snapshot: TableSnapshot, users: set[str]) -> None:
        """The credentials table's snapshot changed for ``users``: re-decide their clients."""
        self.auth.set_table(snapshot)
        self.recheck_clients(users)

    def recheck_clients(self, users: set[str] | None) -> None:
        """After a credential or ACL change (of ``users``; None: everyone).

        A connected client whose credential is no longer in force (user removed or
        disabled, password or client-id pin changed) is disconnected
        (:meth:`Channel.revoke`); the others get a new ClientAcl (their fast-path
        caches are dropped), so live subscriptions deliver under it from now on.
        Offline sessions are decided on their last user name and client id; one
        whose user could no longer log in reads nothing more.
        """
        auth = self.auth
        for conn in list(self.connections):
            name = conn.username
            if users is not None and name not in users:
                continue
            cred = conn.credential
            if cred is not None and not auth.in_force(name or "", conn.client_id, cred):
                conn.revoke()
            else:
                conn.refresh_acl()
        for session in self.registry.sessions.values():
            if session.connection is not None or (
                users is not None and session.username not in users
            ):
                continue
            if not session.user_known and is_deny_all(session.acl):
                continue  # restored without its user name: nothing until it connects
            session.acl = auth.session_acl(session.username, session.client_id)

    # -- start and stop -------------------------------------------------------

    def restore(self, retained: list[Message], sessions: list[StoredSession]) -> None:
        """Rebuild retained messages and offline sessions loaded from the store at start-up."""
        refused = sum(self.retained.set(message) is not None for message in retained)
        if refused:
            # Lowered mqtt.max_retained_messages / max_retained_per_tree since they were
            # stored: they stay in the store and come back once the limits allow.
            log.warning(
                "%d stored retained messages not restored: over mqtt.max_retained_messages"
                " or max_retained_per_tree",
                refused,
            )
        self.registry.restore(sessions)
        # A restored session reads under the ACL of its last user; one whose user name
        # the store did not keep (an older row) reads nothing until its client connects.
        for session in self.registry.sessions.values():
            if session.connection is None and session.acl is None:
                session.acl = (
                    self.auth.session_acl(session.username, session.client_id)
                    if session.user_known
                    else self.auth.deny_all(session.client_id)
                )

    async def shutdown(self) -> None:
        """Close every connection with v5 'server shutting down' and flush writes."""
        self.closing = True
        for conn in list(self.connections):
            conn.disconnect("server_shutdown", Reason.SERVER_SHUTTING_DOWN, "server shutting down")
        # Let transports flush their final bytes and run connection_lost.
        deadline = time.monotonic() + 2.0
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.keepalive.close()
        await self.registry.shutdown()
