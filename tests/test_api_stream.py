"""GET /api/stream (server-sent events) and tokens tied to users.

The stream is read with aiohttp's client (in the test thread's own event loop);
messages come from paho publishers and the API. A slow client is made
deterministic: a webhook batch publishes all its messages in one event-loop
turn, so the stream's bounded queue overflows before its handler can run.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from ingestd.config import Config, HttpConfig, MqttConfig, ServerConfig, TokenConfig
from mqtt_clients import WAIT, Client, props
from server_thread import ServerThread
from test_api import Api, error_of

ADMIN = "admin-token"
ALICE = "alice-token"
# Anonymous MQTT clients (the test's publishers) may do anything; alice only alice/#.
ACL = "topic readwrite #\nuser alice\ntopic readwrite alice/#\ntopic read shared/#\n"


def make_config(tmp_path: Path, **http: Any) -> Config:
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    return Config(
        server=ServerConfig(
            listen=["127.0.0.1:0"], http_listen="127.0.0.1:0", data_dir=str(tmp_path)
        ),
        mqtt=MqttConfig(acl_file=str(acl)),
        http=HttpConfig(tokens=[ADMIN, TokenConfig(token=ALICE, user="alice")], **http),
    )


@pytest.fixture
def srv(tmp_path: Path) -> Any:
    st = ServerThread(make_config(tmp_path, stream_queue_messages=5)).start()
    yield st
    st.stop()


class Sse:
    """One open /api/stream response: ``next()`` returns (event, data) pairs in order."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []

    async def next(self) -> tuple[str, Any]:
        event, data = "message", []
        async with asyncio.timeout(WAIT):
            while True:
                raw = await self.resp.content.readline()
                assert raw, "stream ended"
                line = raw.decode().rstrip("\n")
                if not line:
                    if data:
                        return event, json.loads("\n".join(data))
                    continue
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])


def url(srv: ServerThread, *filters: str) -> str:
    assert srv.app is not None
    q = "&".join("filter=" + aiohttp.helpers.quote(f, safe="") for f in filters)  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{srv.app.port('http')}/api/stream" + (f"?{q}" if q else "")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def streams_open(srv: ServerThread) -> int:
    return srv.call(lambda: len(srv.app.http.api.streams.sinks))  # type: ignore[union-attr]


async def stream(srv: ServerThread, *filters: str, token: str = ADMIN) -> tuple[Any, Sse]:
    session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})
    resp = await session.get(url(srv, *filters))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/event-stream"
    sse = Sse(resp)
    # The opening comment: the stream's subscriptions exist from here on.
    first = await asyncio.wait_for(resp.content.readline(), WAIT)
    assert first.startswith(b": ingestd stream of ")
    return session, sse


def test_stream_sends_each_matching_message_as_one_event(srv: ServerThread) -> None:
    pub = Client(srv.port, version=5)

    async def main() -> None:
        session, sse = await stream(srv, "sensor/#", "other/x")
        try:
            await asyncio.to_thread(pub.publish, "nomatch/a", b"{}", 1)
            await asyncio.to_thread(
                pub.publish,
                "sensor/1",
                b'{"t": 21.5}',
                1,
                False,
                props(UserProperty=[("unit", "C")], ContentType="application/json"),
            )
            await asyncio.to_thread(pub.publish, "other/x", "héllo".encode(), 0)
            await asyncio.to_thread(pub.publish, "sensor/2", b"\xff\x00", 1, True)
            kind, e = await sse.next()
            assert kind == "message"
            assert e["topic"] == "sensor/1"
            assert (e["payload"], e["payload_encoding"], e["qos"], e["retain"]) == (
                {"t": 21.5},
                "json",
                1,
                False,
            )
            assert e["properties"]["user_properties"] == [["unit", "C"]]
            assert e["properties"]["content_type"] == "application/json"
            kind, e = await sse.next()
            assert (e["topic"], e["payload"], e["payload_encoding"], e["qos"]) == (
                "other/x",
                "héllo",
                "plain",
                0,
            )
            kind, e = await sse.next()
            assert (e["topic"], e["payload_encoding"], e["retain"]) == (
                "sensor/2",
                "base64",
                True,
            )
            assert base64.b64decode(e["payload"]) == b"\xff\x00"
        finally:
            await session.close()

    run(main())
    # The stream's subscriptions went with its client.
    deadline_ok = _wait(lambda: streams_open(srv) == 0)
    assert deadline_ok
    n = srv.call(lambda: len(srv.app.broker.trie.match_all("sensor/1")[0]))  # type: ignore[union-attr]
    assert n == 0


