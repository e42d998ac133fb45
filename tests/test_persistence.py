"""Retained messages and persistent sessions survive a restart (real PostgreSQL)."""

from __future__ import annotations

import time
from pathlib import Path

from ingestd.config import Config, DatabaseConfig, MqttConfig, PresenceConfig, ServerConfig
from mqtt_clients import WAIT, Client
from pg_fixtures import fetch_sync
from server_thread import ServerThread


def config(tmp_path: Path, dsn: str) -> Config:
    return Config(
        server=ServerConfig(listen=["127.0.0.1:0"], http_listen=None, data_dir=str(tmp_path)),
        mqtt=MqttConfig(),
        database=DatabaseConfig(dsn=dsn),
        presence=PresenceConfig(enabled=False),
    )


def wait_for_rows(dsn: str, sql: str, n: int) -> None:
    """Poll (bounded) until the write-behind flush has stored ``n`` rows."""
    deadline = time.monotonic() + WAIT
    while len(fetch_sync(dsn, sql)) != n:
        assert time.monotonic() < deadline, f"expected {n} rows for {sql!r}"
        time.sleep(0.05)


def test_retained_and_sessions_survive_a_graceful_restart(pg_dsn, tmp_path):
    srv = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        pub = Client(srv.port)
        pub.publish("plant/1/status", b"online", 1, retain=True)
        pub.publish("plant/2/status", b"gone", 1, retain=True)
        pub.publish("plant/2/status", b"", 1, retain=True)  # deleted again
        dev = Client(srv.port, client_id="persist-dev", session_expiry=3600)
        dev.subscribe("cmd/persist-dev/#", 1, sub_id=7)
        dev.disconnect()
        for i in range(3):
            pub.publish(f"cmd/persist-dev/{i}", str(i).encode(), 1)  # queued while offline
    finally:
        srv.stop()

    srv2 = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        late = Client(srv2.port)
        late.subscribe("plant/+/status", 1)
        [m] = late.expect()
        assert (m.topic, m.payload, m.retain) == ("plant/1/status", b"online", True)
        late.expect_nothing()
        dev2 = Client(srv2.port, client_id="persist-dev", session_expiry=3600, clean_start=False)
        assert dev2.session_present
        got = dev2.expect(3)
        assert [m.payload for m in got] == [b"0", b"1", b"2"]
        assert all(m.properties.SubscriptionIdentifier == [7] for m in got)
        # the restored subscription is live, not only its queue
        pub2 = Client(srv2.port)
        pub2.publish("cmd/persist-dev/after", b"live", 1)
        assert dev2.expect()[0].payload == b"live"
    finally:
        srv2.stop()


def test_retained_is_stored_without_a_graceful_stop(pg_dsn, tmp_path):
    """Write-behind: retained messages reach PostgreSQL while the server runs (crash-safe)."""
    srv = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        Client(srv.port).publish("crash/kept", b"v1", 1, retain=True)
        wait_for_rows(pg_dsn, "SELECT 1 FROM ingestd_retained WHERE topic = 'crash/kept'", 1)
        # A second server on the same database, started while the first still runs
        # (as after a crash: nothing was written at shutdown), sees the message.
        other = ServerThread(config(tmp_path / "b", pg_dsn), database=True).start()
        try:
            c = Client(other.port)
            c.subscribe("crash/#", 1)
            [m] = c.expect()
            assert (m.topic, m.payload) == ("crash/kept", b"v1")
        finally:
            other.stop()
    finally:
        srv.stop()


def test_expired_session_is_not_restored(pg_dsn, tmp_path):
    srv = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        c = Client(srv.port, client_id="short-lived", session_expiry=1)
        c.subscribe("x/#", 1)
        c.disconnect()
        # the session row exists while the session lives ...
        wait_for_rows(pg_dsn, "SELECT 1 FROM ingestd_sessions WHERE client_id = 'short-lived'", 1)
        # ... and is deleted when it expires
        wait_for_rows(pg_dsn, "SELECT 1 FROM ingestd_sessions WHERE client_id = 'short-lived'", 0)
    finally:
        srv.stop()
