# The inbound side of one MQTT connection, compiled: the queue of its QoS 1/2
# acknowledgements and the fast path for PUBLISH packets that only ingest
# routes take.
#
# Why: at ingest rates the broker's per-message Python (the PUBLISH handler, a
# Message routed through Broker.publish, one sink call and one batcher call per
# route, one ack entry and one ack encoding per message) cost ~2.5 us of the
# ~5 us the broker spent per ingested message (py-spy, docs/benchmarks.md).
# Here a run of such PUBLISH packets from one read is handled in one call: each
# becomes a Message appended to its tables' run lists, each table's batcher
# takes the whole run at once, and their acks are queued against the batch
# futures in arrival order; acks are released as one write of 4-byte packets.
#
# Contract (docs/architecture.md, "Inbound fast path"): a packet takes this
# path only if the connection is CONNECTED, it is a PUBLISH of QoS 0 or 1
# without RETAIN, its topic is within mqtt.max_topic_length / max_topic_levels,
# and either every subscriber its topic matches is an ingest route (an
# IngestTarget), or every one is a plain session subscription (a
# SessionTarget: no shared group, no ingest route, no No Local, not a "$"
# topic). MQTT 5 properties are handled as
# _on_publish handles them: a Topic Alias is resolved (or set) in the
# connection's alias map and removed from the properties, a Message Expiry
# Interval becomes the Message's expires_at; an alias _on_publish would
# refuse leaves the packet to it. Everything else, and the packet that breaks a
# run, goes through Channel._on_publish as before. The result is the
# same as the per-message path: the same Messages reach the same batchers in
# the same order (per table), the same acks leave in arrival order.
#
# Length: this file is over 600 lines because the ack queue, the ingest runs and
# the session deliveries of a run share one loop and one ack pass (the order of
# acks across them is the contract); split, each would need the others' state.
#
# Session targets: a message whose topic only plain session subscriptions take
# is delivered at once, in the loop (Session.deliver per subscribed session,
# with the read ACL checked per delivery and the QoS min'd with the grant, as
# Router.publish does), so per-session order is arrival order; its ack is
# queued with the rest of the run, behind the journal's durability future when
# persistence.ack_after_journal asks for it.

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memmove

from ingestd._codec cimport (
    PROP_MESSAGE_EXPIRY_INTERVAL as _P_MESSAGE_EXPIRY,
    PROP_TOPIC_ALIAS as _P_TOPIC_ALIAS,
    PT_PUBACK as _PUBACK,
    PubAck,
    Publish,
)
from ingestd._message cimport Message, new_message
from ingestd._session cimport Delivery, Session
from ingestd._trie cimport SubscriptionTrie

import asyncio
import time

cdef object _gather = asyncio.gather
cdef object _now = time.time
cdef object _monotonic = time.monotonic
# ingestd.broker.acl.READ (tests/test_inbound.py checks they agree).
cdef int READ = 1
READ_BIT = READ

cdef enum:
    # Topics one connection keeps the classification of (cleared when full):
    # a device publishes to a handful of topics over and over.
    CACHE_MAX = 256
    # Released ack entries at the head are dropped once this many pile up.
    _COMPACT_AT = 1024

# An ack entry: packet id (16 bits) | packet type << 16 | qos << 20 | reason << 24.
# (The cdef classes' fields and cdef methods are declared in _inbound.pxd.)
cdef inline unsigned int _code(int ptype, int pid, int qos, int reason) noexcept:
    return (<unsigned int>pid | (<unsigned int>ptype << 16) | (<unsigned int>qos << 20)
            | (<unsigned int>(reason & 0xFF) << 24))


# A success ack (PUBACK 4 / PUBREC 5): 4 bytes under 3.1.1 and 5.0 alike (v5 omits
# reason code 0 and the properties).
cdef inline void _write_ack(char* p, int ptype, int pid) noexcept:
    p[0] = <char>(ptype << 4)
    p[1] = 2
    p[2] = <char>((pid >> 8) & 0xFF)
    p[3] = <char>(pid & 0xFF)


