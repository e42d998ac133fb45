"""RSS per idle connection: ingestd (one or two builds) against Mosquitto, fresh brokers.

Usage::

    python benchmarks/bench_idle.py [--old OLD_VENV] [--connections 10000] [--rounds 2]

Each round starts every broker afresh (a broker that has served connections before
reuses freed memory, and its growth per connection reads near zero), opens
``--connections`` idle MQTT 3.1.1 connections to it with ``ingestd bench --scenario
connections --pid`` (keepalive 60 s), and records the broker's RSS growth divided by
the connections. Brokers alternate within a round, so a noisy machine affects all of
them alike. Prints the medians and the ratios to Mosquitto; ``--json`` for the raw runs.

Loopback only, bounded by the connection count. Needs ``mosquitto`` on PATH. The
open-file limit bounds the count: the broker needs one descriptor per connection
(the script raises its soft limit to the hard one; raising the hard limit needs
CAP_SYS_RESOURCE), and every 28k connections need another source address.
Past the hard limit, ``--workers N`` runs ingestd as ``serve --workers N`` (N
processes sharing the listener, each holding its share of the connections; the
growth is that of the whole process tree) and ``--skip-mosquitto`` leaves out
Mosquitto, which cannot hold more descriptors than the limit::

    python benchmarks/bench_idle.py --connections 100000 --workers 8 --processes 8 --skip-mosquitto
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import free_port, wait_port

# Mosquitto as bench_e2e.py runs it, without a connection limit (its default).
MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
log_dest stderr
log_type error
connection_messages false
"""

# The floor under any broker built on uvloop transports: a server whose protocol is one
# slotted object that answers CONNECT and PINGREQ and holds nothing else.
UVLOOP_FLOOR = """\
import asyncio, sys, uvloop
class P(asyncio.Protocol):
    __slots__ = ("t",)
    def connection_made(self, t): self.t = t
    def data_received(self, d):
        if d[:1] == b"\\x10": self.t.write(b"\\x20\\x02\\x00\\x00")
        elif d[:1] == b"\\xc0": self.t.write(b"\\xd0\\x00")
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    await asyncio.Event().wait()
uvloop.run(main())
"""

INGESTD_CONF = """\
[server]
http_listen = ""
log_level = "warning"
"""


def run_one(cmd: list[str], bench: list[str], port: int, n: int, procs: int) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        # Start-up allocations settle (and, with --workers, every worker listens: the
        # kernel spreads connections over the listening ones only).
        time.sleep(3 if "--workers" in cmd else 0.5)
        out = subprocess.run(
            [
                *bench,
                "--scenario",
                "connections",
                "--connections",
                str(n),
                "--processes",
                str(procs),
                # one source address per 25k connections (28k ephemeral ports each)
                "--source-addresses",
                str(-(-n // 25_000)),
                "--port",
                str(port),
                "--pid",
                str(proc.pid),
                "--hold",
                "1",
                "--json",
                "--no-progress",
            ],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        return dict(json.loads(out.stdout))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, help="virtualenv of another ingestd build")
    ap.add_argument("--new", type=Path, default=Path(sys.executable).parent.parent)
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="ingestd serve --workers N")
    ap.add_argument("--skip-mosquitto", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--floor", action="store_true", help="also a bare uvloop server (UVLOOP_FLOOR above)"
    )
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the brokers
    tmp = Path(tempfile.mkdtemp(prefix="idle-"))
    (tmp / "i.toml").write_text(INGESTD_CONF)
    (tmp / "w.toml").write_text(INGESTD_CONF + "[persistence]\nenabled = false\n")
    bench = [str(a.new / "bin/ingestd"), "bench"]
    brokers: dict[str, object] = {"new": a.new}
    if not a.skip_mosquitto:
        brokers["mosquitto"] = None
    if a.old:
        brokers = {"old": a.old, **brokers}
    if a.floor:
        brokers["uvloop-floor"] = "floor"
    runs: dict[str, list[dict]] = {k: [] for k in brokers}
    for r in range(a.rounds):
        for name, venv in brokers.items():
            port = free_port()
            if venv == "floor":
                cmd = [str(a.new / "bin/python"), "-c", UVLOOP_FLOOR, str(port)]
            elif venv is None:
                conf = tmp / f"m{port}.conf"
                conf.write_text(MOSQUITTO_CONF.format(port=port))
                cmd = ["mosquitto", "-c", str(conf)]
            else:
                data = tmp / f"d{port}"
                cmd = [str(Path(str(venv)) / "bin/ingestd"), "serve", "--no-db"]
                # (workers refuse persistence at all, though --no-db keeps nothing)
                conf = tmp / ("w.toml" if a.workers > 1 else "i.toml")
                cmd += ["--config", str(conf), "--data-dir", str(data)]
                cmd += ["--listen", f"127.0.0.1:{port}"]
                if a.workers > 1:
                    cmd += ["--workers", str(a.workers)]
            res = run_one(cmd, bench, port, a.connections, a.processes)
            runs[name].append(res)
            print(
                f"round {r + 1}: {name}: {res['connected']:,} connected,"
                f" {res['rss_per_connection_bytes']:,.0f} B per connection",
                file=sys.stderr,
            )
    med = {
        k: sorted(x["rss_per_connection_bytes"] for x in v)[len(v) // 2] for k, v in runs.items()
    }
    if a.json:
        print(json.dumps({"runs": runs, "median": med}, indent=2))
        return
    print(f"{a.connections:,} idle connections, RSS growth per connection, median of {a.rounds}")
    for k, v in med.items():
        ratio = v / med["mosquitto"] if med.get("mosquitto") else float("nan")
        print(f"  {k:10} {v:8,.0f} B   {ratio:.2f}x Mosquitto")
    print(
        f"(runs: {json.dumps({k: [round(x['rss_per_connection_bytes']) for x in v] for k, v in runs.items()})})"
    )


if __name__ == "__main__":
    main()
