"""The web console at ``/``: three static files (HTML, JS, CSS) from the package.

No build step and nothing from elsewhere: ``static/index.html``,
``static/console.js``, ``static/console.css`` (and ``favicon.svg``) are package data, read once
and served from memory. The page reads ``/api/stats``, ``/api/devices``,
``/api/dead-letters`` and ``/api/retained`` and publishes through
``POST /api/publish``, so it needs a bearer token wherever the API does (it
asks for it and keeps it in ``sessionStorage``).

Since the page can publish, its responses forbid everything it does not
need: ``Content-Security-Policy`` allows only this origin's script, style
and ``fetch``, no inline script, no framing (``frame-ancestors 'none'``,
``X-Frame-Options: DENY``), no form posts elsewhere; ``nosniff`` and
``Referrer-Policy: no-referrer`` as well. The API answers no CORS preflight,
and ``POST /api/publish`` needs ``Content-Type: application/json``, so
another site cannot post to it from a browser.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class ConsoleRoutes:
    """GET ``/``, ``/console.js``, ``/console.css``: the files, read once."""

    def __init__(self) -> None:
        pkg = resources.files("ingestd.http") / "static"
        self.files = {
            path: ((pkg / name).read_bytes(), ctype) for path, (name, ctype) in FILES.items()
        }

    def register(self, app: web.Application) -> None:
        for path in self.files:
            app.router.add_get(path, self.serve)

    async def serve(self, request: web.Request) -> web.Response:
        body, ctype = self.files[request.path]
        headers = {"Content-Type": ctype, "Cache-Control": "no-cache", **SECURITY_HEADERS}
        return web.Response(body=body, headers=headers)
