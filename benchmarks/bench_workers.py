"""``serve --workers N`` on this machine: how connections spread, and ingest rows/s (issue 11).

Starts one embedded PostgreSQL (or uses ``--dsn``) and two servers on loopback
ports at once, both with the route of ``benchmarks/ingest-bench.toml``:

* ``1w``: ``ingestd serve --workers 1`` (one process);
* ``Nw``: ``ingestd serve --workers N`` (a parent and N workers).

``spread``: for each ``server.worker_sockets`` (``reuseport``, ``inherit``)
opens ``--connections`` MQTT connections to an N-worker broker (one burst from
one process, connections kept open) and prints how many each worker accepted
(its ``ingestd_connections_accepted_total``, from its own HTTP port).

``ingest``: alternating the two servers round by round, runs::

    python -m ingestd.bench.command --scenario ingest --qos 1 --publishers P \\
        --messages M --port <1w or Nw> --dsn <DSN> --table bench_telemetry \\
        --no-reference --json --processes K --inflight W

(with ``--upstream``: the publishers write to an upstream ingestd broker, ``ingestd
serve --no-db``, and per run a consumer ``serve --no-listen --workers 1|N`` with
``[[upstream]] subscriptions = ["$share/bench/..."]`` writes the rows; each of its
workers is one member of the group) and prints committed rows/s (the bench counts its run's rows in PostgreSQL:
loss and duplicates too) and the CPU seconds of the server's processes (parent
and workers, utime + stime from /proc) per 100,000 rows.

Usage (from the repository root, extensions built)::

    .venv/bin/python benchmarks/bench_workers.py [--rounds 3] [--messages 25000]
        [--publishers 8] [--processes 1] [--inflight 64] [--workers 2] [--skip-spread]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_e2e import free_port, stop_all  # noqa: E402
from bench_upstream import BROKER_CONF, upstream_section, wait_port  # noqa: E402

ROUTE = (
    (ROOT / "benchmarks" / "ingest-bench.toml")
    .read_text()
    .replace('http_listen = ""', 'http_listen = "127.0.0.1:0"')
)
PERSISTENCE_OFF = "\n[persistence]\nenabled = false\n"
HTTP_LINE = re.compile(r"\[worker (\d+)\]: ingestd listening on http://127\.0\.0\.1:(\d+)")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live children (the workers), in seconds."""
    from ingestd.bench.procstat import cpu_seconds as one

    total = one(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return total + sum(one(int(c)) for c in children)


def postgres_cpu(pgdata: Path | None) -> float:
    """CPU seconds of the embedded PostgreSQL: the postmaster and its live children."""
    if pgdata is None:
        return float("nan")
    return cpu_seconds(int((pgdata / "postmaster.pid").read_text().split()[0]))


def connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, keepalive 60)."""
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(var)]) + var


def worker_ports(log: Path) -> dict[int, int]:
    return {int(w): int(p) for w, p in HTTP_LINE.findall(log.read_text())}


def accepted(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        int(float(m))
        for m in re.findall(
            r'^ingestd_connections_accepted_total\{protocol="\d"\} (\S+)$', text, re.M
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=25_000, help="per publisher")
    ap.add_argument("--publishers", type=int, default=8)
    ap.add_argument("--processes", type=int, default=1, help="load generator processes")
    ap.add_argument("--inflight", type=int, default=64, help="QoS 1 window per publisher")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--second-flush-ms",
        type=float,
        help="ingest.flush_interval_ms of the second server (a control: --workers 1"
        " --second-flush-ms 25 against one worker at the default 50 ms)",
    )
    ap.add_argument("--connections", type=int, default=400, help="spread: connections per mode")
    ap.add_argument("--skip-spread", action="store_true")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument(
        "--upstream",
        action="store_true",
        help="ingest through an upstream ingestd broker: the consumer's workers share one"
        " $share group (a consumer is started per run)",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ingestd-bench-workers-"))
    procs: list[subprocess.Popen[bytes]] = []
    pg = None
    py = sys.executable

    def serve(name: str, cfg_text: str, *extra: str, env: dict[str, str] | None = None
              ) -> tuple[subprocess.Popen[bytes], Path, int]:  # fmt: skip
        cfg = tmp / f"{name}.toml"
        cfg.write_text(cfg_text)
        log = tmp / f"{name}.log"
        port = free_port()
        with open(log, "wb") as out:
            p = subprocess.Popen(
                [py, "-m", "ingestd", "serve", "--config", str(cfg), "--data-dir",
                 str(tmp / name), "--listen", f"127.0.0.1:{port}", *extra],
                stdout=out, stderr=out, env=env,
            )  # fmt: skip
        procs.append(p)
        wait_port(port, p, log)
        return p, log, port

    def stop(p: subprocess.Popen[bytes]) -> None:
        p.terminate()
        p.wait(60)
        procs.remove(p)

    try:
        if not args.skip_spread:
            for mode in ("reuseport", "inherit"):
                env = dict(os.environ, INGESTD_SERVER__WORKER_SOCKETS=mode)
                p, log, port = serve(f"spread-{mode}", ROUTE + PERSISTENCE_OFF, "--no-db",
                                     "--workers", str(args.workers), env=env)  # fmt: skip
                deadline = time.monotonic() + 60
                while len(worker_ports(log)) < args.workers:
                    if time.monotonic() > deadline:
                        raise SystemExit(log.read_text()[-2000:])
                    time.sleep(0.05)
                socks = []
                for i in range(args.connections):
                    s = socket.create_connection(("127.0.0.1", port))
                    s.sendall(connect_packet(f"spread-{i}"))
                    socks.append(s)
                for s in socks:
                    s.settimeout(30)
                    assert s.recv(4)[:1] == b"\x20", "no CONNACK"
                counts = {w: accepted(hp) for w, hp in sorted(worker_ports(log).items())}
                print(f"spread {mode:9s}: {args.connections} connections ->"
                      + "".join(f" worker {w}: {n}" for w, n in counts.items()), flush=True)  # fmt: skip
                for s in socks:
                    s.close()
                stop(p)
        if args.skip_ingest:
            return
        dsn = args.dsn
        if not dsn:
            from ingestd.db import EmbeddedPostgres

            pg = EmbeddedPostgres(tmp / "pg")
            dsn = pg.start()
        if args.upstream:
            # One upstream broker; per run a consumer with 1 or N workers on its $share group.
            _, _, broker_port = serve("broker", BROKER_CONF.format(window=1024), "--no-db",
                                      "--http-listen", "")  # fmt: skip
            consumer_toml = (
                ROUTE
                + PERSISTENCE_OFF
                + upstream_section(broker_port, "$share/bench/company/+/machine/+/telemetry")
            )
            runs = 0

            def target(second: int) -> tuple[int, subprocess.Popen[bytes]]:
                nonlocal runs
                workers = args.workers if second else 1
                runs += 1
                log = tmp / f"consumer-{runs}.log"
                (tmp / "consumer.toml").write_text(consumer_toml)
                with open(log, "wb") as out:
                    c = subprocess.Popen(
                        [py, "-m", "ingestd", "serve", "--config", str(tmp / "consumer.toml"),
                         "--data-dir", str(tmp / f"consumer-{runs}"), "--no-listen", "--dsn", dsn,
                         "--workers", str(workers)],
                        stdout=out, stderr=out,
                    )  # fmt: skip
                procs.append(c)
                deadline = time.monotonic() + 60
                while log.read_text().count("upstream connected: bench") < workers:
                    if c.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(log.read_text()[-2000:])
                    time.sleep(0.05)
                return broker_port, c
        else:
            p1, _, port1 = serve("1w", ROUTE + PERSISTENCE_OFF, "--dsn", dsn)
            env = dict(os.environ)
            if args.second_flush_ms:
                env["INGESTD_INGEST__FLUSH_INTERVAL_MS"] = str(args.second_flush_ms)
            pn, _, portn = serve(f"{args.workers}w", ROUTE + PERSISTENCE_OFF, "--dsn", dsn,
                                 "--workers", str(args.workers), env=env)  # fmt: skip

            def target(second: int) -> tuple[int, subprocess.Popen[bytes]]:
                return (portn, pn) if second else (port1, p1)

        pgdata = None if args.dsn else tmp / "pg"

        def bench(port: int, pid: int) -> dict[str, Any]:
            cpu0 = cpu_seconds(pid)
            pg0 = postgres_cpu(pgdata)
            gen0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = subprocess.run(
                [py, "-m", "ingestd.bench.command", "--scenario", "ingest", "--qos", "1",
                 "--publishers", str(args.publishers), "--messages", str(args.messages),
                 "--processes", str(args.processes), "--inflight", str(args.inflight),
                 "--port", str(port), "--dsn", dsn,
                 "--table", "bench_telemetry", "--no-reference", "--json", "--no-progress"],
                capture_output=True, check=False, timeout=900,
            )  # fmt: skip
            if out.returncode:
                raise SystemExit(out.stderr.decode()[-3000:])
            res: dict[str, Any] = json.loads(out.stdout)
            res["server_cpu_s"] = cpu_seconds(pid) - cpu0
            res["pg_cpu_s"] = postgres_cpu(pgdata) - pg0
            gen1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            res["gen_cpu_s"] = gen1.ru_utime + gen1.ru_stime - gen0.ru_utime - gen0.ru_stime
            return res

        names = ("1 worker", f"{args.workers} worker{'s' if args.workers > 1 else ''}"
                 + (f", {args.second_flush_ms:g} ms" if args.second_flush_ms else ""))  # fmt: skip
        rates: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = [(names[0], 0), (names[1], 1)]
            if r % 2:
                order.reverse()
            for name, second in order:
                port, proc = target(second)
                res = bench(port, proc.pid)
                if args.upstream:
                    stop(proc)
                per = res["server_cpu_s"] / res["unique_rows"] * 100_000
                rates[name].append(res["msgs_per_s"])
                cpu[name].append(per)
                print(
                    f"round {r + 1} {name:9s}: {res['msgs_per_s']:>9,.0f} rows/s"
                    f"  rows {res['rows']} (distinct {res['unique_rows']}, lost {res['lost']},"
                    f" dup {res['duplicates']})  server CPU {res['server_cpu_s']:.2f} s"
                    f" = {per:.3f} s per 100k rows; PostgreSQL {res['pg_cpu_s']:.2f} s,"
                    f" load generator {res['gen_cpu_s']:.2f} s, wall {res['duration_s']:.2f} s",
                    flush=True,
                )
        a, b = (statistics.median(rates[n]) for n in names)
        ca, cb = (statistics.median(cpu[n]) for n in names)
        print(
            f"median: {names[0]} {a:,.0f} rows/s ({ca:.3f} CPU-s/100k rows), {names[1]}"
            f" {b:,.0f} rows/s ({cb:.3f} CPU-s/100k rows); rows/s ratio {b / a:.2f},"
            f" CPU per row ratio {cb / ca:.2f}"
        )
    finally:
        stop_all(procs, pg, tmp, wait=60)


if __name__ == "__main__":
    main()
