"""Configuration loading, environment overrides, errors and dump_config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.config import (
    Config,
    ConfigError,
    MqttConfig,
    ServerConfig,
    dump_config,
    load_config,
    parse_listen,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "config").glob("*.toml"))

ROUTE = """
[[routes]]
name = "telemetry"
topic = "company/{company_id}/machine/{machine_id}/telemetry"
table = "telemetry"
[routes.columns]
company_id = "topic.company_id"
ts = { source = "payload.ts", type = "timestamptz", unit = "s" }
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def load_checked(path: str) -> Config:
    """What `ingestd config check` does: read the file, then compile its routes
    (load_config checks structure and types; compiling validates routes and tables)."""
    from ingestd.ingest.routes import compile_config

    cfg = load_config(path, env={})
    compile_config(cfg, path)
    return cfg


def test_defaults_without_file() -> None:
    cfg = load_config(None, env={})
    assert cfg == Config()
    # The broker's structs keep their defaults.
    assert cfg.server == ServerConfig()
    assert cfg.mqtt == MqttConfig()
    assert cfg.database.dsn == ""
    assert cfg.ingest.ack == "after-commit"
    assert cfg.presence.table == "device_presence"


def test_file_values(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path, '[database]\ndsn = "postgresql://x@h/db"\n[ingest]\nbatch_rows = 10\n' + ROUTE
        ),
        env={},
    )
    assert cfg.database.dsn == "postgresql://x@h/db"
    assert cfg.ingest.batch_rows == 10
    assert cfg.routes[0].columns["company_id"] == "topic.company_id"


def test_env_overrides_parse_by_type(tmp_path: Path) -> None:
    env = {
        "INGESTD_DATABASE__DSN": "postgresql://env@h/db",
        "INGESTD_MQTT__MAX_PACKET_SIZE": "2048",
        "INGESTD_MQTT__ALLOW_ANONYMOUS": "false",
        "INGESTD_MQTT__PASSWORD_FILE": "/etc/ingestd/passwd",
        "INGESTD_SERVER__LISTEN": "127.0.0.1:1883, [::1]:1884",
        "INGESTD_SERVER__HTTP_LISTEN": "",
        "INGESTD_INGEST__ACK": "on-receipt",
        "INGESTD_INGEST__FLUSH_INTERVAL_MS": "20",
        "INGESTD_TEST_DSN": "ignored: not a config key",
        "PATH": "/bin",
    }
    cfg = load_config(write(tmp_path, "[ingest]\nbatch_rows = 10\n"), env=env)
    assert cfg.database.dsn == "postgresql://env@h/db"
    assert cfg.mqtt.max_packet_size == 2048
    assert cfg.mqtt.allow_anonymous is False
    assert cfg.server.listen == ["127.0.0.1:1883", "[::1]:1884"]
    assert cfg.server.http_listen is None
    assert cfg.ingest.ack == "on-receipt"
    assert cfg.ingest.flush_interval_ms == 20.0
    assert cfg.ingest.batch_rows == 10


def test_overrides_beat_env() -> None:
    cfg = load_config(
        None,
        env={"INGESTD_SERVER__DATA_DIR": "/env"},
        overrides={"server": {"data_dir": "/cli"}, "ingest.batch_rows": 7},
    )
    assert cfg.server.data_dir == "/cli"
    assert cfg.ingest.batch_rows == 7


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"INGESTD_MQTT__MAX_PACKET_SIZE": "big"},
            "$INGESTD_MQTT__MAX_PACKET_SIZE: mqtt.max_packet_size: ",
        ),
        ({"INGESTD_MQTT__NOPE": "1"}, "unknown key 'nope' in section [mqtt]"),
        ({"INGESTD_WAT__X": "1"}, "unknown section 'wat'"),
        (
            {"INGESTD_INGEST__ACK": "later"},
            "$INGESTD_INGEST__ACK: ingest.ack: Invalid enum value 'later'",
        ),
        ({"INGESTD_MQTT__ALLOW_ANONYMOUS": "perhaps"}, "expected a boolean"),
    ],
)
def test_bad_env(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(None, env=env)
    assert expected in str(ei.value)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[mqtt]\nmax_packet_size = 'x'\n", "mqtt.max_packet_size", "Expected `int`, got `str`"),
        ("[mqtt]\nnope = 1\n", "mqtt.nope", "unknown key"),
        ("[wat]\n", "wat", "unknown key"),
        (
            ROUTE + "x = { source = 'payload.x', type = 3 }\n",
            "routes[0].columns.x.type",
            "Expected `str | null`, got `int`",
        ),
        (
            ROUTE + "x = { source = 'payload.x', colour = 'red' }\n",
            "routes[0].columns.x.colour",
            "unknown key",
        ),
        (ROUTE.replace('name = "telemetry"\n', ""), "routes[0].name", "required key is missing"),
        (
            ROUTE + "x = 'payload.x::float16'\n",
            "routes[0].columns.x",
            "unknown column type 'float16'",
        ),
        (
            ROUTE + "x = 'topic.serial'\n",
            "routes[0].columns.x",
            "placeholder {serial} is not in the topic template",
        ),
        (ROUTE.replace('telemetry"\ntable', 'tele+metry"\ntable'), "routes[0].topic", "wildcards"),
        ("[server]\nlisten = ['localhost']\n", "server.listen[0]", "expected HOST:PORT"),
        ("[server]\nlisten = ['::1:1883']\n", "server.listen[0]", "[ADDR]:PORT"),
        ("[server]\nhttp_listen = '1.2.3.4:99999'\n", "server.http_listen", "out of range"),
        ("[server]\ntls_listen = ['0.0.0.0:8883']\n", "server.tls_listen", "tls_certfile"),
        ("[ingest]\nbatch_rows = 0\n", "ingest.batch_rows", "must be > 0"),
        ("[ingest]\nack = 'never'\n", "ingest.ack", "Invalid enum value 'never'"),
        ("[presence]\ntable = 'dead_letters'\n", "presence.table", ""),
        (
            "[database]\npool_size = 3\n[ingest]\nmax_concurrent_copies = 3\n",
            "ingest.max_concurrent_copies",
            "must be less than database.pool_size (3)",
        ),
    ],
)
def test_file_errors_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_checked(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert reason in msg
    assert ei.value.key == key
    assert ei.value.path == path


def test_route_index_in_error_path(tmp_path: Path) -> None:
    text = ROUTE + ROUTE.replace('"telemetry"', '"t2"', 1) + ROUTE.replace('"telemetry"', '"t3"', 1)
    text += "ts2 = { source = 'payload.ts', type = 'timestamptz', unit = 'hours' }\n"
    with pytest.raises(
        ConfigError, match=r"routes\[2\]\.columns\.ts2\.unit: Invalid enum value 'hours'"
    ):
        load_checked(write(tmp_path, text))


def test_duplicate_tables_must_agree(tmp_path: Path) -> None:
    base = """
[[routes]]
name = "a"
topic = "a/{id}"
table = "t"
columns = { id = "topic.id", v = "payload.v::double precision" }
[[routes]]
name = "b"
topic = "b/{id}"
table = "t"
"""
    ok = (
        base
        + 'columns = { id = "topic.id", v = "payload.v::double precision", w = "payload.w::text" }\n'
    )
    load_checked(write(tmp_path, ok))
    bad = base + 'columns = { id = "topic.id", v = "payload.v::bigint" }\n'
    with pytest.raises(
        ConfigError,
        match=r"routes\[1\]\.columns\.v: column t\.v is bigint here but double precision at routes\[0\]",
    ):
        load_checked(write(tmp_path, bad))
    bad_kind = base + 'kind = "latest"\nkey = ["id"]\ncolumns = { id = "topic.id" }\n'
    with pytest.raises(ConfigError, match=r"routes\[1\]: table 't' is 'latest' here but 'append'"):
        load_checked(write(tmp_path, bad_kind))
    dup_name = base.replace('name = "b"', 'name = "a"') + 'columns = { id = "topic.id" }\n'
    with pytest.raises(ConfigError, match="duplicate route name"):
        load_checked(write(tmp_path, dup_name))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[mqtt\n"), env={})
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "nope.toml"), env={})


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:1883") == ("0.0.0.0", 1883)
    assert parse_listen("[::1]:8883") == ("::1", 8883)
    with pytest.raises(ValueError):
        parse_listen("[::1:1883")


