"""The example configurations in config/, end to end through the real broker.

tests/test_ingest_examples.py hands Message objects to the sinks; here every
message is published by a paho-mqtt client (MQTT 3.1.1 or 5.0) to an
in-process ingestd listening on 127.0.0.1 (an ephemeral port), and the rows
are checked with SQL. The shipped files are loaded unchanged except for the
DSN, the data directory and the listeners.

* solar-fleet.toml: telemetry without a timestamp (ts falls back to
  received_at), numeric columns, latest status, a dead letter, commands
  routed to a device, presence, and the LWT {"status":"offline"} on the
  status topic keeping the last energy/water/area (keep_when_missing);
* device-fleet.toml: discovery registry keyed by deviceId, retained status,
  heartbeat (on-receipt), events (Date.now() ms and ISO timestamps), and a
  Last Will marking a dead device offline while keeping its last session;
* pdu-sockets.toml: the device resolved through the socket mapping table,
  an unmapped socket (on_miss = "dead-letter" after miss_wait_s), and mapping
  rows added while running, before a reading or moments after it (the miss
  waits and reloads: nothing is lost);
* a route of our own covering the remaining column sources.

Nothing sleeps to assert: conditions are polled with a bounded deadline, and
QoS 1/2 publishes in after-commit mode return once their batch is committed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.config import Config, load_config
from mqtt_clients import WAIT, Client, props
from pg_fixtures import config_from_toml, fetch_sync, wait_rows
from server_thread import ServerThread

pytestmark = pytest.mark.pg
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
UTC = dt.UTC


# ----------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------


def example(name: str, dsn: str, tmp_path: Path) -> Config:
    """A shipped example, with only the DSN, data_dir and listeners overridden."""
    cfg = load_config(
        str(CONFIG_DIR / name),
        env={},
        overrides={"database": {"dsn": dsn}, "server": {"data_dir": str(tmp_path / "data")}},
    )
    loopback(cfg)
    return cfg


def loopback(cfg: Config) -> Config:
    cfg.server.listen = ["127.0.0.1:0"]
    cfg.server.tls_listen = []
    cfg.server.ws_listen = []
    cfg.server.http_listen = None
    return cfg


class Broker:
    """A ServerThread plus the paho clients connected to it (all closed at the end)."""

    def __init__(self, cfg: Config) -> None:
        self.srv = ServerThread(cfg, database=True).start()
        self.clients: list[Client] = []

    @property
    def engine(self) -> Any:
        assert self.srv.app is not None
        return self.srv.app.ingest

    def client(self, client_id: str, version: int = 5, **kw: Any) -> Client:
        c = Client(self.srv.port, client_id=client_id, version=version, **kw)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            # Disconnect and stop paho's network thread before the server stops (it
            # would keep reconnecting); a dropped client's socket is closed already.
            with contextlib.suppress(OSError):
                c.c.disconnect()
            c.c.loop_stop()
        self.srv.stop()


@contextlib.contextmanager
def running(cfg: Config) -> Iterator[Broker]:
    b = Broker(cfg)
    try:
        yield b
    finally:
        b.close()


def ts(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, UTC)


def within(value: dt.datetime, start: float, end: float) -> bool:
    """``value`` (a received_at) lies between two wall-clock readings of this process.

    1 ms of slack covers rounding to PostgreSQL's microseconds; this is an
    ordering check, not a speed check.
    """
    return ts(start - 0.001) <= value <= ts(end + 0.001)


def dead_letters(dsn: str) -> list[dict[str, Any]]:
    rows = fetch_sync(
        dsn,
        "SELECT route, topic, client_id, payload, error, received_at FROM dead_letters "
        "ORDER BY received_at, route",
    )
    return [dict(r) for r in rows]


# ----------------------------------------------------------------------
# 1. solar-fleet.toml
# ----------------------------------------------------------------------


TELEMETRY = {
    "battery": 13.5,
    "solar_v": 21.2,
    "solar_a": 4.5,
    "water": 80,
    "extra": {"temp": 32.5, "vibration": 0.01},
}
TELEMETRY_SQL = (
    "SELECT company_id, machine_id, ts, received_at, battery, solar_v, solar_a, water, "
    "temp, vibration, extra FROM telemetry ORDER BY received_at"
)
MACHINE_SQL = (
    "SELECT company_id, machine_id, status, energy, water, area, updated_at FROM machine_status "
    "ORDER BY company_id, machine_id"
)


def test_solar_fleet_through_the_broker(pg_dsn: str, tmp_path: Path) -> None:
    t = 1_717_171_717
    with running(example("solar-fleet.toml", pg_dsn, tmp_path)) as b:
        # An operator console watching commands and one machine's telemetry.
        ops = b.client("ops-console", version=5)
        ops.subscribe("company/acme/machine/m1/telemetry", 1)
        # m1 registers its Last Will on its status topic, as the fleet does.
        will = ("company/acme/machine/m1/status", b'{"status":"offline"}', 1, False)
        m1 = b.client("m1", version=4, will=will)  # MQTT 3.1.1
        m2 = b.client("m2", version=5)  # MQTT 5.0
        m1.subscribe("company/acme/machine/m1/command", 1)

        # -- telemetry: exactly what the machines send, no timestamp -----------
        t0 = time.time()
        body1 = json.dumps(TELEMETRY)
        m1.publish("company/acme/machine/m1/telemetry", body1, 1)
        # a machine that does send a ts (Unix seconds) keeps it; numeric strings
        # and integers are accepted for double precision columns
        body2 = json.dumps({"ts": t, "battery": 12, "solar_v": "0", "solar_a": 0, "water": 79})
        m2.publish("company/beta/machine/m2/telemetry", body2, 1)
        # a value of the wrong type: a dead letter, and the connection stays up
        m1.publish("company/acme/machine/m1/telemetry", '{"battery": "high"}', 1)
        t1 = time.time()

        # after-commit: the PUBACKs above mean the rows are committed
        rows = [dict(r) for r in fetch_sync(pg_dsn, TELEMETRY_SQL)]
        assert len(rows) == 2
        r1, r2 = sorted(rows, key=lambda r: r["company_id"])
        assert within(r1["received_at"], t0, t1)
        assert r1.pop("ts") == r1.pop("received_at")  # no ts in the payload: received_at
        assert json.loads(r1.pop("extra")) == TELEMETRY["extra"]
        assert r1 == {
            "company_id": "acme",
            "machine_id": "m1",
            "battery": 13.5,
            "solar_v": 21.2,
            "solar_a": 4.5,
            "water": 80.0,
            "temp": 32.5,
            "vibration": 0.01,
        }
        assert within(r2.pop("received_at"), t0, t1)
        assert r2 == {
            "company_id": "beta",
            "machine_id": "m2",
            "ts": ts(t),
            "battery": 12.0,
            "solar_v": 0.0,
            "solar_a": 0.0,
            "water": 79.0,
            "temp": None,
            "vibration": None,
            "extra": None,
        }
        types = fetch_sync(
            pg_dsn,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'telemetry' ORDER BY column_name",
        )
        numeric = {"battery", "solar_v", "solar_a", "water", "temp", "vibration"}
        assert {c: dtype for c, dtype in types if c in numeric} == dict.fromkeys(
            numeric, "double precision"
        )
        dls = dead_letters(pg_dsn)
        assert [(d["route"], d["topic"], d["client_id"], d["payload"]) for d in dls] == [
            ("telemetry", "company/acme/machine/m1/telemetry", "m1", b'{"battery": "high"}')
        ]
        assert "battery" in dls[0]["error"]
        assert m1.c.is_connected() and m1.disconnects.empty()

        # The broker routes to subscribers side by side with the ingest sinks.
        seen = ops.expect(2)
        assert [(m.topic, m.payload) for m in seen] == [
            ("company/acme/machine/m1/telemetry", body1.encode()),
            ("company/acme/machine/m1/telemetry", b'{"battery": "high"}'),
        ]

        # -- status: one row per (company_id, machine_id) ----------------------
        s1 = {"status": "Running", "energy": 150.5, "water": 25.0, "area": 450.0}
        m1.publish("company/acme/machine/m1/status", json.dumps(s1), 1)
        first = [dict(r) for r in fetch_sync(pg_dsn, MACHINE_SQL)]
        assert len(first) == 1
        assert tuple(first[0].values())[:6] == ("acme", "m1", "Running", 150.5, 25.0, 450.0)
        # Two more in flight at once (most likely one batch): the later one wins;
        # the same machine id under another company is another row.
        s2 = {"status": "Idle", "energy": 151.0, "water": 24.0, "area": 450.0}
        s3 = {"status": "Running", "energy": 152.5, "water": 23.5, "area": 460.0}
        infos = [m1.c.publish("company/acme/machine/m1/status", json.dumps(s), 1) for s in (s2, s3)]
        m2.publish("company/beta/machine/m1/status", json.dumps({"status": "Stopped"}), 1)
        for info in infos:
            info.wait_for_publish(WAIT)
            assert info.is_published()
        st = [tuple(r)[:6] for r in fetch_sync(pg_dsn, MACHINE_SQL)]
        assert st == [
            ("acme", "m1", "Running", 152.5, 23.5, 460.0),
            ("beta", "m1", "Stopped", None, None, None),
        ]

        # A command to machine m1 (no route matches it) reaches the device.
        ops.publish("company/acme/machine/m1/command", b'{"pump": "off"}', 1)
        (cmd,) = m1.expect(1)
        assert (cmd.topic, cmd.payload, cmd.qos) == (
            "company/acme/machine/m1/command",
            b'{"pump": "off"}',
            1,
        )
        # ... and became neither a row nor a dead letter: a later acknowledged
        # telemetry message is committed after anything routed before it.
        m2.publish("company/beta/machine/m2/telemetry", json.dumps(TELEMETRY), 1)
        assert len(dead_letters(pg_dsn)) == 1
        n = fetch_sync(pg_dsn, "SELECT count(*) FROM telemetry")[0][0]
        assert n == 3

        # presence is enabled in this example: one row per connected client
        pres = wait_rows(
            pg_dsn,
            "SELECT client_id, online, protocol_version FROM presence "
            "WHERE client_id IN ('m1', 'm2') ORDER BY client_id",
            until=lambda r: len(r) == 2,
        )
        assert [tuple(p) for p in pres] == [("m1", True, 4), ("m2", True, 5)]

        # -- Last Will: {"status":"offline"} on the status topic --------------
        (before,) = fetch_sync(pg_dsn, MACHINE_SQL + " LIMIT 1")
        m1.drop()  # power lost: no DISCONNECT, the broker publishes the will
        rows = wait_rows(
            pg_dsn, MACHINE_SQL, until=lambda r: len(r) == 2 and r[0]["status"] == "offline"
        )
        # status is offline; the last known energy, water and area are kept
        assert tuple(rows[0])[:6] == ("acme", "m1", "offline", 152.5, 23.5, 460.0)
        assert rows[0]["updated_at"] > before["updated_at"]
        assert tuple(rows[1])[:6] == ("beta", "m1", "Stopped", None, None, None)
        assert len(dead_letters(pg_dsn)) == 1


# ----------------------------------------------------------------------
# 2. device-fleet.toml
# ----------------------------------------------------------------------

STATUS_SQL = (
    "SELECT device_id, type, status, position_ms, session_id, ts, updated_at "
    "FROM device_status WHERE device_id = $1"
)


def ms(t_ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t_ms / 1000, UTC)


def test_device_fleet_through_the_broker(pg_dsn: str, tmp_path: Path) -> None:
    now_ms = 1_717_171_717_123  # Date.now() of a browser simulator
    with running(example("device-fleet.toml", pg_dsn, tmp_path)) as b:
        gw = b.client("sim-registry", version=5)
        # vr-1 (a headset, MQTT 3.1.1) and sim-2 (a browser simulator over MQTT 5)
        # register their Last Will on their lwt topic.
        lwt1 = json.dumps({"deviceId": "vr-1", "status": "offline", "timestamp": now_ms + 9000})
        d1 = b.client("vr-1", version=4, will=("devices/vr-1/lwt", lwt1.encode(), 1, False))
        lwt2 = json.dumps({"deviceId": "sim-2", "status": "offline", "timestamp": now_ms})
        d2 = b.client("sim-2", version=5, will=("devices/sim-2/lwt", lwt2.encode(), 1, False))

        # -- discovery: a registry keyed by the payload's deviceId ------------
        a1 = {"deviceId": "vr-1", "type": "vr-headset", "name": "Quest #1", "timestamp": now_ms}
        a1b = {**a1, "name": "Quest #1 (lab)", "timestamp": now_ms + 1000}
        a2 = {"deviceId": "sim-2", "type": "browser", "name": "Chrome sim", "timestamp": now_ms}
        d1.publish("devices/discovery/announce", json.dumps(a1), 1)
        for a in (a1b, a2):
            gw.publish("devices/discovery/announce", json.dumps(a), 1)
        devs = fetch_sync(
            pg_dsn,
            "SELECT device_id, type, name, announced_at, announced_by FROM devices "
            "ORDER BY device_id",
        )
        assert [tuple(d) for d in devs] == [
            ("sim-2", "browser", "Chrome sim", ms(now_ms), "sim-registry"),
            ("vr-1", "vr-headset", "Quest #1 (lab)", ms(now_ms + 1000), "sim-registry"),
        ]

        # -- status, retained --------------------------------------------------
        status1 = {
            "deviceId": "vr-1",
            "type": "vr-headset",
            "status": "playing",
            "positionMs": 73250,
            "sessionId": "s-42",
            "timestamp": now_ms + 2000,
        }
        t0 = time.time()
        d1.publish("devices/vr-1/status", json.dumps(status1), 1, retain=True)
        t1 = time.time()
        (row,) = fetch_sync(pg_dsn, STATUS_SQL, "vr-1")
        assert tuple(row)[:6] == ("vr-1", "vr-headset", "playing", 73250, "s-42", ms(now_ms + 2000))
        assert within(row["updated_at"], t0, t1)
        d1_status_at = row["updated_at"]

        # A subscriber arriving later gets the retained status ...
        dash = b.client("dashboard", version=5)
        dash.subscribe("devices/+/status", 1)
        (ret,) = dash.expect(1)
        assert (ret.topic, ret.payload, ret.retain) == (
            "devices/vr-1/status",
            json.dumps(status1).encode(),
            True,
        )
        # ... which the ingest routes do not see again: sim-2's status, acknowledged
        # after commit, goes through the same (ordered) batcher of device_status.
        # An ISO 8601 timestamp (new Date().toISOString()) is accepted as well.
        status2 = {
            "deviceId": "sim-2",
            "type": "browser",
            "status": "idle",
            "positionMs": 0,
            "sessionId": None,
            "timestamp": "2024-05-31T16:08:37.123Z",
        }
        d2.publish("devices/sim-2/status", json.dumps(status2), 1, retain=True)
        (live,) = dash.expect(1)
        assert (live.topic, live.retain) == ("devices/sim-2/status", False)
        (row,) = fetch_sync(pg_dsn, STATUS_SQL, "vr-1")
        assert row["updated_at"] == d1_status_at
        (row2,) = fetch_sync(pg_dsn, STATUS_SQL, "sim-2")
        assert tuple(row2)[:6] == ("sim-2", "browser", "idle", 0, None, ms(now_ms))

        # -- heartbeat: on-receipt acks, so poll for the row ------------------
        d1.publish(
            "devices/vr-1/heartbeat", json.dumps({"deviceId": "vr-1", "timestamp": now_ms}), 1
        )
        hb_sql = "SELECT device_id, ts, last_seen FROM device_heartbeats"
        hb = wait_rows(pg_dsn, hb_sql)
        assert [tuple(h)[:2] for h in hb] == [("vr-1", ms(now_ms))]
        first_seen = hb[0]["last_seen"]
        d1.publish("devices/vr-1/heartbeat", "{}", 1)  # no timestamp: received_at
        hb = wait_rows(pg_dsn, hb_sql, until=lambda r: r and r[0]["last_seen"] > first_seen)
        assert len(hb) == 1 and hb[0]["ts"] == hb[0]["last_seen"]  # still one row

        # -- events: append, the whole event kept as jsonb ---------------------
        e1 = {"deviceId": "vr-1", "type": "session_started", "sessionId": "s-42",
              "timestamp": now_ms + 3000, "scene": "lobby"}  # fmt: skip
        e2 = {"deviceId": "vr-1", "type": "seek", "positionMs": 90000, "timestamp": now_ms + 4000}
        e3 = {"deviceId": "vr-1", "type": "session_ended", "timestamp": "not a time"}
        for e in (e1, e2, e3):
            d1.publish("devices/vr-1/events", json.dumps(e), 1)
        ev = fetch_sync(
            pg_dsn,
            "SELECT device_id, ts, event, session_id, payload, received_at FROM device_events "
            "ORDER BY ts",
        )
        assert [(*tuple(e)[:4], json.loads(e[4])) for e in ev] == [
            ("vr-1", ms(now_ms + 3000), "session_started", "s-42", e1),
            ("vr-1", ms(now_ms + 4000), "seek", None, e2),
        ]
        assert all(e["received_at"] is not None for e in ev)
        dls = dead_letters(pg_dsn)
        assert [(d["route"], d["client_id"]) for d in dls] == [("events", "vr-1")]
        assert "column ts: invalid timestamp 'not a time'" in dls[0]["error"]

        # -- Last Will ---------------------------------------------------------
        # sim-2 says goodbye properly: its will is discarded (presence shows when
        # the broker has processed the DISCONNECT).
        d2.disconnect()
        wait_rows(pg_dsn, "SELECT 1 FROM presence WHERE client_id = 'sim-2' AND NOT online")
        # vr-1 loses power: the socket closes without DISCONNECT, the broker
        # publishes its will, and the LWT route marks it offline.
        d1.drop()
        (row,) = wait_rows(
            pg_dsn, STATUS_SQL, "vr-1", until=lambda r: len(r) == 1 and r[0]["status"] == "offline"
        )
        # Only status, ts and updated_at changed: the last position and session stay.
        assert tuple(row)[:6] == ("vr-1", "vr-headset", "offline", 73250, "s-42", ms(now_ms + 9000))
        assert row["updated_at"] > d1_status_at
        # sim-2's will was not published (it would have been committed before vr-1's).
        (row2,) = fetch_sync(pg_dsn, STATUS_SQL, "sim-2")
        assert row2["status"] == "idle"
        pres = wait_rows(
            pg_dsn,
            "SELECT disconnect_reason FROM presence WHERE client_id = 'vr-1' AND NOT online",
        )
        assert pres[0][0] == "connection_lost"


# ----------------------------------------------------------------------
# 3. pdu-sockets.toml
# ----------------------------------------------------------------------


def reading(v: float, a: float, p: float) -> str:
    return json.dumps({"voltage": v, "current": a, "power": p})


LOGS_SQL = (
    "SELECT socket_id, device_id, pdu_base_topic, socket_suffix, voltage, current, power, "
    "received_at FROM device_data_logs ORDER BY received_at"
)
STATE_SQL = (
    "SELECT device_id, socket_id, voltage, current, power, updated_at FROM device_current_state "
    "ORDER BY device_id"
)


def test_pdu_sockets_through_the_broker(pg_dsn: str, tmp_path: Path) -> None:
    with running(example("pdu-sockets.toml", pg_dsn, tmp_path)) as b:
        engine = b.engine
        lk = b.srv.call(lambda: engine.compiled.lookups["socket"])
        assert (lk.on_miss, lk.miss_refresh_s, lk.miss_wait_s) == ("dead-letter", 1, 2)

        def lookup_state() -> tuple[float, int]:
            return b.srv.call(lambda: (lk.miss_reloaded_at, engine.stats.lookup_reloads))

        # ingestd created the mapping table empty; the operator fills it after start,
        # so the rows are not in the cache loaded at start.
        assert fetch_sync(pg_dsn, "SELECT * FROM pdu_sockets") == []
        fetch_sync(
            pg_dsn,
            "INSERT INTO pdu_sockets (pdu_base_topic, socket_suffix, socket_id, device_id) "
            "VALUES ('hopt/tang3/pkt', 'socket1', 17, 'fridge-2'), "
            "('hopt/tang3/pkt', 'socket2', 18, 'kettle-1'), "
            "('hopt/tang4/pkt', 'socket1', 31, 'server-9')",
        )
        _, reloads_at_start = lookup_state()

        pdu3 = b.client("pdu-tang3", version=4)
        pdu4 = b.client("pdu-tang4", version=5)
        t0 = time.time()
        # The first reading misses the cache: the table is reloaded at once.
        pdu3.publish("hopt/tang3/pkt/socket1", reading(229.8, 0.42, 96.5), 1)
        pdu3.publish("hopt/tang3/pkt/socket2", reading(230.1, 8.7, 2001.0), 1)
        pdu4.publish("hopt/tang4/pkt/socket1", reading(231.0, 1.1, 254.1), 1)
        pdu3.publish("hopt/tang3/pkt/socket1", reading(229.5, 0.45, 103.2), 1)
        t1 = time.time()
        miss_reload_at, reloads = lookup_state()
        assert reloads > reloads_at_start and miss_reload_at > 0

        logs = fetch_sync(pg_dsn, LOGS_SQL)
        assert [tuple(r)[:7] for r in logs] == [
            (17, "fridge-2", "hopt/tang3/pkt", "socket1", 229.8, 0.42, 96.5),
            (18, "kettle-1", "hopt/tang3/pkt", "socket2", 230.1, 8.7, 2001.0),
            (31, "server-9", "hopt/tang4/pkt", "socket1", 231.0, 1.1, 254.1),
            (17, "fridge-2", "hopt/tang3/pkt", "socket1", 229.5, 0.45, 103.2),
        ]
        assert all(within(r["received_at"], t0, t1) for r in logs)
        state = fetch_sync(pg_dsn, STATE_SQL)
        assert [tuple(r)[:5] for r in state] == [
            ("fridge-2", 17, 229.5, 0.45, 103.2),
            ("kettle-1", 18, 230.1, 8.7, 2001.0),
            ("server-9", 31, 231.0, 1.1, 254.1),
        ]
        assert all(within(r["updated_at"], t0, t1) for r in state)

        # A topic outside the route's filter is not ingested (no row, no dead letter);
        # an unmapped socket is a dead letter of both routes (on_miss = "dead-letter").
        pdu3.publish("hopt/tang3/meter/socket1", reading(1, 1, 1), 1)
        pdu3.publish("hopt/tang3/pkt/socket9", reading(229.0, 2.0, 458.0), 1)
        dls = dead_letters(pg_dsn)
        assert [(d["route"], d["topic"], d["client_id"], d["payload"]) for d in dls] == [
            (route, "hopt/tang3/pkt/socket9", "pdu-tang3", reading(229.0, 2.0, 458.0).encode())
            for route in ("socket-current-state", "socket-readings")
        ]
        key = "('hopt/tang3/pkt', 'socket9')"
        assert all(f"no row in pdu_sockets for key {key}" in d["error"] for d in dls)
        assert len(fetch_sync(pg_dsn, LOGS_SQL)) == 4
        assert len(fetch_sync(pg_dsn, STATE_SQL)) == 3

        # The operator maps socket9 while ingestd runs; a reading right after it
        # is resolved, even though a miss reloaded the table a moment ago.
        fetch_sync(
            pg_dsn,
            "INSERT INTO pdu_sockets VALUES ('hopt/tang3/pkt', 'socket9', 19, 'heater-3')",
        )
        n_dead = len(dead_letters(pg_dsn))
        pdu3.publish("hopt/tang3/pkt/socket9", reading(227.0, 2.2, 499.4), 1)
        logs = fetch_sync(pg_dsn, LOGS_SQL)
        assert tuple(logs[-1])[:7] == (
            19,
            "heater-3",
            "hopt/tang3/pkt",
            "socket9",
            227.0,
            2.2,
            499.4,
        )
        state = {r["device_id"]: tuple(r)[1:5] for r in fetch_sync(pg_dsn, STATE_SQL)}
        assert state["heater-3"] == (19, 227.0, 2.2, 499.4)
        assert len(state) == 4
        assert len(dead_letters(pg_dsn)) == n_dead

        # A new socket's first reading arrives before its mapping row, which the
        # operator adds moments later: the reading waits (miss_wait_s) and lands.
        sent = time.time()
        info = pdu4.c.publish("hopt/tang4/pkt/socket2", reading(232.0, 3.0, 696.0), 1)
        time.sleep(0.5)  # the "moments later"; the PUBACK is still owed
        assert not info.is_published()
        fetch_sync(
            pg_dsn,
            "INSERT INTO pdu_sockets VALUES ('hopt/tang4/pkt', 'socket2', 32, 'pump-5')",
        )
        info.wait_for_publish(WAIT)
        assert info.is_published()
        assert time.time() - sent < lk.miss_wait_s + lk.miss_refresh_s + WAIT
        row = fetch_sync(pg_dsn, LOGS_SQL + " DESC LIMIT 1")[0]
        assert tuple(row)[:4] == (32, "pump-5", "hopt/tang4/pkt", "socket2")
        state = {r["device_id"]: tuple(r)[1:5] for r in fetch_sync(pg_dsn, STATE_SQL)}
        assert state["pump-5"] == (32, 232.0, 3.0, 696.0)
        assert len(dead_letters(pg_dsn)) == n_dead


# ----------------------------------------------------------------------
# 4. Column sources not covered elsewhere, through the broker
# ----------------------------------------------------------------------

MATRIX = """
[server]
http_listen = ""
[presence]
enabled = false

