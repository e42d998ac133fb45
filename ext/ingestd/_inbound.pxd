# Declarations of ingestd._inbound (ext/ingestd/_inbound.pyx): a connection's
# inbound acks (Inbound) and the ingest fast path (BatchRun, IngestTarget).
# The Python API is the .pyx's def methods; these fields and cdef methods are
# for compiled callers (and say what each object holds).

cimport cython

from ingestd._message cimport Message
from ingestd._trie cimport SubscriptionTrie


@cython.final
cdef class BatchRun:
    cdef object _add_run
    cdef bint _keep_routes        # the table has several routes: keep each message's
    cdef list _msgs
    cdef list _routes
    cdef bint _durable            # a message of the run must be durable before its ack
    cdef bint _touched            # in the current run's list of runs to hand over
    cdef object _fut              # what the last hand-over returned

    cdef int _hand_over(self) except -1


@cython.final
cdef class IngestTarget:
    cdef tuple _runs              # BatchRun per route
    cdef tuple _routes
    cdef tuple _durable           # bools
    cdef Py_ssize_t _n_durable
    cdef BatchRun _only_durable   # the one durable route's run, when _n_durable == 1
    cdef object _gathered         # gather of the durable runs' futures, this run
    cdef Py_ssize_t _stamp        # the run _gathered belongs to


@cython.final
cdef class SessionTarget:
    cdef tuple _sessions          # the subscribed Sessions, each once
    cdef int* _qos                # per session: its highest granted QoS for the topic
    cdef tuple _sub_ids           # per session: list of subscription identifiers or None
    cdef Py_ssize_t _n
    cdef object _router           # ack_after_journal / journal (Router)
    cdef IngestTarget _ingest     # the ingest routes that take the topic too, or None


@cython.final
cdef class Inbound:
    cdef object _ready            # the channel's _ack_ready: the futures' done callback
    cdef object _send             # the channel's send
    cdef list _futs               # per ack entry: its future or None
    cdef unsigned int* _codes     # per ack entry: _code(ptype, pid, qos)
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _head         # first entry not yet released
    cdef object _watch            # the future ``ready`` is already registered on
    cdef public int pending_qos1  # QoS 1 PUBLISHes not yet acknowledged
    cdef readonly unsigned long long taken  # PUBLISHes the fast path handed to ingest
    cdef readonly unsigned long long routed  # PUBLISHes it delivered to sessions

    # fast path (enabled by attach, once the connection is CONNECTED)
    cdef bint _enabled
    cdef int _version
    cdef int _receive_maximum
    cdef int _alias_max           # our Topic Alias Maximum
    cdef dict _aliases            # the connection's inbound alias -> topic (shared)
    cdef SubscriptionTrie _trie
    cdef Py_ssize_t _generation
    cdef object _classify         # router.fast_target(topic) -> IngestTarget | SessionTarget | None
    cdef dict _cache              # topic -> IngestTarget or None (created on first use)
    cdef int _max_topic_length    # mqtt.max_topic_length (UTF-8 bytes; 0: none)
    cdef int _max_topic_levels    # mqtt.max_topic_levels (0: none)
    cdef str _client_id
    cdef object _username
    cdef set _qos2                # the session's inbound_qos2
    cdef object _stats            # the broker's BrokerStats
    cdef Py_ssize_t _stamp
    # Scratch lists of a run, created with the first fast PUBLISH (a connection
    # that never sends one, e.g. an idle device, carries none of them):
    cdef list _run_targets        # per message of the current run: its IngestTarget; for
                                  # a session target the journal future its ack waits on
                                  # (or None), or (IngestTarget, that future) if both
    cdef list _run_pids           # per message of the current run: packet id (0: QoS 0)
    cdef list _touched            # BatchRuns with messages in the current run

    cdef int _append(self, fut, unsigned int code) except -1
    cpdef bytes queue(self, fut, int ptype, int pid, int qos, int reason=*)
    cdef object _target(self, str topic)
    cdef bint _over_limit(self, str topic) except -1
    cdef int _abandon(self) except -1
    cdef object _deliver(self, SessionTarget target, Message msg)
    cdef object _ingest_fut(self, IngestTarget target)
    cdef int _run(self, int qos0, int qos1, int n_ingest) except -1