# A v5 failure ack (reason >= 0x80, e.g. 0x87 for a PUBLISH the ACL refuses): 5 bytes.
cdef inline void _write_ack_reason(char* p, int ptype, int pid, int reason) noexcept:
    p[0] = <char>(ptype << 4)
    p[1] = 3
    p[2] = <char>((pid >> 8) & 0xFF)
    p[3] = <char>(pid & 0xFF)
    p[4] = <char>(reason & 0xFF)


@cython.final
cdef class BatchRun:
    """The messages one table's batcher gets from the current fast run.

    One per TableBatcher, shared by every connection (one event loop; a run is
    handed over before ``Inbound.take`` returns). ``add_run(msgs, routes,
    durable)`` is the batcher's: it takes the run and returns the batch future
    when ``durable`` (else None).
    """

    def __cinit__(self, add_run, bint keep_routes):
        self._add_run = add_run
        self._keep_routes = keep_routes
        self._msgs = []
        self._routes = [] if keep_routes else None

    cdef int _hand_over(self) except -1:
        cdef list msgs = self._msgs
        cdef list routes = self._routes
        self._msgs = []
        if self._keep_routes:
            self._routes = []
        self._touched = False
        durable = self._durable
        self._durable = False
        self._fut = self._add_run(msgs, routes, durable)
        return 0


@cython.final
cdef class IngestTarget:
    """What a topic reaches when only ingest routes subscribe to it: per route, the
    batch run of its table, the route and whether its acks wait for durability."""


    def __cinit__(self, entries):
        """``entries``: (BatchRun, route, durable) per matching route."""
        runs = []
        routes = []
        durable = []
        cdef BatchRun run
        self._n_durable = 0
        for entry in entries:
            run = entry[0]
            runs.append(run)
            routes.append(entry[1])
            d = bool(entry[2])
            durable.append(d)
            if d:
                self._n_durable += 1
                self._only_durable = run
        if not runs:
            raise ValueError("an ingest target needs at least one route")
        self._runs = tuple(runs)
        self._routes = tuple(routes)
        self._durable = tuple(durable)
        self._stamp = -1

    def __len__(self):
        return len(self._runs)


@cython.final
cdef class SessionTarget:
    """What a topic reaches when only plain session subscriptions take it: each
    subscribed session once, with the highest QoS its overlapping subscriptions
    grant and their subscription identifiers (Router.publish merges the same way).

    Made by ``Router.fast_target`` and kept per connection until the trie changes
    (any SUBSCRIBE or UNSUBSCRIBE, a replaced grant included), so the grants it
    holds are the trie's. What can change without the trie (a session's ACL, its
    connection, its queue) is read per delivery.
    """

    def __cinit__(self, entries, router, IngestTarget ingest=None):
        """``entries``: (Session, granted QoS, subscription ids list or None) per session;
        ``ingest``: the ingest routes that take the topic too (None: none)."""
        cdef Py_ssize_t k
        sessions = []
        ids = []
        for entry in entries:
            sessions.append(<Session?>entry[0])
            ids.append(entry[2])
        if not sessions:
            raise ValueError("a session target needs at least one session")
        self._n = len(sessions)
        self._qos = <int*>PyMem_Malloc(self._n * sizeof(int))
        if self._qos == NULL:
            raise MemoryError()
        for k in range(self._n):
            self._qos[k] = entries[k][1]
        self._sessions = tuple(sessions)
        self._sub_ids = tuple(ids)
        self._router = router
        self._ingest = ingest

    def __dealloc__(self):
        PyMem_Free(self._qos)

    def __len__(self):
        return self._n


