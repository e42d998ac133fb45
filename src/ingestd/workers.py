"""Worker processes: ``ingestd serve --workers N`` (``server.workers``).

The parent process (:class:`Supervisor`) starts what must exist once (the
embedded PostgreSQL, when ``database.dsn`` is empty; the listening sockets of
``server.worker_sockets = "inherit"``, or the port reservations of port 0 under
``"reuseport"``), then forks N workers. Each worker is a whole ingestd
(:class:`ingestd.app.App` on its own uvloop): its own broker, ingest engine,
asyncpg pool, HTTP endpoint and directories; workers share nothing but the
listening ports and the database. What that means for clients (sessions,
retained messages, fan-out, presence) is in docs/scaling.md, "Workers".

Per worker ``i`` (:func:`worker_config`): ``server.data_dir`` is
``<data_dir>/worker-<i>`` (its spool; its overflow unless ``mqtt.overflow_dir``
is set, then ``<overflow_dir>/worker-<i>``), HTTP listens on
``http_listen``'s port + i (port 0: a free port each), an upstream's client id
gets the suffix ``-w<i>``, and only worker 0's first start resets the presence
table.

Signals: SIGTERM/SIGINT to the parent stop every worker (each as a single
ingestd stops: listeners closed, sessions told, batches flushed), then the
embedded PostgreSQL; SIGHUP is passed on (each worker re-reads the password
and ACL files). A worker whose parent is gone stops by itself (end of file on
the lifeline pipe). A worker that dies after it was up is restarted (after
1 s, same index and directories: its spool is replayed); one that fails to
start, or dies 5 times within 60 s, stops the whole service (exit status 1,
or 2 for a configuration or database error).
"""

from __future__ import annotations

import collections
import copy
import errno
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ingestd.config import Config
from ingestd.errors import ConfigError, DatabaseError
from ingestd.transport.addr import bound_socket, parse_hostport

if TYPE_CHECKING:
    from ingestd.db import EmbeddedPostgres

log = logging.getLogger("ingestd.workers")

RESTART_DELAY = 1.0  # seconds before a dead worker is started again
MAX_DEATHS = 5  # deaths of one worker within DEATH_WINDOW that stop the service instead
DEATH_WINDOW = 60.0
KILL_GRACE = 15.0  # seconds past server.shutdown_timeout before SIGKILL at a stop

# Listener kinds as App names them, and the server.* field holding their addresses.
LISTENER_FIELDS = (("mqtt", "listen"), ("mqtts", "tls_listen"), ("ws", "ws_listen"),
                   ("wss", "wss_listen"))  # fmt: skip

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_config(
    cfg: Config, index: int, dsn: str, listen: dict[str, list[str]], first_start: bool
) -> Config:
    """The configuration worker ``index`` runs with (see the module docstring)."""
    w = copy.deepcopy(cfg)
    w.server.workers = 1
    w.server.data_dir = str(Path(cfg.server.data_dir) / f"worker-{index}")
    if cfg.mqtt.overflow_dir:
        w.mqtt.overflow_dir = str(Path(cfg.mqtt.overflow_dir) / f"worker-{index}")
    if dsn:
        w.database.dsn = dsn
    # Marking rows left "online" offline is right once, before any client connects; a
    # later (re)start would mark the other workers' clients offline.
    w.presence.reset_on_start = cfg.presence.reset_on_start and index == 0 and first_start
    if cfg.server.http_listen:
        host, port = parse_hostport(cfg.server.http_listen)
        w.server.http_listen = format_hostport(host, port + index if port else 0)
    for up in w.upstream:
        base = up.client_id if up.client_id is not None else f"ingestd-{up.name}"
        up.client_id = f"{base}-w{index}"
    for _kind, name in LISTENER_FIELDS:
        setattr(w.server, name, list(listen[name]))
    return w


def _bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to (host, port): the first address ``host`` resolves to."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return bound_socket(family, kind, proto, addr, reuse_port=reuse_port)


@dataclass
class Worker:
    index: int
    pid: int = 0
    ready_fd: int | None = None  # read end of the pipe the worker writes once it is up
    ready: bool = False
    restart_at: float | None = None  # monotonic time of a scheduled restart
    deaths: collections.deque[float] = field(default_factory=collections.deque)


