"""Pytest fixtures and helpers for PostgreSQL; conftest.py does ``from pg_fixtures import *``.

(Until then, run with ``-p pg_fixtures``.)

Fixtures:

* ``pg_server_dsn`` (session): the test server's DSN (see tests/pg.py).
* ``pg_dsn`` (function): a fresh, empty database on it, dropped afterwards.

Helpers (plain functions): ``config_from_toml``, ``fetch``, ``fetch_sync``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import pg
from ingestd.config import Config, load_config


@pytest.fixture(scope="session")
def pg_server_dsn() -> str:
    return pg.server_dsn()


@pytest.fixture
def pg_dsn(pg_server_dsn: str) -> Iterator[str]:
    dsn = pg.create_database()
    try:
        yield dsn
    finally:
        pg.drop_database(dsn)


def config_from_toml(
    text: str, tmp_path: Path, dsn: str = "", name: str = "ingestd.toml", **sections: dict[str, Any]
) -> Config:
    """Write ``text`` to a file in tmp_path and load it (no environment), with overrides.

    ``sections`` are per-section overrides, e.g. ``ingest={"batch_rows": 10}``;
    the DSN and data_dir (tmp_path/data) are always set.
    """
    path = tmp_path / name
    path.write_text(text)
    overrides: dict[str, Any] = {
        "database": {"dsn": dsn},
        "server": {"data_dir": str(tmp_path / "data")},
    }
    for k, v in sections.items():
        overrides.setdefault(k, {}).update(v)
    return load_config(str(path), env={}, overrides=overrides)


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def fetch_sync(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(fetch(dsn, sql, *args))


# Upper bound for one awaited condition (not a speed assertion); as mqtt_clients.WAIT.
POLL_TIMEOUT = 10.0


def wait_rows(
    dsn: str,
    sql: str,
    *args: Any,
    until: Callable[[list[Any]], bool] = bool,
    timeout: float = POLL_TIMEOUT,
) -> list[Any]:
    """Poll ``sql`` until ``until(rows)`` holds (bounded); returns those rows."""
    deadline = time.monotonic() + timeout
    while True:
        rows = fetch_sync(dsn, sql, *args)
        if until(rows):
            return rows
        assert time.monotonic() < deadline, f"timed out waiting on {sql!r}; last rows: {rows}"
        time.sleep(0.05)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = POLL_TIMEOUT) -> None:
    """Poll ``cond`` until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def topic_matches(flt: str, topic: str) -> bool:
    """MQTT filter matching (what the broker's trie does for the sinks)."""
    f, t = flt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return not topic.startswith("$")
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def publish(engine: Any, topic: str, payload: bytes | str, qos: int = 1, **kw: Any) -> list[Any]:
    """Hand one Message to every sink whose filter matches, as the broker does.

    Returns the futures the sinks returned (None entries dropped).
    """
    from ingestd.broker.message import Message

    if isinstance(payload, str):
        payload = payload.encode()
    m = Message(topic, payload, qos=qos, **kw)
    futs = [sink.deliver(m) for flt, sink in engine.sinks() if topic_matches(flt, topic)]
    return [f for f in futs if f is not None]


__all__ = ["pg_dsn", "pg_server_dsn"]
