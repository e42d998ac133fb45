"""ingestd.db: the embedded PostgreSQL and the connection pool."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from ingestd.config import Config, DatabaseConfig, ServerConfig
from ingestd.db import Database, redact_dsn
from ingestd.errors import DatabaseError

pytestmark = pytest.mark.pg


def test_embedded_server_lifecycle(tmp_path: Path) -> None:
    cfg = Config(server=ServerConfig(data_dir=str(tmp_path / "data")))

    async def main() -> None:
        db = await Database.start(cfg)
        assert db.embedded is not None and db.embedded.started_here
        assert (tmp_path / "data" / "pg" / "PG_VERSION").exists()
        assert await db.pool.fetchval("SELECT 40 + 2") == 42
        dsn = db.dsn

        # A second user of the same directory attaches to the running server...
        db2 = await Database.start(cfg)
        assert db2.embedded is not None and not db2.embedded.started_here
        await db2.pool.execute("CREATE TABLE t (x int)")
        # ...and closing it leaves the server running for the first.
        await db2.close()
        assert await db.pool.fetchval("SELECT count(*) FROM t") == 0

        await db.close()  # we started it: stopped now
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await asyncpg.connect(dsn, timeout=5)

        # Restart on the same data directory: the data is still there.
        db3 = await Database.start(cfg)
        assert db3.embedded is not None and db3.embedded.started_here
        assert await db3.pool.fetchval("SELECT count(*) FROM t") == 0
        await db3.close()

    asyncio.run(main())


def test_unreachable_dsn_is_a_database_error_without_the_password() -> None:
    cfg = Config(
        database=DatabaseConfig(dsn="postgresql://ingest:s3cret@127.0.0.1:1/db", connect_timeout=2)
    )

    async def main() -> None:
        with pytest.raises(DatabaseError) as ei:
            await Database.start(cfg)
        assert "127.0.0.1:1" in str(ei.value)
        assert "s3cret" not in str(ei.value)

    asyncio.run(main())


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    # The embedded server's DSN has an empty password: printed as is, still usable.
    embedded = "postgresql://postgres:@/postgres?host=/data/pg"
    assert redact_dsn(embedded) == embedded
    assert (
        redact_dsn("postgresql://u@h/db?password=pw&x=1") == "postgresql://u@h/db?password=***&x=1"
    )
    assert redact_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
