"""SessionRegistry: every session by client id, and its lifecycle.

Theory of operation
-------------------
``sessions`` maps client id -> :class:`Session`, online (``session.connection``
is its channel) or offline. A session is created by :meth:`attach` (the first
CONNECT of its client id) and ends:

* when its connection closes with Session Expiry 0 (:meth:`connection_closed`);
* when its expiry timer fires after the connection ended (``_expire_session``);
* when a CONNECT with Clean Start replaces it (:meth:`attach`).

Takeover: a CONNECT for a client id whose session is online closes the old
channel synchronously (v5: DISCONNECT 0x8E) before the new one is bound, so
the new connection never races the old one's ``connection_lost``.

Wills: a connection that ends without a normal DISCONNECT publishes its will,
at once or after its Will Delay Interval (the delay is cut short when the
session ends first); a new connection before the delay cancels it
[MQTT-3.1.3-9].

Persistence: a persistent session's subscriptions and expiry are told to the
store on every change (``_save``); :meth:`restore` rebuilds offline sessions
at start-up and :meth:`shutdown` saves every persistent one at a graceful stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ingestd._trie import SubscriptionTrie
from ingestd.broker.hooks import BrokerStats, BrokerStore, EventListener, StoredSession
from ingestd.broker.message import Message
from ingestd.broker.overflow import OverflowStore
from ingestd.broker.router import Router
from ingestd.broker.session import (
    NEVER_EXPIRES,
    DeliveryJournal,
    QueuePool,
    Session,
    SubOptions,
    WillSpec,
)
from ingestd.config import MqttConfig
from ingestd.mqtt.constants import Reason

if TYPE_CHECKING:
    from ingestd.broker.channel import Channel

log = logging.getLogger("ingestd.broker")


class SessionRegistry:
    """Sessions by client id: attach, takeover, wills, expiry, persistence."""

    def __init__(
        self,
        config: MqttConfig,
        loop: asyncio.AbstractEventLoop,
        stats: BrokerStats,
        router: Router,
    ) -> None:
        self.config = config
        self.loop = loop
        self.stats = stats
        self.router = router
        self.trie: SubscriptionTrie = router.trie
        self.sessions: dict[str, Session] = {}
        self._id_counter = 0
        self._id_prefix = config.assigned_id_prefix + os.urandom(4).hex() + "-"
        # Set by the Broker (see Broker.store / journal).
        self.store: BrokerStore | None = None
        self.journal: DeliveryJournal | None = None
        # Where sessions put QoS 1/2 deliveries past their memory queue (None: off).
        self.overflow: OverflowStore | None = None
        # Memory sessions past their own queue bounds borrow before the disk (None: off).
        self.pool: QueuePool | None = None
        # Lifecycle events for the [[hooks]] (set by the Broker; None: no hook wants any).
        self.events: EventListener | None = None

    def assign_client_id(self) -> str:
        """A client id for a CONNECT with an empty one (unique in this process)."""
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter}"

    def _new_session(self, client_id: str) -> Session:
        m = self.config
        session = Session(
            client_id,
            self.stats,
            m.max_queued_messages,
            m.max_queued_bytes,
            self.overflow,
            self.pool,
        )
        session.journal = self.journal
        self.sessions[client_id] = session
        return session

    # -- connections ------------------------------------------------------

    def attach(self, conn: Channel, client_id: str, clean_start: bool) -> tuple[Session, bool]:
        """Bind ``conn`` to the session of ``client_id``; returns (session, session_present)."""
        session = self.sessions.get(client_id)
        if session is not None and session.connection is not None:
            old: Channel = session.connection  # type: ignore[assignment]
            log.info("client %r taken over by %s (was %s)", client_id, conn.peer, old.peer)
            # Detach now, synchronously, keeping the session for the new connection.
            old.disconnect("taken_over", Reason.SESSION_TAKEN_OVER, "session taken over")
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
            session = self._new_session(client_id)
        session.connection = conn
        return session, present

    def connection_closed(self, conn: Channel, reason: str) -> bool:
        """A CONNECTED channel ended: its will, its session's expiry. True if the
        will was published now."""
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
                    will_published = self._publish_will(will, session)
                else:
                    # Waits on the session for its delay. After a takeover attach
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
        return will_published

    def _publish_will(self, will: WillSpec, session: Session) -> bool:
        """Publish a will, if its client may still write its topic (the ACL may have been
        reloaded since CONNECT checked it). True if it was published."""
        acl = session.acl
        if acl is not None and not acl.may_publish(will.topic):
            self.stats.acl_denied_publish += 1
            log.info("will of %r to %r refused by the ACL", session.client_id, will.topic)
            return False
        message = will.to_message()
        self.router.publish(message, None)
        self._event(
            "will.published",
            session,
            topic=message.topic,
            qos=message.qos,
            retain=message.retain,
            payload=message.payload,
        )
        return True

    def _fire_delayed_will(self, session: Session) -> None:
        session.will_handle = None
        will = session.will
        session.will = None
        if will is not None and session.connection is None:
            self._publish_will(will, session)

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
            self._publish_will(will, session)
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
        session.own_subscriptions()[topic_filter] = opts
        log.debug("client %r subscribed to %r (qos %d)", session.client_id, topic_filter, opts.qos)
        self.trie.subscribe(topic_filter, session, opts)
        self._save(session)
        self._event("session.subscribed", session, filter=topic_filter, qos=opts.qos)
        return existed

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        log.debug("client %r unsubscribed from %r", session.client_id, topic_filter)
        self.trie.unsubscribe(topic_filter, session)
        self._save(session)
        self._event("session.unsubscribed", session, filter=topic_filter)
        return True

    def _event(self, name: str, session: Session, **fields: Any) -> None:
        """Tell the [[hooks]] about a session's event, if one wants it."""
        events = self.events
        if events is not None and name in events.events:
            events.on_event(
                name, {"client_id": session.client_id, "username": session.username, **fields}
            )

    # -- persistence ------------------------------------------------------

    def _save(self, session: Session) -> None:
        """Tell the store about a persistent session's subscriptions and expiry."""
        if self.store is not None and session.expiry_interval:
            self.store.session_saved(self.snapshot(session, with_pending=False))

    def snapshot(self, session: Session, with_pending: bool = False) -> StoredSession:
        """The session as stored. ``with_pending``: its undelivered messages too (only
        where no journal keeps them: the journal is the store's own copy), the overflow's
        included (read back into memory: only at a graceful stop)."""
        pending: list[tuple[str, bytes, int, bool, dict, list[int] | None]] = []
        if with_pending:
            session.take_overflow()  # a graceful stop: the disk queue is read back whole
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
            username=session.username,
            user_known=session.user_known,
        )

    def restore(self, sessions: list[StoredSession]) -> None:
        """Rebuild offline sessions loaded from the store at start-up."""
        now = time.time()
        for stored in sessions:
            left = stored.expiry_interval
            if left != NEVER_EXPIRES:
                gone = now - (stored.disconnected_at or now)
                left = int(stored.expiry_interval - gone)
                if left <= 0:
                    if self.store is not None:
                        self.store.session_deleted(stored.client_id)
                    continue
            session = self._new_session(stored.client_id)
            session.username = stored.username
            session.user_known = stored.user_known
            session.expiry_interval = stored.expiry_interval
            for flt, (qos, nl, rap, rh, sub_id) in stored.subscriptions.items():
                opts = SubOptions(qos, nl, rap, rh, sub_id)
                session.own_subscriptions()[flt] = opts
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

    async def shutdown(self) -> None:
        """The process stops (connections already closed): delayed wills go out now,
        timers stop, and the store gets every persistent session's last state."""
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
                    self.snapshot(s, with_pending=pending)
                    for s in self.sessions.values()
                    if s.expiry_interval
                ]
            )
