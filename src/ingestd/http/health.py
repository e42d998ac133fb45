"""/metrics, /healthz and /readyz: the operational endpoints (never behind API auth).

* ``GET /metrics`` — Prometheus text exposition of the process's private registry;
* ``GET /healthz`` — ``200 ok`` while the process runs (liveness);
* ``GET /readyz`` — ``200 ok`` when ``ready()`` says so, else ``503`` and the reason.

All three answer ``text/plain`` and also ``HEAD``. Handlers run on the event
loop: ``generate_latest`` reads the broker's counters without locks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("ingestd.http")

ReadyFn = Callable[[], Awaitable[tuple[bool, str]]]

TEXT = "text/plain; charset=utf-8"
# Our metric and label names are all legacy-valid, so generate_latest's output is the
# classic text format; announce it as 0.0.4, which every Prometheus version parses
# (prometheus_client >= 0.22 labels the same bytes "version=1.0.0").
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HEALTH_PATHS = ("/metrics", "/healthz", "/readyz")


def text_response(status: int, body: str | bytes, content_type: str = TEXT) -> web.Response:
    data = body.encode() if isinstance(body, str) else body
    return web.Response(status=status, body=data, headers={"Content-Type": content_type})


class HealthRoutes:
    """The three handlers, bound to a registry and a readiness check."""

    def __init__(
        self, registry: CollectorRegistry, ready: ReadyFn | None, ready_timeout: float
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.ready_timeout = ready_timeout

    def register(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            body = generate_latest(self.registry)
        except Exception as e:
            log.exception("http: collecting metrics failed")
            return text_response(500, f"collect failed: {e}\n")
        return text_response(200, body, METRICS_CONTENT_TYPE)

    async def healthz(self, request: web.Request) -> web.Response:
        return text_response(200, "ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        ok, why = await self.check_ready()
        return text_response(200 if ok else 503, (why or ("ok" if ok else "not ready")) + "\n")

    async def check_ready(self) -> tuple[bool, str]:
        if self.ready is None:
            return True, "ok"
        try:
            ok, why = await asyncio.wait_for(self.ready(), self.ready_timeout)
        except TimeoutError:
            return False, f"readiness check timed out after {self.ready_timeout:g} s"
        except Exception as e:
            return False, f"readiness check failed: {type(e).__name__}: {e}"
        return bool(ok), str(why)


def readiness_probe(
    listeners_up: Callable[[], bool],
    pool: Callable[[], Any],
    *,
    timeout: float = 2.0,
) -> ReadyFn:
    """A ``ready()`` for the HTTP server: listeners bound and PostgreSQL answering.

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
