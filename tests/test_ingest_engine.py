"""The ingest engine against a real PostgreSQL: rows, upserts, dead letters, acks, presence."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingestd.broker.hooks import ClientInfo
from ingestd.config import Config
from ingestd.errors import DatabaseError
from ingestd.ingest import writing
from ingestd.ingest.engine import IngestEngine
from pg_fixtures import config_from_toml, fetch, publish

pytestmark = pytest.mark.pg
UTC = dt.UTC


async def lock_table(dsn: str, table: str) -> tuple[Any, Any]:
    """(connection, transaction) holding ACCESS EXCLUSIVE on ``table``: nothing can
    COPY into it until the transaction is rolled back."""
    conn = await asyncpg.connect(dsn)
    tr = conn.transaction()
    await tr.start()
    await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    return conn, tr


def run_engine(cfg: Config, body: Callable[[IngestEngine], Awaitable[None]]) -> IngestEngine:
    async def main() -> IngestEngine:
        eng = IngestEngine(cfg)
        await eng.start()
        try:
            await body(eng)
        finally:
            await eng.stop()
        return eng

    return asyncio.run(main())


ALL_TYPES = """
[[routes]]
name = "all"
topic = "dev/{id}/data"
table = "all_types"
[routes.columns]
id = "topic.id"
seq = "payload.seq::bigint"
i = "payload.i::integer"
s = "payload.s::smallint"
f = "payload.f::double precision"
r = "payload.r::real"
n = "payload.n::numeric"
t = "payload.t::text"
b = "payload.b::boolean"
ts = { source = "payload.ts", type = "timestamptz", unit = "ms" }
j = "payload.j::jsonb"
raw = "payload::bytea"
whole = "payload"
at = "received_at"
cid = "client_id"
user = "username"
fw = "user_property.fw"
site = { value = "north" }
[[routes.indexes]]
columns = ["id", "ts"]
[[routes.indexes]]
columns = ["ts"]
method = "brin"
"""


def test_append_every_type(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_from_toml(ALL_TYPES, tmp_path, pg_dsn)
    payload = (
        '{"seq": 1, "i": 7, "s": 3, "f": 1.25, "r": 0.5, "n": 12.345, "t": "hé", "b": true,'
        ' "ts": 1700000000123, "j": {"a": [1, 2]}}'
    )

    async def body(eng: IngestEngine) -> None:
        futs = publish(
            eng,
            "dev/d1/data",
            payload,
            client_id="c1",
            username="u1",
            received_at=1_700_000_001.5,
            properties={0x26: [("fw", "2.0")]},
        )
        futs += publish(eng, "dev/d2/data", '{"seq": 2}', client_id="c2")
        await asyncio.gather(*futs)

    run_engine(cfg, body)
    rows = asyncio.run(fetch(pg_dsn, "SELECT * FROM all_types ORDER BY seq"))
    assert len(rows) == 2
    r = dict(rows[0])
    assert r == {
        "id": "d1",
        "seq": 1,
        "i": 7,
        "s": 3,
        "f": 1.25,
        "r": 0.5,
        "n": Decimal("12.345"),
        "t": "hé",
        "b": True,
        "ts": dt.datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
        "j": '{"a": [1, 2]}',
        "raw": payload.encode(),
        "whole": r["whole"],
        "at": dt.datetime(2023, 11, 14, 22, 13, 21, 500000, tzinfo=UTC),
        "cid": "c1",
        "user": "u1",
        "fw": "2.0",
        "site": "north",
    }
    assert asyncio.run(
        fetch(pg_dsn, "SELECT $1::jsonb = (SELECT whole FROM all_types WHERE seq = 1)", payload)
    )[0][0]
    r2 = dict(rows[1])
    assert (r2["id"], r2["i"], r2["f"], r2["j"], r2["user"], r2["fw"]) == (
        "d2",
        None,
        None,
        None,
        None,
        None,
    )
    types = asyncio.run(
        fetch(
            pg_dsn,
            "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
            "WHERE attrelid = 'all_types'::regclass AND attnum > 0 ORDER BY attnum",
        )
    )
    assert dict(types) == {
        "id": "text",
        "seq": "bigint",
        "i": "integer",
        "s": "smallint",
        "f": "double precision",
        "r": "real",
        "n": "numeric",
        "t": "text",
        "b": "boolean",
        "ts": "timestamp with time zone",
        "j": "jsonb",
        "raw": "bytea",
        "whole": "jsonb",
        "at": "timestamp with time zone",
        "cid": "text",
        "user": "text",
        "fw": "text",
        "site": "text",
    }
    idx = asyncio.run(
        fetch(pg_dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = 'all_types' ORDER BY 1")
    )
    assert [i[0] for i in idx] == [
        "CREATE INDEX all_types_id_ts_idx ON public.all_types USING btree (id, ts)",
        "CREATE INDEX all_types_ts_idx ON public.all_types USING brin (ts)",
    ]


STATUS = """
[[routes]]
name = "status"
topic = "devices/{id}/status"
table = "device_status"
kind = "latest"
key = ["device_id"]
[routes.columns]
device_id = "topic.id"
online = { value = true }
state = "payload.state::text"
battery = "payload.battery::double precision"
updated_at = "received_at"

