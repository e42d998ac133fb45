"""More end to end: paho clients through the real broker, rows checked with SQL.

* a PostgreSQL restart in the middle of a QoS 1 stream (its own embedded server);
* device presence rows for connect, DISCONNECT, a lost connection with a will,
  DISCONNECT with will, and a keepalive timeout;
* dead letters for bad payloads, with the connection staying up;
* column sources: MQTT 5 user property, username (password file), client id,
  and a ``latest`` table updated by two successive messages.

Nothing here sleeps to assert: conditions are polled with a bounded deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

import rawmqtt
from mqtt_clients import WAIT, Client, props
from pg import RestartablePostgres
from pg_fixtures import config_from_toml, fetch_sync, wait_for, wait_rows
from server_thread import ServerThread

pytestmark = pytest.mark.pg


def start_server(text: str, tmp_path: Path, dsn: str, **sections: dict[str, Any]) -> ServerThread:
    cfg = config_from_toml(text, tmp_path, dsn, **sections)
    cfg.server.listen = ["127.0.0.1:0"]
    return ServerThread(cfg, database=True).start()


# ----------------------------------------------------------------------
# 1. PostgreSQL restarts in the middle of a stream
# ----------------------------------------------------------------------

RESTART = """
[server]
http_listen = ""
[[routes]]
name = "stream"
topic = "plant/{device}/seq"
table = "stream_rows"
[routes.columns]
device = "topic.device"
seq = "payload.seq::bigint"
received_at = "received_at"
"""

N_MESSAGES = 2000
RESTART_AFTER_ACKS = 400


@pytest.mark.skipif(
    bool(os.environ.get("INGESTD_TEST_DSN")),
    reason="restarts an embedded PostgreSQL of its own; not run against INGESTD_TEST_DSN",
)
@pytest.mark.parametrize(
    ("stop_mode", "spool_after_ms"),
    [
        ("fast", 600_000),  # clean shutdown; failed batches are retried from memory
        ("immediate", 0),  # like a crash; the first failure sends batches to the spool
    ],
    ids=["fast-retry", "immediate-spool"],
)
def test_postgres_restart_mid_stream_loses_no_acknowledged_message(
    tmp_path: Path, stop_mode: str, spool_after_ms: int, record_property: Any
) -> None:
    pgs = RestartablePostgres(tmp_path / "pg")
    dsn = pgs.start()
    srv: ServerThread | None = None
    try:
        srv = start_server(
            RESTART,
            tmp_path,
            dsn,
            ingest={
                "ack": "after-commit",
                "retry_initial_ms": 20,
                "retry_max_ms": 200,
                "spool_after_ms": spool_after_ms,
            },
            presence={"enabled": False},
            persistence={"enabled": False},
        )
        engine = srv.app.ingest  # type: ignore[union-attr]

        # Record every write attempt's sequence numbers and whether it raised: a
        # duplicate row is allowed only for a message in a batch whose write failed
        # (the commit may have happened with its reply lost) and was written again.
        failed_seqs: set[int] = set()
        committed_attempts: list[int] = []
        # Closed while PostgreSQL is being stopped, so the stream cannot finish before
        # the stop takes effect (pg_ctl is slow on a busy machine): the restart is
        # mid-stream by construction, not by timing.
        gate = asyncio.Event()
        gate.set()

        def instrument() -> None:
            writer = engine.writer
            original = writer.write

            async def write(groups: list[Any], origins: Any = None) -> int:
                await gate.wait()
                seqs = [
                    rec[g.columns.index("seq")]
                    for g in groups
                    if "seq" in g.columns
                    for rec in g.records
                ]
                try:
                    dead = await original(groups, origins)
                except BaseException:
                    failed_seqs.update(seqs)
                    raise
                committed_attempts.append(len(seqs))
                return dead

            writer.write = write

        srv.call(instrument)

        # paho calls on_publish on its network thread: set.add/list.append are atomic.
        acked_mids: set[int] = set()
        disconnects: list[Any] = []
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="restart-dev", protocol=mqtt.MQTTv311
        )
        # A small window keeps the stream going for a while with after-commit acks.
        c.max_inflight_messages_set(20)
        c.max_queued_messages_set(0)
        c.on_publish = lambda cl, u, mid, rc, p: acked_mids.add(mid)
        c.on_disconnect = lambda cl, u, flags, rc, p: disconnects.append(rc)
        connected = threading.Event()
        c.on_connect = lambda cl, u, flags, rc, p: connected.set()
        c.connect("127.0.0.1", srv.port, keepalive=60)
        c.loop_start()
        try:
            assert connected.wait(WAIT), "no CONNACK"
            mid_to_seq: dict[int, int] = {}
            for seq in range(N_MESSAGES):  # fewer than 65,535: mids do not wrap
                info = c.publish("plant/p1/seq", json.dumps({"seq": seq}), 1)
                assert info.rc == mqtt.MQTT_ERR_SUCCESS
                mid_to_seq[info.mid] = seq

            wait_for(lambda: len(acked_mids) >= RESTART_AFTER_ACKS, "the first acknowledgements")
            srv.call(gate.clear)
            pgs.stop_server(stop_mode)
            acked_before = len(acked_mids)
            srv.call(gate.set)
            # Keep PostgreSQL down until a batch has actually failed against it.
            wait_for(lambda: bool(failed_seqs), "a write attempt to fail during the outage", 30)
            pgs.start_server()
            wait_for(
                lambda: len(acked_mids) == N_MESSAGES,
                f"all {N_MESSAGES} acknowledgements after the restart",
                60,
            )
            # The broker connection never dropped, so paho re-sent nothing.
            assert disconnects == []
            assert c.is_connected()
            # A spooled batch is acknowledged before it reaches the table: wait for
            # the replay to drain the spool (else it would wait for the next start).
            wait_for(
                lambda: srv.call(lambda: engine.spool.empty and not engine._spool_active),
                "the spool to be replayed",
                60,
            )
        finally:
            c.disconnect()
            c.loop_stop()
        stats = engine.stats
        srv.stop()
        srv = None
    finally:
        if srv is not None:
            srv.stop()
        try:
            rows = fetch_sync(
                dsn,
                "SELECT seq, count(*) AS n, count(DISTINCT received_at) AS receipts "
                "FROM stream_rows GROUP BY seq",
            )
        finally:
            pgs.close()

    acked = {mid_to_seq[m] for m in acked_mids}
    assert acked_before < N_MESSAGES, "the restart did not happen mid-stream"
    assert acked == set(range(N_MESSAGES))
    stored = {r["seq"] for r in rows}
    missing = acked - stored
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    assert stored == acked, f"rows for messages never sent: {sorted(stored - acked)[:5]}"
    dups = {r["seq"]: r["n"] for r in rows if r["n"] > 1}
    # At least once, and only where it may happen: a message in a failed write attempt
    # (written again by the retry or the spool replay), never a second receipt.
    assert set(dups) <= failed_seqs, f"unexplained duplicates: {sorted(set(dups) - failed_seqs)}"
    assert all(r["receipts"] == 1 for r in rows), "a message was received twice"
    # The engine stops writing a batch after its first successful attempt.
    assert sum(committed_attempts) == N_MESSAGES
    assert stats.write_errors > 0
    if spool_after_ms == 0:
        assert stats.batches_spooled > 0 and stats.rows_replayed > 0
    record_property("duplicates", len(dups))
    record_property("rows_in_failed_attempts", len(failed_seqs))
    print(
        f"\n{stop_mode}: {len(acked)} acked, {sum(r['n'] for r in rows)} rows, "
        f"{len(dups)} duplicated seqs, {len(failed_seqs)} seqs in failed attempts, "
        f"{stats.write_errors} write errors, {stats.batches_spooled} batches spooled"
    )


# ----------------------------------------------------------------------
# 2. Presence
# ----------------------------------------------------------------------

PRESENCE = """
[server]
http_listen = ""
[presence]
enabled = true
flush_interval_ms = 20
[[routes]]
name = "wills"
topic = "pres/will/{device}"
table = "pres_wills"
[routes.columns]
device = "topic.device"
publisher = "client_id"
body = "payload::text"
"""

PRESENCE_ROW = (
    "SELECT client_id, username, online, connected_at, last_seen, disconnect_reason, "
    "peer, protocol_version FROM device_presence WHERE client_id = $1"
)


def presence_row(dsn: str, client_id: str, online: bool) -> dict[str, Any]:
    rows = wait_rows(dsn, PRESENCE_ROW, client_id, until=lambda r: r and r[0]["online"] is online)
    return dict(rows[0])


def local_peer(c: Client) -> str:
    host, port = c.c.socket().getsockname()[:2]
    return f"{host}:{port}"


def test_presence_rows_through_the_broker(pg_dsn: str, tmp_path: Path) -> None:
    srv = start_server(PRESENCE, tmp_path, pg_dsn, persistence={"enabled": False})
    try:
        # (a) a connect: online, with client id, username, peer and protocol version
        a = Client(srv.port, client_id="pres-a", username="alice", password="x")
        a_peer = local_peer(a)
        row = presence_row(pg_dsn, "pres-a", True)
        assert row["username"] == "alice"
        assert row["peer"] == a_peer
        assert row["protocol_version"] == 5
        assert row["disconnect_reason"] is None
        assert row["connected_at"] is not None

        # (b) a clean DISCONNECT: offline, reason "normal"; the will is discarded
        will_b = ("pres/will/b", b"b-gone", 1, False)
        b = Client(srv.port, client_id="pres-b", version=4, will=will_b)
        b_peer = local_peer(b)
        presence_row(pg_dsn, "pres-b", True)
        b.disconnect()
        row = presence_row(pg_dsn, "pres-b", False)
        assert row["disconnect_reason"] == "normal"
        assert (row["username"], row["peer"], row["protocol_version"]) == (None, b_peer, 4)
        assert row["last_seen"] >= row["connected_at"]

        # (c) the socket closes without DISCONNECT: offline, "connection_lost", will published
        c = Client(srv.port, client_id="pres-c", will=("pres/will/c", b"c-gone", 1, False))
        presence_row(pg_dsn, "pres-c", True)
        c.drop()
        row = presence_row(pg_dsn, "pres-c", False)
        assert row["disconnect_reason"] == "connection_lost"

        # (c') DISCONNECT with reason 0x04 (disconnect with will): offline, "will"
        d = Client(srv.port, client_id="pres-d", will=("pres/will/d", b"d-gone", 1, False))
        presence_row(pg_dsn, "pres-d", True)
        d.disconnect(reason_code=0x04)
        row = presence_row(pg_dsn, "pres-d", False)
        assert row["disconnect_reason"] == "will"

        # (d) keepalive 1 s and then silence: the broker closes it after 1.5 s
        raw = rawmqtt.Raw(srv.port)
        raw.send(rawmqtt.connect_v4("pres-ka", keepalive=1))
        first, body = raw.read_packet()
        assert (first, body) == (0x20, b"\x00\x00")  # CONNACK, accepted
        assert raw.read_until_closed() == []  # closed by the server, nothing else sent
        row = presence_row(pg_dsn, "pres-ka", False)
        assert row["disconnect_reason"] == "keepalive_timeout"
        assert row["protocol_version"] == 4

        # (a) is still online: nothing above touched other clients' rows
        assert presence_row(pg_dsn, "pres-a", True)["peer"] == a_peer
    finally:
        srv.stop()  # flushes batches and presence

    # Shutting down marks the client still connected offline.
    row = dict(fetch_sync(pg_dsn, PRESENCE_ROW, "pres-a")[0])
    assert (row["online"], row["disconnect_reason"]) == (False, "server_shutdown")
    # Wills: published for the lost connection and DISCONNECT 0x04, not for a clean DISCONNECT.
    wills = fetch_sync(pg_dsn, "SELECT device, publisher, body FROM pres_wills ORDER BY device")
    assert [tuple(r) for r in wills] == [("c", "pres-c", "c-gone"), ("d", "pres-d", "d-gone")]


# ----------------------------------------------------------------------
# 3. Dead letters
# ----------------------------------------------------------------------

DEAD = """
[server]
http_listen = ""
[presence]
enabled = false
[[routes]]
name = "readings"
topic = "dl/{device}/data"
table = "dl_readings"
[routes.columns]
device = "topic.device"
seq = "payload.seq::bigint"
v = "payload.v::double precision"
"""


def test_dead_letters_through_the_broker_keep_the_connection(pg_dsn: str, tmp_path: Path) -> None:
    srv = start_server(DEAD, tmp_path, pg_dsn, persistence={"enabled": False})
    try:
        pub = Client(srv.port, client_id="dl-dev")
        # QoS 1 with after-commit acks: each returns once its batch (and its
        # dead letters, same transaction) is committed.
        pub.publish("dl/d1/data", json.dumps({"seq": 1, "v": 1.5}), 1)
        pub.publish("dl/d1/data", b"{not json", 1)
        pub.publish("dl/d1/data", json.dumps({"seq": 2, "v": "high"}), 1)
        pub.publish("dl/d1/data", json.dumps({"seq": 3, "v": 3.5}), 1)
        # The connection is still up and a later message is stored.
        assert pub.disconnects.empty() and pub.c.is_connected()
        pub.publish("dl/d2/data", json.dumps({"seq": 4, "v": 4.5}), 1)
        assert pub.disconnects.empty()

        rows = fetch_sync(pg_dsn, "SELECT device, seq, v FROM dl_readings ORDER BY seq")
        assert [tuple(r) for r in rows] == [("d1", 1, 1.5), ("d1", 3, 3.5), ("d2", 4, 4.5)]
        dls = fetch_sync(
            pg_dsn,
            "SELECT route, topic, client_id, payload, error, received_at FROM dead_letters "
            "ORDER BY received_at",
        )
        assert [(r["route"], r["topic"], r["client_id"], r["payload"]) for r in dls] == [
            ("readings", "dl/d1/data", "dl-dev", b"{not json"),
            ("readings", "dl/d1/data", "dl-dev", b'{"seq": 2, "v": "high"}'),
        ]
        assert "not valid JSON" in dls[0]["error"]
        assert "$.v" in dls[1]["error"]
        assert all(r["received_at"] is not None for r in dls)
        assert srv.call(lambda: srv.app.ingest.stats.dead_letters) == 2  # type: ignore[union-attr]
        # Counted by route and reason (the labels of ingestd_ingest_dead_letters_total).
        counts = srv.call(lambda: dict(srv.app.ingest.dead_log.counts))  # type: ignore[union-attr]
        assert counts == {("readings", "invalid_json"): 1, ("readings", "conversion"): 1}
        pub.disconnect()
    finally:
        srv.stop()


# ----------------------------------------------------------------------
# 4. Column sources: user property, username, client id; latest upserts
# ----------------------------------------------------------------------

SOURCES = """
[server]
http_listen = ""
[presence]
enabled = false
[[routes]]
name = "events"
topic = "src/{device}/event"
table = "src_events"
[routes.columns]
device = "topic.device"
seq = "payload.seq::bigint"
fw = "user_property.fw"
build = "user_property.build::integer"
publisher = "client_id"
login = "username"

