"""Micro-benchmark: ingest engine throughput vs a plain asyncpg COPY loop.

Usage::

    .venv/bin/python benchmarks/bench_ingest.py [--rows 200000] [--batch 5000]
    .venv/bin/python benchmarks/bench_ingest.py --upsert   # latest-table methods

PostgreSQL: ``$INGESTD_BENCH_DSN``, else an embedded server in a temp dir.

Measured, each into the same (truncated) ``telemetry`` table, same run:

* ``copy``    plain loop: ``copy_records_to_table`` of pre-built tuples, one
              batch after the other (the ceiling: no decoding at all);
* ``decode+copy`` the minimal hand-written ingester: msgspec-decode each
              payload, build the tuple, COPY per batch;
* ``engine``  Message objects handed to the route sink exactly as the broker
              does (after-commit acks), until every future resolved;
* ``engine/asyncpg-enc`` the same with ``writing.USE_COPY_ENCODER = False``:
              rows encoded by asyncpg's ``copy_records_to_table`` instead of
              ``ingestd._copy.CopyEncoder`` (the before/after of that change).

The issue's goal is engine >= 0.7x the plain loop.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from ingestd.broker.message import Message
from ingestd.config import load_config
from ingestd.db import EmbeddedPostgres
from ingestd.ingest import writing
from ingestd.ingest.engine import IngestEngine

CONFIG = """
[ingest]
batch_rows = {batch}
flush_interval_ms = 50
max_pending_rows = {pending}
max_concurrent_copies = 2
[presence]
enabled = false
[[routes]]
name = "telemetry"
topic = "company/{{company_id}}/machine/{{machine_id}}/telemetry"
table = "telemetry"
[routes.columns]
company_id = "topic.company_id"
machine_id = "topic.machine_id"
ts = {{ source = "payload.ts", type = "timestamptz", unit = "s" }}
received_at = "received_at"
battery = "payload.battery::double precision"
solar_v = "payload.solar_v::double precision"
solar_a = "payload.solar_a::double precision"
water = "payload.water::double precision"
extra = "payload.extra::jsonb"