[[routes]]
name = "matrix"
topic = "mx/{n}/{rest#}"
table = "mx_rows"
[routes.columns]
whole_topic = "topic"
level0 = "topic[0]"
level1 = "topic[1]"
last_level = "topic[-1]"
second_last = "topic[-2]"
rest = "topic.rest"
n = "topic.n::integer"
doc = "payload"
model = "payload.meta.sensor.model::text"
gain = "payload.meta.sensor.gain::double precision"
sensor = "payload.meta.sensor"
second = "payload.values[1]::double precision"
last_value = "payload.values[-1]::integer"
first_raw = "payload.values[0]"
received_at = "received_at"
qos = "qos"
retain = "retain"
source_kind = { value = "mqtt" }
schema_version = { value = 3 }
scale = { value = 0.25 }
calibrated = { value = true }

[[routes]]
name = "blobs"
topic = "mxbin/{dev}"
table = "mx_blobs"
[routes.columns]
dev = "topic.dev"
raw = "payload::bytea"
qos = "qos"
retain = "retain"
received_at = "received_at"
"""

MX_SQL = (
    "SELECT whole_topic, level0, level1, last_level, second_last, rest, n, doc, model, gain, "
    "sensor, second, last_value, first_raw, received_at, qos, retain, source_kind, "
    "schema_version, scale, calibrated FROM mx_rows ORDER BY received_at"
)


def test_column_source_matrix_through_the_broker(pg_dsn: str, tmp_path: Path) -> None:
    cfg = loopback(config_from_toml(MATRIX, tmp_path, pg_dsn, persistence={"enabled": False}))
    with running(cfg) as b:
        pub = b.client("mx-pub", version=5)
        old = b.client("mx-old", version=4)
        doc_a = {"meta": {"sensor": {"model": "TH-2", "gain": 2}}, "values": [10, 20.5, 30]}
        doc_b = {"meta": {"sensor": {"model": "X", "gain": "0.5"}}, "values": [1]}
        doc_c = {"meta": None, "values": [None, 7], "other": {"deep": [1, 2]}}

        t0 = time.time()
        pub.publish("mx/1/a", json.dumps(doc_a), 0)  # QoS 0: not waited for
        pub.publish("mx/22/site/hall/rack7", json.dumps(doc_b), 1, retain=True)
        old.publish("mx/-3/x/y", json.dumps(doc_c), 2)
        rows = [dict(r) for r in wait_rows(pg_dsn, MX_SQL, until=lambda r: len(r) == 3)]
        t1 = time.time()

        for r in rows:
            assert within(r.pop("received_at"), t0, t1)
            for col in ("doc", "sensor", "first_raw"):
                r[col] = None if r[col] is None else json.loads(r[col])
        constants = {"source_kind": "mqtt", "schema_version": 3, "scale": 0.25, "calibrated": True}
        by_topic = {r["whole_topic"]: r for r in rows}
        assert by_topic["mx/1/a"] == {
            "whole_topic": "mx/1/a",
            "level0": "mx",
            "level1": "1",
            "last_level": "a",
            "second_last": "1",
            "rest": "a",
            "n": 1,
            "doc": doc_a,
            "model": "TH-2",
            "gain": 2.0,
            "sensor": {"model": "TH-2", "gain": 2},
            "second": 20.5,
            "last_value": 30,
            "first_raw": 10,
            "qos": 0,
            "retain": False,
            **constants,
        }
        assert by_topic["mx/22/site/hall/rack7"] == {
            "whole_topic": "mx/22/site/hall/rack7",
            "level0": "mx",
            "level1": "22",
            "last_level": "rack7",
            "second_last": "hall",
            "rest": "site/hall/rack7",  # {rest#}: the levels joined with '/'
            "n": 22,
            "doc": doc_b,
            "model": "X",
            "gain": 0.5,
            "sensor": {"model": "X", "gain": "0.5"},
            "second": None,  # past the end of the list: NULL
            "last_value": 1,
            "first_raw": 1,
            "qos": 1,
            "retain": True,
            **constants,
        }
        assert by_topic["mx/-3/x/y"] == {
            "whole_topic": "mx/-3/x/y",
            "level0": "mx",
            "level1": "-3",
            "last_level": "y",
            "second_last": "x",
            "rest": "x/y",
            "n": -3,
            "doc": doc_c,
            "model": None,  # a null intermediate object: NULL
            "gain": None,
            "sensor": None,
            "second": 7.0,
            "last_value": 7,
            "first_raw": None,  # JSON null is SQL NULL
            "qos": 2,
            "retain": False,
            **constants,
        }
        types = fetch_sync(
            pg_dsn,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'mx_rows'",
        )
        types_by_col = {r[0]: r[1] for r in types}
        assert {k: types_by_col[k] for k in ("n", "doc", "qos", "retain", "schema_version")} == {
            "n": "integer",
            "doc": "jsonb",
            "qos": "smallint",
            "retain": "boolean",
            "schema_version": "bigint",
        }

        # MQTT 5 topic alias: the second PUBLISH has an empty topic name; every
        # topic source sees the topic the alias stands for.
        pub.publish("mx/5/alias/dev", json.dumps(doc_a), 1, properties=props(TopicAlias=3))
        pub.publish("", json.dumps(doc_b), 1, properties=props(TopicAlias=3))
        aliased = fetch_sync(
            pg_dsn,
            "SELECT whole_topic, level1, last_level, second_last, rest, n, model FROM mx_rows "
            "WHERE n = 5 ORDER BY received_at",
        )
        assert [tuple(r) for r in aliased] == [
            ("mx/5/alias/dev", "5", "dev", "alias", "alias/dev", 5, "TH-2"),
            ("mx/5/alias/dev", "5", "dev", "alias", "alias/dev", 5, "X"),
        ]

        # Whole payload as bytea: any bytes, not JSON, stored as they are.
        blob = bytes(range(256)) + b"\x00not json\xff"
        t2 = time.time()
        pub.publish("mxbin/cam-1", blob, 1)
        old.publish("mxbin/cam-2", b"\x89PNG\r\n\x1a\n", 1, retain=True)
        t3 = time.time()
        blobs = fetch_sync(
            pg_dsn, "SELECT dev, raw, qos, retain, received_at FROM mx_blobs ORDER BY dev"
        )
        assert [tuple(r)[:4] for r in blobs] == [
            ("cam-1", blob, 1, False),
            ("cam-2", b"\x89PNG\r\n\x1a\n", 1, True),
        ]
        assert all(within(r["received_at"], t2, t3) for r in blobs)

        # A Last Will carries its own QoS and retain flag into the row.
        ghost = b.client("mx-ghost", version=5, will=("mxbin/ghost", b"\x00gone\xff", 1, True))
        ghost.drop()
        (row,) = wait_rows(pg_dsn, "SELECT dev, raw, qos, retain FROM mx_blobs WHERE dev = 'ghost'")
        assert tuple(row) == ("ghost", b"\x00gone\xff", 1, True)

        # Topics that reach the route but do not give a row: too short for {rest#},
        # and a level that is not an integer for topic.n::integer.
        pub.publish("mx/7", json.dumps(doc_a), 1)
        pub.publish("mx/seven/a", json.dumps(doc_a), 1)
        dls = dead_letters(pg_dsn)
        assert [(d["route"], d["topic"]) for d in dls] == [
            ("matrix", "mx/7"),
            ("matrix", "mx/seven/a"),
        ]
        assert "{rest#}" in dls[0]["error"]
        assert "integer" in dls[1]["error"]
        assert len(fetch_sync(pg_dsn, MX_SQL)) == 5  # the three above and the two aliased


WRONG_KIND = """
[server]
http_listen = ""
[presence]
enabled = false