def _wait(cond: Any) -> bool:
    import time

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_a_slow_stream_drops_counts_and_says_so_without_stalling_the_broker(
    srv: ServerThread,
) -> None:
    api = Api(srv, token=ADMIN)
    sub = Client(srv.port, version=5)
    sub.subscribe("burst/#", qos=1)
    before = srv.call(lambda: srv.app.broker.stats.dropped.get("api_stream_slow", 0))  # type: ignore[union-attr]

    async def main() -> None:
        session, sse = await stream(srv, "burst/#")
        try:
            batch = [{"topic": f"burst/{i}", "payload": str(i), "qos": 1} for i in range(50)]
            # One handler turn publishes all 50: the stream's queue holds 5.
            await asyncio.to_thread(api.ok, "POST", "/api/ingest/webhook", batch)
            got = [await sse.next() for _ in range(6)]
            assert [e["topic"] for k, e in got[:5]] == [f"burst/{i}" for i in range(5)]
            assert got[5] == ("dropped", {"dropped": 45, "total_dropped": 45})
            # The stream goes on with what comes next.
            await asyncio.to_thread(api.ok, "POST", "/api/publish", {"topic": "burst/after"})
            kind, e = await sse.next()
            assert (kind, e["topic"]) == ("message", "burst/after")
        finally:
            await session.close()

    run(main())
    # The MQTT subscriber got every message: the slow stream cost it nothing.
    topics = [m.topic for m in sub.expect(51)]
    assert topics == [f"burst/{i}" for i in range(50)] + ["burst/after"]
    after = srv.call(lambda: srv.app.broker.stats.dropped.get("api_stream_slow", 0))  # type: ignore[union-attr]
    assert after - before == 45
    # and the metric family shows it
    status, _, text = Api(srv).call("GET", "/metrics")
    assert status == 200
    assert 'reason="api_stream_slow"' in text.decode()


def test_stream_limits_and_bad_filters(tmp_path: Path) -> None:
    st = ServerThread(make_config(tmp_path, stream_max_clients=1)).start()
    try:
        api = Api(st, token=ADMIN)

        async def main() -> None:
            session, _sse = await stream(st, "a/#")
            try:
                status, headers, data = await asyncio.to_thread(api.call, "GET", "/api/stream")
                assert "stream_max_clients" in error_of(status, data, 503, "busy")
                assert headers.get("Retry-After") == "5"
            finally:
                await session.close()

        run(main())
        for flt in ("a/#/b", "$share/g/a", ""):
            q = "filter=" + quote(flt, safe="")
            status, _, data = api.call("GET", f"/api/stream?{q}")
            assert "is not a valid MQTT topic filter" in error_of(status, data, 400, "bad_request")
        status, _, data = api.call("GET", "/api/stream", token="wrong")
        error_of(status, data, 401, "unauthorized")
    finally:
        st.stop()


# -- tokens tied to users ----------------------------------------------------------------


def test_a_user_token_streams_only_what_the_user_may_read(srv: ServerThread) -> None:
    api = Api(srv, token=ADMIN)
    status, _, data = Api(srv, token=ALICE).call("GET", "/api/stream?filter=bob/%23")
    assert "user 'alice' may read no topic of 'bob/#'" in error_of(status, data, 403, "forbidden")
    pub = Client(srv.port, version=4)

    async def main() -> None:
        session, sse = await stream(srv, "#", token=ALICE)
        try:
            for topic in ("bob/secret", "alice/1", "shared/news", "bob/other", "alice/2"):
                await asyncio.to_thread(pub.publish, topic, b"x", 1)
            got = [(await sse.next())[1]["topic"] for _ in range(3)]
            assert got == ["alice/1", "shared/news", "alice/2"]
        finally:
            await session.close()

    run(main())
    assert api.ok("POST", "/api/publish", {"topic": "bob/x"})["ok"] is True


def test_a_user_token_writes_with_the_users_rights(srv: ServerThread) -> None:
    alice = Api(srv, token=ALICE)
    sub = Client(srv.port, version=5)
    sub.subscribe("#", qos=1)
    sub.barrier()
    status, _, data = alice.call("POST", "/api/publish", {"topic": "bob/x"})
    assert "may not publish to 'bob/x'" in error_of(status, data, 403, "forbidden")
    status, _, data = alice.call("POST", "/api/publish", {"topic": "shared/news"})
    error_of(status, data, 403, "forbidden")  # read-only for alice
    status, _, data = alice.call("POST", "/api/ingest/webhook", [{"topic": "bob/y"}])
    error_of(status, data, 403, "forbidden")
    assert alice.ok("POST", "/api/publish", {"topic": "alice/x", "payload": "hi"})["ok"] is True
    (m,) = sub.expect()
    assert (m.topic, m.payload) == ("alice/x", b"hi")
    # Commands: devices/<id>/commands/<name> is not alice's to write.
    status, _, data = alice.call("POST", "/api/devices/d1/commands/reboot", {})
    error_of(status, data, 403, "forbidden")
    # The broker's administration needs an admin token.
    for method, path in (
        ("GET", "/api/sessions"),
        ("DELETE", f"/api/sessions/{sub.client_id}"),
        ("GET", "/api/dead-letters"),
    ):
        status, _, data = alice.call(method, path)
        assert "needs an admin token" in error_of(status, data, 403, "forbidden"), path
    sub.expect_nothing()
    # The admin token is not restricted.
    admin = Api(srv, token=ADMIN)
    admin.ok("POST", "/api/publish", {"topic": "bob/x"})
    (m,) = sub.expect()
    assert m.topic == "bob/x"
    assert admin.ok("GET", "/api/sessions")["sessions"]


