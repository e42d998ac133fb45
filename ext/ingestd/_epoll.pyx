# The compiled TCP transport: raw non-blocking sockets on one epoll instance.
#
# Why: with a uvloop transport per connection an idle MQTT connection costs
# ~1.2 KB before the broker holds anything for it (TCPTransport, its libuv
# handle, write list, cached data_received, the loop's weak reference;
# docs/benchmarks.md, "Idle connections"). Here a connection is one 48-byte
# Conn (fd, flags, hub, channel, pending bytes) plus a slot in the hub's fd
# table, and nothing of it is tracked by the garbage collector.
#
# How (docs/architecture.md, "Transport"):
# - One Hub per plain-TCP listener: its listening sockets and every accepted
#   socket are in one epoll instance, whose fd is registered once with the
#   event loop (loop.add_reader). When it is readable, one epoll_wait(0) hands
#   back up to MAX_EVENTS ready sockets; they are handled in that call.
#   Level-triggered: whatever is left (more events, unread bytes) makes the
#   epoll fd readable again on the next loop turn, so one busy socket cannot
#   starve the loop.
# - Reads: one recv() per readiness into the hub's one buffer (256 KiB); the
#   bytes read become one bytes object handed to channel.feed().
# - Writes: Conn.send() queues bytes (the first packet of a turn is kept as
#   is, later ones appended to a bytearray) and puts the Conn on the hub's dirty
#   list; one call_soon per hub and loop turn tries send() on each, so a burst
#   of deliveries costs one syscall per connection. What the kernel does not
#   take stays queued and EPOLLOUT is watched until it drains; the queue is
#   released (None) when empty. A connection is unwritable (writable() False)
#   while max_outbound bytes are queued and, once it was, until they drain to a
#   quarter of that; then channel.resume_writing() is called (asyncio's
#   pause_writing / resume_writing water marks).
# - pause_reading / resume_reading take EPOLLIN out of / into the mask.
# - close(last): queue `last`, stop reading, write what is queued, then close
#   the fd; a peer that reads nothing more gets LINGER_S seconds. A reset or a
#   write error closes at once, dropping what is queued. End of file from the
#   peer closes after the queued bytes (as asyncio does when eof_received
#   returns None). connection_lost() reaches the channel on the next loop turn
#   (as with asyncio), never from inside the call that closed.
# - An exception from the channel (feed, resume_writing) is logged and closes
#   that connection only.

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport strerror

