"""The HTTP listener: /metrics, /healthz, /readyz, the JSON API under /api and the console at / (aiohttp)."""

from ingestd.http.api import Api
from ingestd.http.app import ApiError
from ingestd.http.health import ReadyFn, readiness_probe
from ingestd.http.server import HttpServer

__all__ = ["Api", "ApiError", "HttpServer", "ReadyFn", "readiness_probe"]
