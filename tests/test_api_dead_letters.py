"""/api/dead-letters: list them, and replay them after a fix (a mapping row added late)."""

from __future__ import annotations

import json
from pathlib import Path

from mqtt_clients import Client
from pg_fixtures import config_from_toml, fetch_sync
from server_thread import ServerThread
from test_api import Api, make_config

CONFIG = """
[server]
http_listen = "127.0.0.1:0"
[presence]
enabled = false
[[lookups]]
name = "socket"
table = "dl_sockets"
key = { socket = "topic.socket" }
columns = { device_id = "text" }
miss_wait_s = 0            # a row must be there when the message arrives...
miss_refresh_s = 0         # (each miss reloads at once)
on_miss = "dead-letter"    # ...else the message is a dead letter until replayed
[[routes]]
name = "power"
topic = "pdu/{socket}/power"
table = "dl_power"
[routes.columns]
socket = "topic.socket"
device_id = { source = "lookup.socket.device_id", required = true }
watts = "payload.watts::double precision"
"""


def test_a_lookup_miss_replayed_after_the_mapping_row_is_added(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_from_toml(CONFIG, tmp_path, pg_dsn)
    cfg.server.listen = ["127.0.0.1:0"]
    srv = ServerThread(cfg, database=True).start()
    try:
        api = Api(srv)
        dev = Client(srv.port, client_id="pdu-1")
        dev.publish("pdu/s1/power", json.dumps({"watts": 41.5}), qos=1)
        dev.publish("pdu/s2/power", b"\xff\xfe", qos=1)  # not JSON, and s2 is unmapped too
        assert fetch_sync(pg_dsn, "SELECT count(*) FROM dl_power")[0][0] == 0

        listed = api.ok("GET", "/api/dead-letters?route=power")["dead_letters"]
        assert [(d["topic"], d["client_id"]) for d in listed] == [
            ("pdu/s2/power", "pdu-1"),
            ("pdu/s1/power", "pdu-1"),
        ]  # newest first
        s1 = listed[1]
        assert (s1["payload"], s1["payload_encoding"]) == ('{"watts": 41.5}', "plain")
        assert "lookup 'socket'" in s1["error"]
        assert listed[0]["payload_encoding"] == "base64"

        # The operator adds the mapping row late, then replays.
        fetch_sync(pg_dsn, "INSERT INTO dl_sockets (socket, device_id) VALUES ('s1', 'dev-7')")
        done = api.ok("POST", "/api/dead-letters/replay", {"route": "power"})
        assert done["replayed"] == 2 and done["by_route"] == {"power": 2}

        rows = fetch_sync(pg_dsn, "SELECT socket, device_id, watts FROM dl_power")
        assert [tuple(r) for r in rows] == [("s1", "dev-7", 41.5)]
        # s1's dead letter is gone; s2 failed again and is a dead letter once more.
        left = api.ok("GET", "/api/dead-letters")["dead_letters"]
        assert [d["topic"] for d in left] == ["pdu/s2/power"]
    finally:
        srv.stop()


def test_replay_refuses_unknown_fields_and_bad_times(pg_dsn: str, tmp_path: Path) -> None:
    cfg = config_from_toml(CONFIG, tmp_path, pg_dsn)
    cfg.server.listen = ["127.0.0.1:0"]
    srv = ServerThread(cfg, database=True).start()
    try:
        api = Api(srv)
        status, _, err = api.call("POST", "/api/dead-letters/replay", {"rout": "power"})
        assert status == 400 and "rout" in err["error"]["message"]
        status, _, err = api.call("POST", "/api/dead-letters/replay", {"since": "yesterday"})
        assert status == 400 and "since" in err["error"]["message"]
        status, _, err = api.call("GET", "/api/dead-letters?limit=0")
        assert status == 400
    finally:
        srv.stop()


def test_without_a_database_it_says_so(tmp_path: Path) -> None:
    srv = ServerThread(make_config(tmp_path)).start()  # broker only
    try:
        status, _, err = Api(srv).call("GET", "/api/dead-letters")
        assert status == 503 and err["error"]["code"] == "no_database"
    finally:
        srv.stop()
