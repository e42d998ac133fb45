"""The PostgreSQL connection: a DSN, or an embedded server in ``<data_dir>/pg``.

With ``database.dsn`` empty, ingestd runs its own PostgreSQL through the
``pgserver`` package (server binaries ship in its wheel):

* the cluster lives in ``<data_dir>/pg`` (created with ``initdb`` on first use,
  trust authentication, listening on a Unix socket in that directory only);
* when a server is already running on that directory (another ingestd, or one
  left behind by a crash), it is reused and left running at close: we stop
  only a server we started;
* when running as root, pgserver runs PostgreSQL as a system user ``pgserver``
  (created with ``useradd`` if missing) and makes the directories above
  ``<data_dir>/pg`` traversable by it (``chmod g+rx,o+rx``), because PostgreSQL
  refuses to run as root.

Starting the embedded server blocks (initdb, ``pg_ctl -w start``), so it runs
in a worker thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from ingestd.errors import DatabaseError

if TYPE_CHECKING:
    from ingestd.config import Config

log = logging.getLogger("ingestd.db")


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ``***`` (for logs and errors).

    An empty password (the embedded server's ``postgres:@``) is left as it is:
    there is nothing to hide, and the DSN stays usable as printed.
    """
    dsn = re.sub(r"(://[^:/@]*:)[^@]+@", r"\1***@", dsn)
    return re.sub(r"(password=)[^&\s]*", r"\1***", dsn)


def quote_ident(name: str) -> str:
    """Quote a (possibly schema-qualified) identifier for SQL."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def embedded_pgdata(data_dir: str | Path) -> Path:
    """Where the embedded PostgreSQL of ``server.data_dir`` keeps its cluster."""
    return Path(data_dir).expanduser().resolve() / "pg"


def psql_path() -> str | None:
    """The ``psql`` shipped in pgserver's wheel, else one on PATH, else None."""
    import shutil

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from pgserver._commands import POSTGRES_BIN_PATH
        except ImportError:  # pragma: no cover - pgserver is a dependency
            return shutil.which("psql")
    bundled = Path(POSTGRES_BIN_PATH) / "psql"
    return str(bundled) if bundled.exists() else shutil.which("psql")


