# The session state of ingestd.broker.session, compiled (the module docstring of
# src/ingestd/broker/session.py is the theory of operation; this file is its code).
#
# Why: on the stock QoS 1 fan-in the per-delivery Python of Session.deliver,
# _send_new, _alloc_packet_id, pump and Delivery.__init__ was ~20 % of the
# broker's samples (py-spy, docs/benchmarks.md). As cdef classes the fields are
# C slots, the calls between them C calls, and the compiled fast path
# (ingestd._inbound) calls ``deliver`` without a Python frame. Python code sees
# the same classes, attributes and methods as before.

cimport cython

from ingestd._codec cimport _encode_publish
from ingestd._message cimport Message

import time
from collections import deque

cdef object _monotonic = time.monotonic
cdef object _deque = deque

# Reason codes from 0x80 up are failures [MQTT-2.4] (ingestd.mqtt.constants.Reason).
cdef int _FIRST_FAILURE = 0x80
# Records taken from the overflow per call while refilling the memory queue: the
# memory queue's byte bound may be passed by at most this many deliveries.
REFILL_BATCH = 64
cdef Py_ssize_t _REFILL_BATCH = REFILL_BATCH
# Memory a queued delivery costs beyond its payload and topic bytes (the Delivery, the
# Message, the bytes and str headers, the deque slot): measured with tracemalloc over
# 100,000 queued 100-byte deliveries.
DELIVERY_OVERHEAD = 400
cdef long long _OVERHEAD = DELIVERY_OVERHEAD

# The one empty map every session's ``subscriptions`` and ``inflight`` start as (issue
# 14, memory per idle client). A plain dict (the typed fields take no subclass), so it
# cannot refuse a write: every write site swaps in the session's own dict first
# (``_send_new``, ``Session.own_subscriptions``), and tests/test_idle_state.py checks it
# stays empty after real traffic.
cdef dict _NO_ENTRIES = {}
NO_ENTRIES = _NO_ENTRIES

# Delivery states (Delivery.QUEUED / PUBLISH_SENT / PUBREL_SENT).
cdef enum:
    D_QUEUED = 0
    D_PUBLISH_SENT = 1
    D_PUBREL_SENT = 2


@cython.final
cdef class SubOptions:
    """One subscription's options as granted."""

    def __init__(self, int qos, bint no_local=False, bint retain_as_published=False,
                 int retain_handling=0, long long sub_id=0):
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling
        self.sub_id = sub_id

    def __repr__(self):
        return (
            f"SubOptions(qos={self.qos}, nl={self.no_local}, rap={self.retain_as_published},"
            f" rh={self.retain_handling}, id={self.sub_id})"
        )


# Not tracked by the cyclic GC (no_gc): a Delivery refers to its Message (itself
# untracked), a list of ints and ints, never to anything that could refer back to
# it. A backlog of hundreds of thousands of queued deliveries (the memory pool)
# then neither triggers collections nor is traversed by every full one.
@cython.final
@cython.freelist(64)
@cython.no_gc
cdef class Delivery:
    """One outbound QoS 1/2 delivery: a shared message plus this session's view of it."""

    QUEUED = 0
    PUBLISH_SENT = 1
    PUBREL_SENT = 2

    def __init__(self, Message message not None, int qos, bint retain, sub_ids):
        self.message = message
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        self.packet_id = 0
        self.state = D_QUEUED
        self.seq = 0


cdef inline Delivery _new_delivery(Message message, int qos, bint retain, object sub_ids):
    cdef Delivery d = Delivery.__new__(Delivery)
    d.message = message
    d.qos = qos
    d.retain = retain
    d.sub_ids = sub_ids
    return d


@cython.final
cdef class QueuePool:
    """Broker-wide memory (``mqtt.queue_pool_bytes``) for sessions past their own queue
    bounds: a burst is held in memory while the pool has room, and only the rest goes to
    the disk overflow. Charged per delivery as payload + topic + DELIVERY_OVERHEAD."""

    def __init__(self, long long max_bytes):
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0


cdef inline long long _size(Message m):
    return len(m.payload) + len(m.topic)


