"""PostgreSQL alone: rows/s of pre-encoded binary COPYs by batch shape (issue 14's ceiling).

Usage::

    .venv/bin/python benchmarks/bench_copy_shapes.py [--dsn DSN] [--rounds 3]
    .venv/bin/python benchmarks/bench_copy_shapes.py --shapes 640x1,320x2,5000x1

PostgreSQL: ``--dsn``, else ``$INGESTD_BENCH_DSN``, else an embedded server in a temp
dir (fsync and ``synchronous_commit`` as configured: on by default).

A shape ``RxC`` is C connections, each sending one lone ``COPY ... FROM STDIN (FORMAT
binary)`` of R rows after the other (each its own transaction, one commit per COPY, as
ingestd's writer and ``ingestd bench``'s binary reference do), all C at once, for about
``--rows`` rows in all; the rows (``ingest-bench.toml``'s 7 columns) are encoded before
the clock starts. Rounds alternate the shapes. Printed per shape: the median rows/s,
commits/s and COPY latency, and rows/s relative to the first shape of the list (by
default ``5000x1``, the binary reference's shape) measured in the same round.

What it answers: with after-commit acks a batch can hold no more rows than the
publishers keep in flight, and ingestd's writer commits them over
``ingest.max_concurrent_copies`` (2) connections, so at ``--inflight 64`` (10
publishers, 320-640 messages in flight) PostgreSQL alone, with no broker on the
machine, reaches the rate of the ``217x2`` / ``320x2`` / ``640x1`` shapes at best;
docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from ingestd._copy import CopyEncoder

from ingestd.db import EmbeddedPostgres

COLUMNS = ["run", "pub", "seq", "ts", "temperature", "pressure", "machine"]
TYPES = ("text", "integer", "bigint", "timestamptz", "double precision", "double precision", "text")
TABLE = "bench_copy_shapes"
DEFAULT_SHAPES = "5000x1,2500x2,1000x2,640x1,320x2,217x2,160x4"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        rows, _, conns = part.strip().partition("x")
        try:
            r, c = int(rows), int(conns)
        except ValueError:
            raise SystemExit(f"--shapes: {part!r} is not ROWSxCONNECTIONS (e.g. 640x1)") from None
        if r < 1 or not 1 <= c <= 32:
            raise SystemExit(f"--shapes: {part!r}: rows >= 1 and 1-32 connections")
        out.append((r, c))
    return out


async def one_shape(
    conns: list[asyncpg.Connection], rows: int, nconn: int, total: int, data: memoryview
) -> tuple[float, float, float]:
    """(rows/s, commits/s, median COPY seconds) of ``total`` rows in ``rows``-row COPYs."""
    per_conn = max(1, total // rows // nconn)
    lat: list[float] = []

    async def worker(c: asyncpg.Connection) -> None:
        for _ in range(per_conn):
            t = time.perf_counter()
            await c.copy_to_table(TABLE, source=data, columns=COLUMNS, format="binary")
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(conns[i]) for i in range(nconn)])
    el = time.perf_counter() - t0
    commits = per_conn * nconn
    return commits * rows / el, commits / el, statistics.median(lat)


async def run(dsn: str, shapes: list[tuple[int, int]], total: int, rounds: int) -> None:
    nmax = max(c for _r, c in shapes)
    conns = [await asyncpg.connect(dsn) for _ in range(nmax)]
    try:
        await conns[0].execute(
            f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (run text, pub integer,"
            " seq bigint, ts timestamptz, temperature double precision,"
            " pressure double precision, machine text)"
        )
        enc = CopyEncoder(TYPES)
        now = dt.datetime.now(dt.UTC)
        data = {
            r: memoryview(
                enc.encode([("copy-shapes", i % 10, i, now, 21.5, 1013.25, "m1") for i in range(r)])
            )
            for r in {r for r, _c in shapes}
        }
        res: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {}
        for rnd in range(rounds):
            order = shapes if rnd % 2 == 0 else shapes[::-1]
            got = {}
            for r, c in order:
                got[(r, c)] = await one_shape(conns, r, c, total, data[r])
                await conns[0].execute(f"TRUNCATE {TABLE}")
            ref = got[shapes[0]][0]
            for k, v in got.items():
                res.setdefault(k, []).append((*v, v[0] / ref))
        first = f"{shapes[0][0]}x{shapes[0][1]}"
        print(f"{'shape':>8} {'rows/s':>12} {'commits/s':>10} {'COPY ms':>8} {'vs ' + first:>10}")
        for (r, c), vals in res.items():
            med = [statistics.median(x[i] for x in vals) for i in range(4)]
            print(
                f"{f'{r}x{c}':>8} {med[0]:>12,.0f} {med[1]:>10,.0f} {med[2] * 1000:>8.2f}"
                f" {med[3]:>9.2f}x"
            )
        await conns[0].execute(f"DROP TABLE {TABLE}")
    finally:
        for c in conns:
            await c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default=None)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="ROWSxCONNECTIONS,... (first: ref)")
    ap.add_argument("--rows", type=int, default=200_000, help="rows per shape and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes)
    tmp = Path(tempfile.mkdtemp(prefix="ingestd-copy-shapes-"))
    server = None
    dsn = args.dsn or os.environ.get("INGESTD_BENCH_DSN")
    try:
        if not dsn:
            server = EmbeddedPostgres(tmp / "pg")
            dsn = server.start()
        asyncio.run(run(dsn, shapes, args.rows, args.rounds))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
