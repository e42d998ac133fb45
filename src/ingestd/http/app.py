"""The aiohttp Application: routes, the JSON error shape of /api and bearer-token auth.

Requests outside ``/api`` keep the plain-text behaviour of the operational
endpoints (``404 not found``, ``405`` with ``Allow: GET, HEAD`` for any other
method, ``413`` and a closed connection for an oversized body). Every 4xx/5xx
under ``/api`` is JSON of one stable shape::

    {"error": {"code": "not_found", "message": "..."}}

(some errors add fields next to ``code``, e.g. ``index`` for a bad webhook element).
When tokens are configured, or ``mqtt.credentials_table`` is (whose users may
have API tokens: ``ingestd user token``), every ``/api`` request needs
``Authorization: Bearer <token>``. Configured tokens are compared with
:func:`hmac.compare_digest`; a table token is found by its SHA-256 in the
broker's live snapshot of the table (``Auth.api_token_user``).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ingestd.http.health import HEALTH_PATHS, text_response

if TYPE_CHECKING:
    from ingestd.http.server import HttpServer

log = logging.getLogger("ingestd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API_PREFIX = "/api"

# Where the auth middleware leaves the index of the configured token a request presented.
TOKEN_INDEX: Any = (
    web.RequestKey("token_index", int) if hasattr(web, "RequestKey") else "token_index"
)
# Where it leaves the user of a credentials-table token a request presented.
TOKEN_USER: Any = web.RequestKey("token_user", str) if hasattr(web, "RequestKey") else "token_user"

# Stable error codes by status, for errors raised by aiohttp itself (router, body limits).
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    """An /api failure answered as ``{"error": {"code", "message", **extra}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.message, self.headers, **self.extra)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, **extra}}, status=status, headers=headers
    )


def is_api(path: str) -> bool:
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


def bearer(header: str | None) -> str | None:
    """The token ``Authorization: Bearer <token>`` carries, else None."""
    if not header:
        return None
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip()


def token_index(tokens: list[str], header: str | None) -> int | None:
    """Index of the configured token that ``Authorization: Bearer ...`` carries, else None."""
    given = bearer(header)
    if given is None:
        return None
    presented = given.encode()
    found = None
    for i, token in enumerate(tokens):
        # Every token is compared (no early exit): the time taken says nothing about which.
        if hmac.compare_digest(presented, token.encode()) and found is None:
            found = i
    return found


def build_app(server: HttpServer) -> web.Application:
    """The Application behind ``server``: health routes, then the API when configured."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        server.requests += 1
        if request.version.major != 1:
            resp = text_response(505, "only HTTP/1.0 and HTTP/1.1 are supported\n")
            resp.force_close()
            return resp
        if is_api(request.path) and server.api is not None:
            return await _api_request(server, request, handler)
        if request.method not in ("GET", "HEAD"):
            resp = text_response(405, "method not allowed\n")
            resp.headers["Allow"] = "GET, HEAD"
            return resp
        length = request.content_length
        if length is not None and length > server.max_body_bytes:
            resp = text_response(413, "request body too large\n")
            resp.force_close()
            return resp
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return text_response(404, "not found\n")

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["Server"] = "ingestd"
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        keep = response.keep_alive if response.keep_alive is not None else request.keep_alive
        response.headers["Connection"] = "keep-alive" if keep else "close"

    app = web.Application(middlewares=[middleware], client_max_size=server.max_api_body_bytes)
    app.on_response_prepare.append(on_prepare)
    server.health.register(app)
    if server.api is not None:
        server.api.register(app)
    if server.console is not None:
        server.console.register(app)
    return app


async def _api_request(
    server: HttpServer, request: web.Request, handler: Handler
) -> web.StreamResponse:
    assert server.api is not None
    try:
        length = request.content_length
        if length is not None and length > server.max_api_body_bytes:
            raise ApiError(
                413,
                "payload_too_large",
                f"request body of {length} bytes exceeds the limit of"
                f" {server.max_api_body_bytes} bytes",
            )
        if server.api.disabled is not None:
            raise ApiError(403, "api_disabled", server.api.disabled)
        if server.api.tokens or server.api.token_table is not None:
            _authenticate(server, request)
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        if e.status == 404:
            message = f"no API route {request.path}"
        elif e.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = e.text or e.reason
        resp = error_response(e.status, _CODES.get(e.status, "error"), message, headers)
        if e.status == 413:
            resp.force_close()  # the rest of the body was not read
        return resp
    except Exception:
        log.exception("http: %s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error (see the server log)")


def _authenticate(server: HttpServer, request: web.Request) -> None:
    """Record which token the request presented (TOKEN_INDEX or TOKEN_USER); else 401."""
    assert server.api is not None
    header = request.headers.get("Authorization")
    index = token_index(server.api.tokens, header)
    if index is not None:
        request[TOKEN_INDEX] = index
        return
    table = server.api.token_table
    given = bearer(header)
    if table is not None and given is not None:
        user = table.api_token_user(given)
        if user is not None:
            request[TOKEN_USER] = user
            return
        if table.table is None:
            # Not known to be wrong: the table was not loaded yet (database unreachable).
            raise ApiError(
                503, "unavailable", "API tokens not loaded yet (credentials table unreachable)"
            )
    raise ApiError(
        401,
        "unauthorized",
        "missing or invalid bearer token (Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": 'Bearer realm="ingestd"'},
    )


__all__ = ["API_PREFIX", "HEALTH_PATHS", "ApiError", "build_app", "error_response", "is_api"]