@cython.final
cdef class Session:
    """MQTT session state; see ingestd.broker.session's docstring for the state machine."""

    def __init__(self, str client_id, stats, long long max_queued_messages,
                 long long max_queued_bytes, overflow_store=None, QueuePool pool=None):
        self.client_id = client_id
        self.stats = stats
        # The user name of its last connection (None: anonymous, or restored from the store).
        self.username = None
        self.user_known = True  # False: restored from a store row that did not keep it
        # The ACL its messages are read under (mqtt.acl_file; None: no ACL configured).
        # Set from its last connection (Auth.client_acl); the router checks it on
        # every delivery, so it also governs while the session is offline.
        self.acl = None
        # The connected client's outbound side (None: offline): the ``connection`` property.
        self._connection = None
        # Both start as the one shared NO_ENTRIES (an idle client holds no empty dicts of
        # its own, 64 bytes each); the code that first writes one makes the session's own:
        # ``_send_new`` here, the registry (``own_subscriptions``) for subscriptions.
        self.subscriptions = _NO_ENTRIES
        # Plain dicts keep insertion (send) order.
        self.inflight = _NO_ENTRIES
        # Created on first use: an empty deque costs ~760 bytes, and most sessions never queue.
        self.queue = None
        self.queued_bytes = 0
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        # Where deliveries past the memory bound go (None: nowhere, they are dropped);
        # this session's queue in it is made on first use.
        self.overflow_store = overflow_store
        self.overflow = None
        # The broker-wide memory a session past its own bounds may borrow before the disk
        # (None: none), and how much of it this session holds (released as its queue drains).
        self.pool = pool
        self.pooled = 0
        # Made on demand (``qos2_ids``); its channel drops it again when idle.
        self.inbound_qos2 = None
        self.next_packet_id = 1
        self.send_window = 65_535
        self.expiry_interval = 0
        self.expiry_handle = None
        # A will waiting for its Will Delay Interval after the connection ended.
        self.will = None
        self.will_handle = None
        # The broker store's delivery journal (None: no store).
        self.journal = None
        # Template variables learned by devices.schemes, by scheme index (None: none).
        self.device_vars = None

    @property
    def connection(self):
        """The connected client's outbound side (the Channel), or None: offline."""
        return self._connection

    @connection.setter
    def connection(self, value):
        self._connection = value
        self._out_known = False
        self._port = None
        self._delivered = None

    # -- writing ----------------------------------------------------------

    cdef int _look_up_port(self) except -1:
        """Ask the connection once whether its PUBLISHes may be written here
        (``plain_port()``: its port, protocol version, the client's Maximum Packet
        Size and the delivered counters, or None when it rewrites them: outbound
        topic aliases). An Outbound without ``plain_port`` always writes its own."""
        self._out_known = True
        self._port = None
        conn = self._connection
        plain = getattr(conn, "plain_port", None) if conn is not None else None
        if plain is None:
            return 0
        got = plain()
        if got is None:
            return 0
        self._port, self._version, self._max_packet, self._delivered = got
        return 0

    cdef bint _writable(self, object conn) except -1:
        if not self._out_known:
            self._look_up_port()
        if self._port is not None:
            return self._port.writable()
        return conn.writable()

    cdef bint _send_publish(self, object conn, Message m, int qos, bint retain, object sub_ids,
                            int pid, bint dup) except -1:
        """Channel.send_publish for the common case, written straight to the port: the
        same bytes, the same drop of a QoS 0 PUBLISH over the outbound bound, the same
        count. Subscription identifiers, a Message Expiry, MQTT 5 properties and a
        packet over the client's maximum go to ``conn.send_publish``."""
        if not self._out_known:
            self._look_up_port()
        port = self._port
        if (port is None or sub_ids is not None or m.expires_at is not None
                or (self._version == 5 and m.properties)):
            return conn.send_publish(m, qos, retain, sub_ids, pid, dup)
        if qos == 0 and not port.writable():
            return False
        data = _encode_publish(m.topic, m.payload, qos, retain, dup, pid, None, self._version)
        if self._max_packet and len(data) > self._max_packet:
            return conn.send_publish(m, qos, retain, sub_ids, pid, dup)  # drops and counts
        port.send(data)
        self._delivered[qos] += 1
        return True

    # -- outbound ---------------------------------------------------------

    cpdef bint deliver(self, Message message, int qos, bint retain, object sub_ids,
                       long long seq=0) except -1:
        """Deliver one message to this session at ``qos`` (already min'd with the grant).

        ``seq``: the delivery's journal key when it is restored from the journal.
        Returns True if the delivery was recorded in the journal just now.
        """
        cdef object conn = self._connection
        cdef Delivery d
        cdef long long size, charge
        cdef QueuePool pool
        cdef bint journaled
        if qos == 0:
            if conn is None:
                # QoS 0 is not queued for offline sessions (as Mosquitto's default).
                return False
            if not self._send_publish(conn, message, 0, retain, sub_ids, 0, False):
                self.stats.drop("qos0_queue_full")
            return False
        if self.overflow:  # not empty: later deliveries wait behind it, in order
            return self._to_overflow(message, qos, retain, sub_ids, seq)
        d = _new_delivery(message, qos, retain, sub_ids)
        if seq:
            d.seq = seq
        queue = self.queue
        if (
            conn is not None
            and not queue
            and len(self.inflight) < self.send_window
            and self._writable(conn)
        ):
            journaled = self._accepted(d)
            self._send_new(conn, d)
            return journaled
        size = _size(message)
        if queue is None:
            queue = self.queue = _deque()
        if (
            len(queue) >= self.max_queued_messages
            or self.queued_bytes + size > self.max_queued_bytes
        ):
            # Past this session's own bounds: borrow from the broker-wide pool, else disk.
            pool = self.pool
            charge = size + _OVERHEAD
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

    cdef bint _to_overflow(self, Message message, int qos, bint retain, object sub_ids,
                           long long seq) except -1:
        """The memory queue is full (or the overflow is not empty): the delivery goes to
        disk, or is dropped and counted if there is no overflow or its budget is spent.
        No Delivery is built unless the journal needs one."""
        store = self.overflow_store
        cdef bint journaled = False
        cdef Delivery d = None
        if store is not None:
            overflow = self.overflow
            if overflow is None:
                overflow = self.overflow = store.queue()
            if not seq and self.expiry_interval and self.journal is not None:
                # Journaled wherever it waits; its key goes into the record.
                d = _new_delivery(message, qos, retain, sub_ids)
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
                d = _new_delivery(message, qos, retain, sub_ids)
                d.seq = seq
            self._done(d)
        return False

    cdef object _refill(self):
        """Move deliveries from the overflow's head into the (empty) memory queue, up to
        its bounds (bytes: passed by at most REFILL_BATCH deliveries)."""
        overflow = self.overflow
        assert overflow is not None
        queue = self.queue
        if queue is None:
            queue = self.queue = _deque()
        cdef long long limit = self.max_queued_messages
        cdef long long room
        while overflow.count and len(queue) < limit and self.queued_bytes < self.max_queued_bytes:
            room = limit - len(queue)
            if not self._enqueue_taken(overflow.take(_REFILL_BATCH if _REFILL_BATCH < room else room)):
                break  # a segment lost under us (logged by take)
        return queue

    def take_overflow(self):
        """Move the whole overflow into the memory queue, past its bounds (a graceful
        stop saving pending deliveries reads them from there)."""
        overflow = self.overflow
        if overflow:
            self._enqueue_taken(overflow.take(overflow.count))

    cdef Py_ssize_t _enqueue_taken(self, list taken) except -1:
        """Append deliveries taken from the overflow to the memory queue; how many."""
        cdef Delivery d
        cdef Message message
        queue = self.queue
        if queue is None:
            queue = self.queue = _deque()
        for message, qos, retain, sub_ids, seq in taken:
            d = _new_delivery(message, qos, retain, sub_ids)
            d.seq = seq
            queue.append(d)
            self.queued_bytes += _size(message)
        return len(taken)

    cdef bint _accepted(self, Delivery d) except -1:
        """Journal a new QoS 1/2 delivery of a persistent session (restored ones already are)."""
        if not d.seq and self.expiry_interval and self.journal is not None:
            self.journal.put(self.client_id, d)
            return True
        return False

    cdef int _done(self, Delivery d) except -1:
        """A delivery completed or was dropped: it leaves the journal."""
        if d.seq and self.journal is not None:
            self.journal.done(self.client_id, d)
        return 0

    cdef int _alloc_packet_id(self) except -1:
        cdef int pid = self.next_packet_id
        cdef dict inflight = self.inflight
        # At most send_window (<= 65535) ids are in use, so a free one exists.
        while pid in inflight:
            pid = pid + 1 if pid < 65_535 else 1
        self.next_packet_id = pid + 1 if pid < 65_535 else 1
        return pid

    cdef int _send_new(self, object conn, Delivery d) except -1:
        cdef int pid = self._alloc_packet_id()
        d.packet_id = pid
        d.state = D_PUBLISH_SENT
        if self._send_publish(conn, d.message, d.qos, d.retain, d.sub_ids, pid, False):
            if self.inflight is _NO_ENTRIES:
                self.inflight = {}
            self.inflight[pid] = d
        else:
            # Too large for the client's Maximum Packet Size; dropped and counted there.
            self._done(d)
        return 0

    cpdef pump(self):
        """Move queued deliveries into the inflight window while the socket accepts them."""
        conn = self._connection
        if conn is None:
            return
        queue = self.queue
        cdef double now = _monotonic()
        cdef Delivery d
        cdef Message m
        cdef long long size, give
        while len(self.inflight) < self.send_window and self._writable(conn):
            if not queue:
                if not self.overflow:
                    break
                queue = self._refill()
            d = queue.popleft()
            m = d.message
            size = _size(m)
            self.queued_bytes -= size
            if self.pooled:  # give back what the pool lent for the queue's excess
                give = size + _OVERHEAD
                if give > self.pooled:
                    give = self.pooled
                self.pooled -= give
                self.pool.used -= give  # pooled implies a pool
            if m.expires_at is not None and now >= m.expires_at:
                self.stats.drop("expired")
                self._done(d)
                continue
            self._send_new(conn, d)

    def resend_inflight(self):
        """On session resume: re-send unacknowledged PUBLISH (DUP=1) and PUBREL in order."""
        conn = self.connection
        assert conn is not None
        cdef double now = _monotonic()
        cdef Delivery d
        for pid, d in list(self.inflight.items()):
            if d.state == D_PUBREL_SENT:
                conn.send_pubrel(pid)
            elif d.message.expired(now) and d.qos == 1:
                # [MQTT-3.3.2-5] expired messages are not delivered; QoS 2 PUBLISH already
                # sent once must complete its flow, so only QoS 1 is discarded here.
                del self.inflight[pid]
                self.stats.drop("expired")
                self._done(d)
            else:
                conn.send_publish(d.message, d.qos, d.retain, d.sub_ids, pid, True)

    def on_puback(self, int packet_id):
        cdef Delivery d = self.inflight.get(packet_id)
        if d is None or d.qos != 1:
            return False
        del self.inflight[packet_id]
        self._done(d)
        self.pump()
        return True

    def acked(self, list journaled):
        """A run of PUBACKs completed deliveries (``ingestd._inbound.take_pubacks``
        took them out of ``inflight``): the ``journaled`` ones leave the journal, then
        one pump fills the freed window, as ``on_puback`` per ack would have."""
        cdef Delivery d
        if journaled is not None:
            for d in journaled:
                self._done(d)
        self.pump()

    def on_pubrec(self, int packet_id, int reason_code):
        cdef Delivery d = self.inflight.get(packet_id)
        if d is None or d.qos != 2 or d.state != D_PUBLISH_SENT:
            return d is not None and d.state == D_PUBREL_SENT
        if reason_code >= _FIRST_FAILURE:
            # The receiver refused it: the flow ends here [MQTT-4.3.3].
            del self.inflight[packet_id]
            self._done(d)
            self.pump()
            return True
        d.state = D_PUBREL_SENT
        return True

    def on_pubcomp(self, int packet_id):
        cdef Delivery d = self.inflight.get(packet_id)
        if d is None or d.state != D_PUBREL_SENT:
            return False
        del self.inflight[packet_id]
        self._done(d)
        self.pump()
        return True

    def clear_pending(self):
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

    def qos2_ids(self):
        """``inbound_qos2``, made if it does not exist yet."""
        ids = self.inbound_qos2
        if ids is None:
            ids = self.inbound_qos2 = set()
        return ids

    def own_subscriptions(self):
        """``subscriptions``, made a dict of this session's own if it was NO_ENTRIES."""
        if self.subscriptions is _NO_ENTRIES:
            self.subscriptions = {}
        return self.subscriptions

    def cancel_timers(self):
        if self.expiry_handle is not None:
            self.expiry_handle.cancel()
            self.expiry_handle = None
        if self.will_handle is not None:
            self.will_handle.cancel()
            self.will_handle = None

    def __repr__(self):
        state = "online" if self.connection is not None else "offline"
        return (
            f"<Session {self.client_id!r} {state} subs={len(self.subscriptions)}"
            f" inflight={len(self.inflight)} queued={len(self.queue or ())}"
            f" overflow={len(self.overflow or ())}>"
        )
