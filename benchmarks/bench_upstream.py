"""Upstream ingest vs ingestd's own listener, same route, same load, same run (issue 11).

Starts one embedded PostgreSQL (or uses ``--dsn``) and, on loopback ports:

* ``direct``: ``ingestd serve --config <route> --listen A`` (devices publish to it);
* ``upstream``: a broker (``ingestd serve --no-db --listen B``, or Debian's
  ``mosquitto`` with ``--upstream-broker mosquitto``) and a consumer
  ``ingestd serve --config <route + [[upstream]] B> --no-listen`` writing the
  same table of the same database.

Then, alternating the two paths round by round, runs::

    python -m ingestd.bench.command --scenario ingest --qos 1 --publishers P \\
        --messages M --port <A or B> --dsn <DSN> --table bench_telemetry --no-reference --json

and prints the median committed rows/s of each path and their ratio (the
bench counts the rows of its run id in PostgreSQL: loss and duplicates too).

Usage (from the repository root, extensions built)::

    .venv/bin/python benchmarks/bench_upstream.py [--rounds 3] [--messages 20000] [--publishers 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_e2e import free_port, stop_all  # noqa: E402

ROUTE = (ROOT / "benchmarks" / "ingest-bench.toml").read_text()

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
set_tcp_nodelay true
max_inflight_messages {window}
max_queued_messages 0
max_queued_bytes 0
"""

# The upstream ingestd broker: the consumer's session queue unbounded enough that
# nothing is dropped while the consumer catches up (as Mosquitto's above), and as
# many deliveries in flight as the consumer's Receive Maximum (1024).
BROKER_CONF = """\
[mqtt]
max_inflight = {window}
max_queued_messages = 10000000
max_queued_bytes = 10000000000
"""


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"process exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"port {port} never opened") from None
            time.sleep(0.05)


def wait_log(text: str, log: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"never logged {text!r}: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def upstream_section(port: int, subscription: str, receive_maximum: int = 1024) -> str:
    """The consumer's ``[[upstream]]`` on the bench broker at ``port``."""
    return f"""
[[upstream]]
name = "bench"
host = "127.0.0.1"
port = {port}
subscriptions = ["{subscription}"]
qos = 1
receive_maximum = {receive_maximum}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dsn", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=20_000, help="per publisher")
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument(
        "--receive-maximum", type=int, default=1024, help="the consumer's, = the broker's window"
    )
    ap.add_argument("--upstream-broker", choices=["ingestd", "mosquitto"], default="ingestd")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ingestd-bench-up-"))
    procs: list[subprocess.Popen[bytes]] = []
    pg = None
    try:
        dsn = args.dsn
        if not dsn:
            sys.path.insert(0, str(ROOT / "src"))
            from ingestd.db import EmbeddedPostgres

            pg = EmbeddedPostgres(tmp / "pg")
            dsn = pg.start()
        py = sys.executable

        def serve(name: str, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
            log = tmp / f"{name}.log"
            with open(log, "wb") as out:
                p = subprocess.Popen(
                    [py, "-m", "ingestd", "serve", "--data-dir", str(tmp / name),
                     "--log-level", "info", *extra],
                    stdout=out, stderr=out,
                )  # fmt: skip
            procs.append(p)
            return p, log

        port_a, port_b = free_port(), free_port()
        direct_cfg = tmp / "direct.toml"
        direct_cfg.write_text(ROUTE)
        pa, la = serve("direct", "--config", str(direct_cfg), "--listen",
                       f"127.0.0.1:{port_a}", "--dsn", dsn)  # fmt: skip
        wait_port(port_a, pa, la)
        if args.upstream_broker == "mosquitto":
            exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            conf = tmp / "mosquitto.conf"
            conf.write_text(MOSQUITTO_CONF.format(port=port_b, window=args.receive_maximum))
            log_b = tmp / "mosquitto.log"
            with open(log_b, "wb") as out:
                pb = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=out)
            procs.append(pb)
        else:
            broker_cfg = tmp / "broker.toml"
            broker_cfg.write_text(BROKER_CONF.format(window=args.receive_maximum))
            pb, log_b = serve("broker", "--no-db", "--config", str(broker_cfg), "--listen",
                              f"127.0.0.1:{port_b}", "--http-listen", "")  # fmt: skip
        wait_port(port_b, pb, log_b)
        consumer_cfg = tmp / "consumer.toml"
        consumer_cfg.write_text(
            ROUTE + upstream_section(port_b, "company/+/machine/+/telemetry", args.receive_maximum)
        )
        pc, lc = serve("consumer", "--config", str(consumer_cfg), "--no-listen", "--dsn", dsn)
        wait_log("upstream connected", lc, pc)

        def bench(port: int, pid: int) -> dict[str, Any]:
            out = subprocess.run(
                [py, "-m", "ingestd.bench.command", "--scenario", "ingest", "--qos", "1",
                 "--publishers", str(args.publishers), "--messages", str(args.messages),
                 "--port", str(port), "--dsn", dsn, "--table", "bench_telemetry",
                 "--no-reference", "--json", "--no-progress", "--pid", str(pid)],
                capture_output=True, check=False, timeout=600,
            )  # fmt: skip
            if out.returncode:
                raise SystemExit(out.stderr.decode()[-3000:])
            res: dict[str, Any] = json.loads(out.stdout)
            return res

        rates: dict[str, list[float]] = {"direct": [], "upstream": []}
        for r in range(args.rounds):
            for name, port, pid in (("direct", port_a, pa.pid), ("upstream", port_b, pc.pid)):
                res = bench(port, pid)
                rates[name].append(res["msgs_per_s"])
                print(
                    f"round {r + 1} {name:8s}: {res['msgs_per_s']:>9,.0f} rows/s"
                    f"  rows {res['rows']} (distinct {res['unique_rows']}, lost {res['lost']},"
                    f" dup {res['duplicates']})  ingestd CPU {res['broker_cpu_s']:.2f} s",
                    flush=True,
                )
        d, u = statistics.median(rates["direct"]), statistics.median(rates["upstream"])
        print(
            f"median: direct {d:,.0f} rows/s, upstream ({args.upstream_broker} broker)"
            f" {u:,.0f} rows/s, ratio {u / d:.2f}"
        )
    finally:
        stop_all(procs, pg, tmp)


if __name__ == "__main__":
    main()
