"""``ingestd serve --workers N``: real processes, real paho publishers, a real PostgreSQL.

Every server here is a subprocess (the parent forks its workers); what a
worker did is read from its own HTTP port (/metrics) and from the log. Loopback
only; every wait has a deadline and polls a condition.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.broker.passwords import hash_password
from ingestd.config import load_config
from ingestd.db import EmbeddedPostgres
from ingestd.errors import ConfigError
from ingestd.workers import worker_config
from mqtt_clients import WAIT, Client
from pg_fixtures import fetch_sync, wait_for, wait_rows
from server_thread import ServerThread

ROUTE = """
[server]
http_listen = "127.0.0.1:0"
[persistence]
enabled = false
[[routes]]
name = "telemetry"
topic = "company/{company_id}/machine/{machine_id}/telemetry"
table = "w_telemetry"
[routes.columns]
machine_id = "topic.machine_id"
seq = "payload.seq::bigint"
client_id = "client_id"
"""

TOPIC = "company/acme/machine/{}/telemetry"
START = 90.0  # generous: embedded PostgreSQL's initdb on a busy machine


class Served:
    """``ingestd serve --workers N`` in a subprocess, its log in a file."""

    def __init__(self, tmp_path: Path, cfg_text: str, *args: str) -> None:
        cfg = tmp_path / "w.toml"
        cfg.write_text(cfg_text)
        self.log_path = tmp_path / "serve.log"
        self.data_dir = tmp_path / "data"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingestd", "serve", "--config", str(cfg),
                 "--data-dir", str(self.data_dir), *args],
                stdout=out, stderr=out, env={k: v for k, v in os.environ.items()
                                             if not k.startswith("INGESTD_")},
            )  # fmt: skip

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, cond: Callable[[str], bool], what: str, timeout: float = START) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log
            if cond(text):
                return text
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"ingestd exited ({self.proc.returncode}) before {what}:\n{text}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n{text}")
            time.sleep(0.05)

    def wait_up(self, n: int = 2) -> None:
        self.wait_log(lambda t: len(set(re.findall(r"worker (\d+) \(pid \d+\) is up", t))) >= n,
                      f"{n} workers up")  # fmt: skip

    @property
    def mqtt_port(self) -> int:
        m = re.search(r"sharing mqtt://127\.0\.0\.1:(\d+)", self.log)
        assert m, self.log
        return int(m.group(1))

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest start."""
        return {
            int(w): int(p) for w, p in re.findall(r"worker (\d+) \(pid (\d+)\) is up", self.log)
        }

    def http_ports(self) -> dict[int, int]:
        """Worker index -> its HTTP port (of its latest start)."""
        return {int(w): int(p) for w, p in
                re.findall(r"\[worker (\d+)\]: ingestd listening on http://127\.0\.0\.1:(\d+)",
                           self.log)}  # fmt: skip

    def accepted(self, worker: int) -> int:
        """The worker's ingestd_connections_accepted_total, all protocol levels."""
        url = f"http://127.0.0.1:{self.http_ports()[worker]}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT) as r:
            text = r.read().decode()
        return sum(
            int(float(v))
            for v in re.findall(r"^ingestd_connections_accepted_total\{[^}]*\} (\S+)$", text, re.M)
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(START)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in self.worker_pids().values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(cfg_text: str = ROUTE, *args: str) -> Served:
        s = Served(tmp_path, cfg_text, *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def clients_on_both_workers(s: Served, version: int = 5, keep: int = 8) -> tuple[list[Client], int]:
    """Connect paho clients one by one until each worker has accepted one; which worker
    takes a connection is the kernel's choice (4-tuple hashing with SO_REUSEPORT, the
    first woken with one inherited socket), and on a busy host one worker can win many
    in a row, so this waits on the condition (generous deadline), not on a count. Past
    ``keep`` clients, one that lands on a worker already served is disconnected again.
    Returns the clients kept and how many were disconnected."""
    clients: list[Client] = []
    dropped = 0
    counts = (s.accepted(0), s.accepted(1))
    deadline = time.monotonic() + WAIT * 6
    while time.monotonic() < deadline:
        c = Client(s.mqtt_port, version=version)
        now = (s.accepted(0), s.accepted(1))
        fresh = now[0] > 0 and now[1] > 0 and (counts[0] == 0 or counts[1] == 0)
        if fresh or len(clients) < keep:
            clients.append(c)
        else:
            c.disconnect()
            dropped += 1
        counts = now
        if counts[0] and counts[1]:
            return clients, dropped
    raise AssertionError(f"no connection reached both workers in {WAIT * 6:.0f} s: {counts}")


def publish_all(clients: list[Client], per_client: int) -> None:
    """QoS 1 from every client, each waiting for its PUBACKs (after commit: the rows exist)."""
    infos = []
    for n, c in enumerate(clients):
        for seq in range(per_client):
            payload = json.dumps({"seq": n * 1_000_000 + seq})
            infos.append(c.c.publish(TOPIC.format(f"m{n}"), payload, 1))
    for info in infos:
        info.wait_for_publish(WAIT * 3)
        assert info.is_published()


def publish_on_both_workers(s: Served, per_client: int) -> int:
    """Clients on both workers publish, then disconnect; how many clients there were."""
    clients, _dropped = clients_on_both_workers(s)
    try:
        publish_all(clients, per_client)
    finally:
        for c in clients:
            c.disconnect()
    return len(clients)


@pytest.mark.parametrize("sockets", ["reuseport", "inherit"])
def test_two_workers_every_qos1_message_is_one_row(
    served: Callable[..., Served], pg_dsn: str, sockets: str
) -> None:
    cfg = ROUTE.replace("[server]\n", f'[server]\nworker_sockets = "{sockets}"\n')
    s = served(cfg, "--workers", "2", "--dsn", pg_dsn, "--listen", "127.0.0.1:0")
    s.wait_up()
    assert ("SO_REUSEPORT" if sockets == "reuseport" else "one inherited socket") in s.log
    clients, dropped = clients_on_both_workers(s, version=5)
    clients += [Client(s.mqtt_port, version=4) for _ in range(2)]  # 3.1.1 publishers too
    per_client = 200
    try:
        publish_all(clients, per_client)
    finally:
        for c in clients:
            c.disconnect()
    # Every PUBACK came after its commit (ack = after-commit), so the rows are there now.
    rows = fetch_sync(pg_dsn, "SELECT seq, client_id FROM w_telemetry")
    expected = {n * 1_000_000 + q for n in range(len(clients)) for q in range(per_client)}
    assert len(rows) == len(expected)  # none doubled
    assert {r["seq"] for r in rows} == expected  # none lost
    assert {r["client_id"] for r in rows} == {c.client_id for c in clients}
    both = (s.accepted(0), s.accepted(1))
    assert all(both) and sum(both) == len(clients) + dropped, both
    assert s.stop() == 0


def test_sigterm_stops_every_worker_and_the_embedded_postgresql(
    served: Callable[..., Served], tmp_path: Path
) -> None:
    """No DSN: the parent starts one embedded PostgreSQL for both workers, and stops it."""
    s = served(ROUTE, "--workers", "2", "--listen", "127.0.0.1:0")
    s.wait_up()
    pgdata = s.data_dir / "pg"
    assert s.log.count("embedded PostgreSQL started") == 1, s.log
    uri = EmbeddedPostgres(pgdata).running_uri()
    assert uri is not None
    pids = s.worker_pids()
    assert len(pids) == 2 and s.proc.pid not in pids.values()
    n = publish_on_both_workers(s, 50)
    assert len(fetch_sync(uri, "SELECT 1 FROM w_telemetry")) == 50 * n
    # Each worker keeps its spool (and overflow) in a directory of its own.
    assert (s.data_dir / "worker-0" / "spool").is_dir()
    assert (s.data_dir / "worker-1" / "spool").is_dir()
    assert s.stop() == 0
    assert all(gone(pid) for pid in pids.values())
    assert EmbeddedPostgres(pgdata).running_uri() is None
    log = s.log
    assert "worker 0 stopped (exit status 0)" in log and "worker 1 stopped (exit status 0)" in log
    assert "embedded PostgreSQL stopped" in log, log


def test_a_killed_worker_is_restarted_and_its_clients_come_back(
    served: Callable[..., Served], pg_dsn: str
) -> None:
    s = served(ROUTE, "--workers", "2", "--dsn", pg_dsn, "--listen", "127.0.0.1:0")
    s.wait_up()
    old = s.worker_pids()
    os.kill(old[1], signal.SIGKILL)
    s.wait_log(lambda t: "worker 1 died (killed by SIGKILL): restarting it" in t, "the death")
    s.wait_log(lambda t: s.worker_pids()[1] != old[1], "worker 1 restarted")
    assert s.worker_pids()[0] == old[0]  # the other worker went on
    assert gone(old[1])
    # Both serve again: a fresh set of clients reaches both and every message is a row.
    n = publish_on_both_workers(s, 50)
    wait_rows(pg_dsn, "SELECT 1 FROM w_telemetry", until=lambda r: len(r) >= 50 * n)
    assert len(fetch_sync(pg_dsn, "SELECT 1 FROM w_telemetry")) == 50 * n
    assert s.stop() == 0


def test_a_paho_client_on_a_killed_worker_resends_what_was_not_acknowledged(
    served: Callable[..., Served], pg_dsn: str
) -> None:
    """At least once: a QoS 1 message in flight on a killed worker comes again from paho."""
    s = served(ROUTE, "--workers", "2", "--dsn", pg_dsn, "--listen", "127.0.0.1:0")
    s.wait_up()
    # The table is locked: the workers cannot commit, so nothing is acknowledged.
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            c = Client(s.mqtt_port, version=4, clean_start=False, client_id="resender")
            c.publish(TOPIC.format("m0"), json.dumps({"seq": 0}), 1)  # creates the table
            before = {w: s.accepted(w) for w in (0, 1)}
            victim = next(w for w in (0, 1) if before[w])
            tr = conn.transaction()
            await tr.start()
            await conn.execute("LOCK TABLE w_telemetry IN ACCESS EXCLUSIVE MODE")
            infos = [c.c.publish(TOPIC.format("m0"), json.dumps({"seq": q}), 1)
                     for q in range(1, 21)]  # fmt: skip
            assert not any(i.is_published() for i in infos)
            os.kill(s.worker_pids()[victim], signal.SIGKILL)
            await tr.rollback()
            # paho reconnects (to either worker) and sends the unacknowledged ones again.
            deadline = time.monotonic() + WAIT * 3
            while not all(i.is_published() for i in infos):
                assert time.monotonic() < deadline, "never acknowledged after the reconnect"
                await asyncio.sleep(0.05)
            c.disconnect()
        finally:
            await conn.close()

    asyncio.run(run())
    seqs = [r["seq"] for r in fetch_sync(pg_dsn, "SELECT seq FROM w_telemetry")]
    assert set(seqs) == set(range(21))  # none lost; a duplicate would be at-least-once
    assert s.stop() == 0


def test_sighup_to_the_parent_reaches_every_worker(
    served: Callable[..., Served], tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text(f"dev:{hash_password('pw', 1000)}\n")
    cfg = ROUTE + f'[mqtt]\npassword_file = "{users}"\n'
    s = served(cfg, "--workers", "2", "--no-db", "--listen", "127.0.0.1:0")
    s.wait_up()
    reloads = r"\[worker (\d)\]: SIGHUP: reloading the password and ACL files"
    assert not re.findall(reloads, s.log)
    s.proc.send_signal(signal.SIGHUP)
    s.wait_log(lambda t: set(re.findall(reloads, t)) == {"0", "1"}, "both workers reloading")
    assert s.proc.poll() is None
    assert s.stop() == 0


def test_a_worker_that_cannot_start_stops_the_service(
    served: Callable[..., Served], tmp_path: Path
) -> None:
    """No restart loop for what a restart cannot fix: exit 2 with the worker's reason."""
    s = served(ROUTE, "--workers", "2", "--dsn", "postgresql://ingestd@127.0.0.1:1/none",
               "--listen", "127.0.0.1:0")  # fmt: skip
    assert s.proc.wait(START) == 2
    log = s.log
    assert "failed to start (exit status 2): stopping ingestd" in log, log
    assert re.search(r"ingestd: worker \d: configuration error: cannot connect to", log), log
    assert "is up" not in log


def test_workers_share_an_upstream_shared_subscription(
    served: Callable[..., Served], pg_dsn: str, tmp_path: Path
) -> None:
    """Each worker is one member of the $share group (client id suffix -w<i>)."""
    from ingestd.config import Config, MqttConfig, ServerConfig

    up = ServerThread(
        Config(server=ServerConfig(listen=["127.0.0.1:0"], http_listen=None,
                                   data_dir=str(tmp_path / "up")), mqtt=MqttConfig())
    ).start()  # fmt: skip
    try:
        cfg = ROUTE + (
            f'[[upstream]]\nname = "up"\nhost = "127.0.0.1"\nport = {up.port}\n'
            'subscriptions = ["$share/ingest/company/+/machine/+/telemetry"]\n'
            "reconnect_min_s = 0.05\nreconnect_max_s = 0.2\n"
        )
        s = served(cfg, "--workers", "2", "--dsn", pg_dsn, "--no-listen")
        s.wait_up()
        assert up.app is not None
        sessions = up.app.broker.sessions
        wait_for(lambda: up.call(lambda: {"ingestd-up-w0", "ingestd-up-w1"} <= set(sessions)),
                 "both workers at the upstream")  # fmt: skip
        pub = Client(up.port)
        try:
            infos = [pub.c.publish(TOPIC.format("m1"), json.dumps({"seq": q}), 1)
                     for q in range(400)]  # fmt: skip
            for i in infos:
                i.wait_for_publish(WAIT)
        finally:
            pub.disconnect()
        rows = wait_rows(pg_dsn, "SELECT seq FROM w_telemetry", until=lambda r: len(r) >= 400)
        assert sorted(r["seq"] for r in rows) == list(range(400))  # split, none doubled
        assert s.stop() == 0
    finally:
        up.stop()


# -- configuration ----------------------------------------------------------------------


def _load(tmp_path: Path, text: str, workers: int = 2) -> Any:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(str(p), env={}, overrides={"server": {"workers": workers}})


def test_configurations_that_cannot_work_across_workers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, "[persistence]\nenabled = true\n")
    assert str(e.value).startswith(f"{tmp_path / 'c.toml'}: persistence.enabled: must be false")
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, ROUTE + '[[upstream]]\nname = "u"\nhost = "h"\nsubscriptions = ["a/#"]\n')
    assert "upstream[0].subscriptions[0]: with server.workers = 2" in str(e.value)
    assert "$share/<group>/a/#" in str(e.value)
    with pytest.raises(ConfigError, match=r"server.workers: must be 1..256, got 0"):
        _load(tmp_path, "", workers=0)
    with pytest.raises(ConfigError, match=r"server.http_listen: .*65536 is past 65535"):
        _load(tmp_path, ROUTE.replace("127.0.0.1:0", "127.0.0.1:65535"))
    # One worker: persistence and plain subscriptions are as they always were.
    cfg = _load(tmp_path, '[[upstream]]\nname = "u"\nhost = "h"\nsubscriptions = ["a/#"]\n', 1)
    assert cfg.persistence.enabled and cfg.server.workers == 1


def test_serve_refuses_workers_with_persistence_naming_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text("[persistence]\nenabled = true\n")
    out = subprocess.run(
        [sys.executable, "-m", "ingestd", "serve", "--config", str(cfg), "--no-db",
         "--workers", "2", "--data-dir", str(tmp_path / "d")],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert (
        f"{cfg}: persistence.enabled: must be false with server.workers = 2" in out.stderr.decode()
    )


def test_worker_config_gives_each_worker_its_own_directories_ports_and_client_ids(
    tmp_path: Path,
) -> None:
    cfg = _load(
        tmp_path,
        ROUTE.replace("127.0.0.1:0", "127.0.0.1:9100")
        + f'[mqtt]\noverflow_dir = "{tmp_path}/ov"\n'
        + '[[upstream]]\nname = "u"\nhost = "h"\nsubscriptions = ["$share/g/a/#"]\n'
        + '[[upstream]]\nname = "v"\nhost = "h"\nclient_id = "mine"\n'
        + 'subscriptions = ["$share/g/b/#"]\n',
    )
    cfg.server.data_dir = str(tmp_path / "d")
    listen = {"listen": ["127.0.0.1:1883"], "tls_listen": [], "ws_listen": [], "wss_listen": []}
    w0 = worker_config(cfg, 0, "postgresql://x/y", listen, first_start=True)
    w1 = worker_config(cfg, 1, "postgresql://x/y", listen, first_start=True)
    w0_again = worker_config(cfg, 0, "postgresql://x/y", listen, first_start=False)
    assert (w0.server.data_dir, w1.server.data_dir) == (
        f"{tmp_path}/d/worker-0",
        f"{tmp_path}/d/worker-1",
    )
    assert (w0.mqtt.overflow_dir, w1.mqtt.overflow_dir) == (
        f"{tmp_path}/ov/worker-0",
        f"{tmp_path}/ov/worker-1",
    )
    assert (w0.server.http_listen, w1.server.http_listen) == ("127.0.0.1:9100", "127.0.0.1:9101")
    assert [u.client_id for u in w1.upstream] == ["ingestd-u-w1", "mine-w1"]
    assert w0.database.dsn == w1.database.dsn == "postgresql://x/y"
    # Only worker 0's first start resets the presence table.
    assert (w0.presence.reset_on_start, w1.presence.reset_on_start) == (True, False)
    assert w0_again.presence.reset_on_start is False
    # The original is untouched.
    assert cfg.server.data_dir == f"{tmp_path}/d" and cfg.upstream[0].client_id is None