def take_pubacks(list packets, Py_ssize_t i, dict inflight):
    """The run of PUBACK packets of ``packets`` from ``i`` on, applied to a session's
    ``inflight`` (Session.on_puback without its pump: the caller pumps once).

    Returns ``(next index, deliveries acknowledged, journaled ones or None)``; an id
    not in flight at QoS 1 is ignored, as ``on_puback`` ignores it.
    """
    cdef Py_ssize_t n = len(packets)
    cdef object obj
    cdef PubAck p
    cdef Delivery d
    cdef int acked = 0
    cdef list journaled = None
    while i < n:
        obj = packets[i]
        if type(obj) is not PubAck:
            break
        p = <PubAck>obj
        if p.packet_type != _PUBACK:
            break
        i += 1
        d = <Delivery>inflight.get(p.packet_id)
        if d is None or d.qos != 1:
            continue
        del inflight[p.packet_id]
        acked += 1
        if d.seq:
            if journaled is None:
                journaled = []
            journaled.append(d)
    return i, acked, journaled


@cython.final
cdef class Inbound:
    """One connection's inbound acknowledgements (and its PUBLISH fast path).

    Acks of QoS 1/2 PUBLISHes leave in the order the PUBLISHes came
    [MQTT-4.6.0-2]: an ack whose message must first be made durable (its
    future) holds back the acks behind it. ``ready`` is called (as a done
    callback) when such a future completes; it then calls :meth:`release`.
    """

    def __cinit__(self, ready, send):
        self._ready = ready
        self._send = send
        self._futs = []
        self._codes = NULL
        self._cap = 0

    def __dealloc__(self):
        PyMem_Free(self._codes)

    # -- fast path set-up -------------------------------------------------------

    def attach(self, int version, int receive_maximum, SubscriptionTrie trie, classify,
               str client_id, username, set inbound_qos2, stats,
               dict aliases=None, int alias_max=0, int max_topic_length=0,
               int max_topic_levels=0):
        """Turn the fast path on for a CONNECTED connection of ``client_id``.

        ``aliases``: the connection's inbound Topic Alias map (shared with
        ``_on_publish``), ``alias_max`` our Topic Alias Maximum (MQTT 5).
        A topic over ``max_topic_length`` (UTF-8 bytes) or ``max_topic_levels``
        (0: no limit) is never taken: ``_on_publish`` refuses it.
        """
        self._max_topic_length = max_topic_length
        self._max_topic_levels = max_topic_levels
        self._version = version
        self._receive_maximum = receive_maximum
        self._aliases = aliases if aliases is not None else {}
        self._alias_max = alias_max
        self._trie = trie
        self._generation = trie.generation
        self._classify = classify
        self._client_id = client_id
        self._username = username
        self._qos2 = inbound_qos2
        self._stats = stats
        self._cache = None
        self._enabled = True

    @property
    def enabled(self):
        return self._enabled

    # -- acknowledgements ----------------------------------------------------

    @property
    def ack_count(self):
        """Acks queued and not yet sent."""
        return len(self._futs) - self._head

    cdef int _append(self, fut, unsigned int code) except -1:
        cdef Py_ssize_t n = len(self._futs)
        cdef unsigned int* grown
        if n == self._cap:
            self._cap = 64 if self._cap == 0 else self._cap * 2
            grown = <unsigned int*>PyMem_Realloc(self._codes, self._cap * sizeof(unsigned int))
            if grown == NULL:
                raise MemoryError()
            self._codes = grown
        self._codes[n] = code
        self._futs.append(fut)
        if fut is not None and fut is not self._watch:
            # release() frees every ack at the head whose future is done, so a
            # future already watched needs no second callback.
            self._watch = fut
            fut.add_done_callback(self._ready)
        return 0

    cpdef bytes queue(self, fut, int ptype, int pid, int qos, int reason=0):
        """Queue the ack (PUBACK 4 / PUBREC 5) of one PUBLISH of ``qos``.

        ``fut``: the message must be durable first (None: ack at once). Returns
        the ack to send now (nothing held back and no future), else None.
        ``reason``: a v5 reason code for the ack (0: success, 4 bytes); a
        refusal keeps its place in the order like any other ack.
        """
        cdef bytes out
        if fut is None and self._head == len(self._futs):
            if reason:
                out = PyBytes_FromStringAndSize(NULL, 5)
                _write_ack_reason(PyBytes_AS_STRING(out), ptype, pid, reason)
            else:
                out = PyBytes_FromStringAndSize(NULL, 4)
                _write_ack(PyBytes_AS_STRING(out), ptype, pid)
            return out
        if qos == 1:
            self.pending_qos1 += 1
        self._append(fut, _code(ptype, pid, qos, reason))
        return None

    def release(self):
        """Take every ack at the head whose future is done (or that has none).

        Returns ``(acks, failed)``: the acks' bytes to send as one write (b""
        when none), and None, or ``(future, packet id, qos)`` of the first ack
        whose future failed (the entries from it on stay queued; the caller
        closes the connection).
        """
        cdef Py_ssize_t i = self._head
        cdef Py_ssize_t n = len(self._futs)
        cdef list futs = self._futs
        cdef object durable = None
        cdef object fut
        cdef object failed = None
        cdef unsigned int code
        while i < n:
            fut = futs[i]
            if fut is not None and fut is not durable:
                if not fut.done():
                    break
                if fut.cancelled() or fut.exception() is not None:
                    code = self._codes[i]
                    failed = (fut, code & 0xFFFF, (code >> 20) & 0xF)
                    break
                durable = fut
            i += 1
        cdef Py_ssize_t size = 4 * (i - self._head)
        cdef Py_ssize_t j
        for j in range(self._head, i):
            if self._codes[j] >> 24:
                size += 1  # a v5 failure ack carries its reason code
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef char* p = PyBytes_AS_STRING(out)
        cdef int released_qos1 = 0
        for j in range(self._head, i):
            code = self._codes[j]
            if code >> 24:
                _write_ack_reason(p, (code >> 16) & 0xF, code & 0xFFFF, code >> 24)
                p += 5
            else:
                _write_ack(p, (code >> 16) & 0xF, code & 0xFFFF)
                p += 4
            if (code >> 20) & 0xF == 1:
                released_qos1 += 1
            futs[j] = None
        self.pending_qos1 -= released_qos1
        self._head = i
        if self._head == n:
            del futs[:]
            self._head = 0
        elif self._head >= _COMPACT_AT and self._head * 2 >= n:
            memmove(self._codes, self._codes + self._head, (n - self._head) * sizeof(unsigned int))
            del futs[:self._head]
            self._head = 0
        return out, failed

    def clear(self):
        """The connection is closing: forget queued acks, stop the fast path."""
        del self._futs[:]
        self._head = 0
        self._watch = None
        self._enabled = False
        self._cache = None
        self._classify = None
        self._qos2 = None
        self._aliases = None

    # -- the fast path --------------------------------------------------------

    cdef object _target(self, str topic):
        cdef object t
        if self._cache is None:
            self._cache = {}
        if self._trie.generation != self._generation:
            # Someone subscribed or unsubscribed: what a topic reaches may have changed.
            self._cache.clear()
            self._generation = self._trie.generation
        t = self._cache.get(topic, False)
        if t is False:
            if self._over_limit(topic):
                t = None  # _on_publish refuses it (and counts and logs the limit)
            else:
                t = self._classify(topic)
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[topic] = t
        return t

    cdef bint _over_limit(self, str topic) except -1:
        """ingestd.broker.limits.topic_over_limit, decided once per cached topic."""
        cdef Py_ssize_t n = len(topic)
        if self._max_topic_length and (
            n > self._max_topic_length
            or (n * 4 > self._max_topic_length
                and len(topic.encode()) > self._max_topic_length)
        ):
            return True
        if self._max_topic_levels and topic.count("/") >= self._max_topic_levels:
            return True
        return False

    def take(self, list packets, Py_ssize_t i):
        """Handle the fast PUBLISH packets of ``packets`` from index ``i`` on.

        Stops at the first packet that is not one (see the module comment).
        Returns the index of that packet (``len(packets)`` if all were taken).
        """
        if not self._enabled:
            return i
        cdef Py_ssize_t n = len(packets)
        cdef Py_ssize_t start = i
        cdef Publish p
        cdef object obj
        cdef object t
        cdef IngestTarget target
        cdef BatchRun run
        cdef Py_ssize_t r, nr
        cdef int qos1 = 0
        cdef int qos0 = 0
        cdef int n_ingest = 0         # handed to ingest runs
        cdef int n_routed = 0         # delivered to sessions
        cdef object fut
        cdef int limit = 0x7FFFFFFF
        cdef object received_at = None
        cdef object mono = None
        cdef object expires_at
        cdef object alias
        cdef object expiry
        cdef str topic
        cdef dict props
        cdef Message msg
        cdef list touched = self._touched
        cdef list targets = self._run_targets
        cdef list pids = self._run_pids
        if self._version == 5:
            limit = self._receive_maximum - self.pending_qos1 - len(self._qos2)
        while i < n:
            obj = packets[i]
            if type(obj) is not Publish:
                break
            p = <Publish>obj
            if p.qos > 1 or p.retain:
                break
            topic = p.topic
            props = p.properties
            alias = None
            if props:
                alias = props.get(_P_TOPIC_ALIAS)
                if alias is not None:
                    if alias > self._alias_max:
                        break  # _on_publish refuses it (0x94) [MQTT-3.3.2-9]
                    if not topic:
                        topic = self._aliases.get(alias)
                        if topic is None:
                            break  # used before it was set: _on_publish refuses it
            t = self._target(topic)
            if t is None:
                break
            if targets is None:
                targets = self._run_targets = []
                pids = self._run_pids = []
                touched = self._touched = []
            if p.qos == 1:
                if qos1 >= limit:
                    break  # _on_publish raises Receive Maximum exceeded [MQTT-3.3.4-9]
                qos1 += 1
            else:
                qos0 += 1
            if received_at is None:
                received_at = _now()
            expires_at = None
            if props:
                if alias is not None:
                    if p.topic:
                        self._aliases[alias] = topic  # the PUBLISH sets the alias
                    props = dict(props)
                    del props[_P_TOPIC_ALIAS]
                expiry = props.get(_P_MESSAGE_EXPIRY)
                if expiry is not None:
                    if mono is None:
                        mono = _monotonic()
                    expires_at = mono + expiry
            msg = new_message(topic, p.payload, p.qos, False, props, self._client_id,
                              self._username, received_at, expires_at)
            fut = None
            if type(t) is SessionTarget:
                # Delivered now, in arrival order; the ack waits for the run's end.
                try:
                    fut = self._deliver(<SessionTarget>t, msg)
                except BaseException:
                    self._abandon()
                    raise
                n_routed += 1
                target = (<SessionTarget>t)._ingest
                if target is None:
                    targets.append(fut)
                    pids.append(p.packet_id)
                    i += 1
                    continue
            else:
                target = <IngestTarget>t
            n_ingest += 1
            nr = len(target._runs)
            for r in range(nr):
                run = <BatchRun>target._runs[r]
                if not run._touched:
                    run._touched = True
                    touched.append(run)
                run._msgs.append(msg)
                if run._keep_routes:
                    run._routes.append(target._routes[r])
                if p.qos and target._durable[r]:
                    run._durable = True
            # (a session target's journal future too, when ack_after_journal made one)
            targets.append(target if fut is None else (target, fut))
            pids.append(p.packet_id)
            i += 1
        if i == start:
            return i
        self.taken += n_ingest
        self.routed += n_routed
        self._run(qos0, qos1, n_ingest)
        return i

    cdef int _abandon(self) except -1:
        """A delivery raised mid-run (a bug): forget the run without acking any of it
        (its publishers re-send), so the next run starts clean."""
        cdef BatchRun run
        if self._touched is not None:
            for run in self._touched:
                run._msgs = []
                if run._keep_routes:
                    run._routes = []
                run._touched = False
                run._durable = False
            del self._touched[:]
        if self._run_targets is not None:
            del self._run_targets[:]
            del self._run_pids[:]
        return 0

    cdef object _deliver(self, SessionTarget target, Message msg):
        """Router.publish for a session target: ``msg`` to each session that may read
        its topic, at the granted QoS (at most the message's), RETAIN clear. Returns the
        future the publisher's ack waits on (ack_after_journal), or None."""
        cdef Py_ssize_t k
        cdef int q
        cdef int qos = msg.qos
        cdef bint journaled = False
        cdef str topic = msg.topic
        cdef Session session
        cdef object acl, bits, ids, router
        for k in range(target._n):
            session = <Session>target._sessions[k]
            acl = session.acl  # mqtt.acl_file: None when no ACL is configured
            if acl is not None:
                bits = acl.decided.get(topic)  # acl.may_read, inlined
                if bits is None:
                    bits = acl.access(topic)
                if not (<int>bits) & READ:
                    self._stats.acl_denied_read += 1
                    continue
            q = target._qos[k]
            if q > qos:
                q = qos
            ids = target._sub_ids[k]
            if ids is not None:
                ids = list(ids)  # each delivery owns its list, as Router.publish's
            if session.deliver(msg, q, False, ids):
                journaled = True
        if journaled:
            router = target._router
            if router.ack_after_journal and router.journal is not None:
                return router.journal.durable_future()
        return None

    cdef object _ingest_fut(self, IngestTarget target):
        """What an ack of ``target``'s message waits on in this run: None, the one
        durable route's batch future, or the gather of several (made once per run)."""
        if target._n_durable == 0:
            return None
        if target._n_durable == 1:
            return target._only_durable._fut
        if target._stamp != self._stamp:
            target._stamp = self._stamp
            target._gathered = _gather(
                *[(<BatchRun>target._runs[r])._fut
                  for r in range(len(target._runs)) if target._durable[r]]
            )
        return target._gathered

    cdef int _run(self, int qos0, int qos1, int n_ingest) except -1:
        """Hand the run to the batchers, then queue its acks in arrival order."""
        cdef list touched = self._touched
        cdef list targets = self._run_targets
        cdef list pids = self._run_pids
        cdef BatchRun run
        cdef IngestTarget target
        cdef Py_ssize_t k, n = len(targets)
        cdef int pid
        cdef object fut
        cdef bytes ack
        cdef object t
        cdef bytearray now_out = None
        self._stamp += 1
        try:
            for run in touched:
                run._hand_over()
        finally:
            del touched[:]
        stats = self._stats
        received = stats.messages_received
        received[0] += qos0
        received[1] += qos1
        stats.messages_fast_path += n_ingest
        try:
            for k in range(n):
                pid = pids[k]
                if pid == 0:
                    continue  # QoS 0: no ack
                t = targets[k]
                if type(t) is IngestTarget:
                    fut = self._ingest_fut(<IngestTarget>t)
                elif type(t) is tuple:
                    # ingest routes and sessions, and the journal's future
                    fut = self._ingest_fut(<IngestTarget>(<tuple>t)[0])
                    fut = (<tuple>t)[1] if fut is None else _gather(fut, (<tuple>t)[1])
                else:
                    fut = t  # sessions only: the journal's future, or None
                ack = self.queue(fut, _PUBACK, pid, 1)
                if ack is not None:
                    # Nothing held back: ack now (one write for the run).
                    if now_out is None:
                        now_out = bytearray()
                    now_out += ack
        finally:
            del targets[:]
            del pids[:]
        if now_out is not None:
            self._send(bytes(now_out))
        return 0
