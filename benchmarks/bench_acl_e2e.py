"""A 1,000-rule ACL against no ACL, end to end: fan-in (QoS 0 and 1) and ingest, side by side.

Usage (with the python of a virtualenv that has ingestd installed; loopback only,
every run bounded by its message count)::

    ROUNDS=6 .venv/bin/python benchmarks/bench_acl_e2e.py

Starts two ``ingestd serve`` processes of the same build, one without ``acl_file``
and one with :func:`acl_text` (1,000 rules: per-tenant ``user`` sections for 320
tenants, the bench's ten publishers among them, a ``reader`` user, and ``pattern``
rules with ``%u`` and ``%c``). Every client logs in with a user name
(``ingestd bench --usernames``: publisher i as ``c{i}``, writing
``company/c{i}/machine/m{i}/telemetry``; the subscriber as ``reader``), so each
PUBLISH is decided against its user's section and the substituted patterns, and
each delivery against the reader's.

* fan-in, 10 publishers x FMSG (20000) messages of 100 B, QoS 0 and 1, ``--no-db``
  brokers with bench_e2e.py's limits: ACL vs none with ``--compare`` (ROUNDS rounds,
  alternating);
* ingest, 10 x IMSG (20000) JSON messages, QoS 1 and 0, into
  benchmarks/ingest-bench.toml's route (one embedded PostgreSQL shared by both
  brokers), the two brokers alternating for ROUNDS rounds.

Prints each figure and writes them all as JSON to OUT (default ./bench_acl_e2e.json).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# The virtualenv this runs in: its `ingestd` serves, its python runs `ingestd bench`.
VENV = Path(sys.executable).parent.parent
ROUNDS = int(os.environ.get("ROUNDS", "3"))
OUT = Path(os.environ.get("OUT", "bench_acl_e2e.json"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import INGESTD_CONF as CONF  # noqa: E402
from bench_e2e import bench, compare_line, free_port, wait_port  # noqa: E402

TENANTS = 320  # x 3 rules, + the reader, the anonymous section and the patterns = 1,000


def acl_text() -> str:
    """1,000 rules as a multi-tenant deployment would write them."""
    lines = ["# anonymous clients", "topic read public/#", ""]
    for t in range(TENANTS):
        lines += [
            f"user c{t}",
            f"topic write company/c{t}/machine/+/telemetry",
            f"topic read company/c{t}/machine/+/commands",
            f"topic deny company/c{t}/machine/+/telemetry/raw",
            "",
        ]
    lines += ["user reader", "topic read company/#", "topic deny company/+/secret/#", ""]
    patterns = [
        "pattern readwrite company/%u/devices/%c/#",
        "pattern read company/%u/broadcast/#",
        "pattern write company/%u/machine/+/status",
        "pattern read devices/%c/config",
        "pattern write devices/%c/state",
        "pattern deny company/%u/machine/+/telemetry/locked",
    ]
    lines += patterns
    rules = sum(1 for x in lines if x.startswith(("topic", "pattern")))
    # Fill up to exactly 1,000 with more %u / %c patterns on other trees.
    i = 0
    while rules < 1000:
        lines.append(f"pattern read fleet/{i}/%u/+/%c")
        rules += 1
        i += 1
    return "\n".join(lines) + "\n"


def serve(extra: list[str], data: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV / "bin/ingestd"), "serve", *extra, "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(data)]
    )  # fmt: skip
    wait_port(port, proc)
    return proc, port


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="acl-e2e-"))
    acl = tmp / "acl"
    acl.write_text(acl_text())
    (tmp / "none.toml").write_text(CONF)
    (tmp / "acl.toml").write_text(CONF.replace("[mqtt]\n", f"[mqtt]\nacl_file = {str(acl)!r}\n"))
    res: dict = {"rules": 1000}
    procs: list[subprocess.Popen] = []
    try:
        none, none_port = serve(["--no-db", "--config", str(tmp / "none.toml")], tmp / "d-none")
        with_acl, acl_port = serve(["--no-db", "--config", str(tmp / "acl.toml")], tmp / "d-acl")
        procs += [none, with_acl]
        for q in (0, 1):
            r = bench(
                ["--scenario", "fan-in", "--publishers", "10",
                 "--messages", os.environ.get("FMSG", "20000"), "--payload-size", "100",
                 "--qos", str(q), "--rounds", str(ROUNDS), "--usernames",
                 "--port", str(acl_port), "--pid", str(with_acl.pid),
                 "--compare", f"127.0.0.1:{none_port}", "--compare-pid", str(none.pid)],
            )  # fmt: skip
            res[f"fanin_q{q}"] = r
            print(compare_line(f"fan-in QoS {q} acl vs none", r), flush=True)
        for p in procs:
            p.terminate()
            p.wait(30)
        procs = []
        pg = subprocess.Popen(
            [str(VENV / "bin/python"), "-c",
             "import signal, sys, time\n"
             "from ingestd.db import EmbeddedPostgres\n"
             f"e = EmbeddedPostgres({str(tmp / 'pg')!r})\n"
             "print(e.start(), flush=True)\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
             "while True: time.sleep(1)\n"],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        procs.append(pg)
        dsn = pg.stdout.readline().strip()  # type: ignore[union-attr]
        route = (Path(__file__).resolve().parent / "ingest-bench.toml").read_text()
        (tmp / "i-none.toml").write_text(route)
        (tmp / "i-acl.toml").write_text(route + f"\n[mqtt]\nacl_file = {str(acl)!r}\n")
        brokers = {}
        for name in ("none", "acl"):
            proc, port = serve(
                ["--config", str(tmp / f"i-{name}.toml"), "--dsn", dsn], tmp / f"e-{name}"
            )
            procs.append(proc)
            brokers[name] = (proc, port)
        for q in (1, 0):
            for rnd in range(ROUNDS):
                for name in ("none", "acl") if rnd % 2 == 0 else ("acl", "none"):
                    proc, port = brokers[name]
                    r = bench(
                        ["--scenario", "ingest", "--publishers", "10",
                         "--messages", os.environ.get("IMSG", "20000"), "--qos", str(q),
                         "--usernames", "--port", str(port), "--pid", str(proc.pid),
                         "--dsn", dsn, "--table", "bench_telemetry"],
                    )  # fmt: skip
                    res.setdefault(f"ingest_q{q}_{name}", []).append(r)
                    print(
                        f"ingest QoS {q} {name}: {r.get('msgs_per_s', 0):,.0f} rows/s"
                        f" (rows {r.get('unique_rows')}, lost {r.get('lost')})",
                        flush=True,
                    )
            a = statistics.median(x["msgs_per_s"] for x in res[f"ingest_q{q}_acl"])
            b = statistics.median(x["msgs_per_s"] for x in res[f"ingest_q{q}_none"])
            print(f"ingest QoS {q} acl / none (medians): {a / b:.2f}x", flush=True)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
        OUT.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