class Supervisor:
    """The parent of ``serve --workers N``: start, watch, restart and stop the workers."""

    def __init__(self, cfg: Config, *, database: bool = True) -> None:
        self.cfg = cfg
        self.database = database
        self.n = cfg.server.workers
        self.reuse_port = cfg.server.worker_sockets == "reuseport"
        self.dsn = cfg.database.dsn
        self.embedded: EmbeddedPostgres | None = None
        # (kind, address as the workers are configured) -> the parent's socket
        self.sockets: dict[tuple[str, str], socket.socket] = {}
        self.listen: dict[str, list[str]] = {}
        self.workers = [Worker(i) for i in range(self.n)]
        self.exit_code = 0
        self._stopping = False
        self._kill_at = 0.0
        self._pending: list[int] = []
        self._wake_r = self._wake_w = -1
        self._lifeline_r = self._lifeline_w = -1

    # -- parent ------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or a worker that cannot run); the exit status."""
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in _SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            self._prepare()
            self._lifeline_r, self._lifeline_w = os.pipe()
            for w in self.workers:
                self._spawn(w, first_start=True)
            log.info(
                "ingestd: %d workers (pids %s) sharing %s (%s)",
                self.n,
                ", ".join(str(w.pid) for w in self.workers),
                ", ".join(f"{k}://{a}" for k, _ in LISTENER_FIELDS for a in self.listen[_])
                or "no MQTT listener",
                "SO_REUSEPORT" if self.reuse_port else "one inherited socket",
            )
            self._watch()
        finally:
            self._cleanup()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._pending.append(signum)

    def _prepare(self) -> None:
        """What exists once for all workers: the embedded PostgreSQL and the sockets."""
        if self.database and not self.dsn:
            from ingestd.db import EmbeddedPostgres

            self.embedded = pg = EmbeddedPostgres(Path(self.cfg.server.data_dir) / "pg")
            self.dsn = pg.start()
        for kind, name in LISTENER_FIELDS:
            self.listen[name] = []
            for addr in getattr(self.cfg.server, name):
                host, port = parse_hostport(addr)
                if self.reuse_port and port:
                    self.listen[name].append(addr)  # each worker binds it with SO_REUSEPORT
                    continue
                try:
                    sock = _bind(host, port, reuse_port=self.reuse_port)
                except OSError as exc:
                    from ingestd.app import listen_error

                    raise listen_error(kind, host, port, exc) from None
                if not self.reuse_port:
                    sock.listen(4096)
                    sock.setblocking(False)
                # Port 0 under SO_REUSEPORT: this bound (not listening) socket keeps the
                # port the kernel chose for the workers to bind.
                resolved = format_hostport(host, sock.getsockname()[1])
                self.listen[name].append(resolved)
                self.sockets[(kind, resolved)] = sock

    def _watch(self) -> None:
        while True:
            fds = [self._wake_r] + [w.ready_fd for w in self.workers if w.ready_fd is not None]
            timeout = 1.0
            restarts = [w.restart_at for w in self.workers if w.restart_at is not None]
            if restarts:
                timeout = max(0.0, min(min(restarts) - time.monotonic(), timeout))
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except InterruptedError:  # pragma: no cover - PEP 475 retries select
                readable = []
            if self._wake_r in readable:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            for w in self.workers:
                if w.ready_fd is not None and w.ready_fd in readable:
                    self._read_ready(w)
            pending, self._pending = self._pending, []
            for sig in pending:
                if sig in (signal.SIGTERM, signal.SIGINT) and not self._stopping:
                    log.info("ingestd: %s, stopping the workers", signal.Signals(sig).name)
                    self._stop_all()
                elif sig == signal.SIGHUP:
                    self._send(signal.SIGHUP)
            self._reap()
            now = time.monotonic()
            for w in self.workers:
                if w.restart_at is not None and now >= w.restart_at and not self._stopping:
                    w.restart_at = None
                    self._spawn(w, first_start=False)
            if self._stopping:
                if not any(w.pid for w in self.workers):
                    return
                if now >= self._kill_at:
                    for w in self.workers:
                        if w.pid:
                            log.error("worker %d (pid %d) did not stop: killing it", w.index, w.pid)
                            self._kill(w.pid, signal.SIGKILL)
                    self._kill_at = now + 3600

    def _read_ready(self, w: Worker) -> None:
        assert w.ready_fd is not None
        data = os.read(w.ready_fd, 16)
        os.close(w.ready_fd)
        w.ready_fd = None
        if data:
            w.ready = True
            log.info("worker %d (pid %d) is up", w.index, w.pid)

    def _reap(self) -> None:
        for w in self.workers:
            if not w.pid:
                continue
            try:
                pid, status = os.waitpid(w.pid, os.WNOHANG)
            except ChildProcessError:  # pragma: no cover - reaped elsewhere
                pid, status = w.pid, 0
            if pid == 0:
                continue
            w.pid = 0
            if w.ready_fd is not None:
                self._read_ready(w)  # it may have come up and died in one select turn
            self._exited(w, status)

    def _exited(self, w: Worker, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"exit status {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
        if self._stopping:
            log.info("worker %d stopped (%s)", w.index, how)
            if code > 0 and not self.exit_code:
                self.exit_code = code
            return
        if not w.ready:
            log.error("worker %d failed to start (%s): stopping ingestd", w.index, how)
            self.exit_code = code if code > 0 else 1
            self._stop_all()
            return
        now = time.monotonic()
        w.deaths.append(now)
        while w.deaths and w.deaths[0] < now - DEATH_WINDOW:
            w.deaths.popleft()
        if len(w.deaths) >= MAX_DEATHS:
            log.error(
                "worker %d died (%s), %d times within %.0f s: stopping ingestd",
                w.index,
                how,
                len(w.deaths),
                DEATH_WINDOW,
            )
            self.exit_code = 1
            self._stop_all()
            return
        log.error(
            "worker %d died (%s): restarting it in %.0f s (its clients reconnect to any"
            " worker; what it had not acknowledged is sent again by them)",
            w.index,
            how,
            RESTART_DELAY,
        )
        w.ready = False
        w.restart_at = now + RESTART_DELAY

    def _stop_all(self) -> None:
        self._stopping = True
        self._kill_at = time.monotonic() + self.cfg.server.shutdown_timeout + KILL_GRACE
        for w in self.workers:
            w.restart_at = None
        self._send(signal.SIGTERM)

    def _send(self, sig: int) -> None:
        for w in self.workers:
            if w.pid:
                self._kill(w.pid, sig)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except OSError as exc:  # pragma: no cover - exited meanwhile
            if exc.errno != errno.ESRCH:
                raise

    def _spawn(self, w: Worker, *, first_start: bool) -> None:
        ready_r, ready_w = os.pipe()
        # No signal may reach the child before it has put its own handlers in place.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            code = 1
            try:
                code = self._child(w.index, ready_w, old, first_start)
            except BaseException:
                log.exception("worker %d", w.index)
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:  # pragma: no cover
                        pass
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(ready_w)
        w.pid, w.ready_fd, w.ready = pid, ready_r, False

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for w in self.workers:  # an exception in the parent: leave no worker behind
            if w.pid:
                self._kill(w.pid, signal.SIGTERM)
                os.waitpid(w.pid, 0)
                w.pid = 0
            if w.ready_fd is not None:
                os.close(w.ready_fd)
                w.ready_fd = None
        for sock in self.sockets.values():
            sock.close()
        for fd in (self._lifeline_r, self._lifeline_w, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        if self.embedded is not None:
            self.embedded.stop()
        log.info("ingestd: stopped")

    # -- worker ------------------------------------------------------------------

    def _child(self, index: int, ready_w: int, mask: set[int | signal.Signals], first: bool) -> int:
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in (self._wake_r, self._wake_w, self._lifeline_w):
            os.close(fd)
        for other in self.workers:
            if other.ready_fd is not None:
                os.close(other.ready_fd)
        if self.embedded is not None:
            self.embedded.started_here = False  # the parent's to stop, never a worker's
        from ingestd import logs

        logs.configure(self.cfg.server.log_level, self.cfg.server.log_format, worker=index)
        wcfg = worker_config(self.cfg, index, self.dsn, self.listen, first)
        sockets = {} if self.reuse_port else self.sockets
        if self.reuse_port:
            for sock in self.sockets.values():
                sock.close()  # the port reservation is the parent's

        def started() -> None:
            os.write(ready_w, b"1")
            os.close(ready_w)

        import uvloop

        from ingestd.app import App

        app = App(wcfg, database=self.database, listen_sockets=sockets, reuse_port=self.reuse_port)
        try:
            uvloop.run(app.run(lifeline=self._lifeline_r, started=started))
        except (ConfigError, DatabaseError) as exc:
            print(f"ingestd: worker {index}: configuration error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"ingestd: worker {index}: {exc}", file=sys.stderr)
            return 1
        return 0
