"""HTTP API tokens of mqtt.credentials_table users (`ingestd user token`), with aiohttp's client.

A real broker whose credentials are a table in a fresh database of the test
PostgreSQL (the fixtures of tests/test_credentials_table.py), an HTTP listener
on loopback, and a paho subscriber seeing what the API publishes. The table's
full-reload interval is an hour: a token that stops working after a CLI
command was stopped by the table's NOTIFY. Waits are on the broker's snapshot,
never on time.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mqtt_clients import Client
from pg_fixtures import fetch_sync
from pg_proxy import PgProxy
from server_thread import ServerThread
from test_credentials_table import (  # noqa: F401  (start: the fixture)
    TABLE,
    ingestd,
    insert_user,
    sql,
    start,
    user_cmd,
    wait_user,
)

pytestmark = pytest.mark.pg


def call(
    srv: ServerThread, method: str, path: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    """One request with aiohttp's client: (status, the JSON body)."""
    assert srv.app is not None
    url = f"http://127.0.0.1:{srv.app.port('http')}{path}"
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}

    async def run() -> tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, json=body, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    return asyncio.run(run())


def new_token(dsn: str, user: str) -> str:
    out = user_cmd(dsn, "token", user)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token and "\n" not in token
    return token


def has_token(srv: ServerThread, user: str, token: str | None, timeout: float = 10.0) -> None:
    """Wait until the broker's snapshot holds ``token`` (None: no token) for ``user``."""
    want = None if token is None else hashlib.sha256(token.encode()).hexdigest()
    wait_user(srv, user, lambda c: c is not None and c.token_hash == want, timeout)


def test_table_token_acts_as_its_user_until_disabled_or_revoked(
    pg_dsn: str,
    start: Callable[..., ServerThread],  # noqa: F811 (the imported fixture)
) -> None:
    srv = start(pg_dsn, http_listen="127.0.0.1:0")
    insert_user(pg_dsn, "t1", "p1", prefix="org_1")
    insert_user(pg_dsn, "watch", "pw", prefix="org_1")
    token = new_token(pg_dsn, "t1")
    has_token(srv, "t1", token)

    # Only the SHA-256 is stored; `user list` says who has a token, never the hash.
    rows = fetch_sync(pg_dsn, f"SELECT username, api_token_hash FROM {TABLE} ORDER BY username")
    stored = {r["username"]: r["api_token_hash"] for r in rows}
    assert stored == {"t1": hashlib.sha256(token.encode()).hexdigest(), "watch": None}
    listed = user_cmd(pg_dsn, "list")
    assert listed.returncode == 0, listed.stderr
    lines = dict(line.split("\t", 1) for line in listed.stdout.splitlines())
    assert "api_token=yes" in lines["t1"] and "api_token=no" in lines["watch"]
    assert stored["t1"] not in listed.stdout and token not in listed.stdout

    watcher = Client(srv.port, username="watch", password="pw")
    watcher.subscribe("org_1/#", qos=1)
    body = {"topic": "org_1/cmd/a", "payload": "from-api", "qos": 1}
    status, data = call(srv, "POST", "/api/publish", token, body)
    assert status == 200, data
    assert watcher.expect()[0].payload == b"from-api"

    # Outside its prefix, and on an admin-only route: 403, nothing published.
    status, data = call(srv, "POST", "/api/publish", token, {**body, "topic": "org_2/cmd/a"})
    assert (status, data["error"]["code"]) == (403, "forbidden")
    status, data = call(srv, "GET", "/api/sessions", token)
    assert (status, data["error"]["code"]) == (403, "forbidden")
    assert "admin" in data["error"]["message"]
    watcher.expect_nothing()

    # Unknown or missing token: 401.
    for bad in ("not-a-token", None):
        status, data = call(srv, "POST", "/api/publish", bad, body)
        assert (status, data["error"]["code"]) == (401, "unauthorized")

    # Disabled: refused at once (the NOTIFY); enabled again: the same token works.
    assert user_cmd(pg_dsn, "disable", "t1").returncode == 0
    wait_user(srv, "t1", lambda c: c is not None and not c.enabled)
    assert call(srv, "POST", "/api/publish", token, body)[0] == 401
    assert user_cmd(pg_dsn, "enable", "t1").returncode == 0
    wait_user(srv, "t1", lambda c: c is not None and c.enabled)
    assert call(srv, "POST", "/api/publish", token, body)[0] == 200
    assert watcher.expect()[0].payload == b"from-api"

    # A new token replaces the old one.
    second = new_token(pg_dsn, "t1")
    assert second != token
    has_token(srv, "t1", second)
    assert call(srv, "POST", "/api/publish", token, body)[0] == 401
    assert call(srv, "POST", "/api/publish", second, body)[0] == 200
    assert watcher.expect()[0].payload == b"from-api"

    # Revoked: refused; the row keeps no hash.
    out = user_cmd(pg_dsn, "token", "t1", "--revoke")
    assert out.returncode == 0, out.stderr
    has_token(srv, "t1", None)
    assert call(srv, "POST", "/api/publish", second, body)[0] == 401
    (row,) = fetch_sync(pg_dsn, f"SELECT api_token_hash FROM {TABLE} WHERE username = 't1'")
    assert row["api_token_hash"] is None

    # Deleted: its token goes with it.
    third = new_token(pg_dsn, "t1")
    has_token(srv, "t1", third)
    assert call(srv, "POST", "/api/publish", third, body)[0] == 200
    assert watcher.expect()[0].payload == b"from-api"
    assert user_cmd(pg_dsn, "delete", "t1").returncode == 0
    wait_user(srv, "t1", lambda c: c is None)
    assert call(srv, "POST", "/api/publish", third, body)[0] == 401
    watcher.expect_nothing()
    watcher.disconnect()

    missing = user_cmd(pg_dsn, "token", "nobody")
    assert missing.returncode == 2 and "no user 'nobody'" in missing.stderr


