"""PostgreSQL for the test suite.

``server_dsn()`` returns ``$INGESTD_TEST_DSN`` if set, else starts ONE embedded
PostgreSQL (pgserver) per test process in a temporary directory, removed at
exit. Tests that write should use their own database: ``create_database()``
makes a fresh one and returns its DSN (``drop_database()`` removes it), so
tests never see each other's tables.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ingestd.db import EmbeddedPostgres

_dsn: str | None = None


def server_dsn() -> str:
    """The DSN of the test server (one per process; started on first use)."""
    global _dsn
    if _dsn is not None:
        return _dsn
    env = os.environ.get("INGESTD_TEST_DSN")
    if env:
        _dsn = env
        return _dsn
    tmp = Path(tempfile.mkdtemp(prefix="ingestd-test-pg-"))
    server = EmbeddedPostgres(tmp / "pg")
    _dsn = server.start()

    def _cleanup() -> None:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(_cleanup)
    return _dsn


def with_database(dsn: str, dbname: str) -> str:
    """The same DSN pointing at another database (URL-style DSNs)."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(server_dsn())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database() -> str:
    """Create an empty database on the test server; returns its DSN."""
    name = "ingestd_test_" + uuid.uuid4().hex[:12]
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return with_database(server_dsn(), name)


def drop_database(dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
