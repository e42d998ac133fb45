"""Upstream credentials from a file or the environment, and a persistent session that is gone.

The upstream broker is a second in-process ingestd that requires a password
(``mqtt.password_file``, ``allow_anonymous = false``); the consumer writes into
a real PostgreSQL. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ingestd.broker.passwords import hash_password
from ingestd.config import Config, MqttConfig, ServerConfig, load_config
from ingestd.errors import ConfigError
from mqtt_clients import Client
from pg_fixtures import wait_for
from server_thread import ServerThread
from test_upstream import TOPIC, clients, consumer, publish_seqs, upstream_broker, wait_seqs

SECRET = "s3cr3t-Upstream-pw"


def locked_broker(tmp_path: Path, port: int = 0) -> ServerThread:
    users = tmp_path / "users"
    users.write_text(f"ingest:{hash_password(SECRET, 1000)}\n")
    return ServerThread(
        Config(
            server=ServerConfig(
                listen=[f"127.0.0.1:{port}"], http_listen=None, data_dir=str(tmp_path / "up")
            ),
            mqtt=MqttConfig(allow_anonymous=False, password_file=str(users)),
        )
    ).start()


def _metrics_text(srv: ServerThread) -> str:
    from prometheus_client import generate_latest

    assert srv.app is not None
    return generate_latest(srv.app.registry).decode()


@pytest.mark.parametrize("source", ["file", "env"])
def test_password_from_a_file_or_the_environment(
    pg_dsn: str,
    tmp_path: Path,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up = locked_broker(tmp_path)
    if source == "file":
        secret = tmp_path / "upstream.secret"
        secret.write_text(SECRET + "\n")  # as secrets are mounted: one line
        kw = {"password_file": str(secret)}
    else:
        monkeypatch.setenv("UPSTREAM_PW", SECRET)
        kw = {"password_env": "UPSTREAM_PW"}
    caplog.set_level(logging.DEBUG)
    srv = consumer(pg_dsn, tmp_path, up.port, username="ingest", **kw)
    try:
        pub = Client(up.port, username="ingest", password=SECRET)
        try:
            for q in range(50):
                pub.publish(TOPIC.format("m1"), f'{{"seq": {q}}}', 1)
        finally:
            pub.disconnect()
        assert len(wait_seqs(pg_dsn, set(range(50)))) == 50
        assert "upstream connected: up" in caplog.text
        assert SECRET not in caplog.text
    finally:
        srv.stop()
        up.stop()


def test_a_wrong_password_from_the_file_is_refused_by_the_upstream(
    pg_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = locked_broker(tmp_path)
    secret = tmp_path / "wrong.secret"
    secret.write_text("not-it")
    try:
        from pg_fixtures import config_from_toml
        from test_upstream import ROUTES, upstream_toml

        cfg = config_from_toml(
            ROUTES + upstream_toml(up.port, username="ingest", password_file=str(secret)),
            tmp_path,
            pg_dsn,
        )
        srv = ServerThread(cfg, database=True).start()
        try:
            u = clients(srv)[0]
            wait_for(lambda: srv.call(lambda: "CONNACK refused" in u.last_error), "the refusal")
            assert srv.call(lambda: u.connects) == 0
            assert "not-it" not in caplog.text
        finally:
            srv.stop()
    finally:
        up.stop()


@pytest.mark.parametrize(
    ("entry", "key", "reason"),
    [
        ({"password_file": "{tmp}/missing"}, "upstream[0].password_file", "cannot read {tmp}/missing: No such file"),
        ({"password_file": "{tmp}/empty"}, "upstream[0].password_file", "{tmp}/empty is empty"),
        ({"password_file": "{tmp}/two"}, "upstream[0].password_file", "more than one line"),
        ({"password_file": "{tmp}"}, "upstream[0].password_file", "cannot read {tmp}: Is a directory"),
        ({"password_env": "INGESTD_TEST_UNSET_PW"}, "upstream[0].password_env", "INGESTD_TEST_UNSET_PW is unset"),
        ({"password_env": "INGESTD_TEST_EMPTY_PW"}, "upstream[0].password_env", "INGESTD_TEST_EMPTY_PW is empty"),
        ({"password": "a", "password_env": "X"}, "upstream[0].password_env", "set only one of"),
        ({"password_file": "{tmp}/ok", "password_env": "X"}, "upstream[0].password_env", "only one"),
    ],
)  # fmt: skip
def test_bad_password_sources_are_start_up_errors_naming_file_key_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: dict[str, str], key: str, reason: str
) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "two").write_text("a\nb\n")
    (tmp_path / "ok").write_text("pw")
    monkeypatch.delenv("INGESTD_TEST_UNSET_PW", raising=False)
    monkeypatch.setenv("INGESTD_TEST_EMPTY_PW", "")
    p = tmp_path / "c.toml"
    fields = {"name": "u", "host": "h", "username": "x"}
    fields.update({k: v.format(tmp=tmp_path) for k, v in entry.items()})
    p.write_text(
        "[[upstream]]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
        + 'subscriptions = ["a/#"]\n'
    )
    with pytest.raises(ConfigError) as ei:
        load_config(str(p), env={})
    assert ei.value.key == key, str(ei.value)
    assert str(ei.value).startswith(f"{p}: {key}: ")
    assert reason.format(tmp=tmp_path) in str(ei.value)


def test_a_persistent_session_the_upstream_lost_is_a_warning_and_a_metric(
    pg_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = upstream_broker(tmp_path)
    port = up.port
    srv = consumer(pg_dsn, tmp_path, port, session_expiry=600)
    try:
        u = clients(srv)[0]
        # A first connection finds no session: that is how every session starts.
        assert srv.call(lambda: u.sessions_lost) == 0
        assert "was not found (session_present=0)" not in caplog.text
        up.stop()  # the upstream goes, and with it (no persistence) our session
        wait_for(lambda: srv.call(lambda: not u.connected), "the disconnect")
        up = ServerThread(
            Config(
                server=ServerConfig(
                    listen=[f"127.0.0.1:{port}"], http_listen=None, data_dir=str(tmp_path / "up2")
                )
            )
        ).start()
        wait_for(lambda: srv.call(lambda: u.connects) == 2, "the reconnect")
        wait_for(lambda: srv.call(lambda: u.sessions_lost) == 1, "the lost session counted")
        assert 'ingestd_upstream_sessions_lost_total{upstream="up"} 1.0' in srv.call(
            lambda: _metrics_text(srv)
        )
        warning = [r for r in caplog.records if "was not found (session_present=0)" in r.message]
        assert len(warning) == 1 and warning[0].levelno == logging.WARNING
        assert "may have been lost" in warning[0].message
        # The stream goes on through the new session.
        publish_seqs(port, range(20))
        assert len(wait_seqs(pg_dsn, set(range(20)))) == 20
    finally:
        srv.stop()
        up.stop()