class EmbeddedPostgres:
    """A PostgreSQL cluster in a local directory, run through ``pgserver``."""

    def __init__(self, pgdata: str | Path) -> None:
        self.pgdata = Path(pgdata).expanduser().resolve()
        self.started_here = False
        self._server: Any = None
        self.uri = ""

    def running_uri(self) -> str | None:
        """The URI of a server already running on this directory, else None. Never starts one."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver.utils import PostmasterInfo

        if not (self.pgdata / "PG_VERSION").exists():
            return None
        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None or not info.is_running():
            return None
        return str(info.get_uri())

    def start(self) -> str:
        """Start (or attach to) the server; returns its URI. Blocking."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers); harmless.
            warnings.simplefilter("ignore")
            import pgserver
            from pgserver.utils import PostmasterInfo

            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            info = PostmasterInfo.read_from_pgdata(self.pgdata) if self.pgdata.exists() else None
            already = info is not None and info.is_running()
            try:
                # cleanup_mode=None: pgserver's own atexit hook must not stop a
                # server somebody else started; we stop ours in stop().
                self._server = pgserver.get_server(self.pgdata, cleanup_mode=None)
            except Exception as e:
                raise DatabaseError(
                    f"cannot start embedded PostgreSQL in {self.pgdata}: {e}"
                ) from e
        self.started_here = not already
        self.uri = self._server.get_uri()
        if self.started_here:
            atexit.register(self.stop)
        log.info(
            "embedded PostgreSQL %s in %s",
            "started" if self.started_here else "already running, reused",
            self.pgdata,
        )
        return self.uri

    def stop(self) -> None:
        """Stop the server if this object started it. Blocking; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        # Drop pgserver's handle so a later get_server() in this process starts afresh.
        with contextlib.suppress(Exception):
            atexit.unregister(server._cleanup)
            server.global_process_id_list.get_and_remove(os.getpid())
            type(server)._instances.pop(self.pgdata, None)
        if not self.started_here:
            return
        from pgserver import _commands

        try:
            # pg_ctl is generated at import time, hence invisible to mypy.
            pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]
            pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=self.pgdata,
                user=server.system_user,
                timeout=60,
            )
            log.info("embedded PostgreSQL stopped")
        except Exception as e:  # already stopped, or pg_ctl failed
            log.warning("stopping embedded PostgreSQL: %s", e)


class Database:
    """The DSN and connection pool ingest uses; owns the embedded server, if any.

    Use ``db = await Database.start(cfg)`` and ``await db.close()``.
    """

    def __init__(
        self, dsn: str, pool: asyncpg.Pool | None, embedded: EmbeddedPostgres | None
    ) -> None:
        self.dsn = dsn
        self._pool = pool
        self.embedded = embedded

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise DatabaseError("the database is closed")
        return self._pool

    @classmethod
    async def start(cls, cfg: Config, *, connect: bool = True) -> Database:
        """Connect to ``cfg.database.dsn``, or start the embedded server when it is empty.

        Raises :class:`DatabaseError` (with the password redacted) when the
        server cannot be started or reached.
        """
        embedded: EmbeddedPostgres | None = None
        dsn = cfg.database.dsn
        if not dsn:
            embedded = EmbeddedPostgres(Path(cfg.server.data_dir) / "pg")
            dsn = await asyncio.to_thread(embedded.start)
        pool = None
        if connect:
            try:
                pool = await create_pool(dsn, cfg)
            except BaseException:
                if embedded is not None:
                    await asyncio.to_thread(embedded.stop)
                raise
        log.info(
            "database %s%s (psql: ingestd db shell; DSN: ingestd db url)",
            redact_dsn(dsn),
            f" (embedded, in {embedded.pgdata})" if embedded is not None else "",
        )
        return cls(dsn, pool, embedded)

    async def close(self) -> None:
        """Close the pool; stop the embedded server if we started it."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except (TimeoutError, Exception):
                pool.terminate()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None


async def copy_binary(
    conn: Any,
    table: str,
    data: bytes,
    columns: Sequence[str],
    schema_name: str | None = None,
) -> None:
    """``COPY table (columns) FROM STDIN (FORMAT binary)`` of a whole encoded stream
    (``ingestd._copy.CopyEncoder.encode``), sent as one CopyData message.

    A memoryview, because asyncpg's ``copy_to_table`` takes a ``bytes`` source
    for a file path.
    """
    await conn.copy_to_table(
        table,
        source=memoryview(data),
        columns=list(columns),
        schema_name=schema_name,
        format="binary",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to reset (see create_pool)."""


async def create_pool(dsn: str, cfg: Config) -> asyncpg.Pool:
    """An asyncpg pool sized by ``database.pool_size``. Raises DatabaseError."""
    d = cfg.database
    try:
        pool = await asyncpg.create_pool(
            dsn,
            # No connection floor: during an outage the pool would otherwise keep
            # trying (and logging) to restore it; we probe explicitly below.
            min_size=0,
            max_size=d.pool_size,
            timeout=d.connect_timeout,
            command_timeout=d.command_timeout,
            # Connections are long-lived; recycle idle ones so a server restart
            # does not leave the pool full of dead sockets for long.
            max_inactive_connection_lifetime=60.0,
            # ingestd keeps no session state on pooled connections (no SET, LISTEN,
            # advisory locks or cursors; the temp-table upsert's staging table is
            # meant to stay, and RESET ALL would not drop it anyway), so the default
            # reset query (a round trip per release, i.e. per batch) would reset
            # nothing; asyncpg still rolls back a transaction left open.
            reset=_keep_session,
        )
        assert pool is not None
        try:
            await pool.fetchval("SELECT 1")
        except BaseException:
            pool.terminate()
            raise
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
        raise DatabaseError(f"cannot connect to {redact_dsn(dsn)}: {e}") from e
    return pool