import logging
import os

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct sockaddr:
        pass

    struct sockaddr_storage:
        unsigned short ss_family

    enum:
        AF_INET
        AF_INET6
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        SOL_SOCKET
        SO_ERROR

    int accept4(int fd, sockaddr* addr, socklen_t* addrlen, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int setsockopt(int fd, int level, int name, const void* value, socklen_t size)
    int getsockopt(int fd, int level, int name, void* value, socklen_t* size)
    int getpeername(int fd, sockaddr* addr, socklen_t* addrlen)

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP

    struct in_addr:
        pass

    struct in6_addr:
        pass

    struct sockaddr_in:
        uint16_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        uint16_t sin6_port
        in6_addr sin6_addr

    uint16_t ntohs(uint16_t)

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<errno.h>":
    enum:
        ECONNABORTED
        EPROTO
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM

cdef object _log = logging.getLogger("ingestd.transport")

cdef enum:
    MAX_EVENTS = 256            # ready sockets handled per wake-up
    ACCEPT_BATCH = 128          # connections accepted per listener wake-up
    READ_BUFFER = 262_144       # the hub's one read buffer
    EAGER_FLUSH_BYTES = 65_536  # queued bytes written at once instead of at the turn's end

    # Conn._flags
    F_READ_PAUSED = 1
    F_WANT_OUT = 2              # the kernel took less than queued: EPOLLOUT is watched
    F_DIRTY = 4                 # on the hub's dirty list
    F_OVER = 8                  # was unwritable: resume_writing due when drained
    F_CLOSING = 16              # close() called: writing what is queued, then closing
    F_CLOSED = 32               # fd closed
    F_IN_MASK = 64              # the mask epoll has: EPOLLIN
    F_OUT_MASK = 128            # the mask epoll has: EPOLLOUT
    F_REGISTERED = 256          # in the epoll set

# epoll_event.data: the fd, with this bit for a listening socket.
cdef uint64_t LISTENER_BIT = (<uint64_t>1) << 32
# Seconds a closing connection may take to hand its last bytes to a peer that
# reads nothing more.
LINGER_S = 10.0
# Seconds a listener rests after running out of file descriptors (as asyncio).
ACCEPT_RETRY_S = 1.0


cdef str _peer_of(int fd):
    cdef sockaddr_storage ss
    cdef socklen_t n = sizeof(ss)
    cdef char host[64]
    if getpeername(fd, <sockaddr*>&ss, &n) != 0:
        return "?"
    if ss.ss_family == AF_INET:
        if inet_ntop(AF_INET, &(<sockaddr_in*>&ss).sin_addr, host, sizeof(host)) == NULL:
            return "?"
        return f"{host.decode('ascii')}:{ntohs((<sockaddr_in*>&ss).sin_port)}"
    if ss.ss_family == AF_INET6:
        if inet_ntop(AF_INET6, &(<sockaddr_in6*>&ss).sin6_addr, host, sizeof(host)) == NULL:
            return "?"
        return f"[{host.decode('ascii')}]:{ntohs((<sockaddr_in6*>&ss).sin6_port)}"
    return "?"


@cython.final
cdef class Hub:
    """One plain-TCP listener's sockets on one epoll instance (see the module header).

    ``new_channel(conn)`` is called once per accepted socket with its :class:`Conn`
    (the channel's port) and returns the channel (``feed``, ``resume_writing``,
    ``connection_lost``)."""

    def __cinit__(self):
        self._epfd = -1

    def __init__(self, loop, new_channel, Py_ssize_t max_outbound_bytes, stats,
                 str transport_name="tcp"):
        self._loop = loop
        self._new_channel = new_channel
        self._stats = stats
        self._max_outbound = max_outbound_bytes
        self.transport_name = transport_name
        self._by_fd = []
        self._listening = []
        self._dirty = []
        self._lost = []
        self._flush_cb = self._flush_dirty
        self._lost_cb = self._run_lost
        self._rbuf = <char*>PyMem_Malloc(READ_BUFFER)
        self._events = PyMem_Malloc(MAX_EVENTS * sizeof(epoll_event))
        if self._rbuf == NULL or self._events == NULL:
            raise MemoryError()
        self._rbuf_size = READ_BUFFER
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            raise OSError(errno, f"epoll_create1: {strerror(errno).decode()}")
        loop.add_reader(self._epfd, self._ready)
        self._accepting = True

    def __dealloc__(self):
        if self._epfd >= 0:
            close(self._epfd)
        PyMem_Free(self._rbuf)
        PyMem_Free(self._events)

    @property
    def sockets(self):
        """The listening sockets (as ``asyncio.Server.sockets``)."""
        return list(self._listening)

    def listen(self, sock):
        """Accept connections from ``sock`` (bound, listening, non-blocking); it stays
        the caller's object, closed by :meth:`close`."""
        if self._closed:
            raise RuntimeError("hub is closed")
        self._ctl(EPOLL_CTL_ADD, sock.fileno(), EPOLLIN, True)
        self._listening.append(sock)

    def connections(self):
        """The open connections (a list of Conn)."""
        return [c for c in self._by_fd if c is not None]

    cdef int _ctl(self, int op, int fd, unsigned int mask, bint listener) except -1:
        cdef epoll_event ev
        ev.events = mask
        ev.data.u64 = <uint64_t>fd
        if listener:
            ev.data.u64 |= LISTENER_BIT
        if epoll_ctl(self._epfd, op, fd, &ev) != 0:
            raise OSError(errno, f"epoll_ctl: {strerror(errno).decode()}")
        return 0

    def _ready(self):
        """The epoll fd is readable: handle what is ready (the loop's reader callback)."""
        cdef epoll_event* events = <epoll_event*>self._events
        cdef int n, i, fd
        cdef uint32_t ev
        cdef uint64_t data
        cdef Conn conn
        if self._epfd < 0:
            return
        n = epoll_wait(self._epfd, events, MAX_EVENTS, 0)
        if n < 0:
            if errno == EINTR:
                return
            raise OSError(errno, f"epoll_wait: {strerror(errno).decode()}")
        for i in range(n):
            data = events[i].data.u64
            ev = events[i].events
            fd = <int>(data & 0xFFFFFFFF)
            if data & LISTENER_BIT:
                if self._accepting:
                    self._accept(fd)
                continue
            if fd >= len(self._by_fd):
                continue
            obj = self._by_fd[fd]
            if obj is None:
                continue  # closed earlier in this batch
            conn = <Conn>obj
            if ev & EPOLLOUT or (ev & (EPOLLERR | EPOLLHUP) and conn._flags & F_WANT_OUT):
                conn._flags &= ~F_WANT_OUT
                _flush(conn)
                if conn._flags & F_CLOSED:
                    continue
            if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
                if conn._flags & (F_READ_PAUSED | F_CLOSING):
                    if ev & (EPOLLERR | EPOLLHUP):
                        # Not reading, and the peer is gone (reset, or both directions
                        # shut): level-triggered, this would come back every turn.
                        _failed(conn, "connection lost while not reading")
                else:
                    _read(conn)

    cdef int _accept(self, int lfd) except -1:
        cdef int fd, k, one = 1
        cdef Conn conn
        for k in range(ACCEPT_BATCH):
            fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EAGAIN:
                    return 0
                if errno == EINTR or errno == ECONNABORTED or errno == EPROTO:
                    continue
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    # Out of descriptors (or memory): the pending connection stays in the
                    # backlog; stop watching the listeners for a while instead of spinning.
                    _log.error(
                        "cannot accept connections on the %s listener: %s; retrying in %.0f s",
                        self.transport_name, strerror(errno).decode(), ACCEPT_RETRY_S,
                    )
                    self._pause_accepting()
                    return 0
                raise OSError(errno, f"accept: {strerror(errno).decode()}")
            # uvloop and asyncio set it on every TCP transport; MQTT packets are small.
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            conn = Conn.__new__(Conn)
            conn._fd = fd
            conn._hub = self
            while len(self._by_fd) <= fd:
                self._by_fd.extend([None] * max(64, len(self._by_fd)))
            self._by_fd[fd] = conn
            self.open_connections += 1
            self.accepted += 1
            try:
                conn._channel = self._new_channel(conn)
                if conn._flags & F_CLOSED:
                    continue  # the channel closed it at once
                _set_mask(conn)
            except Exception:
                _log.exception("cannot set up a connection from %s", _peer_of(fd))
                conn._out = None
                if not conn._flags & F_CLOSED:
                    _finish(conn)
        return 0

    def _pause_accepting(self):
        if not self._accepting:
            return
        self._accepting = False
        for sock in self._listening:
            self._ctl(EPOLL_CTL_MOD, sock.fileno(), 0, True)
        self._loop.call_later(ACCEPT_RETRY_S, self._resume_accepting)

    def _resume_accepting(self):
        if self._closed or self._accepting:
            return
        self._accepting = True
        for sock in self._listening:
            self._ctl(EPOLL_CTL_MOD, sock.fileno(), EPOLLIN, True)

    cdef int _schedule_flush(self) except -1:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_cb)
        return 0

    def _flush_dirty(self):
        """End of the loop turn: hand every connection's queued bytes to the kernel."""
        cdef Conn conn
        self._flush_scheduled = False
        dirty = self._dirty
        self._dirty = []
        for obj in dirty:
            conn = <Conn>obj
            conn._flags &= ~F_DIRTY
            if not conn._flags & F_CLOSED:
                _flush(conn)

    def _run_lost(self):
        """Deliver connection_lost to the channels of the connections closed last turn."""
        cdef Conn conn
        lost = self._lost
        self._lost = []
        for obj in lost:
            conn = <Conn>obj
            channel = conn._channel
            conn._channel = None  # breaks channel.port -> conn -> channel
            if channel is not None:
                try:
                    channel.connection_lost()
                except Exception:
                    _log.exception("connection_lost failed for %s", _peer_of(conn._fd))

    def close(self):
        """Stop accepting and close the listening sockets (as ``asyncio.Server.close``);
        open connections stay until closed or :meth:`wait_closed`."""
        if self._closed:
            return
        self._closed = True
        self._accepting = False
        for sock in self._listening:
            try:
                self._ctl(EPOLL_CTL_DEL, sock.fileno(), 0, True)
            except OSError:
                pass
            sock.close()
        self._listening = []

    def abort_all(self):
        """Close every open connection now (what is queued is dropped)."""
        cdef Conn conn
        for obj in self._by_fd:
            if obj is not None:
                conn = <Conn>obj
                conn._out = None
                _finish(conn)

    async def wait_closed(self):
        """After :meth:`close`: connections still open are aborted (the broker has
        already given them its shutdown grace), their connection_lost delivered, and
        the epoll instance released."""
        self.close()
        self.abort_all()
        if self._lost:
            self._run_lost()
        if self._epfd >= 0:
            self._loop.remove_reader(self._epfd)
            close(self._epfd)
            self._epfd = -1

    def is_serving(self):
        return not self._closed