def test_a_user_token_lists_only_readable_retained_messages(srv: ServerThread) -> None:
    admin = Api(srv, token=ADMIN)
    for topic in ("alice/r", "bob/r", "shared/r"):
        admin.ok("POST", "/api/publish", {"topic": topic, "payload": "v", "retain": True})
    listed = Api(srv, token=ALICE).ok("GET", "/api/retained?filter=%23")
    assert [m["topic"] for m in listed["messages"]] == ["alice/r", "shared/r"]
    assert len(admin.ok("GET", "/api/retained?filter=%23")["messages"]) == 3
    status, _, data = Api(srv, token=ALICE).call("DELETE", "/api/retained/bob/r")
    error_of(status, data, 403, "forbidden")


def test_shutdown_ends_streams_and_answers_waiting_rpcs(tmp_path: Path) -> None:
    import threading

    st = ServerThread(make_config(tmp_path)).start()
    stopped = False
    try:
        api = Api(st, token=ADMIN)
        dev = Client(st.port, version=5)
        dev.subscribe(f"devices/{dev.client_id}/commands/rpc", qos=1)
        answers: list[Any] = []
        t = threading.Thread(
            target=lambda: answers.append(
                api.call("POST", f"/api/devices/{dev.client_id}/rpc", {"timeout_ms": 30_000})
            )
        )

        async def main() -> None:
            session, sse = await stream(st, "x/#")
            try:
                t.start()
                await asyncio.to_thread(dev.expect)  # the request is out: the RPC waits
                await asyncio.to_thread(st.stop)
                async with asyncio.timeout(WAIT):
                    rest = await sse.resp.content.read()
                assert b"event: message" not in rest  # ended, nothing more
            finally:
                await session.close()

        run(main())
        stopped = True
        t.join(WAIT)
        ((status, _, data),) = answers
        assert status == 503 and data["error"]["code"] == "shutting_down", data
    finally:
        if not stopped:
            st.stop()


def _stalled_stream(srv: ServerThread) -> Any:
    """A raw client that opens a stream and never reads, and the server's handler of it
    blocked in a write (the stream is fed until its write waits)."""
    import socket

    assert srv.app is not None
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.app.port("http")))
    s.sendall(
        b"GET /api/stream?filter=stall/%23 HTTP/1.1\r\nHost: t\r\n"
        b"Authorization: Bearer " + ADMIN.encode() + b"\r\n\r\n"
    )
    assert _wait(lambda: streams_open(srv) == 1)
    api = Api(srv, token=ADMIN)
    big = "x" * 60_000
    batch = [{"topic": "stall/t", "payload": big, "qos": 0} for _ in range(5)]

    def writing() -> bool:
        return any(k.writing for k in srv.app.http.api.streams.sinks)  # type: ignore[union-attr]

    for _ in range(400):  # at most 120 MB offered; the socket buffers hold far less
        if srv.call(writing):
            return s
        api.ok("POST", "/api/ingest/webhook", batch)
    raise AssertionError("the stream's write never blocked")


def test_stop_cuts_off_a_stream_blocked_in_a_write(srv: ServerThread) -> None:
    s = _stalled_stream(srv)
    try:
        # What HttpServer.stop does first: the blocked stream must end, not wait for its
        # client (which would hold the graceful stop).
        srv.call(lambda: srv.app.http.api.close())  # type: ignore[union-attr]
        assert _wait(lambda: streams_open(srv) == 0)
        n = srv.call(lambda: len(srv.app.broker.trie.match_all("stall/t")[0]))  # type: ignore[union-attr]
        assert n == 0
    finally:
        s.close()


def test_a_client_that_takes_no_write_is_cut_off(
    srv: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ingestd.http.stream as stream_module

    monkeypatch.setattr(stream_module, "WRITE_TIMEOUT_S", 0.5)  # an input, not a measurement
    s = _stalled_stream(srv)
    try:
        assert _wait(lambda: streams_open(srv) == 0)

        # Its slot is free again: a new stream opens.
        async def main() -> None:
            session, _sse = await stream(srv, "a/#")
            await session.close()

        run(main())
    finally:
        s.close()
