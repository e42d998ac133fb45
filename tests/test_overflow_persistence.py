"""Session overflow with the delivery journal (real PostgreSQL): deliveries waiting on
disk are journaled like any other, come back after a crash with their journal keys,
and a graceful stop without the journal saves them with the session."""

from __future__ import annotations

from pathlib import Path

from ingestd.config import (
    Config,
    DatabaseConfig,
    MqttConfig,
    PersistenceConfig,
    PresenceConfig,
    ServerConfig,
)
from mqtt_clients import Client
from server_thread import ServerThread
from test_persistence import journal_rows, wait_for_rows

N = 300


def config(tmp_path: Path, dsn: str, journal: bool = True) -> Config:
    return Config(
        server=ServerConfig(listen=["127.0.0.1:0"], http_listen=None, data_dir=str(tmp_path)),
        mqtt=MqttConfig(max_queued_messages=10, queue_pool_bytes=0),
        database=DatabaseConfig(dsn=dsn),
        presence=PresenceConfig(enabled=False),
        persistence=PersistenceConfig(session_journal=journal),
    )


def fill(srv: ServerThread, client_id: str) -> None:
    dev = Client(srv.port, client_id=client_id, session_expiry=3600)
    dev.subscribe(f"cmd/{client_id}/#", 1)
    dev.disconnect()
    pub = Client(srv.port)
    for i in range(N):
        pub.c.publish(f"cmd/{client_id}/x", str(i).encode(), 1)
    pub.publish(f"cmd/{client_id}/end", b"end", 1)
    b = srv.app.broker
    sess = b.sessions[client_id]
    assert srv.call(lambda: (len(sess.queue), len(sess.overflow))) == (10, N + 1 - 10)


def test_overflowed_deliveries_survive_a_crash_with_their_journal_keys(pg_dsn, tmp_path):
    srv = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        fill(srv, "ovf-crash")
        wait_for_rows(pg_dsn, journal_rows("ovf-crash"), N + 1)
        # A second server on the same database, as after a crash (nothing saved at stop).
        other = ServerThread(config(tmp_path / "b", pg_dsn), database=True).start()
        try:
            b = other.app.broker
            sess = b.sessions["ovf-crash"]
            assert other.call(lambda: (len(sess.queue), len(sess.overflow))) == (10, N + 1 - 10)
            dev = Client(other.port, client_id="ovf-crash", session_expiry=3600, clean_start=False)
            got = dev.expect(N + 1)
            assert [m.payload for m in got] == [str(i).encode() for i in range(N)] + [b"end"]
            dev.expect_nothing()
            # Acknowledged deliveries that waited on disk leave the journal by their keys.
            wait_for_rows(pg_dsn, journal_rows("ovf-crash"), 0)
        finally:
            other.stop()
    finally:
        srv.stop()


def test_graceful_stop_without_journal_saves_the_overflow_too(pg_dsn, tmp_path):
    srv = ServerThread(config(tmp_path, pg_dsn, journal=False), database=True).start()
    try:
        fill(srv, "ovf-stop")
    finally:
        srv.stop()  # the pending deliveries, the overflow's included, go into the session row
    again = ServerThread(config(tmp_path, pg_dsn, journal=False), database=True).start()
    try:
        dev = Client(again.port, client_id="ovf-stop", session_expiry=3600, clean_start=False)
        got = dev.expect(N + 1)
        assert [m.payload for m in got] == [str(i).encode() for i in range(N)] + [b"end"]
        dev.expect_nothing()
    finally:
        again.stop()