@cython.final
@cython.no_gc
cdef class Conn:
    """One accepted TCP socket: the Port its channel writes through.

    Made only by a :class:`Hub` (accepting a connection)."""

    @property
    def peer(self):
        """``host:port`` (``[v6]:port``) of the client, or ``?`` once closed."""
        if self._flags & F_CLOSED:
            return "?"
        return _peer_of(self._fd)

    @property
    def channel(self):
        return self._channel

    @property
    def transport_name(self):
        return self._hub.transport_name

    def fileno(self):
        """The socket's file descriptor (-1 once closed)."""
        return -1 if self._flags & F_CLOSED else self._fd

    def is_closing(self):
        return bool(self._flags & (F_CLOSING | F_CLOSED))

    # -- the Port ------------------------------------------------------------

    def send(self, data):
        """Queue ``data``: written at the end of this loop turn, or now past 64 KiB."""
        cdef object out = self._out
        cdef Py_ssize_t size
        if self._flags & (F_CLOSING | F_CLOSED):
            return
        if type(data) is not bytes:
            data = bytes(data)
        if out is None:
            self._out = out = data
            size = PyBytes_GET_SIZE(data)
        elif type(out) is bytes:
            out = bytearray(out)
            out += data
            self._out = out
            size = PyByteArray_GET_SIZE(out)
        else:
            out += data
            size = PyByteArray_GET_SIZE(out)
        if size >= EAGER_FLUSH_BYTES and not self._flags & F_WANT_OUT:
            # Enough to fill a segment train: to the kernel now, rather than let one
            # turn's burst count against the connection's outbound bound.
            _flush(self)
        elif not self._flags & F_DIRTY:
            self._flags |= F_DIRTY
            self._hub._dirty.append(self)
            self._hub._schedule_flush()

    def write_now(self, data):
        """Write ``data`` ahead of what this turn queued (a refusing CONNACK before close)."""
        if self._flags & (F_CLOSING | F_CLOSED):
            return
        data = bytes(data)
        out = self._out
        if out is None:
            self._out = data
        elif self._flags & F_WANT_OUT:
            # Part of the queue may already be on the wire: never split a packet.
            self._out = bytearray(out) + data
        else:
            self._out = data + bytes(out)
        _flush(self)

    def writable(self):
        """False once ``max_outbound_bytes`` are queued, until they drain to a quarter."""
        cdef object out = self._out
        if self._flags & (F_OVER | F_CLOSING | F_CLOSED):
            return False
        if out is not None and len(out) >= self._hub._max_outbound:
            self._flags |= F_OVER
            return False
        return True

    def get_write_buffer_size(self):
        """Outbound bytes the kernel has not taken yet."""
        out = self._out
        return 0 if out is None else len(out)

    def pause_reading(self):
        if not self._flags & (F_READ_PAUSED | F_CLOSED):
            self._flags |= F_READ_PAUSED
            _set_mask(self)

    def resume_reading(self):
        if self._flags & F_READ_PAUSED and not self._flags & F_CLOSED:
            self._flags &= ~F_READ_PAUSED
            _set_mask(self)

    def peer_certificate(self):
        """Plain TCP: no certificate."""
        return None

    def close(self, bytes last=b""):
        """Write what is queued, then ``last``, and close (idempotent)."""
        if self._flags & (F_CLOSING | F_CLOSED):
            return
        if last:
            out = self._out
            if out is None:
                self._out = last
            else:
                if type(out) is bytes:
                    out = self._out = bytearray(out)
                out += last
        self._flags |= F_CLOSING
        if not self._flags & F_WANT_OUT:
            _flush(self)
        if self._flags & F_CLOSED:
            return
        if self._out is None:
            _finish(self)
        else:
            _set_mask(self)  # no more reading; writing until drained
            self._hub._loop.call_later(LINGER_S, self._linger_over)

    def abort(self):
        """Close now; what is queued is dropped."""
        if not self._flags & F_CLOSED:
            self._out = None
            _finish(self)

    def _linger_over(self):
        if not self._flags & F_CLOSED:
            _failed(self, f"peer took no bytes for {LINGER_S:.0f} s while closing")