[[routes]]
name = "lwt"
topic = "devices/{id}/lwt"
table = "device_status"
kind = "latest"
key = ["device_id"]
[routes.columns]
device_id = "topic.id"
online = { value = false }
updated_at = "received_at"
"""


@pytest.mark.parametrize("method", ["unnest", "temp-table", "executemany"])
def test_latest_keeps_the_last_state(
    pg_dsn: str, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writing, "UPSERT_METHOD", method)
    cfg = config_from_toml(
        STATUS, tmp_path, pg_dsn, ingest={"batch_rows": 1000, "flush_interval_ms": 10_000}
    )

    async def body(eng: IngestEngine) -> None:
        # One batch: several states per key; the last one per key must win,
        # and the LWT (other route, fewer columns) must apply after the status.
        futs = []
        for i in range(5):
            futs += publish(eng, "devices/a/status", f'{{"state": "s{i}", "battery": {i}}}')
        futs += publish(eng, "devices/b/status", '{"state": "ok", "battery": 50}')
        futs += publish(eng, "devices/b/lwt", "")
        futs += publish(eng, "devices/c/lwt", "")
        futs += publish(eng, "devices/c/status", '{"state": "back", "battery": 9}')
        await eng.flush()
        await asyncio.gather(*futs)
        rows = {r["device_id"]: dict(r) for r in await fetch(pg_dsn, "SELECT * FROM device_status")}
        assert {k: (v["online"], v["state"], v["battery"]) for k, v in rows.items()} == {
            "a": (True, "s4", 4.0),
            "b": (False, "ok", 50.0),  # lwt keeps the columns it does not write
            "c": (True, "back", 9.0),
        }
        # Next batch updates existing rows.
        futs = publish(eng, "devices/a/lwt", "")
        await eng.flush()
        await asyncio.gather(*futs)
        r = await fetch(pg_dsn, "SELECT online, state FROM device_status WHERE device_id = 'a'")
        assert (r[0]["online"], r[0]["state"]) == (False, "s4")

    run_engine(cfg, body)
    pk = asyncio.run(
        fetch(
            pg_dsn,
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'device_status' AND indexname LIKE '%pkey'",
        )
    )
    assert "(device_id)" in pk[0][0]


KEEP = """
[[routes]]
name = "status"
topic = "company/{company_id}/machine/{machine_id}/status"
table = "machine_status"
kind = "latest"
key = ["company_id", "machine_id"]
[routes.columns]
company_id = "topic.company_id"
machine_id = "topic.machine_id"
status = { source = "payload.status", type = "text", keep_when_missing = true }
energy = { source = "payload.energy", type = "double precision", keep_when_missing = true }
note = "payload.note::text"
"""


@pytest.mark.parametrize("method", ["unnest", "temp-table", "executemany"])
def test_keep_when_missing_keeps_the_stored_value(
    pg_dsn: str, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writing, "UPSERT_METHOD", method)
    cfg = config_from_toml(
        KEEP, tmp_path, pg_dsn, ingest={"batch_rows": 1000, "flush_interval_ms": 10_000}
    )
    t = "company/c/machine/{}/status"

    async def body(eng: IngestEngine) -> None:
        # Same batch: status then LWT (deduplicated to one row per key, merged).
        futs = publish(eng, t.format("m1"), '{"status": "Running", "energy": 1.5, "note": "n"}')
        futs += publish(eng, t.format("m1"), '{"status": "offline"}')
        # Across batches: the stored row keeps energy.
        futs += publish(eng, t.format("m2"), '{"status": "Running", "energy": 2.5, "note": "n"}')
        await eng.flush()
        await asyncio.gather(*futs)
        futs = publish(eng, t.format("m2"), '{"status": "offline", "energy": null}')
        futs += publish(eng, t.format("m3"), '{"status": "offline"}')  # a new row: NULLs
        await eng.flush()
        await asyncio.gather(*futs)
        rows = await fetch(pg_dsn, "SELECT machine_id, status, energy, note FROM machine_status")
        assert {r[0]: tuple(r[1:]) for r in rows} == {
            "m1": ("offline", 1.5, None),  # a column without keep_when_missing is written
            "m2": ("offline", 2.5, None),
            "m3": ("offline", None, None),
        }
        # A later value replaces the kept one.
        futs = publish(eng, t.format("m2"), '{"energy": 3.5}')
        await eng.flush()
        await asyncio.gather(*futs)
        rows = await fetch(
            pg_dsn, "SELECT status, energy FROM machine_status WHERE machine_id='m2'"
        )
        assert tuple(rows[0]) == ("offline", 3.5)

    run_engine(cfg, body)


APPEND = """
[[routes]]
name = "telemetry"
topic = "m/{id}/t"
table = "telemetry"
[routes.columns]
id = "topic.id"
v = "payload.v::double precision"
seq = "payload.seq::bigint"

