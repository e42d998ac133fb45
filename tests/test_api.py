"""The JSON API under /api against a real broker: paho clients, real PostgreSQL for ingest.

Requests go over TCP with urllib from the test thread; the server runs on its own
loop (tests/server_thread.py). Every wait is bounded (mqtt_clients.WAIT).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from paho.mqtt.packettypes import PacketTypes

from ingestd.config import Config, HttpConfig, ServerConfig, load_config
from mqtt_clients import WAIT, Client, props
from pg_fixtures import config_from_toml, fetch_sync, wait_rows
from server_thread import ServerThread, start_with_http

TOKEN = "s3cret-token"


def make_config(tmp_path: Path, http_listen: str = "127.0.0.1:0", **http: Any) -> Config:
    return Config(
        server=ServerConfig(
            listen=["127.0.0.1:0"], http_listen=http_listen, data_dir=str(tmp_path)
        ),
        http=HttpConfig(**http),
    )


class Api:
    """A tiny HTTP client for one server: ``call`` returns (status, headers, parsed JSON)."""

    def __init__(self, srv: ServerThread, token: str | None = None) -> None:
        assert srv.app is not None
        self.srv = srv
        self.base = f"http://127.0.0.1:{srv.app.port('http')}"
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, str], Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        tok = token if token is not None else self.token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        try:
            with urllib.request.urlopen(req, timeout=WAIT) as resp:
                status, headers, text = resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            status, headers, text = e.code, dict(e.headers), e.read()
        ctype = headers.get("Content-Type", "")
        parsed = json.loads(text) if ctype.startswith("application/json") else text
        return status, headers, parsed

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, _, data = self.call(method, path, body)
        assert status == 200, data
        return data


def error_of(status: int, data: Any, expect_status: int, code: str) -> str:
    """Assert the stable JSON error shape; returns the message."""
    assert status == expect_status, data
    assert set(data) == {"error"}, data
    assert data["error"]["code"] == code, data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    return str(data["error"]["message"])


@pytest.fixture
def srv(tmp_path: Path) -> Any:
    st = ServerThread(make_config(tmp_path)).start()
    yield st
    st.stop()


# -- publish -------------------------------------------------------------------------


def test_publish_reaches_subscribers_at_qos_0_and_1_and_retains(srv: ServerThread) -> None:
    api = Api(srv)
    sub = Client(srv.port)
    sub.subscribe("api/#", qos=1)
    assert api.ok("POST", "/api/publish", {"topic": "api/a", "payload": "héllo"}) == {
        "ok": True,
        "topic": "api/a",
        "qos": 0,
        "retain": False,
        "bytes": 6,
    }
    (m,) = sub.expect()
    assert (m.topic, m.payload, m.qos, m.retain) == ("api/a", "héllo".encode(), 0, False)

    body = {"topic": "api/b", "payload_base64": base64.b64encode(b"\x00\xff").decode(), "qos": 1}
    assert api.ok("POST", "/api/publish", body)["qos"] == 1
    (m,) = sub.expect()
    assert (m.topic, m.payload, m.qos) == ("api/b", b"\x00\xff", 1)

    body = {"topic": "api/c", "payload_json": {"t": 21.5, "ok": True}, "qos": 2, "retain": True}
    api.ok("POST", "/api/publish", body)
    (m,) = sub.expect()
    assert (m.topic, json.loads(m.payload), m.qos) == ("api/c", {"t": 21.5, "ok": True}, 1)
    late = Client(srv.port)
    late.subscribe("api/c", qos=2)
    (m,) = late.expect()
    assert (m.payload, m.retain, m.qos) == (b'{"t":21.5,"ok":true}', True, 2)
    sub.expect_nothing()


def test_publish_v5_properties_arrive_at_a_v5_subscriber(srv: ServerThread) -> None:
    api = Api(srv)
    sub = Client(srv.port, version=5)
    sub.subscribe("props/#", qos=1)
    api.ok(
        "POST",
        "/api/publish",
        {
            "topic": "props/x",
            "payload": "{}",
            "qos": 1,
            "properties": {
                "content_type": "application/json",
                "response_topic": "props/reply",
                "correlation_data": base64.b64encode(b"\x01corr").decode(),
                "user_properties": {"site": "lyon", "line": "3"},
                "message_expiry": 3600,
            },
        },
    )
    (m,) = sub.expect()
    p = m.properties
    assert p.ContentType == "application/json"
    assert p.ResponseTopic == "props/reply"
    assert p.CorrelationData == b"\x01corr"
    assert p.UserProperty == [("site", "lyon"), ("line", "3")]
    assert 3590 <= p.MessageExpiryInterval <= 3600
    # The list form keeps order and repeated keys.
    body = {
        "topic": "props/y",
        "properties": {"user_properties": [["k", "1"], ["k", "2"]]},
    }
    api.ok("POST", "/api/publish", body)
    (m,) = sub.expect()
    assert m.properties.UserProperty == [("k", "1"), ("k", "2")]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([], "body: expected a JSON object"),
        ({"payload": "x"}, "topic: expected a topic name string, got null"),
        ({"topic": ""}, "is not a valid MQTT topic name"),
        ({"topic": "a/+/b"}, "is not a valid MQTT topic name"),
        ({"topic": "a/#"}, "is not a valid MQTT topic name"),
        ({"topic": "a\u0000b"}, "is not a valid MQTT topic name"),
        ({"topic": 5}, "topic: expected a topic name string, got a number"),
        ({"topic": "t", "qos": 3}, "qos: expected 0, 1 or 2, got 3"),
        ({"topic": "t", "qos": True}, "qos: expected 0, 1 or 2, got true"),
        ({"topic": "t", "qos": "1"}, "qos: expected 0, 1 or 2"),
        ({"topic": "t", "retain": 1}, "retain: expected true or false, got 1"),
        ({"topic": "t", "payload": 5}, "payload: expected a string, got a number"),
        ({"topic": "t", "payload": "a", "payload_json": 1}, "at most one of payload"),
        ({"topic": "t", "payload_base64": "%%%"}, "payload_base64: not valid base64"),
        ({"topic": "t", "retained": True}, "unknown field 'retained'"),
        ({"topic": "t", "properties": []}, "properties: expected an object, got an array"),
        ({"topic": "t", "properties": {"ttl": 5}}, "properties: unknown field 'ttl'"),
        (
            {"topic": "t", "properties": {"response_topic": "r/#"}},
            "properties.response_topic: 'r/#' is not a valid MQTT topic name",
        ),
        (
            {"topic": "t", "properties": {"correlation_data": "not base64!"}},
            "properties.correlation_data: not valid base64",
        ),
        (
            {"topic": "t", "properties": {"user_properties": [["only-key"]]}},
            "properties.user_properties[0]: expected a [key, value] pair",
        ),
        (
            {"topic": "t", "properties": {"user_properties": {"k": 1}}},
            "properties.user_properties.k: expected a string, got a number",
        ),
        (
            {"topic": "t", "properties": {"user_properties": "k=v"}},
            "properties.user_properties: expected an object",
        ),
        (
            {"topic": "t", "properties": {"message_expiry": 0}},
            "properties.message_expiry: expected whole seconds from 1",
        ),
        (
            {"topic": "t", "properties": {"content_type": "a\u0000"}},
            "properties.content_type: must not contain U+0000",
        ),
    ],
)
def test_publish_rejects_each_malformed_field_precisely(
    srv: ServerThread, body: Any, needle: str
) -> None:
    api = Api(srv)
    sub = Client(srv.port)
    sub.subscribe("#")
    status, _, data = api.call("POST", "/api/publish", body)
    assert needle in error_of(status, data, 400, "bad_request")
    sub.expect_nothing()


def test_publish_rejects_bad_json_and_content_types(srv: ServerThread) -> None:
    api = Api(srv)
    status, _, data = api.call("POST", "/api/publish", raw=b'{"topic": ')
    assert "body is not valid JSON" in error_of(status, data, 400, "invalid_json")
    status, _, data = api.call("POST", "/api/publish", raw=b'{"topic": "t", "payload_json": NaN}')
    assert "NaN is not JSON" in error_of(status, data, 400, "invalid_json")
    status, _, data = api.call("POST", "/api/publish", raw=b"")
    error_of(status, data, 400, "invalid_json")
    # A form post (what a cross-site HTML form can send without a preflight) is refused.
    status, _, data = api.call(
        "POST", "/api/publish", raw=b"topic=t", content_type="application/x-www-form-urlencoded"
    )
    assert "application/json" in error_of(status, data, 415, "unsupported_media_type")


# -- errors, auth ----------------------------------------------------------------------


def test_unknown_routes_and_methods_answer_the_json_error_shape(srv: ServerThread) -> None:
    api = Api(srv)
    status, _, data = api.call("GET", "/api/nope")
    assert "/api/nope" in error_of(status, data, 404, "not_found")
    status, _, data = api.call("GET", "/api")
    error_of(status, data, 404, "not_found")
    status, headers, data = api.call("GET", "/api/publish")
    assert "GET is not allowed" in error_of(status, data, 405, "method_not_allowed")
    assert headers["Allow"] == "POST"
    status, _, data = api.call("PUT", "/api/sessions", {})
    error_of(status, data, 405, "method_not_allowed")
    # Outside /api the operational endpoints keep their plain text.
    status, headers, data = api.call("GET", "/nope")
    assert (status, data) == (404, b"not found\n")


def test_tokens_guard_the_api_but_not_the_probes(tmp_path: Path) -> None:
    st = ServerThread(make_config(tmp_path, tokens=["first", TOKEN])).start()
    try:
        api = Api(st)
        for token in (None, "wrong", TOKEN + "x", "firs", "Basic Zmlyc3Q6"):
            if token is not None and token.startswith("Basic "):
                status, headers, data = call_with_authorization(api, token)
            else:
                status, headers, data = api.call("GET", "/api/sessions", token=token or "")
            error_of(status, data, 401, "unauthorized")
            assert headers["WWW-Authenticate"].startswith("Bearer")
        # Unknown routes too: nothing about the API is told without a token.
        status, _, data = api.call("GET", "/api/nope")
        error_of(status, data, 401, "unauthorized")
        for token in ("first", TOKEN):
            status, _, data = api.call("GET", "/api/sessions", token=token)
            assert status == 200 and data["sessions"] == []
        status, _, _ = api.call("POST", "/api/publish", {"topic": "t"}, token=TOKEN)
        assert status == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert api.call("GET", path)[0] == 200
    finally:
        st.stop()


def call_with_authorization(api: Api, value: str) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(api.base + "/api/sessions", headers={"Authorization": value})
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_tokens_come_from_the_http_table_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[http]\ntokens = ["a", "b"]\n')
    assert load_config(str(path), env={}).http.tokens == ["a", "b"]
    # INGESTD_HTTP__TOKENS keeps secrets out of the file (containers).
    assert load_config(None, env={"INGESTD_HTTP__TOKENS": "x,y"}).http.tokens == ["x", "y"]
    assert load_config(None, env={}).http.tokens == []


def test_api_beyond_loopback_stays_off_without_a_token(tmp_path: Path) -> None:
    st = ServerThread(make_config(tmp_path, http_listen="0.0.0.0:0")).start()
    try:
        api = Api(st)
        status, _, data = api.call("GET", "/api/sessions")
        assert status == 403
        assert data["error"]["code"] == "api_disabled"
        assert "http.tokens" in data["error"]["message"]
        # Prometheus and health checks still work on the exposed listener.
        assert api.call("GET", "/healthz")[0] == 200
    finally:
        st.stop()
    # With a token it serves (and is reached here over loopback).
    st = ServerThread(make_config(tmp_path, http_listen="0.0.0.0:0", tokens=[TOKEN])).start()
    try:
        api = Api(st, TOKEN)
        assert api.call("GET", "/api/sessions")[0] == 200
        assert api.call("GET", "/api/sessions", token="nope")[0] == 401
    finally:
        st.stop()


# -- retained, sessions -----------------------------------------------------------------


def test_retained_list_and_delete(srv: ServerThread) -> None:
    api = Api(srv)
    pub = Client(srv.port, version=5)
    pub.publish("ret/a", b"text", qos=1, retain=True)
    pub.publish(
        "ret/b",
        b"\xff\x00",
        qos=0,
        retain=True,
        properties=props(PacketTypes.PUBLISH, ContentType="bin", UserProperty=[("u", "v")]),
    )
    pub.publish("other/c", b"x", retain=True)
    pub.barrier()  # the broker has handled every PUBLISH above
    data = api.ok("GET", "/api/retained?filter=ret/%23")
    assert data["filter"] == "ret/#" and not data["truncated"]
    assert data["messages"] == [
        {
            "topic": "ret/a",
            "qos": 1,
            "payload": "text",
            "payload_encoding": "plain",
            "properties": {},
        },
        {
            "topic": "ret/b",
            "qos": 0,
            "payload": base64.b64encode(b"\xff\x00").decode(),
            "payload_encoding": "base64",
            "properties": {"content_type": "bin", "user_properties": [["u", "v"]]},
        },
    ]
    assert [m["topic"] for m in api.ok("GET", "/api/retained")["messages"]] == [
        "other/c",
        "ret/a",
        "ret/b",
    ]
    page = api.ok("GET", "/api/retained?limit=1")
    assert len(page["messages"]) == 1 and page["truncated"]
    status, _, data = api.call("GET", "/api/retained?filter=a/%23/b")
    assert "filter" in error_of(status, data, 400, "bad_request")
    status, _, data = api.call("GET", "/api/retained?limit=0")
    assert "limit" in error_of(status, data, 400, "bad_request")

    assert api.ok("DELETE", "/api/retained/ret/a") == {"ok": True, "topic": "ret/a"}
    status, _, data = api.call("DELETE", "/api/retained/ret/a")
    error_of(status, data, 404, "not_found")
    status, _, data = api.call("DELETE", "/api/retained/ret/%23")
    error_of(status, data, 400, "bad_request")
    late = Client(srv.port)
    late.subscribe("ret/#")
    (m,) = late.expect()
    assert m.topic == "ret/b"  # ret/a is gone
    late.expect_nothing()
    assert [m["topic"] for m in api.ok("GET", "/api/retained?filter=ret/%23")["messages"]] == [
        "ret/b"
    ]


def test_sessions_list_and_administrative_disconnect(srv: ServerThread) -> None:
    api = Api(srv)
    dev = Client(srv.port, client_id="dev-1", version=5, session_expiry=300)
    dev.subscribe("cmd/dev-1", qos=1)
    v3 = Client(srv.port, client_id="dev-2", version=4)
    data = api.ok("GET", "/api/sessions?prefix=dev-")
    by_id = {s["client_id"]: s for s in data["sessions"]}
    assert list(by_id) == ["dev-1", "dev-2"]
    s = by_id["dev-1"]
    assert s["online"] is True and s["expiry_interval"] == 300
    assert {"filter": "cmd/dev-1", "qos": 1} in s["subscriptions"]
    assert (s["inflight"], s["queued"]) == (0, 0)

    assert api.ok("DELETE", "/api/sessions/dev-1") == {
        "ok": True,
        "client_id": "dev-1",
        "disconnected": True,
    }
    rc = dev.disconnects.get(timeout=WAIT)
    assert rc.value == 0x98
    # The persistent session stays, offline; deleting it again is a conflict, not a 404.
    s = next(x for x in api.ok("GET", "/api/sessions")["sessions"] if x["client_id"] == "dev-1")
    assert s["online"] is False
    status, _, data = api.call("DELETE", "/api/sessions/dev-1")
    error_of(status, data, 409, "offline")
    status, _, data = api.call("DELETE", "/api/sessions/nobody")
    error_of(status, data, 404, "not_found")
    # A 3.1.1 client has no DISCONNECT from the server: its connection is closed.
    api.ok("DELETE", "/api/sessions/dev-2")
    v3.disconnects.get(timeout=WAIT)


# -- OpenAPI -------------------------------------------------------------------------------


def test_openapi_documents_exactly_the_registered_routes(srv: ServerThread) -> None:
    api = Api(srv)
    doc = api.ok("GET", "/api/openapi.json")
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    assert srv.app is not None and srv.app.http is not None
    router = srv.app.http.app.router
    registered = {
        (route.resource.canonical, route.method)
        for route in router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api")
        and route.method != "HEAD"
    }
    assert documented == registered
    for (path, method), ops in [
        ((p, m), o) for p, ms in doc["paths"].items() for m, o in ms.items()
    ]:
        assert "200" in ops["responses"], (path, method)
        for param in ops.get("parameters", []):
            if param["in"] == "path":
                assert "{" + param["name"] + "}" in path


# -- ingestion: real PostgreSQL -------------------------------------------------------------

ROUTES = """
[presence]
enabled = false
[ingest]
flush_interval_ms = 400
[[routes]]
name = "readings"
topic = "plant/{site}/{sensor}"
table = "api_readings"
[routes.columns]
site = "topic.site"
sensor = "topic.sensor"
value = "payload.v::double precision"
client_id = "client_id"
"""


def pg_server(toml: str, tmp_path: Path, dsn: str) -> Iterator[tuple[ServerThread, str]]:
    """For a fixture: a server of ``toml`` on ephemeral MQTT and HTTP ports, with the
    database; yields (server, dsn) and stops it."""
    st = start_with_http(config_from_toml(toml, tmp_path, dsn))
    yield st, dsn
    st.stop()


@pytest.fixture
def pg_srv(pg_dsn: str, tmp_path: Path) -> Any:
    yield from pg_server(ROUTES, tmp_path, pg_dsn)


def rows(dsn: str) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in fetch_sync(
            dsn, "SELECT site, sensor, value, client_id FROM api_readings ORDER BY value"
        )
    ]


def answer_waits_for_commit(srv: ServerThread, dsn: str, path: str, body: Any) -> Any:
    """POST ``body`` while a lock blocks the route's COPY: no answer until the commit.

    The COPY is seen waiting on our lock in pg_locks; only then is the socket read,
    without blocking: an answer sent before the commit would already be in the
    (loopback) receive buffer, as the handler would have written it before the COPY
    even started. Then the lock goes, the answer comes, and the rows are there.
    """
    assert srv.app is not None

    async def main() -> Any:
        conn = await asyncpg.connect(dsn)
        tr = conn.transaction()
        await tr.start()
        await conn.execute("LOCK TABLE api_readings IN ACCESS EXCLUSIVE MODE")
        data = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", srv.app.port("http")), timeout=WAIT)
        try:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            deadline = time.monotonic() + WAIT
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_locks"
                " WHERE relation = 'api_readings'::regclass AND NOT granted"
            ):
                assert time.monotonic() < deadline, "the COPY never waited on the lock"
                await asyncio.sleep(0.02)
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # no answer while the row is not committed
            await tr.rollback()
            sock.settimeout(WAIT)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        finally:
            sock.close()
            await conn.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"200", raw
        return json.loads(payload)

    return asyncio.run(main())


@pytest.mark.pg
def test_publish_into_an_after_commit_route_answers_once_the_row_is_committed(
    pg_srv: Any,
) -> None:
    srv, dsn = pg_srv
    body = {"topic": "plant/p1/s1", "payload_json": {"v": 1.5}, "qos": 1}
    assert answer_waits_for_commit(srv, dsn, "/api/publish", body)["ok"] is True
    assert rows(dsn) == [("p1", "s1", 1.5, "$api")]
    # QoS 0 is not acknowledged on durability (as over MQTT), but it is ingested.
    Api(srv).ok("POST", "/api/publish", {"topic": "plant/p0/s0", "payload_json": {"v": 0.5}})
    wait_rows(dsn, "SELECT 1 FROM api_readings WHERE site = 'p0'")


@pytest.mark.pg
def test_webhook_answers_once_the_rows_are_committed(pg_srv: Any) -> None:
    srv, dsn = pg_srv
    batch = [{"topic": f"plant/w{i}/x", "payload": f'{{"v": {i}}}', "qos": 1} for i in range(5)]
    assert answer_waits_for_commit(srv, dsn, "/api/ingest/webhook", batch) == {
        "ok": True,
        "accepted": 5,
    }
    assert [r[0] for r in rows(dsn)] == [f"w{i}" for i in range(5)]


@pytest.mark.pg
def test_webhook_emqx_and_plain_forms_commit_before_2xx_and_reach_subscribers(
    pg_srv: Any,
) -> None:
    srv, dsn = pg_srv
    api = Api(srv)
    sub = Client(srv.port)
    sub.subscribe("plant/#", qos=1)
    emqx5 = {
        "event": "message.publish",
        "id": "0006...",
        "topic": "plant/p1/t1",
        "payload": '{"v": 1}',
        "qos": 1,
        "clientid": "emqx-dev-1",
        "username": "u1",
        "flags": {"retain": False, "dup": False},
        "pub_props": {"User-Property": {"src": "emqx"}},
        "peerhost": "10.0.0.9",
        "timestamp": 1700000000000,
        "node": "emqx@127.0.0.1",
    }
    assert api.ok("POST", "/api/ingest/webhook", emqx5) == {"ok": True, "accepted": 1}
    assert rows(dsn) == [("p1", "t1", 1.0, "emqx-dev-1")]
    (m,) = sub.expect()
    assert (m.topic, m.payload) == ("plant/p1/t1", b'{"v": 1}')

    batch = [
        {
            "event": "message.publish",
            "topic": "plant/p2/t2",
            "payload": base64.b64encode(b'{"v": 2}').decode(),
            "payload_encoding": "base64",
            "qos": 1,
            "clientid": "emqx-dev-2",
        },
        {
            "action": "message_publish",  # EMQX 4 web hook
            "from_client_id": "emqx4-dev",
            "from_username": "u4",
            "topic": "plant/p3/t3",
            "payload": '{"v": 3}',
            "qos": 2,
            "retain": False,
        },
        {"topic": "plant/p4/t4", "payload": '{"v": 4}'},  # plain form, QoS 1 by default
    ]
    assert api.ok("POST", "/api/ingest/webhook", batch) == {"ok": True, "accepted": 3}
    assert rows(dsn) == [
        ("p1", "t1", 1.0, "emqx-dev-1"),
        ("p2", "t2", 2.0, "emqx-dev-2"),
        ("p3", "t3", 3.0, "emqx4-dev"),
        ("p4", "t4", 4.0, "$webhook"),
    ]
    assert sorted(m.topic for m in sub.expect(3)) == ["plant/p2/t2", "plant/p3/t3", "plant/p4/t4"]


@pytest.mark.pg
@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"topic": "plant/x/#", "payload": "{}"}, "topic:"),
        ({"event": "client.connected", "clientid": "c"}, "event: only 'message.publish'"),
        (
            {"topic": "plant/x/y", "payload": "!!", "payload_encoding": "base64"},
            "payload: not valid base64",
        ),
        ({"topic": "plant/x/y", "payload_encoding": "hex"}, "payload_encoding"),
        ({"topic": "plant/x/y", "qos": 7}, "qos: expected 0, 1 or 2"),
        ({"topic": "plant/x/y", "flags": {"retain": "no"}}, "flags.retain"),
        ("just a string", "expected a JSON object"),
    ],
)
def test_a_malformed_webhook_element_rejects_the_whole_batch(
    pg_srv: Any, bad: Any, needle: str
) -> None:
    srv, dsn = pg_srv
    api = Api(srv)
    sub = Client(srv.port)
    sub.subscribe("plant/#")
    good = {"topic": "plant/ok/ok", "payload": '{"v": 9}', "qos": 1}
    status, _, data = api.call("POST", "/api/ingest/webhook", [good, good, bad, good])
    message = error_of_index(status, data, 2)
    assert message.startswith("element 2: ") and needle in message, message
    sub.expect_nothing()
    # Nothing of it reached the table either (a later good batch commits alone).
    api.ok("POST", "/api/ingest/webhook", {"topic": "plant/after/x", "payload": '{"v": 0}'})
    assert rows(dsn) == [("after", "x", 0.0, "$webhook")]


def error_of_index(status: int, data: Any, index: int) -> str:
    assert status == 400, data
    assert data["error"]["code"] == "bad_request" and data["error"]["index"] == index, data
    return str(data["error"]["message"])


# -- failure paths, with a stand-in broker --------------------------------------------------


class FailingBroker:
    """Routes nothing; the durability future of a QoS 1/2 message fails (a dead table)."""

    def __init__(self) -> None:
        self.closing = False
        self.published: list[Any] = []
        self.sessions: dict[str, Any] = {}

    def publish(self, message: Any, origin: Any) -> Any:
        self.published.append(message)
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(RuntimeError("relation does not exist"))
        return fut


def test_a_failed_commit_is_a_503_and_shutdown_refuses_publishes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client.registry import CollectorRegistry

    from ingestd.http import Api as ApiRoutes
    from ingestd.http import HttpServer

    broker = FailingBroker()

    async def main() -> None:
        http = HttpServer(CollectorRegistry(), api=ApiRoutes(broker, tokens=["t0", "t1"]))
        port = await http.start("127.0.0.1", 0)

        async def post(path: str, body: Any) -> tuple[int, Any]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            data = json.dumps(body).encode()
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + data
            )
            raw = await asyncio.wait_for(reader.read(), WAIT)
            writer.close()
            head, _, payload = raw.partition(b"\r\n\r\n")
            return int(head.split(b" ")[1]), json.loads(payload)

        try:
            with caplog.at_level("INFO", logger="ingestd.http.api"):
                status, data = await post(
                    "/api/publish", {"topic": "a/b", "payload": "xyz", "qos": 1}
                )
            assert "relation does not exist" in error_of(status, data, 503, "not_durable")
            audit = [r.getMessage() for r in caplog.records if "audit: publish" in r.getMessage()]
            assert audit == [
                "audit: publish topic='a/b' qos=1 retain=False bytes=3 token=1 peer=127.0.0.1"
            ]
            # QoS 0 is not held to durability: its failed future is consumed, the answer is 200.
            status, data = await post("/api/publish", {"topic": "a/b"})
            assert status == 200
            status, data = await post("/api/ingest/webhook", [{"topic": "a/b", "qos": 2}])
            error_of(status, data, 503, "not_durable")
            broker.closing = True
            status, data = await post("/api/publish", {"topic": "a/b"})
            error_of(status, data, 503, "shutting_down")
            assert len(broker.published) == 3  # nothing published once closing
        finally:
            await http.stop()

    asyncio.run(main())


def test_body_limits_and_slow_bodies_answer_json_errors() -> None:
    from prometheus_client.registry import CollectorRegistry

    from ingestd.http import Api as ApiRoutes
    from ingestd.http import HttpServer

    broker = FailingBroker()

    async def main() -> None:
        http = HttpServer(
            CollectorRegistry(),
            api=ApiRoutes(broker),
            max_api_body_bytes=1000,
            request_timeout=0.2,
        )
        port = await http.start("127.0.0.1", 0)

        async def exchange(raw: bytes) -> tuple[int, Any]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            data = await asyncio.wait_for(reader.read(), WAIT)  # the server closes
            writer.close()
            head, _, payload = data.partition(b"\r\n\r\n")
            return int(head.split(b" ")[1]), json.loads(payload)

        head = "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        try:
            # Announced too large: refused before reading.
            status, data = await exchange(f"{head}Content-Length: 1001\r\n\r\n".encode())
            assert "1001 bytes exceeds the limit of 1000" in error_of(
                status, data, 413, "payload_too_large"
            )
            # Chunked, so only reading finds out.
            chunk = b"x" * 1500
            status, data = await exchange(
                f"{head}Transfer-Encoding: chunked\r\n\r\n{len(chunk):x}\r\n".encode()
                + chunk
                + b"\r\n0\r\n\r\n"
            )
            error_of(status, data, 413, "payload_too_large")
            # Half a body, then silence: 408 after request_timeout.
            status, data = await exchange(
                f'{head}Content-Length: 20\r\nConnection: close\r\n\r\n{{"topic":'.encode()
            )
            error_of(status, data, 408, "request_timeout")
            assert broker.published == []
        finally:
            await http.stop()

    asyncio.run(main())