# -- a Conn's internals (functions, not methods: a Conn has no vtable pointer) --

cdef int _read(Conn self) except -1:
    cdef Hub hub = self._hub
    cdef ssize_t n = recv(self._fd, hub._rbuf, hub._rbuf_size, 0)
    cdef int err
    if n > 0:
        data = PyBytes_FromStringAndSize(hub._rbuf, n)
        try:
            self._channel.feed(data)
        except Exception:
            _log.exception("closing %s: its channel failed on %d bytes read", self.peer, n)
            self.abort()
        return 0
    if n == 0:
        # End of file: the client is done sending; close after what is queued.
        self._flags |= F_READ_PAUSED
        self.close()
        return 0
    err = errno
    if err == EAGAIN or err == EINTR:
        return 0
    self._out = None
    _finish(self)  # reset (ECONNRESET) or another error: nothing more to write
    return 0

cdef int _flush(Conn self) except -1:
    """Try to hand the queued bytes to the kernel (not while EPOLLOUT is awaited)."""
    cdef object out = self._out
    cdef const char* buf
    cdef Py_ssize_t size, sent
    cdef Hub hub
    if out is None or self._flags & (F_WANT_OUT | F_CLOSED):
        return 0
    if type(out) is bytes:
        buf = PyBytes_AS_STRING(out)
        size = PyBytes_GET_SIZE(out)
    else:
        buf = PyByteArray_AS_STRING(out)
        size = PyByteArray_GET_SIZE(out)
    sent = send(self._fd, buf, size, MSG_NOSIGNAL)
    if sent < 0:
        if errno == EAGAIN or errno == EINTR:
            sent = 0
        else:
            # EPIPE, ECONNRESET...: the peer is gone.
            self._out = None
            _finish(self)
            return 0
    hub = self._hub
    if sent:
        hub._stats.bytes_sent += sent
    if sent == size:
        self._out = None
    else:
        if type(out) is bytes:
            self._out = bytearray(out[sent:])
        elif sent:
            del out[:sent]
        self._flags |= F_WANT_OUT
    if self._flags & F_CLOSING and self._out is None:
        _finish(self)
        return 0
    _set_mask(self)
    if self._flags & F_OVER and (
        self._out is None or len(self._out) <= hub._max_outbound // 4
    ):
        self._flags &= ~F_OVER
        if self._channel is not None and not self._flags & F_CLOSING:
            try:
                self._channel.resume_writing()
            except Exception:
                _log.exception("closing %s: resume_writing failed", self.peer)
                self.abort()
    return 0

