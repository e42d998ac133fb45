"""Broker: sessions, the subscription trie, retained messages and routing.

One Broker per process, owned by :class:`ingestd.app.App`. It holds every
piece of mutable broker state (no module globals):

* ``sessions`` — client id -> :class:`Session` (online and offline);
* ``trie`` — the one :class:`SubscriptionTrie`: network sessions and ingest
  sinks are subscribers side by side, so one match serves both;
* ``retained`` — the :class:`RetainedStore`;
* ``connections`` — every open :class:`MQTTConnection` (also before CONNECT).

Routing a message (``publish``) matches its topic once, merges overlapping
subscriptions of one session into one delivery at the highest granted QoS
carrying every subscription identifier, picks one member per shared group
(round-robin, preferring online members) and hands the message to each sink.
It returns a future when an ingest sink must make the message durable before
the publisher is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ingestd._inbound import IngestTarget
from ingestd._trie import SubscriptionTrie
from ingestd.auth import load_password_file, verify_password
from ingestd.broker.hooks import (
    BrokerListener,
    BrokerStats,
    BrokerStore,
    MessageSink,
    RunSink,
    StoredSession,
)
from ingestd.broker.message import Message
from ingestd.broker.retained import RetainedStore
from ingestd.broker.session import NEVER_EXPIRES, DeliveryJournal, Session, SubOptions
from ingestd.config import Config
from ingestd.mqtt.constants import Reason

if TYPE_CHECKING:
    from ingestd.broker.connection import MQTTConnection

log = logging.getLogger("ingestd.broker")


class Broker:
    """The MQTT broker state machine shared by every listener."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_running_loop()
        self.stats = BrokerStats()
        self.sessions: dict[str, Session] = {}
        self.trie = SubscriptionTrie()
        self.retained = RetainedStore(config.mqtt.max_retained_messages)
        self.connections: set[MQTTConnection] = set()
        self.listeners: list[BrokerListener] = []
        self._sinks: list[tuple[str, MessageSink]] = []
        self._ingest: Any = None  # object with .saturated and wait_not_saturated()
        self._paused: set[MQTTConnection] = set()
        self._resume_task: asyncio.Task[None] | None = None
        self._id_counter = 0
        self._id_prefix = config.mqtt.assigned_id_prefix + os.urandom(4).hex() + "-"
        self._passwords: dict[str, str] | None = (
            load_password_file(config.mqtt.password_file) if config.mqtt.password_file else None
        )
        self.closing = False
        self.store: BrokerStore | None = None
        # Where persistent sessions journal their QoS 1/2 deliveries (the store, unless
        # persistence.session_journal is off: then only a graceful stop saves them).
        self.journal: DeliveryJournal | None = None
        # persistence.ack_after_journal: a PUBLISH a persistent session journaled is
        # acknowledged once the journal is committed (publish returns its future).
        self.ack_after_journal = False

    # -- plumbing for plugins ---------------------------------------------

    def add_sink(self, topic_filter: str, sink: MessageSink) -> None:
        """Register an internal subscriber (an ingest route) for ``topic_filter``."""
        self.trie.subscribe(topic_filter, sink, None)
        self._sinks.append((topic_filter, sink))

    def remove_sinks(self) -> None:
        for flt, sink in self._sinks:
            self.trie.unsubscribe(flt, sink)
        self._sinks.clear()

    def set_ingest(self, ingest: Any) -> None:
        """The ingest engine whose ``saturated`` flag pauses publishers (backpressure)."""
        self._ingest = ingest

    def add_listener(self, listener: BrokerListener) -> None:
        self.listeners.append(listener)

    # -- connections ------------------------------------------------------

    def connection_opened(self, conn: MQTTConnection) -> None:
        self.connections.add(conn)

    def connection_gone(self, conn: MQTTConnection) -> None:
        self.connections.discard(conn)
        self._paused.discard(conn)

    def assign_client_id(self) -> str:
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter}"

    def authenticate(self, username: str | None, password: bytes | None, peer: str) -> int:
        """0 to accept, else the v5 CONNACK reason code."""
        if self._passwords is None:
            return 0 if (self.config.mqtt.allow_anonymous or username) else Reason.NOT_AUTHORIZED
        if username is None:
            return 0 if self.config.mqtt.allow_anonymous else Reason.NOT_AUTHORIZED
        stored = self._passwords.get(username)
        if stored is None or password is None or not verify_password(stored, password):
            return Reason.BAD_USER_NAME_OR_PASSWORD
        return 0

    def authorize_subscribe(self, conn: MQTTConnection, topic_filter: str) -> bool:
        return True

    def attach_session(
        self, conn: MQTTConnection, client_id: str, clean_start: bool
    ) -> tuple[Session, bool]:
        """Bind ``conn`` to the session of ``client_id``; returns (session, session_present)."""
        session = self.sessions.get(client_id)
        if session is not None and session.connection is not None:
            old = session.connection
            log.info("client %r taken over by %s (was %s)", client_id, conn.peer, old.peer)
            # Detach now, synchronously, keeping the session for the new connection.
            old._close("taken_over", Reason.SESSION_TAKEN_OVER, "session taken over")
            session = self.sessions.get(client_id)
        if session is not None:
            if clean_start:
                # The old session ends now: a will still waiting for its delay goes out
                # [MQTT-3.1.2-8 / will at session end].
                self._end_session(session)
                session = None
            else:
                # A new connection before the Will Delay Interval cancels the will [MQTT-3.1.3-9].
                session.cancel_timers()
                session.will = None
        present = session is not None
        if session is None:
            m = self.config.mqtt
            session = Session(client_id, self.stats, m.max_queued_messages, m.max_queued_bytes)
            session.journal = self.journal
            self.sessions[client_id] = session
        session.connection = conn
        return session, present

    def client_connected(self, conn: MQTTConnection) -> None:
        v = conn.version if conn.info is None else conn.info.protocol_version
        self.stats.connections_total[v] = self.stats.connections_total.get(v, 0) + 1
        self.stats.connections_current[v] = self.stats.connections_current.get(v, 0) + 1
        for listener in self.listeners:
            try:
                listener.on_client_connected(conn.info)  # type: ignore[arg-type]
            except Exception:
                log.exception("listener failed on connect")

    def connection_closed(self, conn: MQTTConnection, reason: str) -> None:
        """A CONNECTED connection ended: wills, session expiry, presence."""
        info = conn.info
        if info is not None:
            v = info.protocol_version
            self.stats.connections_current[v] = self.stats.connections_current.get(v, 1) - 1
        session = conn.session
        # A normal DISCONNECT discards the will [MQTT-3.1.2-10]; every other end publishes it.
        will = conn.will if reason != "normal" else None
        conn.will = None
        will_published = False
        if session is not None and session.connection is conn:
            session.connection = None
            # On takeover the session lives on in the new connection whatever its expiry.
            session_ends = reason != "taken_over" and session.expiry_interval == 0
            if will is not None:
                if will.delay == 0 or session_ends:
                    self.publish(will.to_message(), None)
                    will_published = True
                else:
                    # Waits on the session for its delay. After a takeover attach_session
                    # publishes it (Clean Start ends the session) or cancels it [MQTT-3.1.3-9].
                    session.will = will
            if session_ends:
                self._discard_session(session)
            elif reason != "taken_over":
                if session.will is not None:
                    delay = min(session.will.delay, session.expiry_interval)
                    session.will_handle = self.loop.call_later(
                        delay, self._fire_delayed_will, session
                    )
                if session.expiry_interval != NEVER_EXPIRES:
                    session.expiry_handle = self.loop.call_later(
                        session.expiry_interval, self._expire_session, session
                    )
                self._save(session)
        if info is not None:
            for listener in self.listeners:
                try:
                    listener.on_client_disconnected(info, reason, will_published)
                except Exception:
                    log.exception("listener failed on disconnect")

    def _fire_delayed_will(self, session: Session) -> None:
        session.will_handle = None
        will = session.will
        session.will = None
        if will is not None and session.connection is None:
            self.publish(will.to_message(), None)

    def _expire_session(self, session: Session) -> None:
        session.expiry_handle = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            log.debug("session %r expired", session.client_id)
            self._end_session(session)

    def _end_session(self, session: Session) -> None:
        """The session ends: publish a will still waiting for its delay, then discard."""
        will = session.will
        session.will = None
        session.cancel_timers()
        if will is not None:
            self.publish(will.to_message(), None)
        self._discard_session(session)

    def _discard_session(self, session: Session) -> None:
        session.cancel_timers()
        for flt in session.subscriptions:
            self.trie.unsubscribe(flt, session)
        session.subscriptions.clear()
        session.clear_pending()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            if self.store is not None:
                self.store.session_deleted(session.client_id)

    # -- subscriptions ----------------------------------------------------

    def subscribe(self, session: Session, topic_filter: str, opts: SubOptions) -> bool:
        """Add or replace a subscription; True if it already existed."""
        existed = topic_filter in session.subscriptions
        session.subscriptions[topic_filter] = opts
        self.trie.subscribe(topic_filter, session, opts)
        self._save(session)
        return existed

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        self.trie.unsubscribe(topic_filter, session)
        self._save(session)
        return True

    # -- routing ----------------------------------------------------------

    def publish(self, message: Message, origin: Session | None) -> asyncio.Future[Any] | None:
        """Route one message to every matching session and sink.

        Returns a future to wait on before acknowledging the publisher (some
        sink must make it durable first), or None.
        """
        if message.retain:
            if not self.retained.set(message):
                self.stats.drop("retained_store_full")
            elif self.store is not None:
                if message.payload:
                    self.store.retained_set(message)
                else:
                    self.store.retained_delete(message.topic)
        subs, groups = self.trie.match_all(message.topic)
        if not subs and not groups:
            return None
        qos = message.qos
        durable: list[asyncio.Future[Any]] | None = None
        journaled = False  # a persistent session journaled its delivery
        targets: dict[Session, list[Any]] | None = None
        single: Session | None = None
        single_opts: SubOptions | None = None
        for sub, opts in subs:
            if type(sub) is Session:
                if opts.no_local and sub is origin:
                    continue
                if single is None and targets is None:
                    single, single_opts = sub, opts
                    continue
                if targets is None:
                    assert single_opts is not None
                    targets = {single: _target(single_opts)}  # type: ignore[dict-item]
                t = targets.get(sub)
                if t is None:
                    targets[sub] = _target(opts)
                else:
                    if opts.qos > t[0]:
                        t[0] = opts.qos
                    t[1] = t[1] or opts.retain_as_published
                    if opts.sub_id:
                        if t[2] is None:
                            t[2] = [opts.sub_id]
                        else:
                            t[2].append(opts.sub_id)
            else:
                fut = sub.deliver(message)
                if fut is not None and qos:
                    if durable is None:
                        durable = [fut]
                    else:
                        durable.append(fut)
        retain = message.retain
        if targets is not None:
            for session, (gqos, rap, ids) in targets.items():
                if session.deliver(message, gqos if gqos < qos else qos, retain and rap, ids):
                    journaled = True
        elif single is not None:
            assert single_opts is not None
            o = single_opts
            journaled = single.deliver(
                message,
                o.qos if o.qos < qos else qos,
                retain and o.retain_as_published,
                [o.sub_id] if o.sub_id else None,
            )
        for group in groups:
            if self._deliver_shared(group, message):
                journaled = True
        if journaled and self.ack_after_journal and self.journal is not None:
            fut = self.journal.durable_future()
            if durable is None:
                durable = [fut]
            else:
                durable.append(fut)
        if durable is None:
            return None
        if len(durable) == 1:
            return durable[0]
        return asyncio.gather(*durable)

    def ingest_target(self, topic: str) -> IngestTarget | None:
        """What ``topic`` reaches if only ingest routes subscribe to it, else None.

        The connections' fast path (ext/ingestd/_inbound.pyx) keeps the answer
        per topic until the trie changes; a topic some session or shared group
        subscribes to (or nothing does) takes :meth:`publish`.
        """
        subs, groups = self.trie.match_all(topic)
        if groups or not subs:
            return None
        entries = []
        for sub, _opts in subs:
            if type(sub) is Session or not isinstance(sub, RunSink):
                return None
            entries.append((sub.batch_run, sub.route, sub.durable))
        return IngestTarget(entries)

    def _deliver_shared(self, group: Any, message: Message) -> bool:
        """Deliver to one member; True if a persistent session journaled it."""
        members = group.members
        n = len(members)
        if not n:
            return False
        start = group.next_index()
        chosen = members[start]
        # Prefer a member that is online; an offline member's session queues it.
        for i in range(n):
            cand = members[(start + i) % n]
            sub = cand[0]
            if type(sub) is not Session or sub.connection is not None:
                chosen = cand
                break
        sub, opts = chosen
        if type(sub) is Session:
            q = opts.qos if opts.qos < message.qos else message.qos
            return sub.deliver(
                message,
                q,
                message.retain and opts.retain_as_published,
                [opts.sub_id] if opts.sub_id else None,
            )
        sub.deliver(message)
        return False

    # -- backpressure from ingest -------------------------------------------

    def ingest_saturated(self) -> bool:
        ingest = self._ingest
        return ingest is not None and ingest.saturated

    def reading_paused(self, conn: MQTTConnection) -> None:
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

    # -- persistence ------------------------------------------------------

    def _save(self, session: Session) -> None:
        """Tell the store about a persistent session's subscriptions and expiry."""
        if self.store is not None and session.expiry_interval:
            self.store.session_saved(self.snapshot_session(session, with_pending=False))

    def snapshot_session(self, session: Session, with_pending: bool = False) -> StoredSession:
        """The session as stored. ``with_pending``: its undelivered messages too (only
        where no journal keeps them: the journal is the store's own copy)."""
        pending: list[tuple[str, bytes, int, bool, dict, list[int] | None]] = []
        if with_pending:
            for d in list(session.inflight.values()) + list(session.queue or ()):
                m = d.message
                pending.append((m.topic, m.payload, d.qos, d.retain, m.properties, d.sub_ids))
        return StoredSession(
            client_id=session.client_id,
            expiry_interval=session.expiry_interval,
            subscriptions={
                f: (o.qos, o.no_local, o.retain_as_published, o.retain_handling, o.sub_id)
                for f, o in session.subscriptions.items()
            },
            disconnected_at=None if session.connection is not None else time.time(),
            pending=pending,
        )

    def restore(self, retained: list[Message], sessions: list[StoredSession]) -> None:
        """Rebuild retained messages and offline sessions loaded from the store at start-up."""
        for message in retained:
            self.retained.set(message)
        now = time.time()
        m = self.config.mqtt
        for stored in sessions:
            left = stored.expiry_interval
            if left != NEVER_EXPIRES:
                gone = now - (stored.disconnected_at or now)
                left = int(stored.expiry_interval - gone)
                if left <= 0:
                    if self.store is not None:
                        self.store.session_deleted(stored.client_id)
                    continue
            session = Session(
                stored.client_id, self.stats, m.max_queued_messages, m.max_queued_bytes
            )
            session.journal = self.journal
            session.expiry_interval = stored.expiry_interval
            self.sessions[stored.client_id] = session
            for flt, (qos, nl, rap, rh, sub_id) in stored.subscriptions.items():
                opts = SubOptions(qos, nl, rap, rh, sub_id)
                session.subscriptions[flt] = opts
                self.trie.subscribe(flt, session, opts)
            # Journaled deliveries come back in their order, keeping their journal keys.
            for seq, message, qos, retain, sub_ids in stored.journal:
                session.deliver(message, qos, retain, sub_ids, seq if self.journal else 0)
            if stored.journal and self.journal is None and self.store is not None:
                # Journal turned off: these now live in memory (saved at a graceful stop).
                self.store.journal_drop(stored.client_id)
            if stored.pending:
                # Written by a version that kept undelivered messages in the session row:
                # they join the journal now, and the row is rewritten without them.
                for topic, payload, qos, retain, props, sub_ids in stored.pending:
                    session.deliver(
                        Message(topic, payload, qos, retain, props), qos, retain, sub_ids
                    )
                if self.journal is not None:
                    self._save(session)
            if left != NEVER_EXPIRES:
                session.expiry_handle = self.loop.call_later(left, self._expire_session, session)

    # -- shutdown ---------------------------------------------------------

    async def shutdown(self) -> None:
        """Close every connection with v5 'server shutting down' and flush writes."""
        self.closing = True
        for conn in list(self.connections):
            conn.disconnect("server_shutdown", Reason.SERVER_SHUTTING_DOWN, "server shutting down")
        # Let transports flush their final bytes and run connection_lost.
        deadline = time.monotonic() + 2.0
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Sessions' pending delayed wills go out now: their timers die with the process.
        for session in list(self.sessions.values()):
            if session.will is not None:
                self._fire_delayed_will(session)
            session.cancel_timers()
        if self.store is not None:
            # Undelivered messages are in the store's journal already (unless it is off);
            # this writes the sessions' last state (and flushes the journal with it).
            pending = self.journal is None
            await self.store.save_sessions(
                [
                    self.snapshot_session(s, with_pending=pending)
                    for s in self.sessions.values()
                    if s.expiry_interval
                ]
            )


def _target(opts: SubOptions) -> list[Any]:
    return [opts.qos, opts.retain_as_published, [opts.sub_id] if opts.sub_id else None]
