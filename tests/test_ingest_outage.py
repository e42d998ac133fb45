"""PostgreSQL outages: acknowledgements wait, batches spool to disk, replay loses nothing.

The engine talks to PostgreSQL through a TCP proxy the test can cut (close
the listener and abort every connection) and restore, which looks to the
engine exactly like the server going away and coming back.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

from ingestd.config import Config
from ingestd.errors import DatabaseError
from ingestd.ingest.engine import IngestEngine
from pg_fixtures import config_from_toml, fetch, publish

pytestmark = pytest.mark.pg


class CuttableProxy:
    """A TCP proxy to the PostgreSQL of ``dsn`` that can be cut and restored."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        q = parse_qs(parts.query)
        host = q.get("host", [parts.hostname or "127.0.0.1"])[0]
        port = q.get("port", [str(parts.port or 5432)])[0]
        self.unix = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self.tcp = None if self.unix else (host, int(port))
        self.dbname = parts.path.lstrip("/")
        self.user = parts.username or "postgres"
        self.password = parts.password
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def dsn(self) -> str:
        auth = self.user + (f":{self.password}" if self.password else "")
        return urlunsplit(
            ("postgresql", f"{auth}@127.0.0.1:{self.port}", "/" + self.dbname, "", "")
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.unix:
                ur, uw = await asyncio.open_unix_connection(self.unix)
            else:
                assert self.tcp is not None
                ur, uw = await asyncio.open_connection(*self.tcp)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, uw))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                w.transport.abort()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        self._writers.discard(writer)
        self._writers.discard(uw)


CONFIG = """
[[routes]]
name = "telemetry"
topic = "m/{id}/t"
table = "telemetry"
[routes.columns]
id = "topic.id"
seq = "payload.seq::bigint"

[[routes]]
name = "state"
topic = "m/{id}/state"
table = "state"
kind = "latest"
key = ["id"]
[routes.columns]
id = "topic.id"
seq = "payload.seq::bigint"
"""


def outage_config(tmp_path: Path, dsn: str, **ingest: Any) -> Config:
    settings = {
        "batch_rows": 50,
        "flush_interval_ms": 5,
        "retry_initial_ms": 10,
        "retry_max_ms": 50,
        "spool_after_ms": 3_600_000,
        **ingest,
    }
    return config_from_toml(CONFIG, tmp_path, dsn, ingest=settings, presence={"enabled": False})


