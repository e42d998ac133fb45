"""A TCP proxy in front of the test PostgreSQL that a test can cut and restore.

``PgProxy(dsn)`` listens on a free loopback port and forwards each connection
to the server of ``dsn`` (its Unix socket, or its host and port); ``dsn`` on
the proxy is the same database through it. ``cut()`` closes the listener and
every forwarded connection (the database is unreachable, as in an outage or a
network partition), ``restore()`` listens again on the same port. The shared
test server itself is never stopped.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import parse_qs, urlsplit, urlunsplit


class PgProxy:
    def __init__(self, dsn: str, port: int = 0) -> None:
        parts = urlsplit(dsn)
        host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
        pg_port = parts.port or 5432
        if host.startswith("/"):
            self._target: tuple[int, object] = (socket.AF_UNIX, f"{host}/.s.PGSQL.{pg_port}")
        else:
            self._target = (socket.AF_INET, (host, pg_port))
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = port
        self.restore()
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        self.dsn = urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def restore(self) -> None:
        """Listen (again) on the proxy's port."""
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self.port = ls.getsockname()[1]
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening and close every forwarded connection."""
        ls, self._listener = self._listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    close = cut

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            family, addr = self._target
            upstream = socket.socket(family, socket.SOCK_STREAM)
            try:
                upstream.connect(addr)  # type: ignore[arg-type]
            except OSError:
                client.close()
                upstream.close()
                continue
            with self._lock:
                if self._listener is not ls:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._socks.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
