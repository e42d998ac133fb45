"""Credentials in PostgreSQL (mqtt.credentials_table): `ingestd user ...`, live changes, tenants.

Real clients (paho v5 and v3.1.1) against a real broker whose table lives in a
fresh database of the test PostgreSQL. Changes reach the broker by
LISTEN/NOTIFY: the full-reload interval is an hour here, so a change that
takes effect proves the notification did it. Where the database must be
unreachable, the broker talks to it through a proxy the test cuts
(tests/pg_proxy.py). Waiting is on conditions (the broker's snapshot, a
client's queues), never on time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingestd.broker.passwords import hash_password
from ingestd.config import Config, DatabaseConfig, MqttConfig, ServerConfig
from ingestd.errors import ConfigError
from mqtt_clients import WAIT, Client
from pg_fixtures import fetch_sync, wait_for
from pg_proxy import PgProxy
from server_thread import ServerThread

pytestmark = pytest.mark.pg

TABLE = "mqtt_credentials"
# Every client's private barrier topic (tests/mqtt_clients.py); the tenants' topics come
# from their prefixes in the table.
ACL = "pattern readwrite barrier/%c\n"
BAD_LOGIN, NOT_AUTHORIZED, UNAVAILABLE, ADMINISTRATIVE = 0x86, 0x87, 0x88, 0x98


def ingestd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingestd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def user_cmd(dsn: str, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """`ingestd user ARGS --dsn DSN --table TABLE` (the password on stdin when given)."""
    extra = ["--password-stdin"] if password is not None else []
    out = ingestd(
        "user",
        *args,
        *extra,
        "--dsn",
        dsn,
        "--table",
        TABLE,
        stdin=None if password is None else password + "\n",
    )
    return out


def sql(dsn: str, statement: str, *args: Any) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement, *args)
        finally:
            await conn.close()

    asyncio.run(run())


def insert_user(
    dsn: str, name: str, password: str, client_id: str | None = None, prefix: str | None = None
) -> None:
    """A row as a provisioning backend writes it (a cheap hash keeps the test quick)."""
    sql(
        dsn,
        f"INSERT INTO {TABLE} (username, password_hash, client_id, topic_prefix)"
        " VALUES ($1, $2, $3, $4)",
        name,
        hash_password(password, 1000),
        client_id,
        prefix,
    )


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start a broker (no ingest) whose credentials are the table in ``dsn`` (with an
    HTTP listener when ``http_listen`` is given: tests/test_api_tokens.py)."""
    started: list[ServerThread] = []
    acl = tmp_path / "acl"
    acl.write_text(ACL)

    def run(dsn: str, http_listen: str | None = None, **mqtt: Any) -> ServerThread:
        settings: dict[str, Any] = {
            "credentials_table": TABLE,
            "credentials_refresh_interval": 3600.0,
            "allow_anonymous": False,
            "acl_file": str(acl),
            "auth_failure_limit": 0,
        }
        settings.update(mqtt)
        cfg = Config(
            server=ServerConfig(
                listen=["127.0.0.1:0"],
                http_listen=http_listen,
                data_dir=str(tmp_path / "data"),
            ),
            mqtt=MqttConfig(**settings),
            database=DatabaseConfig(dsn=dsn, connect_timeout=2.0),
        )
        srv = ServerThread(cfg).start()
        started.append(srv)
        return srv

    yield run
    for srv in started:
        srv.stop()


def snapshot_of(srv: ServerThread) -> dict[str, Any] | None:
    """The broker's view of the table (None: not loaded yet)."""

    def get() -> dict[str, Any] | None:
        assert srv.app is not None and srv.app.broker is not None
        table = srv.app.broker.auth.table
        return None if table is None else dict(table.users)

    return srv.call(get)


def wait_user(
    srv: ServerThread, name: str, cond: Callable[[Any], bool] = bool, timeout: float = 10.0
) -> None:
    """Wait until the broker's snapshot has ``name`` in the state ``cond`` wants."""
    wait_for(
        lambda: cond((snapshot_of(srv) or {}).get(name)),
        f"the broker's snapshot to show {name!r} changed",
        timeout,
    )


def refused(port: int, rc: int, version: int = 5, **kw: Any) -> None:
    c = Client(port, version=version, connect=False, **kw)
    c.connect(expect_rc=rc)
    c.c.loop_stop()


# -- the CLI and live changes ---------------------------------------------------------