async def wait_for(cond: Any, what: str, timeout: float = 30.0) -> None:
    """Poll a condition (a liveness wait, not a performance threshold)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_outage_waits_then_spools_then_replays(pg_dsn: str, tmp_path: Path) -> None:
    async def main() -> None:
        proxy = CuttableProxy(pg_dsn)
        await proxy.start()
        eng = IngestEngine(outage_config(tmp_path, proxy.dsn))
        await eng.start()
        spool_dir = tmp_path / "data" / "spool"

        # Healthy: committed directly.
        await asyncio.gather(*publish(eng, "m/a/t", '{"seq": 0}'))
        assert eng.stats.rows_committed == 1

        await proxy.cut()
        futs: set[asyncio.Future[None]] = set()
        for i in range(1, 121):
            futs.update(publish(eng, "m/a/t", f'{{"seq": {i}}}'))
            futs.update(publish(eng, f"m/k{i % 3}/state", f'{{"seq": {i}}}'))
        # Within spool_after_ms the batches retry in memory: no acknowledgement.
        done, _ = await asyncio.wait(futs, timeout=0.5)
        assert not done
        assert eng.stats.write_errors > 0
        assert eng.spool_bytes == 0 and eng.pending_rows == 240

        # Past the bound (lowered here instead of waiting an hour): spooled, fsync'd, acknowledged.
        eng._spool_after = 0
        await asyncio.gather(*futs)
        assert eng.pending_rows == 0
        # 120 appended rows + the state rows left after keeping the last per key per batch.
        spooled = eng.stats.rows_spooled
        assert 123 <= spooled <= 240
        assert eng.spool_bytes > 0
        on_disk = sum(p.stat().st_size for p in spool_dir.glob("*.seg"))
        assert on_disk >= eng.spool_bytes
        assert (await fetch(pg_dsn, "SELECT count(*) FROM telemetry"))[0][0] == 1

        # While the spool holds data, new batches go behind it (order), acked at once.
        eng._spool_after = 3600.0
        more = publish(eng, "m/k0/state", '{"seq": 1000}') + publish(eng, "m/b/t", '{"seq": 1000}')
        await asyncio.gather(*more)
        assert eng.stats.rows_spooled == spooled + 2

        await proxy.start()
        await wait_for(lambda: eng.spool_bytes == 0 and not eng._spool_active, "spool replay")
        assert eng.stats.rows_replayed == spooled + 2
        assert list(spool_dir.glob("*.seg")) == []

        # Back to direct writes.
        await asyncio.gather(*publish(eng, "m/c/t", '{"seq": 2000}'))
        assert eng.stats.rows_committed == 2
        await eng.stop()

        seqs = [r[0] for r in await fetch(pg_dsn, "SELECT seq FROM telemetry ORDER BY seq")]
        assert seqs == [0, *range(1, 121), 1000, 2000]  # each exactly once
        state = dict(await fetch(pg_dsn, "SELECT id, seq FROM state"))
        assert state == {"k0": 1000, "k1": 118, "k2": 119}  # replayed in order: last wins

    asyncio.run(main())


def test_spool_survives_restart(pg_dsn: str, tmp_path: Path) -> None:
    async def main() -> None:
        proxy = CuttableProxy(pg_dsn)
        await proxy.start()
        cfg = outage_config(tmp_path, proxy.dsn, spool_after_ms=0)
        eng = IngestEngine(cfg)
        await eng.start()
        await proxy.cut()
        futs: set[asyncio.Future[None]] = set()
        for i in range(100):
            futs.update(publish(eng, "m/a/t", f'{{"seq": {i}}}'))
        await asyncio.gather(*futs)
        await eng.stop()  # PostgreSQL still down: the spool stays on disk
        assert eng.stats.rows_spooled == 100 and eng.stats.rows_lost == 0

        await proxy.start()
        eng2 = IngestEngine(cfg)
        await eng2.start()  # replays what the previous run spooled
        await wait_for(
            lambda: eng2.spool_bytes == 0 and not eng2._spool_active, "replay after restart"
        )
        await eng2.stop()
        assert eng2.stats.rows_replayed == 100
        got = [r[0] for r in await fetch(pg_dsn, "SELECT seq FROM telemetry ORDER BY seq")]
        assert got == list(range(100))

    asyncio.run(main())


def test_full_spool_holds_rows_and_fails_them_only_at_shutdown(pg_dsn: str, tmp_path: Path) -> None:
    async def main() -> None:
        proxy = CuttableProxy(pg_dsn)
        await proxy.start()
        eng = IngestEngine(
            outage_config(tmp_path, proxy.dsn, spool_after_ms=0, spool_max_bytes=300, batch_rows=10)
        )
        await eng.start()
        await proxy.cut()
        futs: list[asyncio.Future[None]] = []
        for i in range(40):
            futs += publish(eng, "m/a/t", f'{{"seq": {i}}}')
        batches = list(dict.fromkeys(futs))
        assert len(batches) == 4
        await wait_for(lambda: eng.stats.spool_full > 0, "the spool to fill up")
        spooled = [f for f in batches if f.done()]
        assert 0 < len(spooled) < 4  # some fit, the rest wait in memory
        assert eng.pending_rows == 10 * (4 - len(spooled))
        await eng.stop()
        for f in batches:
            if f not in spooled:
                with pytest.raises(DatabaseError):
                    f.result()
        assert eng.stats.rows_lost == 10 * (4 - len(spooled))
        with contextlib.suppress(Exception):
            await proxy.cut()

    asyncio.run(main())
