"""End-to-end broker comparison: ingestd vs Mosquitto, same load generator, same run.

Starts Mosquitto and ingestd on loopback ports, then for each QoS runs::

    python -m ingestd.bench.command --scenario fan-in --publishers 10 --payload-size 100 \\
        --qos Q --port <ingestd> --compare 127.0.0.1:<mosquitto> --rounds R --json ...

(alternating the two brokers round by round), and prints one line per QoS with
the median delivered msgs/s of each broker and their ratio. Both brokers get
the same limits (see docs/benchmarks.md): unbounded-enough per-client queues,
so that no message is dropped and "delivered msgs/s" is the rate at which the
broker moves the whole run through; loss and duplicates are checked anyway.

Usage (from the repository root; the Cython extensions must be built)::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_e2e.py
    PYTHONPATH=src .venv/bin/python benchmarks/bench_e2e.py --qos 0,1 --messages 50000 --rounds 5
    PYTHONPATH=src .venv/bin/python benchmarks/bench_e2e.py --loadgen-check   # generator headroom

Only loopback addresses are used. Every run is bounded by its message count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MOSQUITTO_CONF = """\
# Benchmark configuration (docs/benchmarks.md): loopback, anonymous, no persistence.
listener {port} 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
connection_messages false
set_tcp_nodelay true
# Same in-flight window per client as ingestd's mqtt.max_inflight.
max_inflight_messages 256
# No per-client queue bound (0 = none): nothing is dropped, so the rates compare
# the time each broker needs to move the same messages.
max_queued_messages 0
max_queued_bytes 0
max_packet_size 1048576
"""

INGESTD_CONF = """\
# Benchmark configuration (docs/benchmarks.md): equivalent of the Mosquitto file.
[server]
http_listen = ""
log_level = "warning"

[mqtt]
max_inflight = 256
# Queue bounds raised far beyond one run (Mosquitto: max_queued_messages 0).
max_queued_messages = 100000000
max_queued_bytes = 17179869184
max_outbound_bytes = 268435456
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def embedded_pg(venv: Path, directory: Path) -> tuple[subprocess.Popen[str], str]:
    """An embedded PostgreSQL in ``directory``, run by ``venv``'s ingestd; (process, DSN)."""
    pg = subprocess.Popen(
        [
            str(venv / "bin/python"),
            "-c",
            "import signal, sys, time\n"
            "from ingestd.db import EmbeddedPostgres\n"
            f"e = EmbeddedPostgres({str(directory)!r})\n"
            "print(e.start(), flush=True)\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
            "while True: time.sleep(1)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert pg.stdout is not None
    return pg, pg.stdout.readline().strip()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"broker exited with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def bench(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ingestd.bench.command", *args, "--json", "--no-progress"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return dict(json.loads(out.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--qos", default="0,1", help="comma-separated QoS levels")
    ap.add_argument("--publishers", type=int, default=10)
    ap.add_argument("--messages", type=int, default=20000, help="per publisher")
    ap.add_argument("--payload-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--mqtt-version", default="4", choices=["4", "5"])
    ap.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    ap.add_argument("--ingestd-port", type=int, default=0)
    ap.add_argument("--mosquitto-port", type=int, default=0)
    ap.add_argument("--out", help="write all results as JSON here")
    ap.add_argument(
        "--loadgen-check",
        action="store_true",
        help="also run the faster broker with 1 and 2 generator processes (generator headroom)",
    )
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))
    m_port = a.mosquitto_port or free_port()
    i_port = a.ingestd_port or free_port()
    (tmp / "mosquitto.conf").write_text(MOSQUITTO_CONF.format(port=m_port))
    (tmp / "ingestd.toml").write_text(INGESTD_CONF)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        mosq = subprocess.Popen([a.mosquitto, "-c", str(tmp / "mosquitto.conf")])
        procs.append(mosq)
        ing = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ingestd",
                "serve",
                "--no-db",  # broker only: Mosquitto has no database either
                "--config",
                str(tmp / "ingestd.toml"),
                "--listen",
                f"127.0.0.1:{i_port}",
                "--data-dir",
                str(tmp / "data"),
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append(ing)
        wait_port(m_port, mosq)
        wait_port(i_port, ing)
        results: dict[str, Any] = {"machine": machine(), "runs": {}}
        print(
            f"ingestd 127.0.0.1:{i_port} (pid {ing.pid}), mosquitto 127.0.0.1:{m_port} "
            f"(pid {mosq.pid}); {a.publishers} publishers x {a.messages} messages of "
            f"{a.payload_size} B, MQTT {'5' if a.mqtt_version == '5' else '3.1.1'}, "
            f"{a.rounds} rounds, {a.processes} generator process(es)"
        )
        common = [
            "--scenario",
            "fan-in",
            "--publishers",
            str(a.publishers),
            "--messages",
            str(a.messages),
            "--payload-size",
            str(a.payload_size),
            "--mqtt-version",
            a.mqtt_version,
            "--processes",
            str(a.processes),
        ]
        for q in [int(x) for x in a.qos.split(",")]:
            r = bench(
                [
                    *common,
                    "--qos",
                    str(q),
                    "--port",
                    str(i_port),
                    "--pid",
                    str(ing.pid),
                    "--compare",
                    f"127.0.0.1:{m_port}",
                    "--compare-pid",
                    str(mosq.pid),
                    "--rounds",
                    str(a.rounds),
                ]
            )
            results["runs"][f"qos{q}"] = r
            lost = sum(x["lost"] for x in r["a"] + r["b"])
            dups = sum(x["duplicates"] for x in r["a"] + r["b"])
            print(
                f"QoS {q}: ingestd {r['median_a']:,.0f} msgs/s, mosquitto {r['median_b']:,.0f}"
                f" msgs/s, ratio {r['ratio_of_medians']:.2f}x (rounds: "
                + ", ".join(f"{x:.2f}" for x in r["ratios"])
                + f"); per broker CPU-second {r.get('cpu_efficiency_ratio', 0):.2f}x;"
                f" lost {lost}, duplicates {dups}"
            )
            if a.loadgen_check:
                fast = i_port if r["median_a"] >= r["median_b"] else m_port
                fast_pid = ing.pid if fast == i_port else mosq.pid
                for n in (1, 2):
                    x = bench(
                        [
                            *common[:-1],
                            str(n),
                            "--qos",
                            str(q),
                            "--port",
                            str(fast),
                            "--pid",
                            str(fast_pid),
                        ]
                    )
                    results["runs"][f"qos{q}_loadgen_{n}proc"] = x
                    print(
                        f"  generator check, {n} process(es) against port {fast}: "
                        f"{x['msgs_per_s']:,.0f} msgs/s, publish {x['publish_rate']:,.0f} msgs/s,"
                        f" generator peak {x['loadgen_peak_util'] * 100:.0f}% of a core,"
                        f" broker CPU {x['broker_cpu_s']:.2f} s over {x['duration_s']:.2f} s"
                    )
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=2))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mosq = subprocess.run(
        [shutil.which("mosquitto") or "mosquitto", "-h"], capture_output=True, text=True
    ).stdout.splitlines()[:1]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "mosquitto": mosq[0] if mosq else "",
    }


if __name__ == "__main__":
    main()
