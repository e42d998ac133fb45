"""POST /api/ingest/webhook under a saturated ingest engine, and its body bound.

A lock on the route's table holds the COPY, so pending rows stay where the
test put them: which request fits, which waits and which is refused follows
from counts alone. Every wait is a condition with a generous deadline.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from mqtt_clients import WAIT
from pg_fixtures import config_from_toml, fetch_sync
from server_thread import ServerThread, start_with_http

ROUTES = """
[presence]
enabled = false
[ingest]
max_pending_rows = 100
[http]
max_body_bytes = 20000
[[routes]]
name = "bp"
topic = "bp/{batch}"
table = "bp_rows"
[routes.columns]
batch = "topic.batch"
n = "payload.n::integer"
"""


@pytest.fixture
def srv(pg_dsn: str, tmp_path: Path) -> Any:
    st = start_with_http(config_from_toml(ROUTES, tmp_path, pg_dsn))
    yield st, pg_dsn
    st.stop()


def post(srv: ServerThread, body: bytes) -> tuple[int, dict[str, str], Any]:
    assert srv.app is not None
    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.app.port('http')}/api/ingest/webhook", data=body, method="POST"
    )
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def batch(name: str, first: int, n: int) -> bytes:
    return json.dumps(
        [{"topic": f"bp/{name}", "payload": json.dumps({"n": i})} for i in range(first, first + n)]
    ).encode()


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def wait_until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.pg
def test_saturated_engine_holds_then_refuses_with_503_and_loses_nothing(srv: Any) -> None:
    st, dsn = srv
    app = st.app
    assert app is not None
    api = app.http.api
    pending = app.ingest.pending

    async def lock() -> tuple[asyncpg.Connection, Any]:
        conn = await asyncpg.connect(dsn)
        tr = conn.transaction()
        await tr.start()
        await conn.execute("LOCK TABLE bp_rows IN ACCESS EXCLUSIVE MODE")
        return conn, tr

    loop = asyncio.new_event_loop()
    conn, tr = loop.run_until_complete(lock())
    try:
        # A: 60 rows, accepted; its answer waits for the commit the lock holds up.
        a, a_out = in_thread(lambda: post(st, batch("a", 0, 60)))
        wait_until(lambda: st.call(lambda: pending.count) == 60, "A's rows pending")
        # B: 60 more would pass the bound of 100. With no wait allowed: 503 at once.
        st.call(lambda: setattr(api, "ingest_wait_s", 0.0))
        status, headers, data = post(st, batch("b", 60, 60))
        assert status == 503, data
        assert data["error"]["code"] == "ingest_saturated"
        assert "ingest.max_pending_rows = 100" in data["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        assert st.call(lambda: pending.count) == 60  # nothing of B was published
        assert st.call(lambda: api.webhook_refused) == 1
        # B again, allowed to wait: it is held (not refused) until A's rows commit.
        st.call(lambda: setattr(api, "ingest_wait_s", 60.0))
        b, b_out = in_thread(lambda: post(st, batch("b", 60, 60)))
        wait_until(lambda: st.call(lambda: api.webhook_waiting) == 1, "B waiting for room")
        assert st.call(lambda: pending.count) == 60
        # A batch larger than the bound itself goes only when nothing is pending.
        big, big_out = in_thread(lambda: post(st, batch("c", 120, 150)))
        wait_until(lambda: st.call(lambda: api.webhook_waiting) == 2, "C waiting for room")
    finally:
        loop.run_until_complete(tr.rollback())
        loop.run_until_complete(conn.close())
        loop.close()
    for t in (a, b, big):
        t.join(60)
    assert a_out[0][0] == 200 and a_out[0][2] == {"ok": True, "accepted": 60}
    assert b_out[0][0] == 200 and b_out[0][2] == {"ok": True, "accepted": 60}
    assert big_out[0][0] == 200 and big_out[0][2] == {"ok": True, "accepted": 150}
    got = sorted(r["n"] for r in fetch_sync(dsn, "SELECT n FROM bp_rows"))
    assert got == list(range(270))  # every accepted row once, none of the refused
    assert st.call(lambda: api.webhook_refused) == 1


@pytest.mark.pg
def test_webhook_body_over_the_bound_is_413_and_publishes_nothing(srv: Any) -> None:
    st, dsn = srv
    assert st.app is not None
    body = batch("big", 0, 1000)
    assert len(body) > 20000
    status, _, data = post(st, body)
    assert status == 413, data
    assert data["error"]["code"] == "payload_too_large"
    assert "exceeds the limit of 20000 bytes" in data["error"]["message"]
    status, _, data = post(st, batch("ok", 0, 3))
    assert status == 200 and data == {"ok": True, "accepted": 3}
    assert sorted(r["batch"] for r in fetch_sync(dsn, "SELECT batch FROM bp_rows")) == ["ok"] * 3
