"""Does the web console slow the broker? Fan-in and ingest with it open vs closed.

Usage (from a checkout with ingestd, playwright and /usr/bin/chromium installed)::

    ROUNDS=3 python benchmarks/bench_console.py

Starts one embedded PostgreSQL and two ingestd servers, both with presence and
the HTTP API/console on: F (bench_e2e.py's broker limits, no routes) for
``--scenario fan-in`` and I (benchmarks/ingest-bench.toml's route) for
``--scenario ingest``. The presence table is filled with PRESENCE (100000)
offline devices first, so every /api/devices refresh pages through a large
table. Each round runs the scenario twice, alternating which goes first:
once with the console closed and once with a headless chromium showing it
(polling /api/stats every 2 s and /api/devices, dead letters and retained
every 5 s, as shipped). Prints every run, the medians and open/closed ratios
of msgs/s and of messages per broker CPU-second (the steadier of the two on
a shared machine),
and the cost of one /api/devices?limit=200 request relative to /healthz
(same run, sequential requests). HAMMER=1 replaces the browser by one thread
sending the console's four requests back to back without a pause (a worst
case, far above the page's polling). Loopback only; every run is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import INGESTD_CONF, bench, free_port, start_embedded_pg, wait_port

ROUNDS = int(os.environ.get("ROUNDS", "3"))
MESSAGES = os.environ.get("MESSAGES", "20000")
PRESENCE = int(os.environ.get("PRESENCE", "100000"))
# 1: instead of the browser, one thread sends the console's four requests back to back.
HAMMER = os.environ.get("HAMMER") == "1"
HERE = Path(__file__).resolve().parent

BROWSER = """
import signal, sys
from playwright.sync_api import sync_playwright
args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
    page = b.new_page()
    page.goto(sys.argv[1])
    page.locator("#devices tr.device").first.wait_for(timeout=60000)
    print("open", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        page.wait_for_timeout(1000)
"""


def serve(config: Path, dsn: str, data: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    mqtt, http = free_port(), free_port()
    env = dict(
        os.environ,
        INGESTD_PRESENCE__ENABLED="true",
        INGESTD_INGEST__DEFAULT_ROUTE="false",
        INGESTD_SERVER__LOG_LEVEL="warning",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ingestd",
            "serve",
            "--config",
            str(config),
            "--dsn",
            dsn,
            "--listen",
            f"127.0.0.1:{mqtt}",
            "--http-listen",
            f"127.0.0.1:{http}",
            "--data-dir",
            str(data),
        ],
        env=env,
    )
    wait_port(mqtt, proc)
    wait_port(http, proc)
    return proc, mqtt, http


async def fill_presence(dsn: str, n: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO device_presence (client_id, username, online, connected_at, last_seen,"
            " disconnect_reason, peer, protocol_version)"
            " SELECT 'dev-' || lpad(i::text, 7, '0'), 'fleet', false, now(), now(),"
            " 'connection_lost', '10.0.0.1:1883', 4 FROM generate_series(1, $1) AS i"
            " ON CONFLICT (client_id) DO NOTHING",
            n,
        )
        await conn.execute("ANALYZE device_presence")
    finally:
        await conn.close()


def hammer(http: int, stop: threading.Event) -> None:
    """The console's requests back to back, with no pause (HAMMER=1): a worst case."""
    base = f"http://127.0.0.1:{http}"
    paths = ["/api/stats", "/api/devices?limit=200", "/api/dead-letters?limit=20"]
    paths.append("/api/retained?limit=50")
    while not stop.is_set():
        for path in paths:
            with urllib.request.urlopen(base + path, timeout=30) as r:
                r.read()


def request_ms(url: str, n: int = 50) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="console-bench-"))
    (tmp / "f.toml").write_text(INGESTD_CONF)
    pg, dsn = start_embedded_pg(sys.executable, tmp / "pg")
    procs: list[subprocess.Popen[Any]] = [pg]
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        f, f_mqtt, f_http = serve(tmp / "f.toml", dsn, tmp / "f")
        procs.append(f)
        i, i_mqtt, i_http = serve(HERE / "ingest-bench.toml", dsn, tmp / "i")
        procs.append(i)
        asyncio.run(fill_presence(dsn, PRESENCE))

        base = f"http://127.0.0.1:{f_http}"
        health = request_ms(base + "/healthz")
        devices = request_ms(base + "/api/devices?limit=200")
        paged = request_ms(base + "/api/devices?limit=200&client_id_prefix=dev-00500")
        stats = request_ms(base + "/api/stats")
        print(
            f"per request, {PRESENCE} presence rows: /healthz {health:.2f} ms;"
            f" /api/devices?limit=200 {devices:.2f} ms ({devices / health:.1f}x),"
            f" with a prefix {paged:.2f} ms ({paged / health:.1f}x),"
            f" /api/stats {stats:.2f} ms ({stats / health:.1f}x)",
            flush=True,
        )

        scenarios = {
            "fan-in": (
                f_http,
                ["--scenario", "fan-in", "--port", str(f_mqtt), "--pid", str(f.pid)],
            ),
            "ingest": (
                i_http,
                [
                    "--scenario",
                    "ingest",
                    "--port",
                    str(i_mqtt),
                    "--pid",
                    str(i.pid),
                    "--dsn",
                    dsn,
                    "--table",
                    "bench_telemetry",
                    "--no-reference",
                ],
            ),
        }
        common = ["--publishers", "10", "--messages", MESSAGES, "--qos", "1"]
        for name, (http, args) in scenarios.items():
            for rnd in range(ROUNDS):
                for console in ("closed", "open") if rnd % 2 == 0 else ("open", "closed"):
                    browser = None
                    stop = threading.Event()
                    poller = threading.Thread(target=hammer, args=(http, stop), daemon=True)
                    if console == "open" and HAMMER:
                        poller.start()
                    elif console == "open":
                        browser = subprocess.Popen(
                            [sys.executable, "-c", BROWSER, f"http://127.0.0.1:{http}/"],
                            stdout=subprocess.PIPE,
                            text=True,
                        )
                        assert browser.stdout is not None
                        assert browser.stdout.readline().strip() == "open"
                    try:
                        r = bench([*common, *args])
                    finally:
                        stop.set()
                        if poller.is_alive():
                            poller.join(30)
                        if browser is not None:
                            browser.terminate()
                            browser.wait(30)
                    results.setdefault(f"{name} {console}", []).append(r)
                    cpu = r.get("broker_cpu_s") or 0
                    print(
                        f"{name} console {console}: {r.get('msgs_per_s', 0):,.0f} msgs/s,"
                        f" lost {r.get('lost', 0)}, broker CPU {cpu:.2f} s",
                        flush=True,
                    )
        for name in scenarios:
            for key, what in (("msgs_per_s", "msgs/s"), ("msgs_per_broker_cpu_s", "msgs/CPU-s")):
                closed = statistics.median(r[key] or 0 for r in results[f"{name} closed"])
                opened = statistics.median(r[key] or 0 for r in results[f"{name} open"])
                print(
                    f"{name}: median {opened:,.0f} (open) vs {closed:,.0f} (closed) {what},"
                    f" open/closed {opened / closed:.3f}x",
                    flush=True,
                )
        (tmp / "results.json").write_text(json.dumps(results, indent=1))
        print(f"results: {tmp / 'results.json'}")
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(60)


if __name__ == "__main__":
    main()
