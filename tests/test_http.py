"""The HTTP endpoint over real sockets: routes, keep-alive, garbage, readiness.

The server is aiohttp (llhttp parses the requests); these tests pin what the
operational endpoints promise on the wire, whatever parser sits underneath.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from ingestd.http import HttpServer, readiness_probe
from ingestd.metrics import build_registry


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    # aiohttp answers in the request's HTTP version (HTTP/1.0 when the request line was unreadable).
    assert re.match(r"HTTP/\d\.\d \d{3} ", lines[0]), lines[0]
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status, headers, body


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Send ``raw``, read one response; also report whether the server then closed.

    A response that announces ``Connection: close`` (or has no Connection header, as
    aiohttp's answers to unparsable requests) must be followed by the close itself.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        status, headers, body = await read_response(reader)
        closed = headers.get("connection", "close") == "close" and await _closed(reader)
        return status, headers, body, closed
    finally:
        writer.close()


async def _closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), 10) == b""


def get(path: str, version: str = "1.1", extra: str = "") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode()


ReadyFn = Callable[[], Awaitable[tuple[bool, str]]]


def run(
    body: Callable[[HttpServer], Awaitable[None]],
    ready: ReadyFn | None = None,
    registry: CollectorRegistry | None = None,
    **kw: Any,
) -> None:
    async def main() -> None:
        reg = registry if registry is not None else build_registry(process_metrics=False)[0]
        srv = HttpServer(reg, ready, **kw)
        port = await srv.start("127.0.0.1", 0)
        assert port == srv.port and port > 0
        try:
            await body(srv)
        finally:
            await srv.stop()

    asyncio.run(main())


def test_metrics_endpoint_serves_the_registry() -> None:
    async def body(srv: HttpServer) -> None:
        status, headers, data, _ = await request(srv.port, get("/metrics"))
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        names = {f.name for f in text_string_to_metric_families(data.decode())}
        assert "ingestd_build_info" in names
        # A query string does not change the route.
        status, _, data2, _ = await request(srv.port, get("/metrics?x=1"))
        assert status == 200 and b"ingestd_build_info" in data2

    run(body)


def test_healthz_and_unknown_paths_and_methods() -> None:
    async def body(srv: HttpServer) -> None:
        status, headers, data, _ = await request(srv.port, get("/healthz"))
        assert (status, data) == (200, b"ok\n")
        assert headers["content-type"] == "text/plain; charset=utf-8"
        status, _, _, _ = await request(srv.port, get("/nope"))
        assert status == 404
        status, headers, _, _ = await request(
            srv.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        )
        assert status == 405 and headers["allow"] == "GET, HEAD"
        # Any other method on any path outside /api, known or not, as before.
        status, headers, data, _ = await request(srv.port, b"PUT /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, data, headers["allow"]) == (405, b"method not allowed\n", "GET, HEAD")
        # HEAD: headers with the length of the body that GET would send, and no body.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + get("/healthz"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: 3" in head
        # the next bytes are the GET's response
        status, _, data = await read_response(reader)
        assert (status, data) == (200, b"ok\n")
        writer.close()

    run(body)


def test_keep_alive_and_pipelining() -> None:
    async def body(srv: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(get("/healthz") + get("/nope") + get("/metrics"))
        statuses = [(await read_response(reader))[0] for _ in range(3)]
        assert statuses == [200, 404, 200]
        writer.write(get("/healthz", extra="Connection: close\r\n"))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await _closed(reader)
        writer.close()
        # HTTP/1.0 closes unless asked to keep alive.
        status, headers, _, closed = await request(srv.port, get("/healthz", "1.0"))
        assert status == 200 and closed
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(get("/healthz", "1.0", "Connection: keep-alive\r\n") + get("/healthz"))
        assert (await read_response(reader))[1]["connection"] == "keep-alive"
        assert (await read_response(reader))[0] == 200
        writer.close()
        assert srv.requests == 7

    run(body)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"\x00\xff\xfe garbage\r\n\r\n", 400),
        (b"GET\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"get /healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /healthz FOO/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nno-colon-here\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", 413),
        # Oversized head: was 431, aiohttp's parser answers 400 (LineTooLong).
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 400),
        # HTTP/1.1 without Host (RFC 9112 3.2: 400).
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_garbage_gets_an_error_and_a_closed_connection(
    raw: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(srv: HttpServer) -> None:
        got, headers, _, closed = await request(srv.port, raw)
        assert got == status
        assert headers.get("connection", "close") == "close" and closed
        # The server still serves others.
        assert (await request(srv.port, get("/healthz")))[0] == 200

    with caplog.at_level("DEBUG"):
        run(body)
    # A stray request is not an error of ours: no error log, no traceback (debug only).
    assert not [r for r in caplog.records if r.levelno >= 30 or r.exc_info], caplog.text


def test_half_requests_and_abrupt_closes_are_harmless() -> None:
    async def body(srv: HttpServer) -> None:
        for raw in (b"", b"GET /metr", b"\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
            _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(raw)
            await writer.drain()
            writer.close()
        assert (await request(srv.port, get("/healthz")))[0] == 200

    run(body)


def test_a_silent_or_half_sent_request_is_closed_after_the_idle_timeout() -> None:
    """Was a 408 answer; aiohttp closes without one. What matters: no connection is pinned."""

    async def body(srv: HttpServer) -> None:
        for raw in (b"", b"GET /healthz HTTP/1.1\r\n"):  # nothing / never finished
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(raw)
            assert await _closed(reader)  # bounded by _closed's own 10 s
            writer.close()
        # Also after a served request, on the kept-alive connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(get("/healthz"))
        assert (await read_response(reader))[0] == 200
        writer.write(b"GET /heal")
        assert await _closed(reader)
        writer.close()

    run(body, idle_timeout=0.2)


def test_chunked_request_bodies_are_read() -> None:
    """The hand-written server answered 501 to chunked bodies; aiohttp reads them."""

    async def body(srv: HttpServer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n" + get("/healthz")
        )
        assert (await read_response(reader))[:3:2] == (200, b"ok\n")
        assert (await read_response(reader))[:3:2] == (200, b"ok\n")  # still in step
        writer.close()

    run(body)


def test_stop_closes_idle_keep_alive_connections() -> None:
    async def main() -> None:
        srv = HttpServer(CollectorRegistry())
        port = await srv.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(get("/healthz"))
        assert (await read_response(reader))[0] == 200
        await srv.stop()
        assert await _closed(reader)
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await srv.stop()  # idempotent

    asyncio.run(main())


def test_readyz_reports_ready_and_not_ready_with_reason() -> None:
    state: dict[str, Any] = {"ok": False, "why": "database: connection refused"}

    async def ready() -> tuple[bool, str]:
        if state.get("raise"):
            raise RuntimeError("boom")
        if state.get("hang"):
            await asyncio.Event().wait()
        return state["ok"], state["why"]

    async def body(srv: HttpServer) -> None:
        status, _, data, _ = await request(srv.port, get("/readyz"))
        assert (status, data) == (503, b"database: connection refused\n")
        state.update(ok=True, why="ok")
        status, _, data, _ = await request(srv.port, get("/readyz"))
        assert (status, data) == (200, b"ok\n")
        state["raise"] = True
        status, _, data, _ = await request(srv.port, get("/readyz"))
        assert status == 503 and data == b"readiness check failed: RuntimeError: boom\n"
        state.update({"raise": False, "hang": True})
        status, _, data, _ = await request(srv.port, get("/readyz"))
        assert status == 503 and b"timed out" in data
        # /healthz stays 200 whatever readiness says.
        assert (await request(srv.port, get("/healthz")))[0] == 200

    run(body, ready, ready_timeout=0.05)


def test_readyz_without_a_check_is_ready() -> None:
    async def body(srv: HttpServer) -> None:
        assert (await request(srv.port, get("/readyz")))[0] == 200

    run(body)


def test_readiness_probe() -> None:
    class Pool:
        def __init__(self, fail: Exception | None = None) -> None:
            self.fail = fail
            self.calls = 0

        async def fetchval(self, sql: str) -> int:
            self.calls += 1
            assert sql == "SELECT 1"
            if self.fail is not None:
                raise self.fail
            return 1

    async def main() -> None:
        up = {"v": False}
        pool = Pool()
        ready = readiness_probe(lambda: up["v"], lambda: pool)
        assert await ready() == (False, "listeners not up")
        up["v"] = True
        assert await ready() == (True, "ok")
        assert pool.calls == 1
        pool.fail = ConnectionRefusedError("refused")
        ok, why = await ready()
        assert not ok and why == "database: ConnectionRefusedError: refused"
        assert await readiness_probe(lambda: True, lambda: None)() == (True, "ok")

        def no_pool() -> Any:
            raise RuntimeError("the database is closed")

        assert await readiness_probe(lambda: True, no_pool)() == (
            False,
            "database: the database is closed",
        )

    asyncio.run(main())


def test_wired_like_the_app_against_a_real_broker(server: Any) -> None:
    """build_registry + HttpServer + readiness_probe on the broker's own loop, scraped over TCP."""
    import socket

    from ingestd.metrics import LoopLagMonitor

    app = server.app
    holder: dict[str, Any] = {}

    async def start() -> int:
        lag = LoopLagMonitor()
        lag.start()
        registry, _ = build_registry(app.broker, app.ingest, lag)
        ready = readiness_probe(lambda: any(b.kind == "mqtt" for b in app.bound), lambda: None)
        http = HttpServer(registry, ready)
        holder.update(lag=lag, http=http)
        return await http.start("127.0.0.1", 0)

    port = server.run(start())

    def fetch(path: str) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    try:
        # One MQTT client connected (raw 3.1.1 CONNECT), so the gauges have something to show.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
            c.sendall(b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02hx")
            assert c.recv(4)[0] == 0x20
            status, body = fetch("/metrics")
            assert status == 200
            fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
            conns = {s.labels["protocol"]: s.value for s in fams["ingestd_connections"].samples}
            assert conns["4"] == 1
            assert "ingestd_event_loop_lag_seconds" in fams
            assert "process_resident_memory_bytes" in fams
            assert fetch("/readyz") == (200, b"ok\n")
            assert fetch("/healthz") == (200, b"ok\n")
    finally:

        async def stop() -> None:
            await holder["http"].stop()
            await holder["lag"].stop()

        server.run(stop())