def test_with_the_table_the_api_needs_a_token_and_may_listen_beyond_loopback(
    pg_dsn: str,
    start: Callable[..., ServerThread],  # noqa: F811 (the imported fixture)
) -> None:
    # No http.tokens: the API is not open (401, not served), so a 0.0.0.0 listener serves it.
    srv = start(pg_dsn, http_listen="0.0.0.0:0")
    insert_user(pg_dsn, "u", "pw")
    token = new_token(pg_dsn, "u")
    has_token(srv, "u", token)
    status, data = call(srv, "GET", "/api/retained", None)
    assert (status, data["error"]["code"]) == (401, "unauthorized")
    status, data = call(srv, "GET", "/api/retained", token)
    assert status == 200, data
    # No prefix and no ACL line for "u": it may write nothing.
    status, data = call(srv, "POST", "/api/publish", token, {"topic": "any/t", "payload": "x"})
    assert (status, data["error"]["code"]) == (403, "forbidden")


def test_before_the_table_is_loaded_a_token_answers_503_then_works(
    pg_dsn: str,
    start: Callable[..., ServerThread],  # noqa: F811 (the imported fixture)
) -> None:
    proxy = PgProxy(pg_dsn)
    try:
        assert user_cmd(pg_dsn, "add", "u", password="pw").returncode == 0
        token = new_token(pg_dsn, "u")
        proxy.cut()
        srv = start(proxy.dsn, http_listen="127.0.0.1:0")
        # Not known to be wrong (the table could not be read): 503, not 401.
        status, data = call(srv, "GET", "/api/retained", token)
        assert (status, data["error"]["code"]) == (503, "unavailable")
        assert call(srv, "GET", "/api/retained", None)[0] == 401  # no token at all
        proxy.restore()
        has_token(srv, "u", token, timeout=60)  # the watcher's retry backoff
        assert call(srv, "GET", "/api/retained", token)[0] == 200
    finally:
        proxy.close()


def test_db_init_adds_the_token_column_to_an_older_table(pg_dsn: str, tmp_path: Path) -> None:
    # The table as created before API tokens existed.
    sql(
        pg_dsn,
        f"CREATE TABLE {TABLE} (username text PRIMARY KEY, password_hash text NOT NULL,"
        " client_id text, topic_prefix text, enabled boolean NOT NULL DEFAULT true,"
        " created_at timestamptz NOT NULL DEFAULT now(),"
        " updated_at timestamptz NOT NULL DEFAULT now())",
    )
    insert_user(pg_dsn, "old", "pw")
    conf = tmp_path / "ingestd.toml"
    conf.write_text(f'[mqtt]\ncredentials_table = "{TABLE}"\n')
    printed = ingestd("db", "init", "--config", str(conf), "--dsn", pg_dsn, "--print")
    assert printed.returncode == 0, printed.stderr
    assert "ADD COLUMN IF NOT EXISTS api_token_hash" in printed.stdout
    out = ingestd("db", "init", "--config", str(conf), "--dsn", pg_dsn)
    assert out.returncode == 0, out.stderr
    assert "ALTER TABLE" in out.stdout
    (row,) = fetch_sync(pg_dsn, f"SELECT username, api_token_hash FROM {TABLE}")
    assert (row["username"], row["api_token_hash"]) == ("old", None)
    # The column takes only a SHA-256 in hex (never a clear token written by mistake).
    import asyncpg

    with pytest.raises(asyncpg.CheckViolationError):
        sql(pg_dsn, f"UPDATE {TABLE} SET api_token_hash = 'clear-token'")
    # A second run has nothing left to add.
    again = ingestd("db", "init", "--config", str(conf), "--dsn", pg_dsn)
    assert again.returncode == 0 and "ALTER TABLE" not in again.stdout


def test_snapshot_token_index_follows_partial_updates() -> None:
    """TableSnapshot alone: the index follows update(); a stale entry never lets a user in."""
    from ingestd.broker.credentials import Credential, TableSnapshot, api_token_hash

    h1, h2 = api_token_hash("one"), api_token_hash("two")
    snap = TableSnapshot({"a": Credential("x", token_hash=h1), "b": Credential("x")}, "", 0.0)
    assert (snap.token_user(h1), snap.token_user(h2)) == ("a", None)
    snap.update("a", Credential("x", token_hash=h2))
    assert (snap.token_user(h1), snap.token_user(h2)) == (None, "a")
    snap.update("a", Credential("x", token_hash=h2, enabled=False))
    assert snap.token_user(h2) is None
    snap.update("a", None)
    assert snap.token_user(h2) is None and snap.tokens == {}
    snap.tokens[h1] = "b"  # stale: b has no such token
    assert snap.token_user(h1) is None