def test_dump_round_trip(tmp_path: Path) -> None:
    text = (
        "[server]\nhttp_listen = ''\ntls_certfile = 'c.pem'\n[ingest]\nack = 'on-receipt'\n"
        + ROUTE
        + "extra = { source = 'payload.extra', type = 'jsonb' }\n"
        + "flag = { value = true }\n"
        + "since = { value = 2024-05-01T12:00:00Z }\n"
        + "tags = { value = ['a', 'b'], type = 'jsonb' }\n"
        + "'odd key' = 'client_id'\n".replace("odd key", "odd_key")
        + "[[routes.indexes]]\ncolumns = ['company_id', 'ts']\n[[routes.indexes]]\ncolumns = ['ts']\nmethod = 'brin'\n"
    )
    cfg = load_config(write(tmp_path, text), env={"INGESTD_MQTT__MAX_INFLIGHT": "9"})
    dumped = dump_config(cfg)
    tomllib.loads(dumped)  # valid TOML
    assert 'http_listen = ""' in dumped
    p = tmp_path / "dumped.toml"
    p.write_text(dumped)
    assert load_config(str(p), env={}) == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_checked(str(path))
    assert cfg.routes or path.name == "ingestd.example.toml"
    p = tmp_path / "dumped.toml"
    p.write_text(dump_config(cfg))
    assert load_config(str(p), env={}) == cfg


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    number=st.floats(allow_nan=False) | st.integers(-(2**63), 2**63 - 1),
)
def test_dump_round_trips_any_string_and_number(text: str, number: float) -> None:
    import msgspec

    from ingestd.config import ColumnSpec, RouteConfig

    cfg = Config(
        server=ServerConfig(data_dir=text),
        mqtt=MqttConfig(assigned_id_prefix=text),
        routes=[
            RouteConfig(
                name="r",
                topic="a/{b}",
                table="t",
                columns={
                    "b": "topic.b",
                    "c": ColumnSpec(value=text or "x"),
                    "n": ColumnSpec(value=number),
                },
            )
        ],
    )
    back = msgspec.convert(tomllib.loads(dump_config(cfg)), Config, strict=True)
    assert back == cfg


def test_load_config_does_not_import_ingest() -> None:
    """Reading a configuration needs nothing of the ingest side (no import cycle)."""
    import subprocess
    import sys

    code = (
        "import sys; from ingestd.config import load_config; load_config(None, env={}); "
        "bad = [m for m in sys.modules if m.startswith(('ingestd.ingest', 'ingestd.cli'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_anonymous_without_credentials_is_an_error(tmp_path: Path) -> None:
    # allow_anonymous = false with no credential source would let any user name in.
    path = write(tmp_path, "[mqtt]\nallow_anonymous = false\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.path == path
    assert e.value.key == "mqtt.allow_anonymous"
    assert "password_file" in e.value.reason
    ok = write(tmp_path, '[mqtt]\nallow_anonymous = false\npassword_file = "pw"\nacl_file = ""\n')
    cfg = load_config(ok)
    assert cfg.mqtt.password_file == "pw" and cfg.mqtt.acl_file is None