[[routes]]
name = "status"
topic = "company/{{company_id}}/machine/{{machine_id}}/status"
table = "machine_status"
kind = "latest"
key = ["company_id", "machine_id"]
[routes.columns]
company_id = "topic.company_id"
machine_id = "topic.machine_id"
ts = {{ source = "payload.ts", type = "timestamptz", unit = "s" }}
battery = "payload.battery::double precision"
state = "payload.state::text"
"""

COLUMNS = (
    "company_id",
    "machine_id",
    "ts",
    "received_at",
    "battery",
    "solar_v",
    "solar_a",
    "water",
    "extra",
)


def make_messages(n: int, kind: str = "telemetry", machines: int = 500) -> list[Message]:
    now = time.time()
    out = []
    for i in range(n):
        m = i % machines
        if kind == "telemetry":
            payload = {
                "ts": 1_700_000_000 + i,
                "battery": 50 + (i % 50) / 10,
                "solar_v": 18.2,
                "solar_a": 1.5 + (i % 7) / 10,
                "water": 12.0,
                "extra": {"fw": "1.4.2", "rssi": -70 - i % 20},
            }
        else:
            payload = {"ts": 1_700_000_000 + i, "battery": 50.5, "state": "ok"}
        out.append(
            Message(
                f"company/c{m % 10}/machine/m{m}/{kind}",
                json.dumps(payload).encode(),
                qos=1,
                client_id=f"m{m}",
                received_at=now,
            )
        )
    return out


async def truncate(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE telemetry")
    await conn.execute("TRUNCATE machine_status")


async def bench_plain_copy(dsn: str, msgs: list[Message], batch: int) -> float:
    # Pre-built records: the ceiling (what COPY alone costs).
    dec = msgspec.json.Decoder()
    recs = []
    for m in msgs:
        p = dec.decode(m.payload)
        lv = m.topic.split("/")
        recs.append(
            (
                lv[1],
                lv[3],
                dt.datetime.fromtimestamp(p["ts"], dt.UTC),
                dt.datetime.fromtimestamp(m.received_at, dt.UTC),
                p["battery"],
                p["solar_v"],
                p["solar_a"],
                p["water"],
                json.dumps(p["extra"]),
            )
        )
    conn = await asyncpg.connect(dsn)
    await truncate(conn)
    t0 = time.perf_counter()
    for i in range(0, len(recs), batch):
        await conn.copy_records_to_table("telemetry", records=recs[i : i + batch], columns=COLUMNS)
    elapsed = time.perf_counter() - t0
    assert await conn.fetchval("SELECT count(*) FROM telemetry") == len(msgs)
    await conn.close()
    return len(msgs) / elapsed


async def bench_decode_copy(dsn: str, msgs: list[Message], batch: int) -> float:
    dec = msgspec.json.Decoder()
    utc = dt.UTC
    fromts = dt.datetime.fromtimestamp
    conn = await asyncpg.connect(dsn)
    await truncate(conn)
    t0 = time.perf_counter()
    for i in range(0, len(msgs), batch):
        recs = []
        for m in msgs[i : i + batch]:
            p = dec.decode(m.payload)
            lv = m.topic.split("/")
            recs.append(
                (
                    lv[1],
                    lv[3],
                    fromts(p["ts"], utc),
                    fromts(m.received_at, utc),
                    p["battery"],
                    p["solar_v"],
                    p["solar_a"],
                    p["water"],
                    msgspec.json.encode(p["extra"]).decode(),
                )
            )
        await conn.copy_records_to_table("telemetry", records=recs, columns=COLUMNS)
    elapsed = time.perf_counter() - t0
    assert await conn.fetchval("SELECT count(*) FROM telemetry") == len(msgs)
    await conn.close()
    return len(msgs) / elapsed


async def bench_engine(
    cfg: Any, dsn: str, msgs: list[Message], table: str = "telemetry"
) -> tuple[float, float]:
    """-> (rows/s, worst event-loop stall in ms while ingesting)."""
    eng = IngestEngine(cfg)
    await eng.start()
    conn = await asyncpg.connect(dsn)
    await truncate(conn)
    sinks = [s for flt, s in eng.sinks() if s.route.table == table]
    sink = sinks[0]
    stall = [0.0]

    async def watchdog() -> None:
        # Largest gap between two wake-ups: how long ingest work blocks the loop.
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall[0] = max(stall[0], now - last - 0.001)
            last = now

    wd = asyncio.ensure_future(watchdog())
    t0 = time.perf_counter()
    futs = set()
    deliver = sink.deliver
    for i, m in enumerate(msgs):
        f = deliver(m)
        if f is not None:
            futs.add(f)
        if eng.saturated:
            await eng.wait_not_saturated()
        elif i % 1000 == 999:
            await asyncio.sleep(0)  # a broker yields between socket reads
    await eng.flush()
    await asyncio.gather(*futs)
    elapsed = time.perf_counter() - t0
    wd.cancel()
    count = await conn.fetchval(f"SELECT count(*) FROM {table}")
    await conn.close()
    await eng.stop()
    if table == "telemetry":
        assert count == len(msgs), (count, len(msgs))
    return len(msgs) / elapsed, stall[0] * 1000


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--upsert", action="store_true", help="compare latest-table upsert methods")
    ap.add_argument("--dsn", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
    server = None
    dsn = args.dsn or os.environ.get("INGESTD_BENCH_DSN")
    if not dsn:
        server = EmbeddedPostgres(tmp / "pg")
        dsn = await asyncio.to_thread(server.start)
    try:
        cfg_path = tmp / "bench.toml"
        cfg_path.write_text(CONFIG.format(batch=args.batch, pending=max(100_000, args.batch * 20)))
        cfg = load_config(
            str(cfg_path),
            env={},
            overrides={"database": {"dsn": dsn}, "server": {"data_dir": str(tmp / "data")}},
        )
        # Create the tables once.
        e = IngestEngine(cfg)
        await e.start()
        await e.stop()
        if args.upsert:
            await run_upsert(cfg, dsn, args)
            return
        msgs = make_messages(args.rows)
        # The input messages live for the whole run (in a broker they would come
        # and go); keep the collector from re-scanning them in every run alike.
        gc.collect()
        gc.freeze()
        print(f"{args.rows} rows, batch {args.batch}, PostgreSQL {dsn.split('?')[0]}")
        results: dict[str, list[float]] = {
            "copy": [],
            "decode+copy": [],
            "engine": [],
            "engine/asyncpg-enc": [],
        }
        stalls = []
        for _ in range(args.repeat):
            results["copy"].append(await bench_plain_copy(dsn, msgs, args.batch))
            results["decode+copy"].append(await bench_decode_copy(dsn, msgs, args.batch))
            rate, stall = await bench_engine(cfg, dsn, msgs)
            results["engine"].append(rate)
            stalls.append(stall)
            writing.USE_COPY_ENCODER = False
            try:
                rate, _stall = await bench_engine(cfg, dsn, msgs)
            finally:
                writing.USE_COPY_ENCODER = True
            results["engine/asyncpg-enc"].append(rate)
        best = {k: max(v) for k, v in results.items()}
        med = {k: statistics.median(v) for k, v in results.items()}
        for k, v in results.items():
            runs = ", ".join(f"{x:,.0f}" for x in v)
            print(
                f"  {k:18s} best {best[k]:>9,.0f}  median {med[k]:>9,.0f} rows/s   (runs: {runs})"
            )
        for base in ("copy", "decode+copy"):
            print(
                f"  engine / {base:12s} = {best['engine'] / best[base]:.2f}x best, "
                f"{med['engine'] / med[base]:.2f}x median"
            )
        print(f"  worst event-loop stall during engine runs: {max(stalls):.1f} ms")
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        shutil.rmtree(tmp, ignore_errors=True)


async def run_upsert(cfg: Any, dsn: str, args: argparse.Namespace) -> None:
    print(f"latest table upserts: {args.rows} messages over 500 keys (batches of {args.batch})")
    msgs = make_messages(args.rows, kind="status")
    for method in ("unnest", "temp-table", "executemany"):
        writing.UPSERT_METHOD = method
        rates = []
        for _ in range(args.repeat):
            rate, _stall = await bench_engine(cfg, dsn, msgs, table="machine_status")
            rates.append(rate)
        print(f"  {method:12s} {max(rates):>10,.0f} msgs/s")
    # Distinct keys per batch (no dedup): the upsert itself dominates.
    msgs = make_messages(args.rows, kind="status", machines=args.rows)
    print(f"latest table upserts: {args.rows} messages, all distinct keys")
    for method in ("unnest", "temp-table", "executemany"):
        writing.UPSERT_METHOD = method
        rates = []
        for _ in range(args.repeat):
            rate, _stall = await bench_engine(cfg, dsn, msgs, table="machine_status")
            rates.append(rate)
        print(f"  {method:12s} {max(rates):>10,.0f} msgs/s")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