[[routes]]
name = "telemetry-fast"
topic = "m/{id}/fast"
table = "telemetry"
ack = "on-receipt"
[routes.columns]
id = "topic.id"
v = "payload.v::double precision"
seq = "payload.seq::bigint"
"""


def test_dead_letters_never_stop_the_batch(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_from_toml(APPEND, tmp_path, pg_dsn, ingest={"flush_interval_ms": 10_000})

    async def body(eng: IngestEngine) -> None:
        # A constraint PostgreSQL enforces and Python does not know about:
        # the batch is bisected and only the offending row becomes a dead letter.
        await eng.database.pool.execute("ALTER TABLE telemetry ADD CONSTRAINT v_pos CHECK (v >= 0)")  # type: ignore[union-attr]
        futs = []
        futs += publish(eng, "m/a/t", '{"v": 1, "seq": 1}', client_id="good")
        futs += publish(eng, "m/a/t", "{not json", client_id="bad-json")
        futs += publish(eng, "m/a/t", '{"v": "high", "seq": 3}', client_id="bad-type")
        futs += publish(eng, "m/a/t", '{"v": -5, "seq": 4}', client_id="bad-check")
        futs += publish(eng, "m/a/t", '{"v": 2, "seq": 5}', client_id="good")
        await eng.flush()
        await asyncio.gather(*futs)
        assert eng.stats.dead_letters == 3
        assert eng.stats.rows_committed == 2
        assert eng.stats.bisections == 1

    run_engine(cfg, body)
    rows = asyncio.run(fetch(pg_dsn, "SELECT seq FROM telemetry ORDER BY seq"))
    assert [r[0] for r in rows] == [1, 5]
    dls = asyncio.run(fetch(pg_dsn, "SELECT * FROM dead_letters ORDER BY client_id"))
    by_client = {r["client_id"]: dict(r) for r in dls}
    assert set(by_client) == {"bad-json", "bad-type", "bad-check"}
    assert "not valid JSON" in by_client["bad-json"]["error"]
    assert by_client["bad-json"]["payload"] == b"{not json"
    assert "$.v" in by_client["bad-type"]["error"]
    assert "CheckViolation" in by_client["bad-check"]["error"]
    assert all(r["route"] == "telemetry" and r["topic"] == "m/a/t" for r in dls)


def test_a_lone_copy_rejected_by_postgresql_is_bisected(pg_dsn: str, tmp_path: Path) -> None:
    # Only good payloads: the batch is one COPY written without BEGIN/COMMIT. PostgreSQL
    # rejects it for one row; the retry isolates that row inside a transaction.
    cfg = config_from_toml(APPEND, tmp_path, pg_dsn, ingest={"flush_interval_ms": 10_000})

    async def body(eng: IngestEngine) -> None:
        await eng.database.pool.execute("ALTER TABLE telemetry ADD CONSTRAINT v_pos CHECK (v >= 0)")  # type: ignore[union-attr]
        futs = []
        for seq in range(1, 8):
            v = -1 if seq == 4 else seq
            futs += publish(eng, "m/a/t", f'{{"v": {v}, "seq": {seq}}}', client_id=f"c{seq}")
        await eng.flush()
        await asyncio.gather(*futs)
        assert eng.stats.bisections == 1
        assert eng.stats.dead_letters == 1
        assert eng.stats.rows_committed == 6

    run_engine(cfg, body)
    rows = asyncio.run(fetch(pg_dsn, "SELECT seq FROM telemetry ORDER BY seq"))
    assert [r[0] for r in rows] == [1, 2, 3, 5, 6, 7]
    dls = asyncio.run(fetch(pg_dsn, "SELECT client_id, error FROM dead_letters"))
    assert [(r["client_id"], "CheckViolation" in r["error"]) for r in dls] == [("c4", True)]


def test_after_commit_future_resolves_only_after_commit(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_from_toml(APPEND, tmp_path, pg_dsn, ingest={"flush_interval_ms": 5})

    async def body(eng: IngestEngine) -> None:
        # Hold a lock that blocks the COPY: nothing can commit until we let go.
        blocker, tr = await lock_table(pg_dsn, "telemetry")
        futs = publish(eng, "m/a/t", '{"v": 1, "seq": 1}', qos=1)
        futs += publish(eng, "m/a/t", '{"v": 1, "seq": 2}', qos=2)
        assert len(futs) == 2 and futs[0] is futs[1]  # one future per batch
        assert publish(eng, "m/a/t", '{"v": 1, "seq": 3}', qos=0) == []  # QoS 0: never a future
        assert publish(eng, "m/a/fast", '{"v": 1, "seq": 4}', qos=1) == []  # on-receipt route
        done, _ = await asyncio.wait(futs, timeout=0.5)
        assert not done  # the batch was flushed, but it cannot commit
        probe = await asyncpg.connect(pg_dsn)
        assert await probe.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted") >= 1
        await tr.rollback()
        await asyncio.gather(*futs)
        # Acknowledged means visible to anybody.
        assert await probe.fetchval("SELECT count(*) FROM telemetry WHERE seq IN (1, 2)") == 2
        await eng.flush()
        assert await probe.fetchval("SELECT count(*) FROM telemetry") == 4
        await probe.close()
        await blocker.close()

    run_engine(cfg, body)


def test_saturation_and_resume(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_from_toml(
        APPEND,
        tmp_path,
        pg_dsn,
        ingest={"max_pending_rows": 8, "batch_rows": 4, "flush_interval_ms": 5},
    )

    async def body(eng: IngestEngine) -> None:
        blocker, tr = await lock_table(pg_dsn, "telemetry")
        futs = []
        for i in range(8):
            assert not eng.saturated
            futs += publish(eng, "m/a/t", f'{{"v": 1, "seq": {i}}}')
        assert eng.saturated and eng.pending_rows == 8
        waiter = asyncio.ensure_future(eng.wait_not_saturated())
        await asyncio.sleep(0.2)
        assert not waiter.done()
        await tr.rollback()
        await waiter
        assert not eng.saturated
        await asyncio.gather(*futs)
        assert eng.pending_rows == 0
        await blocker.close()

    run_engine(cfg, body)
    assert asyncio.run(fetch(pg_dsn, "SELECT count(*) FROM telemetry"))[0][0] == 8


def test_batches_wait_as_messages_beyond_twice_the_copy_slots(pg_dsn: str, tmp_path: Path) -> None:
    """With the table locked, 10 full batches: 2 x max_concurrent_copies writer tasks
    (converted, waiting for the COPY), the rest closed and waiting unconverted; once
    the lock goes, every batch commits and its future resolves, in order."""
    cfg = config_from_toml(
        APPEND,
        tmp_path,
        pg_dsn,
        ingest={"batch_rows": 5, "max_concurrent_copies": 1, "flush_interval_ms": 5},
    )

    async def body(eng: IngestEngine) -> None:
        blocker, tr = await lock_table(pg_dsn, "telemetry")
        futs: list[Any] = []
        try:
            for i in range(50):
                for f in publish(eng, "m/a/t", f'{{"v": {i}, "seq": {i}}}'):
                    if not futs or futs[-1] is not f:
                        futs.append(f)
            await asyncio.sleep(0.3)
            b = eng._batchers["telemetry"]
            assert len(futs) == 10
            assert len(eng._tasks) == 2 and b._active == 2
            assert b.backlog == 8
            assert not any(f.done() for f in futs)
        finally:
            await tr.rollback()
        order: list[int] = []
        for k, f in enumerate(futs):
            f.add_done_callback(lambda _f, k=k: order.append(k))
        await asyncio.gather(*futs)
        assert order == list(range(10))
        assert b.backlog == 0 and eng.pending_rows == 0
        await blocker.close()

    run_engine(cfg, body)
    got = asyncio.run(fetch(pg_dsn, "SELECT count(*), count(DISTINCT seq) FROM telemetry"))[0]
    assert tuple(got) == (50, 50)


def test_many_rows_many_batches(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_from_toml(
        APPEND, tmp_path, pg_dsn, ingest={"batch_rows": 100, "max_concurrent_copies": 3}
    )
    n = 2500

    async def body(eng: IngestEngine) -> None:
        futs = set()
        for i in range(n):
            futs.update(publish(eng, f"m/d{i % 7}/t", f'{{"v": {i}, "seq": {i}}}'))
        await asyncio.gather(*futs)
        assert eng.stats.rows_committed == n
        assert eng.stats.batches_committed == n // 100

    run_engine(cfg, body)
    got = asyncio.run(fetch(pg_dsn, "SELECT count(*), count(DISTINCT seq), sum(v) FROM telemetry"))[
        0
    ]
    assert tuple(got) == (n, n, sum(range(n)))


def test_presence(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_from_toml(APPEND, tmp_path, pg_dsn, presence={"flush_interval_ms": 10})
    t0 = time.time()

    async def body(eng: IngestEngine) -> None:
        a = ClientInfo("dev-a", "alice", "10.0.0.1:5000", 5, t0)
        b = ClientInfo("dev-b", None, "10.0.0.2:5000", 4, t0)
        c = ClientInfo("dev-c", "carol", "[::1]:6000", 3, t0)
        eng.on_client_connected(a)
        eng.on_client_connected(b)
        eng.on_client_connected(c)
        eng.on_client_disconnected(b, "keepalive_timeout", True)  # same flush as its connect
        await eng.presence.flush(eng.database.pool)  # type: ignore[union-attr]
        eng.on_client_disconnected(c, "will", True)
        await asyncio.gather(
            *publish(eng, "m/a/t", '{"v": 1, "seq": 1}', client_id="dev-a", received_at=t0 + 30)
        )
        await eng.flush()
        await eng.presence.flush(eng.database.pool)  # type: ignore[union-attr]

    run_engine(cfg, body)
    rows = {
        r["client_id"]: dict(r) for r in asyncio.run(fetch(pg_dsn, "SELECT * FROM device_presence"))
    }
    assert set(rows) == {"dev-a", "dev-b", "dev-c"}
    a, b, c = rows["dev-a"], rows["dev-b"], rows["dev-c"]
    assert (a["online"], a["username"], a["peer"], a["protocol_version"]) == (
        True,
        "alice",
        "10.0.0.1:5000",
        5,
    )
    assert a["last_seen"] == dt.datetime.fromtimestamp(t0 + 30, UTC)  # touched by its publish
    assert (b["online"], b["disconnect_reason"], b["username"]) == (
        False,
        "keepalive_timeout",
        None,
    )
    assert (c["online"], c["disconnect_reason"], c["protocol_version"]) == (False, "will", 3)
    assert a["connected_at"] == dt.datetime.fromtimestamp(t0, UTC)

    # A new run marks clients left online by the previous one offline.
    run_engine(cfg, lambda eng: asyncio.sleep(0))
    a = asyncio.run(
        fetch(
            pg_dsn,
            "SELECT online, disconnect_reason FROM device_presence WHERE client_id = 'dev-a'",
        )
    )[0]
    assert (a["online"], a["disconnect_reason"]) == (False, "server_restart")


LOOKUP = """
[[lookups]]
name = "dev"
table = "device_map"
key = { serial = "topic.serial" }
columns = { device_id = "bigint", site = "text" }
miss_refresh_s = 0  # reload on every miss: no timing in this test
on_miss = "{on_miss}"

