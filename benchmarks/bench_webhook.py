"""Webhook ingest vs MQTT ingest: committed rows/s through POST /api/ingest/webhook
and through MQTT QoS 1 publishes, into the same table, same server, same run.

Starts one ``ingestd serve`` (the route of ``benchmarks/ingest-bench.toml``, the
HTTP API on a loopback port) and, round by round, alternates:

* ``mqtt``: ``python -m ingestd.bench.command --scenario ingest --publishers 10
  --messages M --qos 1 ...`` (its own processes; rows verified by it);
* ``webhook``: ``--clients`` concurrent HTTP/1.1 keep-alive connections (aiohttp,
  in this process) POSTing JSON arrays of ``--batch`` plain-form messages
  (QoS 1, so each 200 means "committed") until the same number of messages
  was sent. Bodies are built before the clock starts, as the MQTT generator
  pre-encodes its packets. rows/s = distinct rows of the run / (start to last 200).

Usage (repository root, extensions built, INGESTD_BENCH_DSN or an embedded
PostgreSQL in a temp dir)::

    .venv/bin/python benchmarks/bench_webhook.py --batch 100 --clients 4 --rounds 3
    .venv/bin/python benchmarks/bench_webhook.py --batch 1000 --clients 4 --rounds 3
    .venv/bin/python benchmarks/bench_webhook.py --decode-only   # body decoding, us/message

Only loopback addresses are used; every run is bounded by its message count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import bench, free_port, stop_all, wait_port

from ingestd.db import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent


def bodies(run: str, total: int, batch: int, publishers: int) -> list[bytes]:
    """The webhook requests of one run: ``total`` messages in arrays of ``batch``,
    each payload the JSON object `ingestd bench --scenario ingest` publishes."""
    out = []
    msgs: list[dict[str, Any]] = []
    ts = time.time_ns()
    for i in range(total):
        pub = i % publishers
        payload = json.dumps(
            {
                "run": run,
                "pub": pub,
                "seq": i // publishers,
                "ts": ts,
                "temperature": 20.5 + (i % 10),
                "pressure": 1013.25,
                "pad": "",
            }
        )
        msgs.append({"topic": f"company/c{pub}/machine/m{pub}/telemetry", "payload": payload})
        if len(msgs) == batch:
            out.append(json.dumps(msgs).encode())
            msgs = []
    if msgs:
        out.append(json.dumps(msgs).encode())
    return out


async def webhook_round(
    url: str, dsn: str, total: int, batch: int, clients: int, publishers: int
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:12]
    reqs = bodies(run, total, batch, publishers)
    statuses: dict[int, int] = {}
    retries = 0
    queue = list(reversed(reqs))

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal retries
        while queue:
            body = queue.pop()
            while True:
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    if resp.status == 200:
                        break
                    if resp.status != 503:
                        raise SystemExit(f"webhook answered {resp.status}")
                    retries += 1
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    conn = await asyncpg.connect(dsn)
    try:
        rows, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT (pub, seq)) FROM bench_telemetry WHERE run = $1", run
        )
    finally:
        await conn.close()
    return {
        "rows": rows,
        "distinct": distinct,
        "seconds": elapsed,
        "rows_per_s": distinct / elapsed,
        "statuses": statuses,
        "retries_503": retries,
    }


def decode_only() -> None:
    """us per message to decode webhook bodies: json.loads (before) vs msgspec (now)."""
    import msgspec

    dec = msgspec.json.Decoder().decode
    for batch in (100, 1000):
        reqs = bodies("r", 100 * batch, batch, 10)
        best: dict[str, float] = {}
        for _ in range(5):  # alternating, best of 5
            for name, fn in (("json.loads", json.loads), ("msgspec", dec)):
                t = time.perf_counter()
                for body in reqs:
                    fn(body)
                us = (time.perf_counter() - t) / (100 * batch) * 1e6
                best[name] = min(best.get(name, us), us)
        print(
            f"arrays of {batch}: json.loads {best['json.loads']:.2f} us/msg, msgspec"
            f" {best['msgspec']:.2f} us/msg, {best['json.loads'] / best['msgspec']:.1f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=100, help="messages per webhook request")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP connections")
    ap.add_argument("--publishers", type=int, default=10, help="MQTT publishers")
    ap.add_argument("--messages", type=int, default=20000, help="per MQTT publisher")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dsn", default=os.environ.get("INGESTD_BENCH_DSN"))
    ap.add_argument("--pid-file", help="write the server's pid here (for py-spy)")
    ap.add_argument("--decode-only", action="store_true", help=decode_only.__doc__)
    a = ap.parse_args()
    if a.decode_only:
        decode_only()
        return
    total = a.publishers * a.messages
    tmp = Path(tempfile.mkdtemp(prefix="ingestd-bench-webhook-"))
    pg = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dsn = a.dsn
        if not dsn:
            pg = EmbeddedPostgres(tmp / "pg")
            dsn = pg.start()
        mqtt_port, http_port = free_port(), free_port()
        env = dict(os.environ, INGESTD_DATABASE__DSN=dsn, INGESTD_SERVER__LOG_LEVEL="warning")
        env["INGESTD_SERVER__HTTP_LISTEN"] = f"127.0.0.1:{http_port}"
        srv = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ingestd",
                "serve",
                "--config",
                str(ROOT / "benchmarks" / "ingest-bench.toml"),
                "--listen",
                f"127.0.0.1:{mqtt_port}",
                "--data-dir",
                str(tmp / "data"),
            ],
            env=env,
        )
        procs.append(srv)
        wait_port(mqtt_port, srv)
        wait_port(http_port, srv)
        if a.pid_file:
            Path(a.pid_file).write_text(str(srv.pid))
        url = f"http://127.0.0.1:{http_port}/api/ingest/webhook"
        print(
            f"{total} messages per run; webhook: {a.clients} clients x arrays of {a.batch};"
            f" mqtt: {a.publishers} publishers, QoS 1, after-commit"
        )
        ratios, web_rates, mqtt_rates = [], [], []
        for r in range(a.rounds):
            m = bench(
                [
                    "--scenario",
                    "ingest",
                    "--publishers",
                    str(a.publishers),
                    "--messages",
                    str(a.messages),
                    "--qos",
                    "1",
                    "--port",
                    str(mqtt_port),
                    "--dsn",
                    dsn,
                    "--table",
                    "bench_telemetry",
                    "--no-reference",
                ]
            )
            assert m["unique_rows"] == total, m
            m_rate = float(m["msgs_per_s"])  # the ingest scenario's rows/s
            w = asyncio.run(webhook_round(url, dsn, total, a.batch, a.clients, a.publishers))
            assert w["distinct"] == total and w["rows"] == total, w
            ratios.append(w["rows_per_s"] / m_rate)
            web_rates.append(w["rows_per_s"])
            mqtt_rates.append(m_rate)
            print(
                f"round {r + 1}: webhook {w['rows_per_s']:>9,.0f} rows/s ({w['rows']} rows,"
                f" 503s {w['retries_503']})   mqtt {m_rate:>9,.0f} rows/s   ratio {ratios[-1]:.2f}x"
            )
        print(
            f"median: webhook {statistics.median(web_rates):,.0f} rows/s, mqtt"
            f" {statistics.median(mqtt_rates):,.0f} rows/s, webhook/mqtt"
            f" {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})"
        )
    finally:
        stop_all(procs, pg, tmp)


if __name__ == "__main__":
    main()
