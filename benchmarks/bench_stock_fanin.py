"""Issue 12's measurement: QoS 1 fan-in on ingestd's stock configuration (no config file)
against Mosquitto with unlimited queues, two ingestd builds and Mosquitto alternating.

Usage::

    python benchmarks/bench_stock_fanin.py OLD_VENV NEW_VENV ROUNDS [extra bench args]

(pass the same venv twice to measure one build). Each round runs, with NEW's
`ingestd bench`, ``--scenario fan-in --publishers 10 --messages 20000 --qos 1`` against
each broker in turn; prints delivered msgs/s, loss and msgs per broker CPU-second per
round, the medians, and each broker's peak RSS (VmHWM). Loopback only, bounded by the
message count. Writes the results as JSON to OUT (default ./bench_stock_fanin.json).

The brokers run ``--no-db`` (the broker's own job, as Mosquitto's). ``WITH_DB=1`` runs
``ingestd serve`` with no flags at all instead: each build with its own embedded
PostgreSQL, so the default route stores every message as a row and acknowledges it
after the commit.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import free_port, stop_all, wait_port

MOSQUITTO = (
    "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
    "max_queued_bytes 0\nmax_inflight_messages 256\npersistence false\nlog_dest none\n"
)


def peak_rss(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(line for line in f if line.startswith("VmHWM")).split(":")[1].strip()


def main() -> None:
    old, new, rounds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    extra = sys.argv[4:]
    tmp = Path(tempfile.mkdtemp(prefix="bench-stock-fanin-"))
    brokers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    for name, venv in (("old", old), ("new", new)):
        port = free_port()
        cmd = [str(venv / "bin/ingestd"), "serve", "--listen", f"127.0.0.1:{port}"]
        if not os.environ.get("WITH_DB"):
            cmd.append("--no-db")
        cmd += ["--http-listen", "", "--data-dir", str(tmp / name), "--log-level", "warning"]
        brokers[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL), port)
    port = free_port()
    (tmp / "mosquitto.conf").write_text(MOSQUITTO.format(port=port))
    mosq = subprocess.Popen(
        ["/usr/sbin/mosquitto", "-c", str(tmp / "mosquitto.conf")], stdout=subprocess.DEVNULL
    )
    brokers["mosquitto"] = (mosq, port)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in brokers}
    try:
        for proc, port in brokers.values():
            wait_port(port, proc)
        for r in range(rounds):
            for name in ("new", "mosquitto", "old"):
                proc, port = brokers[name]
                cmd = [str(new / "bin/ingestd"), "bench", "--port", str(port)]
                cmd += ["--scenario", "fan-in", "--publishers", "10", "--messages", "20000"]
                cmd += ["--qos", "1", "--pid", str(proc.pid), "--json", "--no-progress", *extra]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
                res = json.loads(out.stdout)
                results[name].append(res)
                print(
                    f"{name} round {r}: {res['msgs_per_s']:,.0f} msgs/s delivered, lost"
                    f" {res['lost']}, {res['msgs_per_broker_cpu_s'] or 0:,.0f} msgs/broker CPU-s",
                    flush=True,
                )
        for name, (proc, _) in brokers.items():
            rates = [res["msgs_per_s"] for res in results[name]]
            per_cpu = [res["msgs_per_broker_cpu_s"] or 0 for res in results[name]]
            print(
                f"{name}: median {statistics.median(rates):,.0f} msgs/s,"
                f" {statistics.median(per_cpu):,.0f} msgs/broker CPU-s,"
                f" lost {[res['lost'] for res in results[name]]}, peak RSS {peak_rss(proc.pid)}"
            )
    finally:
        stop_all([proc for proc, _ in brokers.values()], tmp=tmp)
    with open(os.environ.get("OUT", "bench_stock_fanin.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