[[routes]]
name = "path-only"
topic = "wk/{dev}"
table = "wk_a"
[routes.columns]
dev = "topic.dev"
b = "payload.a.b::double precision"

[[routes]]
name = "path-and-parent"
topic = "wk/{dev}"
table = "wk_b"
[routes.columns]
dev = "topic.dev"
b = "payload.a.b::double precision"
a = "payload.a"
"""


def test_payload_path_of_the_wrong_kind_is_a_dead_letter(pg_dsn: str, tmp_path: Path) -> None:
    """docs/ingest.md: "A value of the wrong kind (a number where the path expects an
    object) is an error." The same column must behave the same in both routes."""
    cfg = loopback(config_from_toml(WRONG_KIND, tmp_path, pg_dsn, persistence={"enabled": False}))
    with running(cfg) as b:
        pub = b.client("wk-pub", version=5)
        pub.publish("wk/d1", '{"a": {"b": 1.5}}', 1)  # both routes: a row
        pub.publish("wk/d2", '{"a": 5}', 1)  # a number where payload.a.b expects an object
        dls = dead_letters(pg_dsn)
        assert sorted((d["route"], d["topic"]) for d in dls) == [
            ("path-and-parent", "wk/d2"),
            ("path-only", "wk/d2"),
        ]
        assert [tuple(r) for r in fetch_sync(pg_dsn, "SELECT dev, b FROM wk_a")] == [("d1", 1.5)]
        assert [tuple(r) for r in fetch_sync(pg_dsn, "SELECT dev, b FROM wk_b")] == [("d1", 1.5)]
