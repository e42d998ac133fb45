"""Upstream mode end to end: ingestd consumes from another broker into PostgreSQL.

The upstream broker is a second in-process ingestd (``database=False``) or
Debian's ``mosquitto``; devices publish to it with paho; the consumer ingestd
(no MQTT listener, a real PostgreSQL) subscribes and writes rows, and
acknowledges upstream only after commit. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingestd.config import Config, MqttConfig, ServerConfig, UpstreamConfig, load_config
from ingestd.errors import ConfigError
from ingestd.upstream.acks import PUBACK, AckFailed, AckQueue
from mqtt_clients import WAIT, Client
from pg_fixtures import config_from_toml, fetch_sync, wait_for, wait_rows
from server_thread import ServerThread

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)

ROUTES = """
[server]
http_listen = ""
listen = []
[presence]
enabled = false
[persistence]
enabled = false
[[routes]]
name = "telemetry"
topic = "company/{company_id}/machine/{machine_id}/telemetry"
table = "up_telemetry"
[routes.columns]
machine_id = "topic.machine_id"
seq = "payload.seq::bigint"
client_id = "client_id"
"""

TOPIC = "company/acme/machine/{}/telemetry"


def upstream_toml(port: int, name: str = "up", **kw: Any) -> str:
    lines = [
        "[[upstream]]",
        f'name = "{name}"',
        'host = "127.0.0.1"',
        f"port = {port}",
        "reconnect_min_s = 0.05",
        "reconnect_max_s = 0.2",
    ]
    kw.setdefault("subscriptions", ["company/+/machine/+/telemetry"])
    for k, v in kw.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def upstream_broker(tmp_path: Path) -> ServerThread:
    return ServerThread(
        Config(
            server=ServerConfig(
                listen=["127.0.0.1:0"], http_listen=None, data_dir=str(tmp_path / "up")
            ),
            mqtt=MqttConfig(),
        )
    ).start()


def consumer(
    pg_dsn: str,
    tmp_path: Path,
    up_port: int,
    name: str = "c",
    sections: dict[str, dict[str, Any]] | None = None,
    **kw: Any,
) -> ServerThread:
    cfg = config_from_toml(
        ROUTES + upstream_toml(up_port, **kw),
        tmp_path,
        pg_dsn,
        name=f"{name}.toml",
        **(sections or {}),
    )
    cfg.server.data_dir = str(tmp_path / f"data-{name}")
    srv = ServerThread(cfg, database=True).start()
    wait_until_connected(srv)
    return srv


def clients(srv: ServerThread) -> list[Any]:
    assert srv.app is not None and srv.app.upstreams is not None
    return list(srv.app.upstreams.clients)


def wait_until_connected(srv: ServerThread, n: int = 1) -> None:
    wait_for(
        lambda: srv.call(lambda: sum(u.connects for u in clients(srv)) >= n
                         and all(u.connected for u in clients(srv))),
        "the upstream connection",
        timeout=WAIT,
    )  # fmt: skip


def publish_seqs(port: int, seqs: range, machine: str = "m1", version: int = 5) -> None:
    pub = Client(port, version=version)
    try:
        for s in seqs:
            pub.c.publish(TOPIC.format(machine), json.dumps({"seq": s}), 1)
        pub.publish(TOPIC.format(machine), json.dumps({"seq": -1}), 1)  # waits: all sent
    finally:
        pub.disconnect()


def seqs_in_table(dsn: str) -> list[int]:
    return [r[0] for r in fetch_sync(dsn, "SELECT seq FROM up_telemetry WHERE seq >= 0")]


def wait_seqs(dsn: str, expected: set[int]) -> list[int]:
    rows = wait_rows(
        dsn,
        "SELECT seq FROM up_telemetry WHERE seq >= 0",
        until=lambda rows: {r[0] for r in rows} >= expected,
        timeout=WAIT * 2,
    )
    return [r[0] for r in rows]


# -- against a second ingestd ---------------------------------------------------


@pytest.mark.parametrize("protocol", [5, 4])
def test_every_qos1_message_becomes_a_row(pg_dsn: str, tmp_path: Path, protocol: int) -> None:
    up = upstream_broker(tmp_path)
    srv = consumer(pg_dsn, tmp_path, up.port, protocol=protocol)
    try:
        assert srv.app is not None and not any(b.kind == "mqtt" for b in srv.app.bound)
        publish_seqs(up.port, range(500))
        got = wait_seqs(pg_dsn, set(range(500)))
        assert len(got) == 500  # no reconnect happened: no duplicate either
        owners = {r[0] for r in fetch_sync(pg_dsn, "SELECT DISTINCT client_id FROM up_telemetry")}
        assert owners == {"up"}  # the upstream's name (MQTT does not carry the publisher's id)
        u = clients(srv)[0]
        wait_for(lambda: srv.call(lambda: u.acks_pending) == 0, "acks to drain")
        assert srv.call(lambda: u.messages_received) == 501
        # every ack reached the upstream: its session for us has nothing in flight
        sess = up.call(lambda: up.app.broker.sessions["ingestd-up"])  # type: ignore[union-attr]
        wait_for(lambda: up.call(lambda: len(sess.inflight)) == 0, "upstream inflight empty")
        text = srv.call(lambda: _metrics_text(srv))
        assert 'ingestd_upstream_connected{upstream="up"} 1.0' in text
        assert 'ingestd_upstream_messages_received_total{upstream="up"} 501.0' in text
    finally:
        srv.stop()
        up.stop()


def test_qos2_rows_and_the_upstream_flow_completes(pg_dsn: str, tmp_path: Path) -> None:
    up = upstream_broker(tmp_path)
    srv = consumer(pg_dsn, tmp_path, up.port, qos=2)
    try:
        pub = Client(up.port)
        try:
            for s in range(200):
                pub.c.publish(TOPIC.format("q2"), json.dumps({"seq": s}), 2)
            pub.publish(TOPIC.format("q2"), json.dumps({"seq": -1}), 2)
        finally:
            pub.disconnect()
        got = wait_seqs(pg_dsn, set(range(200)))
        assert len(got) == 200  # routed once each
        sess = up.call(lambda: up.app.broker.sessions["ingestd-up"])  # type: ignore[union-attr]
        # PUBREC after commit, PUBREL, PUBCOMP: nothing left in flight at the upstream
        wait_for(lambda: up.call(lambda: len(sess.inflight)) == 0, "the QoS 2 flows to complete")
    finally:
        srv.stop()
        up.stop()


@pytest.mark.parametrize("local_publish", [True, False])
def test_local_publish_switch(pg_dsn: str, tmp_path: Path, local_publish: bool) -> None:
    up = upstream_broker(tmp_path)
    srv = consumer(
        pg_dsn,
        tmp_path,
        up.port,
        sections={"server": {"listen": ["127.0.0.1:0"]}},
        local_publish=local_publish,
    )
    sub = Client(srv.port)
    try:
        sub.subscribe("company/#", qos=1)
        publish_seqs(up.port, range(3))
        got = wait_seqs(pg_dsn, {0, 1, 2})  # the routes get them either way
        assert len(got) == 3
        if local_publish:
            seen = [json.loads(m.payload)["seq"] for m in sub.expect(4)]
            assert seen == [0, 1, 2, -1]
        else:
            sub.expect_nothing()
    finally:
        sub.disconnect()
        srv.stop()
        up.stop()


def test_v3_stops_reading_at_receive_maximum_and_resumes(pg_dsn: str, tmp_path: Path) -> None:
    """3.1.1 has no Receive Maximum: the upstream sends up to its own window; we pause reading."""
    up = upstream_broker(tmp_path)
    srv = consumer(pg_dsn, tmp_path, up.port, protocol=4, receive_maximum=4)
    try:
        u = clients(srv)[0]
        high = [0]

        def sample() -> None:  # highest acks_pending seen, sampled on the consumer's loop
            high[0] = max(high[0], u.acks_pending)
            if u.conn is not None:
                srv.loop.call_later(0.001, sample)

        srv.call(sample)
        publish_seqs(up.port, range(1000), version=4)
        got = wait_seqs(pg_dsn, set(range(1000)))
        assert len(got) == 1000
        assert srv.call(lambda: u.read_pauses) > 0  # the bound was hit, and reading resumed
        assert high[0] > 0
    finally:
        srv.stop()
        up.stop()


def _metrics_text(srv: ServerThread) -> str:
    from prometheus_client import generate_latest

    assert srv.app is not None
    return generate_latest(srv.app.registry).decode()


def test_persistent_session_keeps_messages_while_consumer_is_down(
    pg_dsn: str, tmp_path: Path
) -> None:
    up = upstream_broker(tmp_path)
    srv = consumer(pg_dsn, tmp_path, up.port, session_expiry=600)
    try:
        publish_seqs(up.port, range(100))
        wait_seqs(pg_dsn, set(range(100)))
    finally:
        srv.stop()
    try:
        publish_seqs(up.port, range(100, 300))  # nobody consumes: the upstream session queues
        sess = up.call(lambda: up.app.broker.sessions["ingestd-up"])  # type: ignore[union-attr]
        assert up.call(lambda: sess.connection is None)
        assert set(seqs_in_table(pg_dsn)) == set(range(100))
        srv = consumer(pg_dsn, tmp_path, up.port, session_expiry=600)
        try:
            got = wait_seqs(pg_dsn, set(range(300)))
            assert len(got) == 300  # graceful stop: every ack went out, nothing redelivered
        finally:
            srv.stop()
    finally:
        up.stop()


class _Locker:
    """Holds ACCESS EXCLUSIVE on a table from its own thread/loop, so COPY into it blocks."""

    def __init__(self, dsn: str, table: str) -> None:
        self.loop = asyncio.new_event_loop()
        import threading

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conn: Any = self._run(asyncpg.connect(dsn))
        self._run(self.conn.execute("BEGIN"))
        self._run(self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def release(self) -> None:
        self._run(self.conn.execute("COMMIT"))
        self._run(self.conn.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


def test_ack_only_after_commit_and_redelivered_when_unacked(pg_dsn: str, tmp_path: Path) -> None:
    up = upstream_broker(tmp_path)
    srv = consumer(pg_dsn, tmp_path, up.port)
    locker = None
    try:
        u = clients(srv)[0]
        sess = up.call(lambda: up.app.broker.sessions["ingestd-up"])  # type: ignore[union-attr]
        locker = _Locker(pg_dsn, "up_telemetry")  # the COPY cannot finish
        pub = Client(up.port)
        pub.publish(TOPIC.format("m1"), json.dumps({"seq": 7}), 1)  # upstream acked the device
        pub.disconnect()
        wait_for(lambda: srv.call(lambda: u.acks_pending) == 1, "the message at the consumer")
        # not committed -> not acknowledged: the upstream still holds it in flight
        assert up.call(lambda: len(sess.inflight)) == 1
        assert srv.call(lambda: u.acks_pending) == 1
        # The consumer's connection drops (as in a crash of the link): the upstream
        # redelivers the unacknowledged message to the reconnecting consumer.
        before = srv.call(lambda: u.messages_received)
        srv.call(lambda: u.conn.fail("test: connection dropped"))
        wait_until_connected(srv, n=2)
        wait_for(lambda: srv.call(lambda: u.messages_received) > before, "the redelivery")
        assert up.call(lambda: len(sess.inflight)) == 1
        locker.release()
        locker = None
        got = wait_seqs(pg_dsn, {7})
        assert set(got) == {7} and 1 <= len(got) <= 2  # at least once: the first copy may land
        wait_for(lambda: up.call(lambda: len(sess.inflight)) == 0, "the PUBACK after commit")
        wait_for(lambda: srv.call(lambda: u.acks_pending) == 0, "nothing owed upstream")
    finally:
        if locker is not None:
            locker.release()
        srv.stop()
        up.stop()


def test_shared_group_splits_the_stream_between_two_consumers(pg_dsn: str, tmp_path: Path) -> None:
    up = upstream_broker(tmp_path)
    shared = {"subscriptions": ["$share/ingest/company/+/machine/+/telemetry"]}
    a = consumer(pg_dsn, tmp_path, up.port, name="a", client_id="ingest-a", **shared)
    b = consumer(pg_dsn, tmp_path, up.port, name="b", client_id="ingest-b", **shared)
    try:
        publish_seqs(up.port, range(1000))
        got = wait_seqs(pg_dsn, set(range(1000)))
        # no reconnect in this run, so at-least-once produced no duplicate
        assert len(got) == 1000
        na = a.call(lambda: clients(a)[0].messages_received)
        nb = b.call(lambda: clients(b)[0].messages_received)
        assert na + nb == 1001 and na > 100 and nb > 100, (na, nb)
    finally:
        a.stop()
        b.stop()
        up.stop()


def test_sigkill_mid_stream_loses_nothing_the_upstream_held(pg_dsn: str, tmp_path: Path) -> None:
    """A crashed consumer: what it had not acknowledged comes back from the upstream session."""
    up = upstream_broker(tmp_path)
    cfg = tmp_path / "consumer.toml"
    # A small window and batches: the stream takes many commits, so the kill lands mid-stream.
    cfg.write_text(
        f'[database]\ndsn = "{pg_dsn}"\n'
        + ROUTES
        + "[ingest]\nbatch_rows = 5\n"
        + upstream_toml(up.port, receive_maximum=5, session_expiry=600)
    )
    total = 5000

    def start() -> subprocess.Popen[bytes]:
        import sys

        return subprocess.Popen(
            [sys.executable, "-m", "ingestd", "serve", "--config", str(cfg), "--no-listen",
             "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    proc = start()
    try:
        sessions = up.call(lambda: up.app.broker.sessions)  # type: ignore[union-attr]
        wait_for(lambda: up.call(lambda: "ingestd-up" in sessions), "the consumer's session")
        publish_seqs(up.port, range(total))  # the upstream acked all; it holds them for us
        wait_rows(pg_dsn, "SELECT count(*) FROM up_telemetry", until=lambda r: r[0][0] >= 200)
        proc.kill()  # SIGKILL: no DISCONNECT, acks owed are never sent
        proc.wait(WAIT)
        at_kill = len(set(seqs_in_table(pg_dsn)))
        assert at_kill < total, "the stream ended before the kill: the test proves nothing"
        proc = start()
        got = wait_seqs(pg_dsn, set(range(total)))
        assert len(set(got)) == total
        # duplicates only from rows committed but not yet acknowledged at the kill
        assert len(got) - total <= 2 * 5, len(got) - total
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(WAIT)
        up.stop()


def test_database_outage_holds_acks_and_loses_nothing(pg_dsn: str, tmp_path: Path) -> None:
    from test_e2e_ingest import _LoopThread
    from test_ingest_outage import CuttableProxy

    lt = _LoopThread()
    proxy = CuttableProxy(pg_dsn)
    lt.run(proxy.start())
    up = upstream_broker(tmp_path)
    srv = consumer(
        proxy.dsn,
        tmp_path,
        up.port,
        sections={
            "ingest": {"retry_initial_ms": 10, "retry_max_ms": 50, "spool_after_ms": 3_600_000}
        },
    )
    try:
        u = clients(srv)[0]
        sess = up.call(lambda: up.app.broker.sessions["ingestd-up"])  # type: ignore[union-attr]
        publish_seqs(up.port, range(50))
        wait_seqs(pg_dsn, set(range(50)))
        lt.run(proxy.cut())
        publish_seqs(up.port, range(50, 150))
        stats = srv.app.ingest.stats  # type: ignore[union-attr]
        wait_for(lambda: srv.call(lambda: stats.write_errors) > 0, "a failed write")
        # nothing committed -> nothing acknowledged: the upstream holds them in flight
        assert srv.call(lambda: u.acks_pending) > 0
        assert up.call(lambda: len(sess.inflight)) > 0
        lt.run(proxy.start())  # PostgreSQL reachable again (same port)
        got = wait_seqs(pg_dsn, set(range(150)))
        assert len(got) == 150
        wait_for(lambda: up.call(lambda: len(sess.inflight)) == 0, "the PUBACKs after commit")
    finally:
        srv.stop()
        up.stop()
        lt.close()


# -- against Debian's mosquitto -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mosquitto() -> Iterator[int]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does as root)")
    with tempfile.TemporaryDirectory(prefix="ingestd-up-") as d:
        os.chmod(d, 0o755)  # readable after mosquitto drops root privileges
        port = _free_port()
        conf = Path(d) / "m.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\nmax_inflight_messages 1000\n"
        )
        log = Path(d) / "m.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + WAIT
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "mosquitto did not listen"
                    time.sleep(0.02)  # polling for the listener
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("protocol", [5, 4])
def test_mosquitto_upstream(pg_dsn: str, tmp_path: Path, mosquitto: int, protocol: int) -> None:
    srv = consumer(pg_dsn, tmp_path, mosquitto, protocol=protocol)
    try:
        publish_seqs(mosquitto, range(500), version=protocol)
        got = wait_seqs(pg_dsn, set(range(500)))
        assert len(got) == 500
    finally:
        srv.stop()
    # persistent session at mosquitto: published while we are away, ingested on return
    publish_seqs(mosquitto, range(500, 700), version=protocol)
    srv = consumer(pg_dsn, tmp_path, mosquitto, protocol=protocol)
    try:
        wait_seqs(pg_dsn, set(range(700)))
    finally:
        srv.stop()


# -- pieces -----------------------------------------------------------------------


def test_ack_queue_releases_in_order_and_stops_at_a_failure() -> None:
    loop = asyncio.new_event_loop()
    try:
        ready: list[int] = []
        q = AckQueue(5, lambda: ready.append(1))
        f1, f2 = loop.create_future(), loop.create_future()
        q.add(f1, PUBACK, 1)
        q.add(None, PUBACK, 2)
        q.add(f2, PUBACK, 3)
        assert q.release() == b"" and q.pending == 3
        f2.set_result(None)
        assert q.release() == b""  # 1 still waits; 2 and 3 stay behind it
        f1.set_result(None)
        loop.run_until_complete(asyncio.sleep(0))
        assert ready
        assert q.release() == bytes([0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 0, 3])
        assert q.pending == 0
        f3 = loop.create_future()
        q.add(f3, PUBACK, 4)
        f3.set_exception(RuntimeError("db down"))
        with pytest.raises(AckFailed):
            q.release()
        assert q.pending == 1
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("entry", "key", "reason"),
    [
        ({"subscriptions": []}, "upstream[0].subscriptions", "at least one"),
        ({"subscriptions": ["a/#/b"]}, "upstream[0].subscriptions[0]", "invalid topic filter"),
        ({"port": 0}, "upstream[0].port", "1..65535"),
        ({"cert_file": "c.pem", "tls": True}, "upstream[0].cert_file", "go together"),
        ({"ca_file": "ca.pem"}, "upstream[0].tls", "tls = false"),
        ({"reconnect_min_s": 5, "reconnect_max_s": 1}, "upstream[0].reconnect_max_s", ">="),
        ({"receive_maximum": 0}, "upstream[0].receive_maximum", "1..65535"),
        ({"protocol": 3}, "upstream[0].protocol", ""),
    ],
)
def test_config_errors_name_file_key_and_reason(
    tmp_path: Path, entry: dict[str, Any], key: str, reason: str
) -> None:
    p = tmp_path / "c.toml"
    fields = {"name": "u", "host": "h", "subscriptions": ["a/#"], **entry}
    p.write_text("[[upstream]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    with pytest.raises(ConfigError) as ei:
        load_config(str(p), env={})
    assert ei.value.key == key, str(ei.value)
    assert reason in str(ei.value) and str(p) in str(ei.value)


def test_config_duplicate_names_and_defaults(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    one = '[[upstream]]\nname = "u"\nhost = "h"\nsubscriptions = ["a/#"]\n'
    p.write_text(one + one)
    with pytest.raises(ConfigError, match="duplicate upstream name"):
        load_config(str(p), env={})
    p.write_text(one)
    (u,) = load_config(str(p), env={}).upstream
    assert u == UpstreamConfig(name="u", host="h", subscriptions=["a/#"])
    assert (u.port, u.protocol, u.qos, u.clean_start, u.local_publish) == (1883, 5, 1, False, True)


def test_serve_no_listen_runs_a_pure_consumer(tmp_path: Path) -> None:
    """`ingestd serve --no-listen`: no MQTT listener, ready on /readyz, upstream connected."""
    import signal
    import sys
    import urllib.request

    up = upstream_broker(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[presence]\nenabled = false\n" + upstream_toml(up.port))
    http = _free_port()
    base = [sys.executable, "-m", "ingestd", "serve", "--data-dir", str(tmp_path / "d"),
            "--config", str(cfg), "--no-db"]  # fmt: skip
    bad = subprocess.run([*base, "--no-listen", "--listen", "127.0.0.1:1"], capture_output=True)
    assert bad.returncode == 2 and b"exclude each other" in bad.stderr
    proc = subprocess.Popen(
        [*base, "--no-listen", "--http-listen", f"127.0.0.1:{http}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        sessions = up.call(lambda: up.app.broker.sessions)  # type: ignore[union-attr]
        wait_for(lambda: up.call(lambda: "ingestd-up" in sessions), "the consumer's session")
        url = f"http://127.0.0.1:{http}/readyz"
        with urllib.request.urlopen(url, timeout=WAIT) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=WAIT) as r:
            assert b'ingestd_upstream_connected{upstream="up"} 1.0' in r.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "upstream connected: up at 127.0.0.1" in err, err
        assert "upstream disconnected: up" in err and "disconnected by ingestd" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        up.stop()


def _self_signed(d: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d / "cert.pem", d / "key.pem"


def test_tls_upstream_verified_and_refused(pg_dsn: str, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    up_cfg = Config(
        server=ServerConfig(
            listen=["127.0.0.1:0"],
            tls_listen=["127.0.0.1:0"],
            tls_certfile=str(cert),
            tls_keyfile=str(key),
            http_listen=None,
            data_dir=str(tmp_path / "up"),
        )
    )
    up = ServerThread(up_cfg).start()
    assert up.app is not None
    tls_port = up.app.port("mqtts")
    try:
        # The system trust store does not know our self-signed certificate: refused, retried.
        cfg = config_from_toml(
            ROUTES + upstream_toml(tls_port, tls=True), tmp_path, pg_dsn, name="bad.toml"
        )
        cfg.server.data_dir = str(tmp_path / "data-bad")
        bad = ServerThread(cfg, database=True).start()
        try:
            u = clients(bad)[0]
            wait_for(lambda: bad.call(lambda: u.reconnects) >= 1, "a retry")
            assert not bad.call(lambda: u.connected)
            assert "certificate verify failed" in bad.call(lambda: u.last_error).lower()
        finally:
            bad.stop()
        srv = consumer(pg_dsn, tmp_path, tls_port, tls=True, ca_file=str(cert))
        try:
            publish_seqs(up.port, range(100))
            assert len(wait_seqs(pg_dsn, set(range(100)))) == 100
        finally:
            srv.stop()
    finally:
        up.stop()
