"""Two builds of ingestd side by side (and Mosquitto), for a change that must not cost speed.

Usage (each argument a virtualenv with that build installed, e.g. a `git worktree` of the
old commit with its own .venv)::

    ROUNDS=3 python benchmarks/bench_ab.py OLD_VENV NEW_VENV

Runs, with the NEW build's `ingestd bench`:

* fan-in, 10 publishers x FMSG (20000) messages of 100 B, QoS 0 and 1, `--no-db` brokers
  with bench_e2e.py's limits: new vs old, new vs Mosquitto, old vs Mosquitto, each
  alternating ROUNDS rounds (`--compare`);
* ingest, 10 x IMSG (20000) QoS 1 JSON messages into benchmarks/ingest-bench.toml's route
  (after-commit), `--inflight` 64 and 1000, old and new alternating, one embedded
  PostgreSQL shared by both, each run with its same-run COPY reference.

Writes every result as JSON to OUT (default ./bench_ab.json). Loopback only; every run
is bounded by its message count. Needs `mosquitto` on PATH.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OLD = Path(sys.argv[1])  # venv dir
NEW = Path(sys.argv[2])
ROUNDS = int(os.environ.get("ROUNDS", "3"))
OUT = Path(os.environ.get("OUT", "bench_ab.json"))

# The same broker limits as bench_e2e.py (Mosquitto with unlimited queues, ingestd with
# queue bounds far beyond one run), so the figures compare with docs/benchmarks.md.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import INGESTD_CONF as CONF  # noqa: E402
from bench_e2e import MOSQUITTO_CONF as MOSQ  # noqa: E402
from bench_e2e import embedded_pg, free_port  # noqa: E402


def wait_port(port: int) -> None:
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def bench(venv: Path, args: list[str]) -> dict:
    cmd = [str(venv / "bin/ingestd"), "bench", *args, "--json", "--no-progress"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return dict(json.loads(out.stdout))


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ab-"))
    (tmp / "m.conf").write_text(MOSQ.format(port=(mp := free_port())))
    (tmp / "i.toml").write_text(CONF)
    procs = []
    pg = None
    res: dict = {}
    try:
        procs.append(m := subprocess.Popen(["mosquitto", "-c", str(tmp / "m.conf")]))
        ports = {}
        pids = {}
        for name, venv in (("old", OLD), ("new", NEW)):
            ports[name] = p = free_port()
            pr = subprocess.Popen(
                [
                    str(venv / "bin/ingestd"),
                    "serve",
                    "--no-db",
                    "--config",
                    str(tmp / "i.toml"),
                    "--listen",
                    f"127.0.0.1:{p}",
                    "--data-dir",
                    str(tmp / f"d-{name}"),
                ]
            )
            procs.append(pr)
            pids[name] = pr.pid
        for p in (mp, *ports.values()):
            wait_port(p)
        for q in (0, 1):
            common = [
                "--scenario",
                "fan-in",
                "--publishers",
                "10",
                "--messages",
                os.environ.get("FMSG", "20000"),
                "--payload-size",
                "100",
                "--qos",
                str(q),
                "--rounds",
                str(ROUNDS),
            ]
            for a, b in (("new", "old"), ("new", "mosq"), ("old", "mosq")):
                bport = mp if b == "mosq" else ports[b]
                bpid = m.pid if b == "mosq" else pids[b]
                r = bench(
                    NEW,
                    [
                        *common,
                        "--port",
                        str(ports[a]),
                        "--pid",
                        str(pids[a]),
                        "--compare",
                        f"127.0.0.1:{bport}",
                        "--compare-pid",
                        str(bpid),
                    ],
                )
                res[f"fanin_q{q}_{a}_vs_{b}"] = r
                lost = sum(x["lost"] for x in r["a"] + r["b"])
                print(
                    f"fan-in QoS {q} {a} vs {b}: {r['median_a']:,.0f} vs {r['median_b']:,.0f}"
                    f" msgs/s, ratio {r['ratio_of_medians']:.2f}x rounds "
                    + ", ".join(f"{x:.2f}" for x in r["ratios"])
                    + f"; lost {lost}",
                    flush=True,
                )
        for pr in procs[1:]:
            pr.terminate()
            pr.wait(30)
        procs = procs[:1]
        # ingest
        pg, dsn = embedded_pg(NEW, tmp / "pg")
        ingest_toml = Path(__file__).resolve().parent / "ingest-bench.toml"
        for name, venv in (("old", OLD), ("new", NEW)):
            ports[name] = p = free_port()
            pr = subprocess.Popen(
                [
                    str(venv / "bin/ingestd"),
                    "serve",
                    "--config",
                    str(ingest_toml),
                    "--dsn",
                    dsn,
                    "--listen",
                    f"127.0.0.1:{p}",
                    "--data-dir",
                    str(tmp / f"e-{name}"),
                ]
            )
            procs.append(pr)
            pids[name] = pr.pid
            wait_port(p)
        for inflight in (64, 1000):
            for rnd in range(ROUNDS):
                for name in ("old", "new") if rnd % 2 == 0 else ("new", "old"):
                    r = bench(
                        NEW,
                        [
                            "--scenario",
                            "ingest",
                            "--publishers",
                            "10",
                            "--messages",
                            os.environ.get("IMSG", "20000"),
                            "--qos",
                            "1",
                            "--inflight",
                            str(inflight),
                            "--port",
                            str(ports[name]),
                            "--pid",
                            str(pids[name]),
                            "--dsn",
                            dsn,
                            "--table",
                            "bench_telemetry",
                        ],
                    )
                    res.setdefault(f"ingest_{inflight}_{name}", []).append(r)
                    print(
                        f"ingest inflight {inflight} {name}: {r.get('msgs_per_s', 0):,.0f} rows/s"
                        f" vs reference {r.get('vs_reference', 0):.2f}x, broker CPU"
                        f" {r.get('broker_cpu_s', 0):.2f} s, lost {r.get('lost')}",
                        flush=True,
                    )
        OUT.write_text(json.dumps(res, indent=1))
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            try:
                pr.wait(30)
            except subprocess.TimeoutExpired:
                pr.kill()
        if pg is not None:
            pg.terminate()
            pg.wait(60)


if __name__ == "__main__":
    main()
