"""ingest.default_route: with no routes configured, every non-$ message lands in `messages`."""

from __future__ import annotations

import json

from ingestd.broker.message import Message
from ingestd.config import Config, IngestConfig, RouteConfig
from ingestd.ingest.routes import compile_config
from mqtt_clients import Client
from pg_fixtures import config_from_toml, fetch_sync
from server_thread import ServerThread


def _row(cfg: Config, payload: bytes) -> dict[str, object]:
    route = compile_config(cfg).routes[0]
    m = Message("a/b", payload, 1, False, {}, "dev", "alice", 1_700_000_000.0)
    values = route.convert_slow(m)
    assert route.convert(m) == values  # the generated converter agrees with the getters
    return dict(zip([c.name for c in route.columns], values, strict=True))


def test_no_routes_means_one_messages_route_into_a_messages_table() -> None:
    compiled = compile_config(Config())
    assert [r.name for r in compiled.routes] == ["messages"]
    spec = compiled.tables["messages"]
    assert spec.kind == "append"
    assert spec.columns == {
        "topic": "text",
        "client_id": "text",
        "username": "text",
        "qos": "smallint",
        "retain": "boolean",
        "received_at": "timestamptz",
        "payload": "jsonb",
        "payload_raw": "bytea",
    }


def test_configured_routes_replace_it_and_it_can_be_switched_off() -> None:
    mine = RouteConfig(name="t", topic="t/{id}", table="t", columns={"id": "topic.id"})
    assert [r.name for r in compile_config(Config(routes=[mine])).routes] == ["t"]
    off = Config(ingest=IngestConfig(default_route=False))
    assert compile_config(off).routes == []


def test_payload_is_jsonb_when_json_and_bytes_otherwise() -> None:
    cfg = Config()
    doc = _row(cfg, b'{"battery": 13.5}')
    assert json.loads(doc["payload"]) == {"battery": 13.5}  # type: ignore[arg-type]
    assert doc["payload_raw"] is None
    assert (doc["topic"], doc["client_id"], doc["username"], doc["qos"]) == (
        "a/b",
        "dev",
        "alice",
        1,
    )
    binary = _row(cfg, b"\x00\xff\x10")
    assert binary["payload"] is None and binary["payload_raw"] == b"\x00\xff\x10"
    text = _row(cfg, b"on")  # not JSON: kept as bytes, not a dead letter
    assert text["payload"] is None and text["payload_raw"] == b"on"
    nul = _row(cfg, b'"a\\u0000b"')  # JSON jsonb cannot store
    assert nul["payload"] is None and nul["payload_raw"] == b'"a\\u0000b"'
    empty = _row(cfg, b"")
    assert empty["payload"] is None and empty["payload_raw"] is None


def test_every_non_dollar_publish_becomes_a_row(pg_dsn, tmp_path) -> None:
    cfg = config_from_toml(
        "[server]\nhttp_listen = ''\n[presence]\nenabled = false\n", tmp_path, pg_dsn
    )
    cfg.server.listen = ["127.0.0.1:0"]
    srv = ServerThread(cfg, database=True).start()
    try:
        pub = Client(srv.port, client_id="dev-1")
        pub.publish("company/1/machine/7/telemetry", json.dumps({"battery": 13.5}), qos=1)
        pub.publish("company/1/machine/7/blob", b"\x01\x02", qos=1, retain=True)
        pub.publish("$internal/x", b"{}", qos=1)  # '#' does not match $ topics [MQTT-4.7.2-1]
    finally:
        srv.stop()
    rows = fetch_sync(
        pg_dsn,
        "SELECT topic, client_id, qos, retain, payload->>'battery', payload_raw"
        " FROM messages ORDER BY received_at",
    )
    assert [tuple(r) for r in rows] == [
        ("company/1/machine/7/telemetry", "dev-1", 1, False, "13.5", None),
        ("company/1/machine/7/blob", "dev-1", 1, True, None, b"\x01\x02"),
    ]
    # One index, BRIN on received_at: cheap per row (docs/ingest.md, "Routes").
    indexes = fetch_sync(pg_dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = 'messages'")
    assert [r[0].split(" ON ")[1] for r in indexes] == ["public.messages USING brin (received_at)"]
