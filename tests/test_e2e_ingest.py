"""Devices publish with paho through the real broker; SQL sees the rows (real PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt

from mqtt_clients import WAIT, Client
from pg_fixtures import config_from_toml, fetch_sync
from server_thread import ServerThread

ROUTES = """
[server]
http_listen = ""
[presence]
enabled = false
[[routes]]
name = "telemetry"
topic = "company/{company_id}/machine/{machine_id}/telemetry"
table = "e2e_telemetry"
[routes.columns]
company_id = "topic.company_id"
machine_id = "topic.machine_id"
seq = "payload.seq::bigint"
battery = "payload.battery::double precision"
received_at = "received_at"

[[routes]]
name = "status"
topic = "company/{company_id}/machine/{machine_id}/telemetry"
table = "e2e_status"
kind = "latest"
key = ["machine_id"]
[routes.columns]
machine_id = "topic.machine_id"
battery = "payload.battery::double precision"
"""


def test_qos0_and_qos1_rows_and_latest_state(pg_dsn, tmp_path):
    cfg = config_from_toml(ROUTES, tmp_path, pg_dsn)
    cfg.server.listen = ["127.0.0.1:0"]
    srv = ServerThread(cfg, database=True).start()
    try:
        pub = Client(srv.port)
        for seq in range(20):
            body = json.dumps({"seq": seq, "battery": 50 + seq})
            pub.publish("company/acme/machine/m7/telemetry", body, qos=1 if seq % 2 else 0)
        pub.publish("company/acme/machine/m8/telemetry", json.dumps({"seq": 99, "battery": 1.5}), 1)
    finally:
        srv.stop()  # flushes pending batches
    rows = fetch_sync(pg_dsn, "SELECT machine_id, seq, battery FROM e2e_telemetry ORDER BY seq")
    assert [(r[0], r[1], r[2]) for r in rows] == [
        *[("m7", s, 50.0 + s) for s in range(20)],
        ("m8", 99, 1.5),
    ]
    # one message fed two routes: the latest-state table has the last reading per machine
    state = fetch_sync(pg_dsn, "SELECT machine_id, battery FROM e2e_status ORDER BY machine_id")
    assert [tuple(r) for r in state] == [("m7", 69.0), ("m8", 1.5)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigkill_loses_no_acknowledged_message(pg_dsn, tmp_path):
    """after-commit acks: whatever the publisher saw acknowledged is in the table after a crash."""
    cfg_path = tmp_path / "ingestd.toml"
    cfg_path.write_text(f'[database]\ndsn = "{pg_dsn}"\n' + ROUTES)
    port = _free_port()
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingestd", "serve", "--config", str(cfg_path),
         "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)

        # paho calls on_publish on its network thread while holding its own lock, so
        # record acknowledged mids without a lock of ours (set.add is atomic) and map
        # them to sequence numbers after the kill. Fewer than 65,535 publishes: mids
        # do not wrap.
        acked_mids: set[int] = set()
        mid_to_seq: dict[int, int] = {}
        enough = threading.Event()

        def on_publish(client, userdata, mid, rc, props):
            acked_mids.add(mid)
            if len(acked_mids) >= 300:
                enough.set()

        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="crash-dev", protocol=mqtt.MQTTv311
        )
        c.max_inflight_messages_set(50)
        c.on_publish = on_publish
        c.connect("127.0.0.1", port)
        c.loop_start()
        for seq in range(20_000):  # bounded; we stop at the kill
            body = json.dumps({"seq": seq, "battery": 1.0})
            mid_to_seq[c.publish("company/crash/machine/k1/telemetry", body, 1).mid] = seq
            if enough.is_set():
                break
            if seq % 200 == 199:
                time.sleep(0.01)  # let acks flow while still publishing
        assert enough.wait(WAIT), "no acknowledgements"
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: more publishes are in flight
        proc.wait(30)
        c.loop_stop()
        acked_now = {mid_to_seq[m] for m in set(acked_mids)}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stored = {r[0] for r in fetch_sync(pg_dsn, "SELECT seq FROM e2e_telemetry")}
    missing = acked_now - stored
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    assert len(acked_now) >= 300


class _LoopThread:
    """An event loop on its own thread (for the database proxy)."""

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


def test_after_commit_ack_withheld_during_outage_and_released_after(pg_dsn, tmp_path):
    from test_ingest_outage import CuttableProxy

    lt = _LoopThread()
    proxy = CuttableProxy(pg_dsn)
    lt.run(proxy.start())
    cfg = config_from_toml(
        ROUTES,
        tmp_path,
        proxy.dsn,
        ingest={"retry_initial_ms": 10, "retry_max_ms": 50, "spool_after_ms": 3_600_000},
        persistence={"enabled": False},
    )
    cfg.server.listen = ["127.0.0.1:0"]
    srv = ServerThread(cfg, database=True).start()
    try:
        pub = Client(srv.port)
        pub.publish("company/o/machine/m1/telemetry", json.dumps({"seq": 1, "battery": 1}), 1)
        lt.run(proxy.cut())
        info = pub.c.publish(
            "company/o/machine/m1/telemetry", json.dumps({"seq": 2, "battery": 2}), 1
        )
        stats = srv.app.ingest.stats
        deadline = time.monotonic() + WAIT
        while srv.call(lambda: stats.write_errors) == 0:
            assert time.monotonic() < deadline, "the batch was never attempted"
            time.sleep(0.02)
        # The batch holding seq 2 failed to commit: its PUBACK can only follow a commit.
        assert not info.is_published()
        lt.run(proxy.start())  # the database is back (same port)
        info.wait_for_publish(WAIT)
        assert info.is_published()
        seqs = sorted(r[0] for r in fetch_sync(pg_dsn, "SELECT seq FROM e2e_telemetry"))
        assert seqs == [1, 2]
    finally:
        srv.stop()
        lt.close()


NS_ROUTE = """
[server]
http_listen = ""
[presence]
enabled = false
[[routes]]
name = "ns"
topic = "dev/{id}/ts"
table = "e2e_ns"
[routes.columns]
id = "topic.id"
seq = "payload.seq::bigint"
ts = { source = "payload.ts", type = "timestamptz", unit = "ns" }
ms = { source = "payload.ms", type = "timestamptz", unit = "ms" }
"""


def test_integer_ns_and_ms_timestamps_are_stored_exactly(pg_dsn, tmp_path):
    """An integer count of nanoseconds becomes the microsecond PostgreSQL stores, rounded
    half-even from the integer (a float division, as before, put 1764394355323205507 ns
    at .323205 instead of .323206), whichever path converts them: the compiled batch
    path, or the per-message one (MQTT 3.1.1 here sends its messages without waiting,
    so a bad one usually shares their batch and sends its chunk through the latter)."""
    cfg = config_from_toml(NS_ROUTE, tmp_path, pg_dsn)
    cfg.server.listen = ["127.0.0.1:0"]
    srv = ServerThread(cfg, database=True).start()
    ns = [1764394355323205507, 1764394355323205500, 1764394355323206500, -1500, 999_999_999_500]
    try:
        for version in (5, 4):
            pub = Client(srv.port, version=version)
            bodies = [
                json.dumps({"seq": version * 100 + i, "ts": v, "ms": v // 10**6})
                for i, v in enumerate(ns)
            ]
            if version == 4:
                bodies.append('{"seq": "not a number"}')  # a dead letter
            infos = [pub.c.publish(f"dev/v{version}/ts", b, 1) for b in bodies]
            for info in infos:
                info.wait_for_publish(WAIT)
                assert info.is_published()
            pub.disconnect()
    finally:
        srv.stop()
    rows = fetch_sync(
        pg_dsn,
        "SELECT seq, (extract(epoch FROM ts) * 1000000)::bigint,"
        " (extract(epoch FROM ms) * 1000000)::bigint FROM e2e_ns ORDER BY seq",
    )

    def us_half_even(v: int) -> int:
        q, r = divmod(v, 1000)
        return q + 1 if r > 500 or (r == 500 and q % 2) else q

    expected = [
        (version * 100 + i, us_half_even(v), (v // 10**6) * 1000)
        for version in (4, 5)
        for i, v in enumerate(ns)
    ]
    assert [tuple(r) for r in rows] == expected
    assert us_half_even(1764394355323205507) % 10**6 == 323206
