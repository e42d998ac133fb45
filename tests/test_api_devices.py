"""/api/devices, /api/stats and the console's static files, against a real broker.

Devices are paho clients (MQTT 3.1.1 and 5); presence and device state live in
the real PostgreSQL. Every wait is a bounded poll on a condition.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from ingestd.config import RouteConfig, load_config
from ingestd.errors import ConfigError
from ingestd.http.devices import presence_page_sql, state_sql
from ingestd.ingest.routes import compile_config
from ingestd.ingest.schema import schema_sql
from mqtt_clients import Client
from pg_fixtures import fetch_sync, wait_for, wait_rows
from server_thread import ServerThread
from test_api import Api, error_of, make_config, pg_server

FLEET = """
[presence]
enabled = true
table = "dev_presence"
flush_interval_ms = 50
[ingest]
flush_interval_ms = 50
[[routes]]
name = "status"
topic = "dev/{id}/status"
table = "dev_status"
kind = "latest"
key = ["device_id"]
device_state = true
[routes.columns]
device_id = "topic.id"
status = "payload.status::text"
level = "payload.level::double precision"
updated_at = "received_at"
[[routes]]
name = "site"
topic = "site/{site}/dev/{id}"
table = "dev_site"
kind = "latest"
key = ["site", "device_id"]
device_state = "device_id"
[routes.columns]
site = "topic.site"
device_id = "topic.id"
note = "payload.note::text"
"""


@pytest.fixture
def fleet(pg_dsn: str, tmp_path: Path) -> Any:
    yield from pg_server(FLEET, tmp_path, pg_dsn)


def devices(api: Api, query: str = "") -> dict[str, Any]:
    data = api.ok("GET", "/api/devices" + query)
    assert set(data) == {"devices", "next"}
    return data  # type: ignore[no-any-return]


def by_id(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["client_id"]: d for d in data["devices"]}


def test_devices_join_presence_live_state_and_device_rows(fleet: Any) -> None:
    srv, dsn = fleet
    api = Api(srv)
    will = json.dumps({"status": "offline"}).encode()
    d1 = Client(srv.port, client_id="dev-1", version=5, will=("dev/dev-1/status", will, 1, False))
    d1.subscribe("cmd/dev-1/#", qos=1, noLocal=True)
    d1.publish("dev/dev-1/status", json.dumps({"status": "running", "level": 0.5}), qos=1)
    d1.publish("site/north/dev/dev-1", json.dumps({"note": "roof"}), qos=1)
    d1.publish("site/south/dev/dev-1", json.dumps({"note": "spare"}), qos=1)
    d2 = Client(srv.port, client_id="dev-2", version=4)
    d2.disconnect()
    wait_rows(dsn, "SELECT 1 FROM dev_presence WHERE client_id = 'dev-2' AND NOT online")
    wait_rows(dsn, "SELECT 1 FROM dev_site WHERE device_id = 'dev-1'", until=lambda r: len(r) == 2)

    listed = by_id(devices(api))
    one, two = listed["dev-1"], listed["dev-2"]
    assert (one["online"], one["protocol"], one["protocol_version"]) == (True, "5.0", 5)
    assert one["peer"].startswith("127.0.0.1:") and one["connected_at"] and one["last_seen"]
    assert one["state"]["dev_status"] == [
        {
            "device_id": "dev-1",
            "status": "running",
            "level": 0.5,
            "updated_at": one["state"]["dev_status"][0]["updated_at"],
        }
    ]
    assert sorted(r["site"] for r in one["state"]["dev_site"]) == ["north", "south"]
    assert (two["online"], two["protocol"], two["disconnect_reason"]) == (False, "3.1.1", "normal")
    assert two["state"] == {"dev_status": [], "dev_site": []}

    assert list(by_id(devices(api, "?online=true"))) == ["dev-1"]
    assert "dev-1" not in by_id(devices(api, "?online=false"))
    assert list(by_id(devices(api, "?client_id_prefix=dev-2"))) == ["dev-2"]

    detail = api.ok("GET", "/api/devices/dev-1")
    assert detail["online"] is True
    # (barrier/dev-1 is the test client's own sync subscription)
    assert [s for s in detail["subscriptions"] if s["filter"] != "barrier/dev-1"] == [
        {
            "filter": "cmd/dev-1/#",
            "qos": 1,
            "no_local": True,
            "retain_as_published": False,
            "retain_handling": 0,
            "subscription_identifier": None,
        }
    ]
    assert detail["will"] == {
        "topic": "dev/dev-1/status",
        "qos": 1,
        "retain": False,
        "delay": 0,
        "bytes": len(will),
        "truncated": False,
        "payload": will.decode(),
        "payload_encoding": "plain",
    }
    assert detail["session"] == {
        "expiry_interval": 0,
        "clean_start": True,
        "keepalive": 60,
        "transport": "tcp",
    }
    assert detail["queued"] == {"inflight": 0, "memory": 0, "overflow": 0}

    # The will fires when dev-1 drops: presence says why, and the state row says offline.
    d1.drop()
    wait_for(
        lambda: (
            api.ok("GET", "/api/devices/dev-1")["state"]["dev_status"][0]["status"] == "offline"
        ),
        "the will in dev-1's state row",
    )
    gone = api.ok("GET", "/api/devices/dev-1")
    assert (gone["online"], gone["disconnect_reason"], gone["session"]) == (
        False,
        "connection_lost",
        None,
    )
    assert error_of(*api.call("GET", "/api/devices/nobody")[::2], 404, "not_found")


def test_an_offline_persistent_session_shows_its_queue(fleet: Any) -> None:
    srv, _ = fleet
    api = Api(srv)
    sub = Client(srv.port, client_id="slow-1", version=5, session_expiry=600)
    sub.subscribe("jobs/#", qos=1)
    sub.disconnect()
    wait_for(lambda: not api.ok("GET", "/api/devices/slow-1")["online"], "slow-1 offline")
    pub = Client(srv.port, version=5)
    for i in range(3):
        pub.publish("jobs/x", f"job {i}", qos=1)
    detail = api.ok("GET", "/api/devices/slow-1")
    assert detail["queued"] == {"inflight": 0, "memory": 3, "overflow": 0}
    assert detail["session"]["expiry_interval"] == 600
    assert "jobs/#" in [s["filter"] for s in detail["subscriptions"]]


def test_devices_pages_with_a_cursor(fleet: Any) -> None:
    srv, dsn = fleet
    api = Api(srv)
    clients = [Client(srv.port, client_id=f"pg-{i}", version=4) for i in range(5)]
    wait_rows(
        dsn, "SELECT 1 FROM dev_presence WHERE client_id LIKE 'pg-%'", until=lambda r: len(r) == 5
    )
    seen: list[str] = []
    query = "?client_id_prefix=pg-&limit=2"
    for _ in range(5):
        page = devices(api, query)
        assert len(page["devices"]) <= 2
        seen += [d["client_id"] for d in page["devices"]]
        if page["next"] is None:
            break
        query = "?client_id_prefix=pg-&limit=2&cursor=" + urllib.parse.quote(page["next"])
    assert seen == [f"pg-{i}" for i in range(5)]
    for c in clients:
        c.disconnect()


def test_devices_rejects_bad_queries(fleet: Any) -> None:
    srv, _ = fleet
    api = Api(srv)
    for query, word in [
        ("?online=maybe", "online"),
        ("?limit=0", "limit"),
        ("?limit=100000", "limit"),
        ("?colour=red", "colour"),
        ("?topic_prefix=a/", "topic_prefix"),
    ]:
        status, _, data = api.call("GET", "/api/devices" + query)
        assert word in error_of(status, data, 400, "bad_request"), query


def test_devices_and_stats_without_a_database(tmp_path: Path) -> None:
    srv = ServerThread(make_config(tmp_path)).start()
    try:
        api = Api(srv)
        a = Client(srv.port, client_id="nodb-a", version=5)
        b = Client(srv.port, client_id="nodb-b", version=5, session_expiry=60)
        b.disconnect()
        wait_for(
            lambda: by_id(devices(api)).get("nodb-b", {}).get("online") is False, "nodb-b offline"
        )
        listed = by_id(devices(api))
        assert listed["nodb-a"]["online"] is True and listed["nodb-a"]["state"] == {}
        assert list(by_id(devices(api, "?online=true"))) == ["nodb-a"]
        page = devices(api, "?limit=1")
        assert [d["client_id"] for d in page["devices"]] == ["nodb-a"] and page["next"] == "nodb-a"
        assert [d["client_id"] for d in devices(api, "?limit=1&cursor=nodb-a")["devices"]] == [
            "nodb-b"
        ]

        before = api.ok("GET", "/api/stats")
        assert before["ingest"] is None and before["routes"] == []
        a.publish("x/y", "1", qos=1)
        after = api.ok("GET", "/api/stats")
        assert after["broker"]["messages_received"] == before["broker"]["messages_received"] + 1
        assert after["broker"]["connections"] == 1 and after["time"] >= before["time"]
        a.disconnect()
    finally:
        srv.stop()


def test_stats_count_rows_and_dead_letters_per_route(fleet: Any) -> None:
    srv, dsn = fleet
    api = Api(srv)
    d = Client(srv.port, client_id="st-1", version=5)
    d.publish("dev/st-1/status", json.dumps({"status": "ok"}), qos=1)
    d.publish("dev/st-1/status", b"not json", qos=1)
    wait_for(lambda: api.ok("GET", "/api/stats")["ingest"]["dead_letters"] == 1, "one dead letter")
    s = api.ok("GET", "/api/stats")
    routes = {r["name"]: r for r in s["routes"]}
    assert routes["status"]["table_rows"] == s["ingest"]["rows_by_table"]["dev_status"] >= 1
    assert (routes["status"]["dead_letters"], routes["site"]["dead_letters"]) == (1, 0)
    assert routes["status"]["device_state"] == "device_id"
    assert fetch_sync(dsn, "SELECT count(*) FROM dev_status")[0][0] == 1


def test_a_page_of_a_large_presence_table_is_an_index_range(fleet: Any) -> None:
    """The console polls /api/devices: its query must not read the whole table."""
    srv, dsn = fleet
    fetch_sync(
        dsn,
        "INSERT INTO dev_presence (client_id, online) SELECT 'x-' || lpad(i::text, 6, '0'),"
        " i % 3 = 0 FROM generate_series(1, 50000) AS i",
    )
    fetch_sync(dsn, "ANALYZE dev_presence")
    for q in [
        {},
        {"cursor": "x-025000"},
        {"client_id_prefix": "x-0123"},
        {"online": "true", "cursor": "x-040000"},
    ]:
        sql, args = presence_page_sql("dev_presence", q, 200)
        (plan,) = fetch_sync(dsn, "EXPLAIN (FORMAT JSON) " + sql, *args)
        text = plan[0]
        assert "Seq Scan" not in text and "dev_presence_client_id_c_idx" in text, (q, text)
    # The device-state look-up of a composite key goes through the index on its column.
    fetch_sync(
        dsn,
        "INSERT INTO dev_site (site, device_id, note) SELECT 's' || (i % 7), 'x-' ||"
        " lpad(i::text, 6, '0'), 'n' FROM generate_series(1, 50000) AS i",
    )
    fetch_sync(dsn, "ANALYZE dev_site")
    sql = state_sql("dev_site", "device_id", ["site", "device_id", "note"])
    (plan,) = fetch_sync(dsn, "EXPLAIN (FORMAT JSON) " + sql, ["x-000001", "x-000002"])
    assert "Seq Scan" not in plan[0] and "dev_site_device_id_idx" in plan[0], plan[0]
    page = devices(Api(srv), "?client_id_prefix=x-0123&limit=5")
    assert [d["client_id"] for d in page["devices"]] == [f"x-0123{i:02d}" for i in range(5)]
    assert page["devices"][1]["state"]["dev_site"] == [
        {"site": "s2", "device_id": "x-012301", "note": "n"}
    ]
    assert page["next"] == "x-012304"


# -- the route option ---------------------------------------------------------------


def _route(**kw: Any) -> RouteConfig:
    base: dict[str, Any] = {
        "name": "r",
        "topic": "m/{company}/{machine}",
        "table": "t",
        "kind": "latest",
        "key": ["company", "machine"],
        "columns": {
            "company": "topic.company",
            "machine": "topic.machine",
            "n": "payload.n::bigint",
        },
    }
    base.update(kw)
    return RouteConfig(**base)


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"device_state": True}, "several columns"),
        ({"device_state": "n"}, "not a key column"),
        ({"device_state": "n", "key": ["n"]}, "must be text"),
        ({"device_state": True, "kind": "append", "key": []}, "kind = 'latest'"),
    ],
)
def test_device_state_is_checked_at_start(tmp_path: Path, kw: dict[str, Any], why: str) -> None:
    cfg = load_config(None, env={})
    cfg.routes = [_route(**kw)]
    with pytest.raises(ConfigError) as e:
        compile_config(cfg, "fleet.toml")
    assert why in str(e.value) and "routes[0].device_state" in str(e.value)
    assert "fleet.toml" in str(e.value)


def test_a_device_column_after_the_first_key_column_gets_an_index() -> None:
    cfg = load_config(None, env={})
    cfg.routes = [_route(device_state="machine")]
    sql = schema_sql(cfg, compile_config(cfg))
    assert 'CREATE INDEX IF NOT EXISTS "t_machine_idx" ON "t" ("machine")' in sql
    assert '"device_presence_client_id_c_idx" ON "device_presence" ("client_id" COLLATE "C")' in sql
    cfg.routes = [_route(device_state="company")]
    assert "t_company_idx" not in schema_sql(cfg, compile_config(cfg))


def test_the_example_fleets_mark_their_device_state() -> None:
    root = Path(__file__).resolve().parent.parent / "config"
    for name, table in [
        ("device-fleet.toml", "device_status"),
        ("solar-fleet.toml", "machine_status"),
    ]:
        cfg = load_config(str(root / name), env={})
        routes = compile_config(cfg, name).routes
        assert any(r.table == table and r.device_column for r in routes), name


# -- the console's files ----------------------------------------------------------------


def test_console_files_are_served_with_security_headers(tmp_path: Path) -> None:
    srv = ServerThread(make_config(tmp_path)).start()
    try:
        api = Api(srv)
        status, headers, html = api.call("GET", "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b'<script src="/console.js" defer>' in html and b"<script>" not in html
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        for path, ctype, word in [
            ("/console.js", "text/javascript", b"/api/devices"),
            ("/console.css", "text/css", b"body"),
        ]:
            status, headers, body = api.call("GET", path)
            assert (status, headers["Content-Type"].split(";")[0]) == (200, ctype)
            assert word in body
        assert api.call("POST", "/", raw=b"x")[0] == 405
    finally:
        srv.stop()


def test_the_console_can_be_turned_off(tmp_path: Path) -> None:
    srv = ServerThread(make_config(tmp_path, console=False)).start()
    try:
        api = Api(srv)
        assert api.call("GET", "/")[0] == 404
        assert api.call("GET", "/console.js")[0] == 404
        assert api.ok("GET", "/api/stats")["broker"]["sessions"] == 0
    finally:
        srv.stop()