@pytest.mark.parametrize("version", [5, 4])
def test_user_added_by_the_cli_connects_without_restart(
    pg_dsn: str, start: Callable[..., ServerThread], version: int
) -> None:
    srv = start(pg_dsn)
    assert snapshot_of(srv) == {}  # the table was created and loaded at start-up
    refused(srv.port, BAD_LOGIN, version, username="dev1", password="s3cret")

    out = user_cmd(pg_dsn, "add", "dev1", password="s3cret")
    assert out.returncode == 0, out.stderr
    wait_user(srv, "dev1")
    dev = Client(srv.port, version=version, username="dev1", password="s3cret")
    refused(srv.port, BAD_LOGIN, version, username="dev1", password="wrong")

    listed = user_cmd(pg_dsn, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("dev1\tenabled\t")
    # The hash is stored, never the password, and `list` prints neither.
    (row,) = fetch_sync(pg_dsn, f"SELECT password_hash FROM {TABLE}")
    assert row["password_hash"].startswith("$pbkdf2-sha256$100000$")
    assert "s3cret" not in row["password_hash"]
    assert "$pbkdf2" not in listed.stdout and "s3cret" not in listed.stdout
    dev.disconnect()


def test_disable_disconnects_and_refuses_and_delivers_nothing_more(
    pg_dsn: str, start: Callable[..., ServerThread]
) -> None:
    srv = start(pg_dsn)
    insert_user(pg_dsn, "dev1", "pw1", prefix="org_1")
    insert_user(pg_dsn, "ops", "pw-ops", prefix="org_1")
    wait_user(srv, "ops")
    ops = Client(srv.port, username="ops", password="pw-ops")
    ops.subscribe("org_1/status/#", qos=1)

    def dev1(**kw: Any) -> Client:  # one persistent session, client id dev1-c
        return Client(
            srv.port, client_id="dev1-c", username="dev1", password="pw1", session_expiry=600, **kw
        )

    dev = dev1(will=("org_1/status/dev1", b"gone", 1, False))
    dev.subscribe("org_1/cmd/#", qos=1)
    ops.publish("org_1/cmd/a", b"before", qos=1)
    assert dev.expect()[0].payload == b"before"

    out = user_cmd(pg_dsn, "disable", "dev1")
    assert out.returncode == 0, out.stderr
    rc = dev.disconnects.get(timeout=WAIT)
    assert rc.value == ADMINISTRATIVE
    dev.c.loop_stop()
    broker = srv.app.broker  # type: ignore[union-attr]
    assert srv.call(lambda: broker.stats.credentials_revoked) == 1  # ingestd_credentials_revoked
    refused(srv.port, BAD_LOGIN, client_id="dev1-c", username="dev1", password="pw1")
    # Its will is not published: a revoked client writes nothing more.
    ops.expect_nothing()
    # Published while it was disabled: its persistent session does not take it.
    ops.publish("org_1/cmd/a", b"while-disabled", qos=1)

    assert user_cmd(pg_dsn, "enable", "dev1").returncode == 0
    wait_user(srv, "dev1", lambda c: c is not None and c.enabled)
    back = dev1(clean_start=False)
    assert back.session_present  # the session stayed; only its deliveries stopped
    back.expect_nothing()
    ops.publish("org_1/cmd/a", b"after", qos=1)
    assert back.expect()[0].payload == b"after"
    back.disconnect()
    ops.disconnect()


def test_delete_and_passwd_disconnect_a_v3_client(
    pg_dsn: str, start: Callable[..., ServerThread]
) -> None:
    srv = start(pg_dsn)
    insert_user(pg_dsn, "a", "pw-a")
    insert_user(pg_dsn, "b", "pw-b")
    wait_user(srv, "b")
    a = Client(srv.port, version=4, username="a", password="pw-a")
    b = Client(srv.port, version=4, username="b", password="pw-b")

    assert user_cmd(pg_dsn, "delete", "a").returncode == 0
    a.disconnects.get(timeout=WAIT)  # 3.1.1: the connection is closed
    a.c.loop_stop()
    refused(srv.port, BAD_LOGIN, 4, username="a", password="pw-a")

    # A new password closes the connections made with the old one.
    assert user_cmd(pg_dsn, "passwd", "b", password="pw-b2").returncode == 0
    b.disconnects.get(timeout=WAIT)
    b.c.loop_stop()
    refused(srv.port, BAD_LOGIN, 4, username="b", password="pw-b")
    Client(srv.port, version=4, username="b", password="pw-b2").disconnect()

    missing = user_cmd(pg_dsn, "delete", "a")
    assert missing.returncode == 2 and "no user 'a'" in missing.stderr


@pytest.mark.parametrize("version", [5, 4])
def test_client_id_pin(pg_dsn: str, start: Callable[..., ServerThread], version: int) -> None:
    srv = start(pg_dsn)
    out = user_cmd(pg_dsn, "add", "dev7", "--client-id", "dev7-board", password="pw7")
    assert out.returncode == 0, out.stderr
    wait_user(srv, "dev7")
    refused(srv.port, NOT_AUTHORIZED, version, client_id="other", username="dev7", password="pw7")
    refused(srv.port, NOT_AUTHORIZED, version, client_id="", username="dev7", password="pw7")
    pinned = Client(
        srv.port, version=version, client_id="dev7-board", username="dev7", password="pw7"
    )
    # The pin moves: the live connection no longer has the allowed id.
    sql(pg_dsn, f"UPDATE {TABLE} SET client_id = 'dev7-new' WHERE username = 'dev7'")
    rc = pinned.disconnects.get(timeout=WAIT)
    if version == 5:
        assert rc.value == ADMINISTRATIVE
    pinned.c.loop_stop()
    Client(
        srv.port, version=version, client_id="dev7-new", username="dev7", password="pw7"
    ).disconnect()


@pytest.mark.parametrize("version", [5, 4])
def test_prefix_tenants_cannot_reach_each_other(
    pg_dsn: str, start: Callable[..., ServerThread], version: int
) -> None:
    srv = start(pg_dsn)
    assert (
        user_cmd(pg_dsn, "add", "t1", "--prefix", "org_1/devices/#", password="p1").returncode == 0
    )
    insert_user(pg_dsn, "t2", "p2", prefix="org_2/devices")
    wait_user(srv, "t2")
    assert snapshot_of(srv)["t1"].prefix == "org_1/devices"  # type: ignore[index]

    def tenant(name: str, pw: str) -> Client:
        return Client(srv.port, version=version, username=name, password=pw)

    t1, t2 = tenant("t1", "p1"), tenant("t2", "p2")
    # Each tenant retains one message in its own tree first.
    t1.publish("org_1/devices/r", b"t1-retained", qos=1, retain=True)
    t2.publish("org_2/devices/r", b"t2-retained", qos=1, retain=True)
    watchers = {}
    for name, pw in (("t1", "p1"), ("t2", "p2")):
        for flt in ("#", "+/+/#", "$share/g/#"):
            w = tenant(name, pw)
            rcs = w.subscribe(flt, qos=1)
            assert rcs[0].value in (0, 1), (name, flt, rcs)
            watchers[(name, flt)] = w
    # Another tenant's tree is refused outright.
    assert t1.subscribe("org_2/devices/#", qos=1)[0].value == (0x87 if version == 5 else 0x80)
    for i in range(3):
        t1.publish(f"org_1/devices/x/{i}", f"t1-{i}".encode(), qos=1)
        t2.publish(f"org_2/devices/x/{i}", f"t2-{i}".encode(), qos=1)
    # Writing into the other tenant is refused (v5 PUBACK 0x87; v3 acked, dropped).
    t1.publish("org_2/devices/x/forged", b"forged", qos=1)
    for (name, flt), w in watchers.items():
        want = 4 if not flt.startswith("$share") else 3  # retained + 3 live; no retained shared
        got = [m.payload.decode() for m in w.expect(want)]
        w.expect_nothing()
        assert all(p.startswith(name + "-") for p in got), (name, flt, got)
    for w in [t1, t2, *watchers.values()]:
        w.disconnect()


# -- the database down -----------------------------------------------------------------


@pytest.mark.parametrize("version", [5, 4])
def test_database_down_at_start_refuses_table_users_until_it_is_up(
    pg_dsn: str, start: Callable[..., ServerThread], version: int
) -> None:
    proxy = PgProxy(pg_dsn)
    try:
        # The table exists with a user, but the broker cannot reach it yet.
        assert user_cmd(pg_dsn, "add", "dev1", password="pw1").returncode == 0
        proxy.cut()
        srv = start(proxy.dsn)
        assert snapshot_of(srv) is None
        refused(srv.port, UNAVAILABLE, version, username="dev1", password="pw1")
        refused(srv.port, UNAVAILABLE, version, username="nobody", password="x")
        proxy.restore()
        wait_user(srv, "dev1", timeout=60)  # the watcher's retry backoff
        Client(srv.port, version=version, username="dev1", password="pw1").disconnect()
        proxy.cut()
        srv.stop()  # stopping while the database is unreachable does not hang
        assert srv.app is not None and srv.app.credentials.snapshot is not None
    finally:
        proxy.close()


def test_database_unreachable_after_the_snapshot_keeps_it(
    pg_dsn: str, start: Callable[..., ServerThread]
) -> None:
    proxy = PgProxy(pg_dsn)
    try:
        srv = start(proxy.dsn)
        wait_for(lambda: snapshot_of(srv) is not None, "the first snapshot")
        insert_user(pg_dsn, "dev1", "pw1")
        insert_user(pg_dsn, "dev2", "pw2")
        wait_user(srv, "dev2")
        d2 = Client(srv.port, username="dev2", password="pw2")
        proxy.cut()
        assert srv.app is not None
        watcher = srv.app.credentials
        wait_for(lambda: not srv.call(lambda: watcher.connected), "the watcher to notice")
        # Still served from the snapshot.
        Client(srv.port, username="dev1", password="pw1").disconnect()
        # Changed while the broker could not hear it: applied when it is back (the
        # reconnect reloads everything, the missed notification does not matter).
        sql(pg_dsn, f"UPDATE {TABLE} SET enabled = false WHERE username = 'dev2'")
        proxy.restore()
        rc = d2.disconnects.get(timeout=30)
        assert rc.value == ADMINISTRATIVE
        d2.c.loop_stop()
        refused(srv.port, BAD_LOGIN, username="dev2", password="pw2")
        srv.stop()  # while its database is reachable: a clean stop
    finally:
        proxy.close()


# -- the password file: SIGHUP disconnects removed users -------------------------------


@pytest.mark.parametrize("version", [5, 4])
def test_sighup_disconnects_a_user_removed_from_the_password_file(
    tmp_path: Path, server_factory: Callable[..., ServerThread], version: int
) -> None:
    pw = tmp_path / "passwd"
    pw.write_text(f"a:{hash_password('pw-a', 1000)}\nb:{hash_password('pw-b', 1000)}\n")
    srv = server_factory(password_file=str(pw), allow_anonymous=False)
    a = Client(srv.port, version=version, username="a", password="pw-a")
    b = Client(
        srv.port,
        version=version,
        username="b",
        password="pw-b",
        session_expiry=60,
        clean_start=version == 5,  # 3.1.1: clean session 0 keeps the session
    )
    b.subscribe("news", qos=1)
    # b is removed; a's line stays as it was (a stays connected).
    pw.write_text(pw.read_text().splitlines()[0] + "\n")
    assert srv.app is not None
    assert srv.call(srv.app.reload_auth) is True
    rc = b.disconnects.get(timeout=WAIT)
    if version == 5:
        assert rc.value == ADMINISTRATIVE
    b.c.loop_stop()
    a.publish("news", b"x", qos=1)  # routed before its PUBACK: b's offline session refuses it
    broker = srv.app.broker
    assert broker is not None
    session = srv.call(lambda: broker.sessions[b.client_id])
    assert srv.call(lambda: (session.connection, len(session.queue or ()))) == (None, 0)
    a.disconnect()


# -- configuration and CLI errors --------------------------------------------------------


def test_config_rules(tmp_path: Path) -> None:
    from ingestd.config import validate_config

    validate_config(Config(mqtt=MqttConfig(allow_anonymous=False, credentials_table="t")))
    with pytest.raises(ConfigError, match="credential source"):
        validate_config(Config(mqtt=MqttConfig(allow_anonymous=False)))
    for bad in ("", "a.b.c", "x" * 64, "s."):
        with pytest.raises(ConfigError, match=r"mqtt\.credentials_table"):
            validate_config(Config(mqtt=MqttConfig(credentials_table=bad)))
    with pytest.raises(ConfigError, match="credentials_refresh_interval"):
        validate_config(Config(mqtt=MqttConfig(credentials_refresh_interval=0)))
    # --no-db and no DSN: nothing to read the table from.
    cfg = Config(
        server=ServerConfig(listen=["127.0.0.1:0"], http_listen=None, data_dir=str(tmp_path)),
        mqtt=MqttConfig(credentials_table="t"),
    )
    with pytest.raises(ConfigError, match=r"database\.dsn"):
        ServerThread(cfg).start()


def test_cli_refuses_bad_input_and_db_init_creates_the_table(pg_dsn: str, tmp_path: Path) -> None:
    bad = user_cmd(pg_dsn, "add", "a:b", password="x")
    assert bad.returncode == 2 and "':'" in bad.stderr
    bad = user_cmd(pg_dsn, "add", "a", "--prefix", "org/+/x", password="x")
    assert bad.returncode == 2 and "--prefix" in bad.stderr
    bad = user_cmd(pg_dsn, "add", "a", password="")
    assert bad.returncode == 2 and "empty" in bad.stderr
    assert user_cmd(pg_dsn, "add", "a", password="x").returncode == 0
    dup = user_cmd(pg_dsn, "add", "a", password="x")
    assert dup.returncode == 2 and "already exists" in dup.stderr
    no_table = ingestd("user", "list", "--dsn", pg_dsn)
    assert no_table.returncode == 2 and "mqtt.credentials_table" in no_table.stderr
    # The table refuses what is not a hash (a clear password written by mistake).
    with pytest.raises(asyncpg.CheckViolationError):
        sql(pg_dsn, f"INSERT INTO {TABLE} (username, password_hash) VALUES ('c', 'secret')")

    conf = tmp_path / "ingestd.toml"
    conf.write_text('[mqtt]\ncredentials_table = "auth_users"\n')
    printed = ingestd("db", "init", "--config", str(conf), "--dsn", pg_dsn, "--print")
    assert printed.returncode == 0, printed.stderr
    assert 'CREATE TABLE IF NOT EXISTS "auth_users"' in printed.stdout
    assert "pg_notify" in printed.stdout
    out = ingestd("db", "init", "--config", str(conf), "--dsn", pg_dsn)
    assert out.returncode == 0, out.stderr
    names = {
        r["tgname"]
        for r in fetch_sync(
            pg_dsn, "SELECT tgname FROM pg_trigger WHERE tgrelid = 'auth_users'::regclass"
        )
    }
    assert names == {"ingestd_touch", "ingestd_notify", "ingestd_truncate"}


def test_auth_decisions_on_a_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Auth alone (no database): refusals, pins, prefixes, timing, credentials in force."""
    from ingestd.broker import auth as auth_mod
    from ingestd.broker.credentials import Credential, TableSnapshot
    from ingestd.broker.passwords import dummy_of_kind, hash_kind

    a = auth_mod.Auth(MqttConfig(credentials_table="t", allow_anonymous=False))
    hashed: list[str] = []
    verify = auth_mod.verify_password
    monkeypatch.setattr(
        auth_mod, "verify_password", lambda stored, pw: hashed.append(stored) or verify(stored, pw)
    )
    h = hash_password("p", 1000)
    on = Credential(h, client_id="c", prefix="org_1")

    async def run() -> None:
        async def login(user: str, password: bytes, client_id: str = "c") -> Any:
            return await a.authenticate(user, password, "127.0.0.1:1", client_id)

        # No snapshot yet: refused as unavailable, nothing hashed, not a failed login.
        assert (await login("u", b"p")).reason == UNAVAILABLE
        assert hashed == [] and a.stats.auth_failures == 0
        users = {"u": on, "off": Credential(h, enabled=False)}
        a.set_table(TableSnapshot(users, dummy_of_kind(hash_kind(h)), 0.0))
        ok = await login("u", b"p")
        assert (ok.reason, ok.credential) == (0, on)
        assert (await login("u", b"p", "other")).reason == NOT_AUTHORIZED
        assert (await login("u", b"wrong")).reason == BAD_LOGIN
        assert (await login("off", b"p")).reason == BAD_LOGIN
        assert hashed[-1] == h  # a disabled user costs its own hash
        assert (await login("ghost", b"p")).reason == BAD_LOGIN
        # An unknown user is hashed against a dummy of the table's scheme and cost.
        assert hashed[-1].split("$")[:3] == h.split("$")[:3] and hashed[-1] != h

    asyncio.run(run())
    acl = a.client_acl("u", "c")
    assert acl is not None
    assert acl.may_publish("org_1") and acl.may_read("org_1/a/b") and not acl.may_read("org_2/a")
    assert a.may_subscribe(acl, "#") and not a.may_subscribe(acl, "org_2/#")
    anon = a.client_acl(None, "x")
    assert anon is not None and not anon.may_read("org_1/a")  # default deny
    assert a.in_force("u", "c", on) and not a.in_force("u", "d", on)
    a.set_table(TableSnapshot({"u": Credential(h, client_id="d")}, "", 0.0))
    assert not a.in_force("u", "c", on)
    revoked = a.session_acl("u", "c")
    assert revoked is not None and not revoked.may_read("org_1/a")
