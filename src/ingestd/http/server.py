"""HttpServer: the HTTP listener of ingestd, on aiohttp.

It serves the operational endpoints (:mod:`ingestd.http.health`: /metrics,
/healthz, /readyz) and, when given an :class:`~ingestd.http.api.Api`, the
JSON API under ``/api`` (:mod:`ingestd.http.api`) and, when given a
:class:`~ingestd.http.console.ConsoleRoutes`, the web console at ``/``. aiohttp brings a fuzzed
HTTP/1.1 parser (llhttp), keep-alive and pipelining, chunked request bodies
and graceful shutdown; this class only sets its limits:

* request heads: lines and header fields of at most ``max_head_bytes``;
* bodies: ``max_body_bytes`` outside /api (the endpoints take none),
  ``max_api_body_bytes`` under /api (webhook batches);
* idle or half-sent connections are closed after ``idle_timeout``; API
  handlers read their body within ``request_timeout``; the body of a refused
  request is drained for at most ``lingering_time`` before the close.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.registry import CollectorRegistry

from ingestd.http.app import build_app
from ingestd.http.health import HealthRoutes, ReadyFn

if TYPE_CHECKING:
    from ingestd.http.api import Api
    from ingestd.http.console import ConsoleRoutes

log = logging.getLogger("ingestd.http")


class _MalformedRequestsAtDebug(logging.Filter):
    """aiohttp logs every unparsable request as an error with a traceback; scanners
    and stray TLS handshakes on a public port would flood the log. They become one
    debug line here; any other error passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("http: malformed request: %s", exc)
            return False
        return True


# The logger our aiohttp request handlers report to (aiohttp's own stays untouched).
_wire_log = logging.getLogger("ingestd.http.wire")
_wire_log.addFilter(_MalformedRequestsAtDebug())


class HttpServer:
    """Serve /metrics, /healthz, /readyz, (with ``api``) the JSON API and (with
    ``console``) the web console.

    ``registry`` is the registry whose collectors ``/metrics`` exposes;
    ``ready`` is awaited by ``/readyz`` (bounded by ``ready_timeout``; an
    exception or timeout means not ready).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: ReadyFn | None = None,
        *,
        api: Api | None = None,
        console: ConsoleRoutes | None = None,
        ready_timeout: float = 5.0,
        max_head_bytes: int = 16384,
        max_body_bytes: int = 65536,
        max_api_body_bytes: int = 8 * 1024 * 1024,
        idle_timeout: float = 30.0,
        request_timeout: float = 10.0,
        shutdown_timeout: float = 5.0,
        lingering_time: float = 2.0,
    ) -> None:
        self.registry = registry
        self.health = HealthRoutes(registry, ready, ready_timeout)
        self.api = api
        self.console = console
        if api is not None:
            api.request_timeout = request_timeout
        self.max_head_bytes = max_head_bytes
        self.max_body_bytes = max_body_bytes
        self.max_api_body_bytes = max_api_body_bytes
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.shutdown_timeout = shutdown_timeout
        self.lingering_time = lingering_time
        self.port = 0
        self.requests = 0
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: an ephemeral port); returns the bound port.

        An API that would be reachable beyond loopback without a token is
        turned off (403 on /api, see ``Api.check_exposure``).
        """
        if self.api is not None:
            self.api.check_exposure(host)
        self.app = build_app(self)
        runner = web.AppRunner(
            self.app,
            access_log=None,
            logger=_wire_log,
            handle_signals=False,
            shutdown_timeout=self.shutdown_timeout,
            keepalive_timeout=self.idle_timeout,
            # A refused body (413) is drained this long before the close, so the client
            # can read the answer instead of a reset.
            lingering_time=self.lingering_time,
            max_line_size=self.max_head_bytes,
            max_field_size=self.max_head_bytes,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    @property
    def addresses(self) -> list[Any]:
        return list(self._runner.addresses) if self._runner is not None else []

    async def stop(self) -> None:
        """Stop listening and close open connections (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self.api is not None:
            self.api.close()  # streams end and waiting RPCs answer before the close
        with contextlib.suppress(Exception):
            await runner.cleanup()
