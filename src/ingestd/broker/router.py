"""Router: where a published message goes.

The one :class:`SubscriptionTrie` holds network sessions and ingest sinks
side by side, so one match serves both. Routing a message (:meth:`Router.publish`)
updates the retained store when RETAIN is set, matches its topic once, merges
overlapping subscriptions of one session into one delivery at the highest
granted QoS carrying every subscription identifier, picks one member per
shared group (round-robin, preferring online members) and hands the message
to each sink. It returns a future when the publisher's acknowledgement must
wait: an ingest sink must make the message durable, or (with
``ack_after_journal``) a persistent session journaled it.

:meth:`Router.fast_target` classifies a topic for the connections' compiled
fast path (``ext/ingestd/_inbound.pyx``): only ingest routes take it (an
``IngestTarget``), or only plain session subscriptions (a ``SessionTarget``:
``Inbound.take`` then delivers it as :meth:`publish` would, without it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ingestd._inbound import IngestTarget, SessionTarget
from ingestd._trie import SubscriptionTrie
from ingestd.broker.acl import READ
from ingestd.broker.hooks import BrokerStats, BrokerStore, MessageSink, RunSink
from ingestd.broker.limits import LimitLog
from ingestd.broker.message import Message
from ingestd.broker.retained import RetainedStore
from ingestd.broker.session import DeliveryJournal, Session, SubOptions


class Router:
    """The trie, the ingest sinks in it, and message routing."""

    def __init__(
        self,
        trie: SubscriptionTrie,
        retained: RetainedStore,
        stats: BrokerStats,
        limits: LimitLog | None = None,
    ) -> None:
        self.trie = trie
        self.retained = retained
        self.stats = stats
        self.limits = limits if limits is not None else LimitLog(stats)
        self.sinks: list[tuple[str, MessageSink]] = []
        # Set by the Broker (see Broker.store / journal / ack_after_journal).
        self.store: BrokerStore | None = None
        self.journal: DeliveryJournal | None = None
        self.ack_after_journal = False
        # fast_target bound once: every connection's fast path holds this one object.
        self.classify = self.fast_target

    # -- ingest sinks -------------------------------------------------------

    def add_sink(self, topic_filter: str, sink: MessageSink) -> None:
        """Register an internal subscriber (an ingest route) for ``topic_filter``."""
        self.trie.subscribe(topic_filter, sink, None)
        self.sinks.append((topic_filter, sink))

    def remove_sinks(self) -> None:
        for flt, sink in self.sinks:
            self.trie.unsubscribe(flt, sink)
        self.sinks.clear()

    # -- routing ----------------------------------------------------------

    def publish(self, message: Message, origin: Session | None) -> asyncio.Future[Any] | None:
        """Route one message to every matching session and sink.

        Returns a future to wait on before acknowledging the publisher (some
        sink must make it durable first), or None.
        """
        if message.retain:
            refused = self.retained.set(message)
            if refused is not None:
                # Delivered as usual, only not retained.
                self._retain_refused(refused, message)
            elif self.store is not None and not message.topic.startswith("$SYS/"):
                # ($SYS/ retained messages describe this process: kept in memory only.)
                if message.payload:
                    self.store.retained_set(message)
                else:
                    self.store.retained_delete(message.topic)
        subs, groups = self.trie.match_all(message.topic)
        if not subs and not groups:
            return None
        qos = message.qos
        topic = message.topic
        durable: list[asyncio.Future[Any]] | None = None
        journaled = False  # a persistent session journaled its delivery
        targets: dict[Session, list[Any]] | None = None
        single: Session | None = None
        single_opts: SubOptions | None = None
        for sub, opts in subs:
            if type(sub) is Session:
                if opts.no_local and sub is origin:
                    continue
                acl = sub.acl  # mqtt.acl_file: None when no ACL is configured
                if acl is not None:
                    bits = acl.decided.get(topic)  # acl.may_read, inlined
                    if bits is None:
                        bits = acl.access(topic)
                    if not bits & READ:
                        self.stats.acl_denied_read += 1
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

    def _retain_refused(self, key: str, message: Message) -> None:
        retained = self.retained
        if key == "max_retained_per_tree":
            bound = f"{retained.max_per_tree} under {retained.tree(message.topic)!r}"
        else:
            bound = str(retained.max_messages)
        self.limits.hit(
            key,
            f"message of client {message.client_id!r} to {message.topic!r} delivered but not"
            f" retained: {bound} retained messages already",
        )

    def _ingest_target(self, subs: list[Any]) -> IngestTarget | None:
        """The ``IngestTarget`` of ``subs`` (``trie.match_all``'s) if every one is an
        ingest route, else None."""
        entries = []
        for sub, _opts in subs:
            if type(sub) is Session or not isinstance(sub, RunSink):
                return None
            entries.append((sub.batch_run, sub.route, sub.durable))
        return IngestTarget(entries)

    def fast_target(self, topic: str) -> IngestTarget | SessionTarget | None:
        """What the compiled fast path does with ``topic``: an ``IngestTarget`` when only
        ingest routes take it, a ``SessionTarget`` when plain session subscriptions do
        (with the ingest routes that take it too), else None (:meth:`publish`)."""
        subs, groups = self.trie.match_all(topic)
        if groups or not subs:
            return None
        for sub, _opts in subs:
            if type(sub) is Session:
                return self.session_target(topic, subs)
        return self._ingest_target(subs)

    def session_target(self, topic: str, subs: list[Any]) -> SessionTarget | None:
        """The sessions ``subs`` (``trie.match_all(topic)``'s, no shared group) deliver
        to, merged per session as :meth:`publish` merges them, plus the ingest routes
        among ``subs``; None if another kind of subscriber takes ``topic`` or a session
        subscription has No Local (whose answer depends on the publisher), and for a
        ``$`` topic ($SYS and its rules stay in :meth:`publish`)."""
        if topic[0] == "$":
            return None
        merged: dict[Session, list[Any]] = {}
        sinks: list[Any] = []
        for sub, opts in subs:
            if type(sub) is not Session:
                sinks.append((sub, opts))
                continue
            if opts.no_local:
                return None
            t = merged.get(sub)
            if t is None:
                merged[sub] = [sub, opts.qos, [opts.sub_id] if opts.sub_id else None]
            else:
                if opts.qos > t[1]:
                    t[1] = opts.qos
                if opts.sub_id:
                    if t[2] is None:
                        t[2] = [opts.sub_id]
                    else:
                        t[2].append(opts.sub_id)
        ingest = None
        if sinks:
            ingest = self._ingest_target(sinks)
            if ingest is None:
                return None  # a subscriber that is not an ingest route (a stream, an RPC)
        return SessionTarget(list(merged.values()), self, ingest)

    def _deliver_shared(self, group: Any, message: Message) -> bool:
        """Deliver to one member; True if a persistent session journaled it."""
        members = group.members
        n = len(members)
        if not n:
            return False
        start = group.next_index()
        chosen = None
        first = None  # the first member that may read the topic
        topic = message.topic
        # Prefer a member that is online; an offline member's session queues it. A member
        # whose ACL does not let it read the topic is never chosen.
        for i in range(n):
            cand = members[(start + i) % n]
            sub = cand[0]
            if type(sub) is not Session:
                chosen = cand
                break
            acl = sub.acl
            if acl is not None and not acl.may_read(topic):
                continue
            if first is None:
                first = cand
            if sub.connection is not None:
                chosen = cand
                break
        if chosen is None:
            chosen = first
            if chosen is None:
                self.stats.acl_denied_read += 1
                return False
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


def _target(opts: SubOptions) -> list[Any]:
    return [opts.qos, opts.retain_as_published, [opts.sub_id] if opts.sub_id else None]