[[routes]]
name = "readings"
topic = "r/{serial}"
table = "readings"
[routes.columns]
serial = "topic.serial"
device_id = "lookup.dev.device_id"
site = "lookup.dev.site"
v = "payload.v::double precision"
"""


@pytest.mark.parametrize("on_miss", ["dead-letter", "null", "skip"])
def test_lookup(pg_dsn: str, tmp_path: Path, on_miss: str) -> None:
    cfg = config_from_toml(LOOKUP.replace("{on_miss}", on_miss), tmp_path, pg_dsn)

    async def body(eng: IngestEngine) -> None:
        pool = eng.database.pool  # type: ignore[union-attr]
        await pool.execute("INSERT INTO device_map VALUES ('s1', 101, 'north')")
        # s1 is not in the cache loaded at start: the miss reloads it.
        await asyncio.gather(*publish(eng, "r/s1", '{"v": 1}'))
        await asyncio.gather(*publish(eng, "r/s2", '{"v": 2}'))  # unknown serial
        await eng.flush()
        await pool.execute("INSERT INTO device_map VALUES ('s2', 102, 'south')")
        await asyncio.gather(*publish(eng, "r/s2", '{"v": 3}'))
        await eng.flush()

    run_engine(cfg, body)
    rows = [
        tuple(r)
        for r in asyncio.run(
            fetch(pg_dsn, "SELECT serial, device_id, site, v FROM readings ORDER BY v")
        )
    ]
    dls = asyncio.run(fetch(pg_dsn, "SELECT error FROM dead_letters"))
    expected = [("s1", 101, "north", 1.0), ("s2", 102, "south", 3.0)]
    if on_miss == "dead-letter":
        assert rows == expected
        assert len(dls) == 1 and "lookup 'dev': no row in device_map for key ('s2',)" in dls[0][0]
    elif on_miss == "null":
        assert rows == [expected[0], ("s2", None, None, 2.0), expected[1]]
        assert dls == []
    else:
        assert rows == expected
        assert dls == []


def test_existing_tables_are_verified(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_from_toml(STATUS, tmp_path, pg_dsn)

    async def start_fails(sql: str) -> str:
        conn = await asyncpg.connect(pg_dsn)
        await conn.execute("DROP TABLE IF EXISTS device_status")
        await conn.execute(sql)
        await conn.close()
        eng = IngestEngine(cfg)
        with pytest.raises(DatabaseError) as ei:
            await eng.start()
        return str(ei.value)

    msg = asyncio.run(
        start_fails(
            "CREATE TABLE device_status (device_id text PRIMARY KEY, online boolean, state text, updated_at timestamptz)"
        )
    )
    assert "table device_status exists but has no column battery (double precision)" in msg
    assert 'ALTER TABLE "device_status" ADD COLUMN "battery" double precision' in msg
    msg = asyncio.run(
        start_fails(
            "CREATE TABLE device_status (device_id text PRIMARY KEY, online boolean, state text,"
            " battery double precision, updated_at text)"
        )
    )
    assert (
        "column device_status.updated_at is text but the configuration writes timestamp with time zone"
        in msg
    )
    msg = asyncio.run(
        start_fails(
            "CREATE TABLE device_status (device_id text, online boolean, state text,"
            " battery double precision, updated_at timestamptz)"
        )
    )
    assert "needs a primary key or unique index on (device_id)" in msg
    msg = asyncio.run(
        start_fails(
            "CREATE TABLE device_status (device_id text PRIMARY KEY, online boolean, state text,"
            " battery double precision, updated_at timestamptz, owner text NOT NULL)"
        )
    )
    assert "column device_status.owner is NOT NULL without a default" in msg
    # A compatible table (wider types, extra nullable column) is accepted as is.
    ok = (
        "CREATE TABLE device_status (device_id varchar(64) PRIMARY KEY, online boolean, state text,"
        " battery double precision, updated_at timestamptz, note text)"
    )

    async def accepted() -> None:
        conn = await asyncpg.connect(pg_dsn)
        await conn.execute("DROP TABLE IF EXISTS device_status")
        await conn.execute(ok)
        await conn.close()
        eng = IngestEngine(cfg)
        await eng.start()
        await asyncio.gather(*publish(eng, "devices/x/status", '{"state": "ok"}'))
        await eng.stop()

    asyncio.run(accepted())
    assert (
        asyncio.run(fetch(pg_dsn, "SELECT device_id, state FROM device_status"))[0]["state"] == "ok"
    )


def test_schema_sql_is_idempotent(pg_dsn: str, tmp_path: Path) -> None:
    from ingestd.ingest.schema import schema_sql

    cfg = config_from_toml(ALL_TYPES + STATUS, tmp_path, pg_dsn)
    sql = schema_sql(cfg, IngestEngine(cfg).compiled)

    async def twice() -> Any:
        conn = await asyncpg.connect(pg_dsn)
        await conn.execute(sql)
        await conn.execute(sql)
        return await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )

    assert [r[0] for r in asyncio.run(twice())] == [
        "all_types",
        "dead_letters",
        "device_presence",
        "device_status",
    ]
