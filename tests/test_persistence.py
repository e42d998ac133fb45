"""Retained messages and persistent sessions survive a restart (real PostgreSQL)."""

from __future__ import annotations

import time
from pathlib import Path

from ingestd.config import (
    Config,
    DatabaseConfig,
    MqttConfig,
    PersistenceConfig,
    PresenceConfig,
    ServerConfig,
)
from mqtt_clients import WAIT, Client
from pg_fixtures import fetch_sync
from server_thread import ServerThread


def config(tmp_path: Path, dsn: str, journal: bool = True) -> Config:
    return Config(
        server=ServerConfig(listen=["127.0.0.1:0"], http_listen=None, data_dir=str(tmp_path)),
        mqtt=MqttConfig(),
        database=DatabaseConfig(dsn=dsn),
        presence=PresenceConfig(enabled=False),
        persistence=PersistenceConfig(session_journal=journal),
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


# -- the delivery journal: persistent sessions' QoS 1/2 deliveries survive a crash --


def journal_rows(client_id: str) -> str:
    return f"SELECT seq FROM ingestd_session_queue WHERE client_id = '{client_id}'"


def test_offline_queue_survives_a_crash(pg_dsn, tmp_path):
    """Messages queued for an offline persistent session are in PostgreSQL without a
    graceful stop: a second server started on the same database (as after a crash,
    nothing written at shutdown) delivers them, in order, and they leave the journal
    once acknowledged."""
    srv = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        dev = Client(srv.port, client_id="crash-dev", session_expiry=3600)
        dev.subscribe("cmd/crash-dev/#", 1, sub_id=3)
        dev.disconnect()
        pub = Client(srv.port)
        for i in range(5):
            pub.publish(f"cmd/crash-dev/{i}", str(i).encode(), 1)  # PUBACKed while queued
        wait_for_rows(pg_dsn, journal_rows("crash-dev"), 5)
        other = ServerThread(config(tmp_path / "b", pg_dsn), database=True).start()
        try:
            dev2 = Client(other.port, client_id="crash-dev", session_expiry=3600, clean_start=False)
            assert dev2.session_present
            got = dev2.expect(5)
            assert [m.payload for m in got] == [b"0", b"1", b"2", b"3", b"4"]
            assert all(m.properties.SubscriptionIdentifier == [3] for m in got)
            dev2.expect_nothing()
            # Acknowledged (paho acks on receipt): they leave the journal.
            wait_for_rows(pg_dsn, journal_rows("crash-dev"), 0)
        finally:
            other.stop()
    finally:
        srv.stop()


def test_acknowledged_deliveries_are_not_restored(pg_dsn, tmp_path):
    """A delivery that completed is not redelivered after a crash."""
    srv = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        dev = Client(srv.port, client_id="acked-dev", session_expiry=3600)
        dev.subscribe("cmd/acked-dev/#", 1)
        wait_for_rows(pg_dsn, "SELECT 1 FROM ingestd_sessions WHERE client_id = 'acked-dev'", 1)
        pub = Client(srv.port)
        for i in range(5):
            pub.publish(f"cmd/acked-dev/{i}", str(i).encode(), 1)
        assert [m.payload for m in dev.expect(5)] == [b"0", b"1", b"2", b"3", b"4"]
        dev.barrier()
        # The queued delivery after these is journaled while it waits...
        dev.disconnect()
        pub.publish("cmd/acked-dev/late", b"late", 1)
        # The journal holds "late" and nothing else. (Counting rows alone raced: under
        # load a flush could store "4" before its completion was flushed, so one row
        # was there before "late" was.)
        late = "position(convert_to('cmd/acked-dev/late', 'UTF8') in delivery)"
        wait_for_rows(pg_dsn, journal_rows("acked-dev") + f" AND {late} > 0", 1)
        wait_for_rows(pg_dsn, journal_rows("acked-dev") + f" AND {late} = 0", 0)
        other = ServerThread(config(tmp_path / "b", pg_dsn), database=True).start()
        try:
            dev2 = Client(other.port, client_id="acked-dev", session_expiry=3600, clean_start=False)
            assert dev2.session_present
            # ... and is the only one that comes back.
            assert [m.payload for m in dev2.expect()] == [b"late"]
            dev2.expect_nothing()
        finally:
            other.stop()
    finally:
        srv.stop()


def test_a_session_that_ends_takes_its_journal_with_it(pg_dsn, tmp_path):
    srv = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        dev = Client(srv.port, client_id="gone-dev", session_expiry=3600)
        dev.subscribe("cmd/gone-dev/#", 1)
        dev.disconnect()
        pub = Client(srv.port)
        for i in range(3):
            pub.publish(f"cmd/gone-dev/{i}", b"x", 1)
        wait_for_rows(pg_dsn, journal_rows("gone-dev"), 3)
        # Clean Start discards the session: its undelivered messages go too.
        fresh = Client(srv.port, client_id="gone-dev", session_expiry=3600, clean_start=True)
        assert not fresh.session_present
        wait_for_rows(pg_dsn, journal_rows("gone-dev"), 0)
        fresh.expect_nothing()
    finally:
        srv.stop()


def test_journal_changes_in_one_flush(pg_dsn):
    """The store alone: a put and its done within one interval write nothing, and a new
    session's delivery survives the old session's clear in the same flush."""
    import asyncio

    import asyncpg

    from ingestd.broker.message import Message
    from ingestd.broker.session import Delivery
    from ingestd.broker.store import PgBrokerStore

    def delivery(payload: bytes) -> Delivery:
        return Delivery(Message("t/x", payload, 1), 1, False, None)

    async def main() -> None:
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
        store = PgBrokerStore(pool, flush_interval=3600.0)  # flushed by hand below
        await store.start()
        try:

            async def seqs() -> list[int]:
                await store.flush()
                rows = await pool.fetch(
                    "SELECT seq FROM ingestd_session_queue WHERE client_id = 'c' ORDER BY seq"
                )
                return [r[0] for r in rows]

            old = delivery(b"old")
            store.put("c", old)
            assert await seqs() == [old.seq]
            store.session_deleted("c")
            new = delivery(b"new")
            store.put("c", new)
            assert await seqs() == [new.seq]
            quick = delivery(b"quick")
            store.put("c", quick)
            store.done("c", quick)
            assert await seqs() == [new.seq]
            store.done("c", new)
            assert await seqs() == []
            # Keys keep growing across a restart of the store: load() starts past them.
            kept = delivery(b"kept")
            store.put("c", kept)
            await store.flush()
            await pool.execute(
                "INSERT INTO ingestd_sessions (client_id, state) VALUES ('c', $1)",
                b"\x94\xcd\x0e\x10\x80\xc0\x90",  # msgpack [3600, {}, None, []]
            )
            again = PgBrokerStore(pool, flush_interval=3600.0)
            _, sessions = await again.load()
            [s] = [s for s in sessions if s.client_id == "c"]
            assert [(seq, m.payload) for seq, m, *_ in s.journal] == [(kept.seq, b"kept")]
            nxt = delivery(b"next")
            again.put("c", nxt)
            assert nxt.seq > kept.seq
        finally:
            await store.close()
            await pool.close()

    asyncio.run(main())


def test_bench_with_persistent_subscribers_leaves_nothing_behind(pg_dsn, tmp_path):
    """ingestd bench --persistent-sessions: journaled fan-in, exact accounting, and the
    sessions and their journal rows are gone after the run."""
    from ingestd.bench.runner import run
    from ingestd.bench.worker import Plan

    srv = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        for version in (4, 5):
            plan = Plan(
                "fan-in",
                "127.0.0.1",
                srv.port,
                version=version,
                qos=1,
                publishers=5,
                subscribers=2,
                messages=400,
                drain_timeout=10.0,
                persistent_subscribers=True,
            )
            res = run(plan)
            assert res.errors == []
            assert (res.sent, res.delivered, res.lost, res.duplicates) == (2000, 4000, 0, 0)
            sessions = srv.call(lambda: list(srv.app.broker.sessions))
            assert not [c for c in sessions if c.startswith("bench-")], sessions
        wait_for_rows(pg_dsn, "SELECT 1 FROM ingestd_session_queue", 0)
        wait_for_rows(pg_dsn, "SELECT 1 FROM ingestd_sessions WHERE client_id LIKE 'bench-%'", 0)
    finally:
        srv.stop()


def test_session_journal_off_keeps_graceful_restarts_and_drops_old_rows(pg_dsn, tmp_path):
    """persistence.session_journal = false: nothing journaled; a graceful stop saves the
    undelivered messages with the session; rows a journaling run left are taken over."""
    srv = ServerThread(config(tmp_path, pg_dsn), database=True).start()
    try:
        dev = Client(srv.port, client_id="nj-dev", session_expiry=3600)
        dev.subscribe("cmd/nj-dev/#", 1)
        dev.disconnect()
        pub = Client(srv.port)
        for i in range(3):
            pub.publish(f"cmd/nj-dev/{i}", str(i).encode(), 1)
        wait_for_rows(pg_dsn, journal_rows("nj-dev"), 3)
    finally:
        srv.stop()

    off = ServerThread(config(tmp_path, pg_dsn, journal=False), database=True).start()
    try:
        # Restored from the journal into memory, and the journal rows are dropped.
        wait_for_rows(pg_dsn, journal_rows("nj-dev"), 0)
        dev2 = Client(off.port, client_id="nj-dev", session_expiry=3600, clean_start=False)
        assert [m.payload for m in dev2.expect(3)] == [b"0", b"1", b"2"]
        dev2.disconnect()
        pub = Client(off.port)
        for i in range(3, 5):
            pub.publish(f"cmd/nj-dev/{i}", str(i).encode(), 1)
        pub.barrier()
    finally:
        off.stop()  # graceful: the two undelivered messages go into the session row
    # Everything was flushed at the stop: a journaling store would have left 2 rows.
    assert fetch_sync(pg_dsn, journal_rows("nj-dev")) == []

    again = ServerThread(config(tmp_path, pg_dsn, journal=False), database=True).start()
    try:
        dev3 = Client(again.port, client_id="nj-dev", session_expiry=3600, clean_start=False)
        assert [m.payload for m in dev3.expect(2)] == [b"3", b"4"]
        dev3.expect_nothing()
    finally:
        again.stop()


def test_durable_future_resolves_after_the_commit_and_survives_a_failed_flush(pg_dsn):
    """The store alone: durable_future() is shared until a flush starts and resolves
    once a flush commits what was recorded before it, without waiting for the
    write-behind interval (an hour here); while the database fails it stays pending
    (never failed), and the retry that commits resolves it."""
    import asyncio

    import asyncpg

    from ingestd.broker.message import Message
    from ingestd.broker.session import Delivery
    from ingestd.broker.store import PgBrokerStore

    class BrokenPool:
        def acquire(self):
            raise ConnectionError("database down")

    async def main() -> None:
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
        store = PgBrokerStore(pool, flush_interval=3600.0)
        await store.start()
        try:
            await asyncio.wait_for(store.durable_future(), WAIT)  # nothing to write
            d1 = Delivery(Message("t/x", b"1", 1), 1, False, None)
            store.put("c", d1)
            fut = store.durable_future()
            assert store.durable_future() is fut
            await asyncio.wait_for(fut, WAIT)  # not after the hour: at once
            rows = await pool.fetch("SELECT seq FROM ingestd_session_queue WHERE client_id='c'")
            assert [r[0] for r in rows] == [d1.seq]

            store.flush_interval = 0.2  # the retry pace while the database fails
            store.pool = BrokenPool()
            d2 = Delivery(Message("t/x", b"2", 1), 1, False, None)
            store.put("c", d2)
            fut2 = store.durable_future()
            await asyncio.sleep(0.5)
            assert store.flush_errors >= 1
            assert not fut2.done()  # not durable: still waiting, not failed
            store.pool = pool
            await asyncio.wait_for(fut2, WAIT)
            assert fut2.exception() is None
            rows = await pool.fetch(
                "SELECT seq FROM ingestd_session_queue WHERE client_id='c' ORDER BY seq"
            )
            assert [r[0] for r in rows] == [d1.seq, d2.seq]
        finally:
            store.pool = pool
            await store.close()
            await pool.close()

    asyncio.run(main())


def test_ack_after_journal_acknowledges_only_journaled_messages(pg_dsn, tmp_path):
    """persistence.ack_after_journal: a QoS 1 PUBLISH queued for an offline persistent
    session is PUBACKed only once its journal row is committed, so a crash right after
    the PUBACK cannot lose it. The write-behind interval is long (1.5 s) so that an ack
    sent before the commit would find no row."""
    cfg = config(tmp_path, pg_dsn)
    cfg.persistence.flush_interval_ms = 1500.0
    cfg.persistence.ack_after_journal = True
    srv = ServerThread(cfg, database=True).start()
    try:
        dev = Client(srv.port, client_id="aaj-dev", session_expiry=3600)
        dev.subscribe("cmd/aaj-dev/#", 1)
        dev.disconnect()
        pub = Client(srv.port)
        for i in range(3):
            pub.publish(f"cmd/aaj-dev/{i}", str(i).encode(), 1)  # waits for the PUBACK
            assert len(fetch_sync(pg_dsn, journal_rows("aaj-dev"))) == i + 1
        pub.publish("nobody/listens", b"x", 1)  # no persistent session: nothing to wait for
        pub.disconnect()
    finally:
        srv.stop()


def test_ack_after_journal_needs_the_journal(tmp_path):
    import pytest

    from ingestd.config import load_config
    from ingestd.errors import ConfigError

    path = tmp_path / "c.toml"
    path.write_text("[persistence]\nack_after_journal = true\nsession_journal = false\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), env={})
    assert "persistence.ack_after_journal" in str(e.value)
