"""The HTTP listener: /metrics, /healthz, /readyz (and the JSON API under /api), on aiohttp."""

from ingestd.http.app import ApiError
from ingestd.http.health import ReadyFn, readiness_probe
from ingestd.http.server import HttpServer

__all__ = ["ApiError", "HttpServer", "ReadyFn", "readiness_probe"]
