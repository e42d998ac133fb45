"""The HTTP endpoint: Prometheus /metrics, /healthz and /readyz."""

from ingestd.http.server import HttpServer, ReadyFn, parse_head, readiness_probe

__all__ = ["HttpServer", "ReadyFn", "parse_head", "readiness_probe"]
