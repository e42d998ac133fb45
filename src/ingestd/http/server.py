"""A small HTTP/1.1 server for /metrics, /healthz and /readyz (asyncio streams, no dependency).

* ``GET /metrics`` — Prometheus text exposition of a private
  :class:`~prometheus_client.registry.CollectorRegistry`;
* ``GET /healthz`` — ``200 ok`` while the process runs (liveness);
* ``GET /readyz`` — ``200 ok`` when ``ready()`` says so, else ``503`` and the reason;
* anything else: ``404`` (unknown path), ``405`` (method other than GET/HEAD),
  ``400`` (malformed request), ``431`` (headers too large), ``413`` (body too large).

Keep-alive follows HTTP/1.1 (persistent unless ``Connection: close``;
HTTP/1.0 only with ``Connection: keep-alive``). Every read has a deadline,
so idle or slow clients cannot pin a connection forever; request heads are
bounded in size. Handlers run on the event loop: ``generate_latest`` reads
the broker's counters without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("ingestd.http")

ReadyFn = Callable[[], Awaitable[tuple[bool, str]]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

TEXT = "text/plain; charset=utf-8"
# Our metric and label names are all legacy-valid, so generate_latest's output is the
# classic text format; announce it as 0.0.4, which every Prometheus version parses
# (prometheus_client >= 0.22 labels the same bytes "version=1.0.0").
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class HttpServer:
    """Serve /metrics, /healthz and /readyz.

    ``registry`` is the registry whose collectors ``/metrics`` exposes;
    ``ready`` is awaited by ``/readyz`` (bounded by ``ready_timeout``; an
    exception or timeout means not ready).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: ReadyFn | None = None,
        *,
        ready_timeout: float = 5.0,
        max_head_bytes: int = 16384,
        max_body_bytes: int = 65536,
        idle_timeout: float = 30.0,
        request_timeout: float = 10.0,
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.port = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: an ephemeral port); returns the bound port."""
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=self.max_head_bytes, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def sockets(self) -> list[Any]:
        return list(self._server.sockets) if self._server is not None else []

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for w in list(self._writers):
            w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)

    # -- connection handling ----------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            keep = True
            first = True
            while keep:
                try:
                    keep = await self._one_request(reader, writer, first)
                except _BadRequest as e:
                    await self._respond(writer, e.status, f"{e}\n", keep_alive=False)
                    break
                first = False
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:
            log.exception("http: unexpected error")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_head(self, reader: asyncio.StreamReader, first: bool) -> bytes | None:
        """The request head up to the blank line; None when the client closed cleanly."""
        timeout = self.request_timeout if first else self.idle_timeout
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as e:
            if not e.partial.strip():
                return None
            raise _BadRequest(400, "incomplete request") from None
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, "request head too large") from None
        except TimeoutError:
            if first:
                raise _BadRequest(408, "request timeout") from None
            return None
        return head

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool
    ) -> bool:
        """Serve one request; returns whether the connection stays open."""
        head = await self._read_head(reader, first)
        if head is None:
            return False
        method, path, version, headers = parse_head(head)
        self.requests += 1
        conn_hdr = headers.get("connection", "").lower()
        # HTTP/1.1 is persistent unless told otherwise; HTTP/1.0 only when asked.
        keep_alive = "close" not in conn_hdr if version == "HTTP/1.1" else "keep-alive" in conn_hdr
        if "transfer-encoding" in headers:
            raise _BadRequest(501, "chunked request bodies are not supported")
        length_text = headers.get("content-length", "0").strip()
        if not length_text.isdigit():
            raise _BadRequest(400, "bad Content-Length")
        length = int(length_text)
        if length > self.max_body_bytes:
            raise _BadRequest(413, "request body too large")
        if length:
            await asyncio.wait_for(reader.readexactly(length), self.request_timeout)

        if method not in ("GET", "HEAD"):
            await self._respond(
                writer,
                405,
                "method not allowed\n",
                keep_alive=keep_alive,
                extra={"Allow": "GET, HEAD"},
                head_only=False,
            )
            return keep_alive
        route = path.split("?", 1)[0]
        head_only = method == "HEAD"
        if route == "/metrics":
            try:
                body = generate_latest(self.registry)
            except Exception as e:
                log.exception("http: collecting metrics failed")
                await self._respond(writer, 500, f"collect failed: {e}\n", keep_alive=keep_alive)
                return keep_alive
            await self._respond(
                writer, 200, body, METRICS_CONTENT_TYPE, keep_alive=keep_alive, head_only=head_only
            )
        elif route == "/healthz":
            await self._respond(writer, 200, "ok\n", keep_alive=keep_alive, head_only=head_only)
        elif route == "/readyz":
            ok, why = await self._check_ready()
            await self._respond(
                writer,
                200 if ok else 503,
                (why or ("ok" if ok else "not ready")) + "\n",
                keep_alive=keep_alive,
                head_only=head_only,
            )
        else:
            await self._respond(
                writer, 404, "not found\n", keep_alive=keep_alive, head_only=head_only
            )
        return keep_alive

    async def _check_ready(self) -> tuple[bool, str]:
        if self.ready is None:
            return True, "ok"
        try:
            ok, why = await asyncio.wait_for(self.ready(), self.ready_timeout)
        except TimeoutError:
            return False, f"readiness check timed out after {self.ready_timeout:g} s"
        except Exception as e:
            return False, f"readiness check failed: {type(e).__name__}: {e}"
        return bool(ok), str(why)

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes | str,
        content_type: str = TEXT,
        *,
        keep_alive: bool,
        head_only: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(data)}",
            "Cache-Control: no-store",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        for k, v in (extra or {}).items():
            lines.append(f"{k}: {v}")
        out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(out if head_only else out + data)
        await asyncio.wait_for(writer.drain(), self.request_timeout)


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """(method, target, version, lower-cased headers) of a request head; raises _BadRequest."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise _BadRequest(400, "undecodable request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not method.isalpha() or not method.isupper():
        raise _BadRequest(400, "malformed method")
    if not version.startswith("HTTP/"):
        raise _BadRequest(400, "malformed HTTP version")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if not target.startswith("/") or any(c in target for c in "\x00\r\n\t"):
        raise _BadRequest(400, "malformed request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise _BadRequest(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        if key == "content-length" and key in headers and headers[key] != value:
            raise _BadRequest(400, "conflicting Content-Length")
        headers[key] = value
    return method, target, version, headers


def readiness_probe(
    listeners_up: Callable[[], bool],
    pool: Callable[[], Any],
    *,
    timeout: float = 2.0,
) -> ReadyFn:
    """A ``ready()`` for :class:`HttpServer`: listeners bound and PostgreSQL answering.

    ``listeners_up()`` says whether the MQTT listeners are accepting;
    ``pool()`` returns the asyncpg pool (or connection) to probe with
    ``SELECT 1``, or None when there is no database (then only listeners count).
    Either may raise; that counts as not ready, with the exception as reason.
    """

    async def ready() -> tuple[bool, str]:
        try:
            if not listeners_up():
                return False, "listeners not up"
        except Exception as e:
            return False, f"listeners: {e}"
        try:
            p = pool()
        except Exception as e:
            return False, f"database: {e}"
        if p is None:
            return True, "ok"
        try:
            await asyncio.wait_for(p.fetchval("SELECT 1"), timeout)
        except TimeoutError:
            return False, f"database: no answer within {timeout:g} s"
        except Exception as e:
            return False, f"database: {type(e).__name__}: {e}"
        return True, "ok"

    return ready
