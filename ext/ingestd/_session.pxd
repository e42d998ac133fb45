# Declarations of ingestd._session (ext/ingestd/_session.pyx): the session state
# of ingestd.broker.session, compiled. Python code reads and writes the public
# fields as attributes; compiled callers (ingestd._inbound) call the cpdef methods.

cimport cython

from ingestd._message cimport Message


@cython.final
cdef class SubOptions:
    cdef public int qos
    cdef public bint no_local
    cdef public bint retain_as_published
    cdef public int retain_handling
    cdef public long long sub_id


@cython.final
@cython.no_gc
cdef class Delivery:
    cdef public Message message
    cdef public int qos
    cdef public bint retain
    cdef public object sub_ids       # list[int] or None
    cdef public int packet_id
    cdef public int state            # QUEUED, PUBLISH_SENT, PUBREL_SENT
    cdef public long long seq        # its key in the delivery journal (0: none)


@cython.final
cdef class QueuePool:
    cdef public long long max_bytes
    cdef public long long used
    cdef public long long peak


@cython.final
cdef class Session:
    cdef public str client_id
    cdef public object stats         # BrokerStats
    cdef public object username      # str or None
    cdef public bint user_known
    cdef public object acl           # ClientAcl or None
    cdef object _connection          # the ``connection`` property: Outbound or None
    cdef public dict subscriptions   # filter -> SubOptions
    cdef public dict inflight        # packet id -> Delivery, in send order
    cdef public object queue         # deque[Delivery] or None
    cdef public long long queued_bytes
    cdef public long long max_queued_messages
    cdef public long long max_queued_bytes
    cdef public object overflow_store
    cdef public object overflow      # OverflowQueue or None
    cdef public QueuePool pool
    cdef public long long pooled
    cdef public set inbound_qos2
    cdef public int next_packet_id
    cdef public int send_window
    cdef public long long expiry_interval
    cdef public object expiry_handle
    cdef public object will
    cdef public object will_handle
    cdef public object journal       # DeliveryJournal or None
    cdef public object device_vars
    # The connection's plain writer (Channel.plain_port), looked up once per connection:
    cdef bint _out_known             # looked up for the current connection
    cdef object _port                # its port when PUBLISHes may be written here, else None
    cdef int _version
    cdef Py_ssize_t _max_packet      # the client's Maximum Packet Size (0: none)
    cdef list _delivered             # BrokerStats.messages_delivered

    cpdef bint deliver(self, Message message, int qos, bint retain, object sub_ids,
                       long long seq=*) except -1
    cdef bint _to_overflow(self, Message message, int qos, bint retain, object sub_ids,
                           long long seq) except -1
    cdef object _refill(self)
    cdef Py_ssize_t _enqueue_taken(self, list taken) except -1
    cdef bint _accepted(self, Delivery d) except -1
    cdef int _done(self, Delivery d) except -1
    cdef int _alloc_packet_id(self) except -1
    cdef int _send_new(self, object conn, Delivery d) except -1
    cdef int _look_up_port(self) except -1
    cdef bint _writable(self, object conn) except -1
    cdef bint _send_publish(self, object conn, Message m, int qos, bint retain, object sub_ids,
                            int pid, bint dup) except -1
    cpdef pump(self)
