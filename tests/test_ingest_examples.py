"""The example configurations in config/, end to end against PostgreSQL.

Each test loads the shipped file (only the DSN and data_dir are overridden),
initializes the database, publishes the messages the file's comments
describe (as the broker would hand them to the sinks) and checks the rows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest

from ingestd.broker.hooks import ClientInfo
from ingestd.config import Config, load_config
from ingestd.ingest.engine import IngestEngine
from pg_fixtures import fetch, publish

pytestmark = pytest.mark.pg
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
UTC = dt.UTC


def example(name: str, dsn: str, tmp_path: Path) -> Config:
    return load_config(
        str(CONFIG_DIR / name),
        env={},
        overrides={"database": {"dsn": dsn}, "server": {"data_dir": str(tmp_path / "data")}},
    )


async def deliver_all(eng: IngestEngine, items: list[tuple[str, str]], **kw: Any) -> None:
    futs: list[Any] = []
    for topic, payload in items:
        futs += publish(eng, topic, payload, **kw)
    await eng.flush()
    await asyncio.gather(*futs)


def test_solar_fleet(pg_dsn: str, tmp_path: Path) -> None:
    cfg = example("solar-fleet.toml", pg_dsn, tmp_path)
    t = 1_717_171_717

    async def main() -> None:
        eng = IngestEngine(cfg)
        await eng.start()
        eng.on_client_connected(ClientInfo("m1", None, "10.1.1.1:40000", 4, time.time()))
        items = [
            (
                f"company/acme/machine/m{i % 3}/telemetry",
                f'{{"battery": {13 + i / 10}, "solar_v": 21.2, "solar_a": 4.5, "water": 80,'
                f' "extra": {{"temp": 32.5, "vibration": {i / 100}}}}}',
            )
            for i in range(30)
        ]
        items += [
            ("company/acme/machine/m9/telemetry", f'{{"ts": {t}, "battery": 10}}'),
            (
                "company/acme/machine/m1/status",
                '{"status":"Running","energy":150.5,"water":25.0,"area":450.0}',
            ),
            ("company/beta/machine/m1/status", '{"status":"Stopped","energy":1.0}'),
            ("company/acme/machine/m2/status", '{"status":"offline"}'),  # LWT, nothing before
            ("company/acme/machine/m1/telemetry", '{"battery": "high"}'),  # dead letter
        ]
        await deliver_all(eng, items, client_id="m1")
        # The LWT in a later batch keeps the last energy/water/area.
        await deliver_all(eng, [("company/acme/machine/m1/status", '{"status":"offline"}')])
        await eng.presence.flush(eng.database.pool)  # type: ignore[union-attr]
        await eng.stop()

    asyncio.run(main())
    rows = asyncio.run(fetch(pg_dsn, "SELECT * FROM telemetry ORDER BY received_at"))
    assert len(rows) == 31
    r = rows[7]
    assert tuple(r[c] for c in ("company_id", "machine_id", "battery", "solar_v", "water")) == (
        "acme",
        "m1",
        13.7,
        21.2,
        80.0,
    )
    assert (r["temp"], r["vibration"]) == (32.5, 0.07)
    assert json.loads(r["extra"]) == {"temp": 32.5, "vibration": 0.07}
    assert r["ts"] == r["received_at"]  # no ts in the payload
    (m9,) = [r for r in rows if r["machine_id"] == "m9"]
    assert m9["ts"] == dt.datetime.fromtimestamp(t, UTC) != m9["received_at"]
    status = {
        (r["company_id"], r["machine_id"]): (r["status"], r["energy"], r["water"], r["area"])
        for r in asyncio.run(fetch(pg_dsn, "SELECT * FROM machine_status"))
    }
    assert status == {
        ("acme", "m1"): ("offline", 150.5, 25.0, 450.0),
        ("acme", "m2"): ("offline", None, None, None),
        ("beta", "m1"): ("Stopped", 1.0, None, None),
    }
    dl = asyncio.run(fetch(pg_dsn, "SELECT topic, error FROM dead_letters"))
    assert [(d["topic"], "battery" in d["error"]) for d in dl] == [
        ("company/acme/machine/m1/telemetry", True)
    ]
    idx = asyncio.run(
        fetch(pg_dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = 'telemetry'")
    )
    assert any("(machine_id, ts)" in i[0] for i in idx)
    pres = asyncio.run(fetch(pg_dsn, "SELECT client_id, online FROM presence"))
    assert [tuple(p) for p in pres] == [("m1", True)]


def test_device_fleet(pg_dsn: str, tmp_path: Path) -> None:
    cfg = example("device-fleet.toml", pg_dsn, tmp_path)
    now = 1_717_171_717_123  # Date.now()

    def at(t_ms: int) -> dt.datetime:
        return dt.datetime.fromtimestamp(t_ms / 1000, UTC)

    async def main() -> None:
        eng = IngestEngine(cfg)
        await eng.start()
        heartbeat_futs = publish(eng, "devices/d1/heartbeat", f'{{"timestamp": {now}}}')
        assert heartbeat_futs == []  # on-receipt route: acknowledged at once
        status = '{{"deviceId":"{d}","type":"vr-headset","status":"playing","positionMs":{p},"sessionId":"s1","timestamp":{t}}}'
        await deliver_all(
            eng,
            [
                ("devices/d1/status", status.format(d="d1", p=1000, t=now)),
                ("devices/d2/status", status.format(d="d2", p=2000, t=now + 1)),
                ("devices/d1/heartbeat", f'{{"deviceId": "d1", "timestamp": {now + 60_000}}}'),
                ("devices/d1/events", f'{{"type": "seek", "positionMs": 5, "timestamp": {now}}}'),
                ("devices/d1/events", '{"type": "pause", "timestamp": "2024-05-01T12:00:05Z"}'),
                ("devices/d2/events", '{"type": "x", "timestamp": true}'),  # dead letter
                (
                    "devices/discovery/announce",
                    f'{{"deviceId":"d1","type":"vr-headset","name":"Quest","timestamp":{now}}}',
                ),
                (
                    "devices/discovery/announce",
                    f'{{"deviceId":"d1","type":"vr-headset","name":"Quest 3","timestamp":{now + 5}}}',
                ),
                ("devices/discovery/announce", '{"name": "anonymous"}'),  # no id: dead letter
                ("devices/d2/lwt", f'{{"deviceId":"d2","status":"offline","timestamp":{now + 9}}}'),
            ],
            client_id="gw",
        )
        await eng.stop()

    asyncio.run(main())
    st = {
        r["device_id"]: tuple(r)[1:6]
        for r in asyncio.run(
            fetch(
                pg_dsn,
                "SELECT device_id, type, status, position_ms, session_id, ts FROM device_status",
            )
        )
    }
    assert st == {
        "d1": ("vr-headset", "playing", 1000, "s1", at(now)),
        # The LWT marked d2 offline and kept its last position and session.
        "d2": ("vr-headset", "offline", 2000, "s1", at(now + 9)),
    }
    hb = asyncio.run(fetch(pg_dsn, "SELECT device_id, ts FROM device_heartbeats"))
    assert [tuple(h) for h in hb] == [("d1", at(now + 60_000))]
    ev = asyncio.run(fetch(pg_dsn, "SELECT device_id, ts, event FROM device_events ORDER BY ts"))
    assert [tuple(e) for e in ev] == [
        ("d1", dt.datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC), "pause"),
        ("d1", at(now), "seek"),
    ]
    devs = asyncio.run(
        fetch(pg_dsn, "SELECT device_id, name, announced_at, announced_by FROM devices")
    )
    assert [tuple(d) for d in devs] == [("d1", "Quest 3", at(now + 5), "gw")]
    dl = asyncio.run(fetch(pg_dsn, "SELECT route FROM dead_letters ORDER BY route"))
    assert [d[0] for d in dl] == ["discovery", "events"]


def test_pdu_sockets(pg_dsn: str, tmp_path: Path) -> None:
    cfg = example("pdu-sockets.toml", pg_dsn, tmp_path)

    async def main() -> None:
        eng = IngestEngine(cfg)
        await eng.start()  # creates pdu_sockets (empty) with the other tables
        pool = eng.database.pool  # type: ignore[union-attr]
        await pool.execute(
            "INSERT INTO pdu_sockets (pdu_base_topic, socket_suffix, socket_id, device_id) VALUES "
            "('hopt/tang3/pkt', 'socket1', 17, 'fridge-2'), ('hopt/tang3/pkt', 'socket2', 18, 'kettle-1'),"
            " ('hopt/tang4/pkt', 'socket1', 31, 'server-9')"
        )
        # Not in the cache loaded at start: the first miss reloads the mapping.
        await deliver_all(
            eng,
            [
                ("hopt/tang3/pkt/socket1", '{"voltage": 229.8, "current": 0.42, "power": 96.5}'),
                ("hopt/tang3/pkt/socket2", '{"voltage": 230.1, "current": 8.7, "power": 2001.0}'),
                ("hopt/tang4/pkt/socket1", '{"voltage": 231.0, "current": 1.1, "power": 254.1}'),
                ("hopt/tang3/pkt/socket1", '{"voltage": 229.5, "current": 0.45, "power": 103.2}'),
                ("hopt/tang3/pkt/socket9", '{"voltage": 1, "current": 1, "power": 1}'),  # unmapped
            ],
        )
        assert eng.stats.lookup_reloads >= 2  # start + the miss
        await eng.stop()

    asyncio.run(main())
    logs = asyncio.run(
        fetch(
            pg_dsn,
            "SELECT socket_id, device_id, socket_suffix, power FROM device_data_logs ORDER BY power",
        )
    )
    assert [tuple(r) for r in logs] == [
        (17, "fridge-2", "socket1", 96.5),
        (17, "fridge-2", "socket1", 103.2),
        (31, "server-9", "socket1", 254.1),
        (18, "kettle-1", "socket2", 2001.0),
    ]
    state = {
        r["device_id"]: tuple(r)[1:]
        for r in asyncio.run(
            fetch(
                pg_dsn,
                "SELECT device_id, socket_id, voltage, current, power FROM device_current_state",
            )
        )
    }
    assert state == {
        "fridge-2": (17, 229.5, 0.45, 103.2),
        "kettle-1": (18, 230.1, 8.7, 2001.0),
        "server-9": (31, 231.0, 1.1, 254.1),
    }
    dl = asyncio.run(fetch(pg_dsn, "SELECT route, topic, error FROM dead_letters ORDER BY route"))
    assert [(d["route"], d["topic"]) for d in dl] == [
        ("socket-current-state", "hopt/tang3/pkt/socket9"),
        ("socket-readings", "hopt/tang3/pkt/socket9"),
    ]
    assert "no row in pdu_sockets for key ('hopt/tang3/pkt', 'socket9')" in dl[0]["error"]


def test_reference_example(pg_dsn: str, tmp_path: Path) -> None:
    cfg = example("ingestd.example.toml", pg_dsn, tmp_path)

    async def main() -> None:
        eng = IngestEngine(cfg)
        await eng.start()
        await deliver_all(
            eng,
            [("sensors/lab/s1/reading", '{"ts": 1717171717000, "temp": 21.5, "hum": 40}')],
            client_id="s1",
            properties={0x26: [("fw", "3.1")]},
        )
        await eng.stop()

    asyncio.run(main())
    r = asyncio.run(fetch(pg_dsn, "SELECT * FROM sensor_readings"))[0]
    assert (
        r["site"],
        r["sensor_id"],
        r["temperature"],
        r["humidity"],
        r["firmware"],
        r["source_kind"],
    ) == (
        "lab",
        "s1",
        21.5,
        40.0,
        "3.1",
        "mqtt",
    )
    assert r["ts"] == dt.datetime(2024, 5, 31, 16, 8, 37, tzinfo=UTC)
