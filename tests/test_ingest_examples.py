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

    async def main() -> None:
        eng = IngestEngine(cfg)
        await eng.start()
        eng.on_client_connected(ClientInfo("m1", None, "10.1.1.1:40000", 4, time.time()))
        t = 1_717_171_717
        items = [
            (
                f"company/acme/machine/m{i % 3}/telemetry",
                f'{{"ts": {t + i}, "battery": {80 + i}, "solar_v": 18.4, "solar_a": 1.9, "water": 412.0,'
                f' "extra": {{"pump": "on", "i": {i}}}}}',
            )
            for i in range(30)
        ]
        items += [
            ("company/acme/machine/m1/status", f'{{"ts": {t}, "state": "idle", "fw": "2.4.0"}}'),
            (
                "company/acme/machine/m1/status",
                f'{{"ts": {t + 5}, "state": "pumping", "fw": "2.4.1"}}',
            ),
            ("company/beta/machine/m1/status", f'{{"ts": {t}, "state": "off", "fw": "1.0"}}'),
            (
                "company/acme/machine/m9/telemetry",
                '{"battery": 10}',
            ),  # no ts: required -> dead letter
        ]
        await deliver_all(eng, items, client_id="m1")
        await eng.presence.flush(eng.database.pool)  # type: ignore[union-attr]
        await eng.stop()

    asyncio.run(main())
    rows = asyncio.run(fetch(pg_dsn, "SELECT * FROM telemetry ORDER BY ts"))
    assert len(rows) == 30
    r = rows[7]
    assert (
        r["company_id"],
        r["machine_id"],
        r["battery"],
        r["solar_v"],
        r["solar_a"],
        r["water"],
    ) == (
        "acme",
        "m1",
        87.0,
        18.4,
        1.9,
        412.0,
    )
    assert r["ts"] == dt.datetime.fromtimestamp(1_717_171_724, UTC)
    assert json.loads(r["extra"]) == {"pump": "on", "i": 7}
    assert r["received_at"] is not None
    status = {
        (r["company_id"], r["machine_id"]): dict(r)
        for r in asyncio.run(fetch(pg_dsn, "SELECT * FROM machine_status"))
    }
    assert set(status) == {("acme", "m1"), ("beta", "m1")}
    assert (status[("acme", "m1")]["state"], status[("acme", "m1")]["firmware"]) == (
        "pumping",
        "2.4.1",
    )
    assert status[("acme", "m1")]["ts"] == dt.datetime.fromtimestamp(1_717_171_722, UTC)
    dl = asyncio.run(fetch(pg_dsn, "SELECT topic, error FROM dead_letters"))
    assert [(d["topic"], "column ts: no value" in d["error"]) for d in dl] == [
        ("company/acme/machine/m9/telemetry", True)
    ]
    idx = asyncio.run(
        fetch(pg_dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = 'telemetry'")
    )
    assert any("(machine_id, ts)" in i[0] for i in idx)
    pres = asyncio.run(fetch(pg_dsn, "SELECT client_id, online FROM device_presence"))
    assert [tuple(p) for p in pres] == [("m1", True)]


def test_device_fleet(pg_dsn: str, tmp_path: Path) -> None:
    cfg = example("device-fleet.toml", pg_dsn, tmp_path)

    async def main() -> None:
        eng = IngestEngine(cfg)
        await eng.start()
        heartbeat_futs = publish(eng, "devices/d1/heartbeat", '{"uptime": 100, "rssi": -60}')
        assert heartbeat_futs == []  # on-receipt route: acknowledged at once
        await deliver_all(
            eng,
            [
                ("devices/d1/status", '{"state": "running", "battery": 80, "fw": "1.2.0"}'),
                ("devices/d2/status", '{"state": "running", "battery": 55, "fw": "1.1.9"}'),
                ("devices/d1/heartbeat", '{"uptime": 160, "rssi": -61}'),
                (
                    "devices/d1/events",
                    '{"ts": "2024-05-01T12:00:00Z", "type": "door_open", "data": {"door": 2}}',
                ),
                ("devices/d1/events", '{"ts": "2024-05-01T12:00:05+02:00", "type": "door_close"}'),
                ("devices/d2/events", '{"ts": "2024-05-01T12:00:00Z"}'),  # no type: dead letter
                (
                    "devices/discovery/announce",
                    '{"id": "d1", "model": "TH-2", "fw": "1.2.0", "caps": ["temp"]}',
                ),
                (
                    "devices/discovery/announce",
                    '{"id": "d1", "model": "TH-2", "fw": "1.3.0", "caps": ["temp", "hum"]}',
                ),
                ("devices/discovery/announce", '{"model": "anonymous"}'),  # no id: dead letter
                ("devices/d2/lwt", "offline"),
            ],
            client_id="gw",
        )
        await eng.stop()

    asyncio.run(main())
    st = {
        r["device_id"]: dict(r) for r in asyncio.run(fetch(pg_dsn, "SELECT * FROM device_status"))
    }
    assert (st["d1"]["online"], st["d1"]["state"], st["d1"]["battery"]) == (True, "running", 80.0)
    # The LWT marked d2 offline and kept its last known state.
    assert (st["d2"]["online"], st["d2"]["state"], st["d2"]["firmware"]) == (
        False,
        "running",
        "1.1.9",
    )
    hb = asyncio.run(fetch(pg_dsn, "SELECT device_id, uptime_s, rssi FROM last_seen"))
    assert [tuple(h) for h in hb] == [("d1", 160, -61)]
    ev = asyncio.run(
        fetch(pg_dsn, "SELECT device_id, ts, event, data FROM device_events ORDER BY ts")
    )
    assert [tuple(e) for e in ev] == [
        ("d1", dt.datetime(2024, 5, 1, 10, 0, 5, tzinfo=UTC), "door_close", None),
        ("d1", dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC), "door_open", '{"door": 2}'),
    ]
    devs = asyncio.run(
        fetch(pg_dsn, "SELECT device_id, firmware, capabilities, announced_by FROM devices")
    )
    assert [tuple(d) for d in devs] == [("d1", "1.3.0", '["temp", "hum"]', "gw")]
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
