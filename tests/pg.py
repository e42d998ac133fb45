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


class RestartablePostgres:
    """An embedded PostgreSQL of one test (its own data directory) that the test can
    stop and start again, as an operator or a crash would.

    Never used for the shared test server: restarting that would break other tests.
    ``start()`` returns the DSN, which stays the same across ``stop_server()`` /
    ``start_server()`` (same data directory, same Unix socket); ``close()`` stops it.
    """

    def __init__(self, pgdata: str | Path) -> None:
        self.embedded = EmbeddedPostgres(pgdata)
        self.pgdata = self.embedded.pgdata
        self.dsn = ""
        self._socket_dir: Path | None = None
        self._user: str | None = None

    def start(self) -> str:
        from pgserver.utils import PostmasterInfo

        self.dsn = self.embedded.start()
        assert self.embedded.started_here, f"a server was already running in {self.pgdata}"
        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        assert info is not None and info.socket_dir is not None
        self._socket_dir = info.socket_dir
        # pgserver runs PostgreSQL as a system user when we are root (see ingestd.db).
        self._user = self.embedded._server.system_user
        return self.dsn

    def _pg_ctl(self, args: list[str]) -> None:
        from pgserver import _commands

        _commands.pg_ctl(args, pgdata=self.pgdata, user=self._user, timeout=60)  # type: ignore[attr-defined]

    def stop_server(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE`` (``fast``: clean shutdown; ``immediate``: like a crash)."""
        self._pg_ctl(["-w", "-m", mode, "stop"])

    def start_server(self) -> None:
        """Start it again on the same data directory and socket (the options pgserver uses)."""
        assert self._socket_dir is not None, "start() first"
        self._pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {self._socket_dir}",
             "-l", str(self.pgdata / "log"), "start"]
        )  # fmt: skip

    def close(self) -> None:
        self.embedded.stop()