[[routes]]
name = "state"
topic = "src/{device}/event"
table = "src_state"
kind = "latest"
key = ["device"]
[routes.columns]
device = "topic.device"
seq = "payload.seq::bigint"
fw = "user_property.fw"
login = "username"
publisher = "client_id"
"""


def test_column_sources_through_the_broker(pg_dsn: str, tmp_path: Path) -> None:
    # The password file exactly as an operator writes it.
    out = CliRunner().invoke(_cli(), ["passwd", "alice", "--password", "s3cret"])
    assert out.exit_code == 0, out.output
    pw = tmp_path / "passwd"
    pw.write_text(out.output)

    srv = start_server(
        SOURCES,
        tmp_path,
        pg_dsn,
        mqtt={"password_file": str(pw), "allow_anonymous": False},
        persistence={"enabled": False},
    )
    try:
        # The password file is in force: a wrong password is refused.
        bad = Client(srv.port, username="alice", password="wrong", connect=False)
        bad.connect(expect_rc=134)  # Bad User Name or Password
        bad.c.loop_stop()

        pub = Client(srv.port, client_id="cs-dev-1", username="alice", password="s3cret")
        p1 = props(UserProperty=[("other", "x"), ("fw", "1.2.3"), ("build", "41"), ("fw", "9")])
        pub.publish("src/m1/event", json.dumps({"seq": 1}), 1, properties=p1)
        # after-commit: the PUBACK means the latest row is committed
        state = fetch_sync(pg_dsn, "SELECT device, seq, fw, login, publisher FROM src_state")
        assert [tuple(r) for r in state] == [("m1", 1, "1.2.3", "alice", "cs-dev-1")]

        # A second message from another client updates the same row (upsert, new batch).
        pub2 = Client(srv.port, client_id="cs-dev-2", username="alice", password="s3cret")
        p2 = props(UserProperty=[("fw", "1.2.4")])
        pub2.publish("src/m1/event", json.dumps({"seq": 2}), 1, properties=p2)
        state = fetch_sync(pg_dsn, "SELECT device, seq, fw, login, publisher FROM src_state")
        assert [tuple(r) for r in state] == [("m1", 2, "1.2.4", "alice", "cs-dev-2")]

        # An MQTT 3.1.1 client has no user properties: NULL.
        v4 = Client(srv.port, client_id="cs-dev-3", version=4, username="alice", password="s3cret")
        v4.publish("src/m2/event", json.dumps({"seq": 3}), 1)

        rows = fetch_sync(
            pg_dsn, "SELECT device, seq, fw, build, publisher, login FROM src_events ORDER BY seq"
        )
        assert [tuple(r) for r in rows] == [
            ("m1", 1, "1.2.3", 41, "cs-dev-1", "alice"),
            ("m1", 2, "1.2.4", None, "cs-dev-2", "alice"),
            ("m2", 3, None, None, "cs-dev-3", "alice"),
        ]
        state = fetch_sync(pg_dsn, "SELECT device, seq, fw FROM src_state ORDER BY device")
        assert [tuple(r) for r in state] == [("m1", 2, "1.2.4"), ("m2", 3, None)]
        for c in (pub, pub2, v4):
            c.disconnect()
    finally:
        srv.stop()


def _cli() -> Any:
    from ingestd.cli import main

    return main
