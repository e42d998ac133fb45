"""What a full reload of mqtt.credentials_table costs the event loop.

Usage::

    .venv/bin/python benchmarks/bench_credentials.py [--dsn DSN] [--users 100000] [--rounds 5]

Fills a scratch table with USERS rows (prefixes and pins on every other row)
and times, alternately round by round on the same connection:

- ``fetch``: the bare ``SELECT`` of every row through asyncpg (the reference:
  what any reload must pay);
- ``reload``: ``CredentialWatcher._load_all`` with nothing changed (the same
  fetch, plus building the snapshot and comparing it with the one in force),
  which is what the periodic safety-net reload runs on the loop.

Besides the wall time of each, it records the longest the event loop went
without running a 1 ms ticker (the stall every other client sees). Prints
each round and the medians (reload / fetch ratios). Without --dsn an
embedded PostgreSQL is started in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from ingestd.broker.credentials import _COLUMNS, CredentialWatcher, ensure_table
from ingestd.broker.passwords import hash_password
from ingestd.db import EmbeddedPostgres

TABLE = "bench_credentials"


class Ticker:
    """The longest gap between turns of a task that sleeps 1 ms at a time."""

    def __init__(self) -> None:
        self.gap = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.gap = max(self.gap, now - last)
            last = now

    async def measure(self, coro: Any) -> tuple[float, float]:
        """(wall seconds, longest loop gap) of awaiting ``coro``."""
        await asyncio.sleep(0.005)
        self.gap = 0.0
        t0 = time.perf_counter()
        await coro
        return time.perf_counter() - t0, self.gap

    def stop(self) -> None:
        self._task.cancel()


async def run(dsn: str, users: int, rounds: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        await ensure_table(conn, TABLE)
        stored = hash_password("x", 1000)
        rows = [
            (f"dev-{i}", stored, f"dev-{i}" if i % 2 else None, f"org_{i % 97}" if i % 2 else None)
            for i in range(users)
        ]
        await conn.copy_records_to_table(
            TABLE, records=rows, columns=["username", "password_hash", "client_id", "topic_prefix"]
        )
        watcher = CredentialWatcher(dsn, TABLE, 3600.0, lambda snap, changed: None)
        await watcher._load_all(conn)  # the snapshot in force
        ticker = Ticker()
        wall: list[float] = []
        stall: list[float] = []
        for r in range(rounds):
            f_wall, f_gap = await ticker.measure(conn.fetch(f"SELECT {_COLUMNS} FROM {TABLE}"))
            r_wall, r_gap = await ticker.measure(watcher._load_all(conn))
            wall.append(r_wall / f_wall)
            stall.append(r_gap / f_gap)
            print(
                f"round {r + 1}: fetch {1000 * f_wall:.0f} ms (loop stall {1000 * f_gap:.0f} ms),"
                f" reload {1000 * r_wall:.0f} ms (loop stall {1000 * r_gap:.0f} ms)"
            )
        ticker.stop()
        print(
            f"{users} users, medians of reload / fetch: wall {statistics.median(wall):.2f}x,"
            f" longest loop stall {statistics.median(stall):.2f}x"
        )
        await conn.execute(f"DROP TABLE {TABLE}")
    finally:
        await conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default="")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.dsn:
        asyncio.run(run(args.dsn, args.users, args.rounds))
        return
    with tempfile.TemporaryDirectory() as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        try:
            asyncio.run(run(pg.start(), args.users, args.rounds))
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