cdef int _set_mask(Conn self) except -1:
    """Tell epoll what this connection waits for now (only when that changed)."""
    cdef unsigned int want = 0, have
    cdef unsigned int flags = self._flags
    if flags & F_CLOSED:
        return 0
    if not flags & (F_READ_PAUSED | F_CLOSING):
        want |= F_IN_MASK
    if flags & F_WANT_OUT:
        want |= F_OUT_MASK
    have = flags & (F_IN_MASK | F_OUT_MASK | F_REGISTERED)
    if have == want | F_REGISTERED:
        return 0
    self._hub._ctl(
        EPOLL_CTL_MOD if have & F_REGISTERED else EPOLL_CTL_ADD,
        self._fd,
        (EPOLLIN if want & F_IN_MASK else 0) | (EPOLLOUT if want & F_OUT_MASK else 0),
        False,
    )
    self._flags = (flags & ~(F_IN_MASK | F_OUT_MASK)) | want | F_REGISTERED
    return 0

cdef int _failed(Conn self, str what) except -1:
    _log.info("closing %s: %s", self.peer, what)
    self._out = None
    _finish(self)
    return 0

cdef int _finish(Conn self) except -1:
    """Close the fd; connection_lost reaches the channel on the next turn."""
    cdef Hub hub = self._hub
    cdef int fd = self._fd
    if self._flags & F_CLOSED:
        return 0
    if self._flags & F_REGISTERED and hub._epfd >= 0:
        epoll_ctl(hub._epfd, EPOLL_CTL_DEL, fd, NULL)
    self._flags = (self._flags | F_CLOSED) & ~F_WANT_OUT
    self._out = None
    if fd < len(hub._by_fd) and hub._by_fd[fd] is self:
        hub._by_fd[fd] = None
    close(fd)
    hub.open_connections -= 1
    if not hub._lost:
        hub._loop.call_soon(hub._lost_cb)
    hub._lost.append(self)
    return 0
