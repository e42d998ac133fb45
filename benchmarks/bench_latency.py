"""Latency at a fixed rate, with and without an ingest route, old build against new.

Usage::

    ROUNDS=3 [SCHED=fifo] [GEN=old] python benchmarks/bench_latency.py [OLD_VENV] NEW_VENV

For each build, two brokers: ``--no-db`` (routing only) and one with
``benchmarks/latency-ingest.toml``'s route taking the same traffic (after-commit
acks, into one embedded PostgreSQL shared by all), plus Mosquitto. Every round runs,
in alternating order, with the NEW build's generator (``GEN=old``: the OLD build's)::

    ingestd bench --scenario latency --publishers 10 --rate RATE --duration DUR --qos 1 \
        --port P --pid PID --metrics http://127.0.0.1:H/metrics

(RATE 20000, DUR 10 by default) and records p50/p99/p99.9/max end to end, the
broker's worst event-loop stall (``ingestd_event_loop_lag_max_seconds`` over the run),
the host's load average and how long the broker waited for a CPU (run-queue wait).

Every broker and the generator run in a session of their own (``setsid``), as a
daemon does: with the kernel's autogroup scheduling a session shares one CPU share,
and a broker in the script's session would share it with the generator (and with
PostgreSQL's backends it is not: they are in sessions of their own). ``SCHED=fifo``
runs the brokers and the generator (not PostgreSQL) as SCHED_FIFO, out of reach of
the host's other work.

Prints per broker the median over the rounds and the new/old ratios; OUT (default
./bench_latency.json) gets every run. Loopback only, bounded by the duration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import INGESTD_CONF, MOSQUITTO_CONF, free_port, start_embedded_pg, wait_port

HERE = Path(__file__).resolve().parent
VENVS = [Path(v) for v in sys.argv[1:]]
if not VENVS or len(VENVS) > 2:
    raise SystemExit(__doc__)
NEW = VENVS[-1]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
RATE = os.environ.get("RATE", "20000")
DUR = os.environ.get("DUR", "10")
OUT = Path(os.environ.get("OUT", "bench_latency.json"))
# SCHED=fifo: the brokers and the generator run as SCHED_FIFO (``chrt -f 10``; needs
# CAP_SYS_NICE), PostgreSQL as it is: nothing else on a shared host preempts them, so
# what is left is the brokers' own latency. The default is the ordinary scheduler.
SCHED = os.environ.get("SCHED", "other")
if SCHED not in ("other", "fifo"):
    raise SystemExit("SCHED must be 'other' or 'fifo'")
PRIO = ["chrt", "-f", "10"] if SCHED == "fifo" else []
# GEN=old: every run uses the OLD build's generator (to compare generators, not brokers).
GEN = VENVS[0] if os.environ.get("GEN") == "old" else NEW


def summary(res: dict) -> str:  # type: ignore[type-arg]
    lat = res["latency_ms"]
    stall = res["loop_lag_max_ms"] or 0.0
    pcts = " ".join(f"{k} {lat[k]:.2f}" for k in ("p50", "p99", "p99.9", "max"))
    wait, load = res.get("broker_runqueue_wait_s"), res.get("load_average")
    return (
        f"{pcts} ms; loop stall max {stall:.2f} ms; lost {res['lost']};"
        f" load {'-' if load is None else f'{load:.1f}'}; broker CPU {res['broker_cpu_s']:.2f} s,"
        f" run-queue wait {'-' if wait is None else f'{wait:.2f}'} s;"
        f" loadgen CPU {res['loadgen_cpu_s']:.2f} s;"
        f" publishers' full-window wait {res.get('window_wait_s', 0.0):.2f} s"
    )


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lat-"))
    (tmp / "plain.toml").write_text(INGESTD_CONF.replace('http_listen = ""\n', ""))
    procs: list[subprocess.Popen] = []  # type: ignore[type-arg]
    brokers: dict[str, tuple[int, int, str | None]] = {}  # name -> port, pid, metrics
    try:
        pg, dsn = start_embedded_pg(NEW / "bin/python", tmp / "pg")
        procs.append(pg)
        mport = free_port()
        (tmp / "m.conf").write_text(MOSQUITTO_CONF.format(port=mport))
        m = subprocess.Popen(
            [*PRIO, "mosquitto", "-c", str(tmp / "m.conf")], start_new_session=True
        )
        procs.append(m)
        wait_port(mport, m)
        brokers["mosquitto"] = (mport, m.pid, None)
        for label, venv in zip(("old", "new")[-len(VENVS) :], VENVS, strict=True):
            for mode in ("plain", "route"):
                port, http = free_port(), free_port()
                cmd = [str(venv / "bin/ingestd"), "serve", "--listen", f"127.0.0.1:{port}"]
                cmd += [
                    "--http-listen",
                    f"127.0.0.1:{http}",
                    "--data-dir",
                    str(tmp / f"{label}-{mode}"),
                ]
                if mode == "plain":
                    cmd += ["--no-db", "--config", str(tmp / "plain.toml")]
                else:
                    cmd += ["--config", str(HERE / "latency-ingest.toml"), "--dsn", dsn]
                pr = subprocess.Popen([*PRIO, *cmd], start_new_session=True)
                procs.append(pr)
                wait_port(port, pr)
                brokers[f"{label}-{mode}"] = (port, pr.pid, f"http://127.0.0.1:{http}/metrics")
        runs: dict[str, list[dict]] = {k: [] for k in brokers}
        names = list(brokers)
        for r in range(ROUNDS):
            for name in names if r % 2 == 0 else names[::-1]:
                port, pid, metrics = brokers[name]
                cmd = [str(GEN / "bin/ingestd"), "bench", "--scenario", "latency"]
                cmd += ["--publishers", "10", "--rate", RATE, "--duration", DUR, "--qos", "1"]
                cmd += ["--port", str(port), "--pid", str(pid), "--json", "--no-progress"]
                if metrics:
                    cmd += ["--metrics", metrics]
                out = subprocess.run(
                    [*PRIO, *cmd], check=True, stdout=subprocess.PIPE, start_new_session=True
                )
                res = json.loads(out.stdout)
                runs[name].append(res)
                print(f"round {r + 1} {name:12} {summary(res)}", flush=True)
        OUT.write_text(json.dumps(runs, indent=2))

        def med(name: str, key: str) -> float:
            xs = sorted(
                (x["latency_ms"][key] if key != "lag" else x["loop_lag_max_ms"] or 0.0)
                for x in runs[name]
            )
            return xs[len(xs) // 2]

        print(f"median of {ROUNDS} rounds, ms:  p50 / p99 / p99.9 / max / loop stall max")
        for name in names:
            vals = [med(name, k) for k in ("p50", "p99", "p99.9", "max", "lag")]
            print(f"  {name:12} " + " / ".join(f"{v:.2f}" for v in vals))
        if len(VENVS) == 2:
            for mode in ("plain", "route"):
                a, b = f"new-{mode}", f"old-{mode}"
                print(
                    f"  new/old {mode}: p99 {med(a, 'p99') / med(b, 'p99'):.2f}x,"
                    f" p99.9 {med(a, 'p99.9') / med(b, 'p99.9'):.2f}x"
                )
    finally:
        for pr in reversed(procs):
            pr.terminate()
            try:
                pr.wait(30)
            except subprocess.TimeoutExpired:
                pr.kill()


if __name__ == "__main__":
    main()
