# Declarations of ingestd._epoll (ext/ingestd/_epoll.pyx): the compiled TCP
# transport. One Hub per plain-TCP listener (one epoll instance, registered
# once with the event loop) and one Conn per accepted socket, which is the
# channel's Port (src/ingestd/broker/channel.py). The Python API is the .pyx's
# def methods; these fields say what each object holds.

cimport cython


@cython.final
cdef class Hub:
    cdef int _epfd                # the epoll instance (-1 once closed)
    cdef object _loop
    cdef object _new_channel      # new_channel(conn) -> the conn's channel
    cdef object _stats            # .bytes_sent: bytes handed to the kernel
    cdef Py_ssize_t _max_outbound # a conn is unwritable at this many pending bytes
    cdef readonly str transport_name
    cdef list _by_fd              # fd -> its Conn (None: not ours)
    cdef list _listening          # the listening socket objects
    cdef list _dirty              # Conns with bytes queued this loop turn
    cdef bint _flush_scheduled
    cdef object _flush_cb         # self._flush_dirty, made once
    cdef object _lost_cb          # self._run_lost, made once
    cdef list _lost               # Conns closed this turn: connection_lost is due
    cdef char* _rbuf              # the one read buffer every Conn reads into
    cdef Py_ssize_t _rbuf_size
    cdef void* _events            # struct epoll_event[MAX_EVENTS]
    cdef readonly Py_ssize_t open_connections
    cdef readonly unsigned long long accepted
    cdef bint _accepting
    cdef bint _closed

    cdef int _ctl(self, int op, int fd, unsigned int mask, bint listener) except -1
    cdef int _accept(self, int lfd) except -1
    cdef int _schedule_flush(self) except -1


@cython.final
@cython.no_gc
cdef class Conn:
    # Slim on purpose: every idle connection is one of these (48 bytes with its
    # header). Not tracked by the garbage collector: the only cycle through it
    # (channel.port -> conn -> channel) is broken when connection_lost is delivered.
    cdef int _fd
    cdef unsigned int _flags
    cdef Hub _hub
    cdef object _channel
    cdef object _out              # None, or bytes / bytearray not yet taken by the kernel
    # (No cdef methods: module functions in the .pyx, so no vtable pointer per Conn.)
