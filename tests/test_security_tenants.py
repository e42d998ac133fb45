"""Two tenants on one broker: credentials, mqtt.acl_file, reload, failed logins.

Real clients (paho, v3.1.1 and v5, and raw sockets where the reason code of
an ack matters) against a real broker on loopback. Absence is shown without
sleeping: a sentinel published after the stream (or the client's barrier)
arrives last, so anything that would have been delivered before it has been.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import rawmqtt
from ingestd.broker.acl import AclFile, filters_intersect
from ingestd.broker.passwords import (
    dummy_like,
    hash_password,
    load_password_file,
    verify_password,
)
from ingestd.errors import ConfigError
from mqtt_clients import WAIT, Client
from pg_fixtures import config_from_toml, fetch_sync, wait_rows
from server_thread import ServerThread

# Tenants are user names "1" and "2": the pattern puts each under company/<user>/.
ACL = """\
# every client's private barrier topic (tests/mqtt_clients.py)
pattern readwrite barrier/%c
pattern readwrite company/%u/#

# a device that may publish only its telemetry and read only its commands
user sensor1
topic write company/1/machine/s1/telemetry
topic read company/1/machine/s1/commands
"""

PASSWORDS = {"1": "pw-one", "2": "pw-two", "sensor1": "pw-sensor"}


def write_passwords(path: Path, users: dict[str, str]) -> None:
    # Fewer iterations than the default keep the test fast; verification reads them.
    path.write_text("".join(f"{u}:{hash_password(p, 1000)}\n" for u, p in users.items()))


@pytest.fixture
def tenants(tmp_path: Path, server_factory: Callable[..., ServerThread]) -> ServerThread:
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    pw = tmp_path / "passwd"
    write_passwords(pw, PASSWORDS)
    return server_factory(
        acl_file=str(acl), password_file=str(pw), allow_anonymous=False, auth_failure_limit=0
    )


def client(port: int, user: str, version: int = 5, **kw: Any) -> Client:
    return Client(port, username=user, password=PASSWORDS[user], version=version, **kw)


def raw_connect(
    port: int,
    user: str,
    password: str,
    client_id: str = "raw",
    v5: bool = True,
    will: tuple[str, bytes] | None = None,
) -> tuple[rawmqtt.Raw, int]:
    """A raw CONNECT with credentials; returns the socket and the CONNACK code."""
    flags = 0x02 | 0x80 | 0x40
    payload = rawmqtt.s(client_id)
    if will is not None:
        flags |= 0x04
        payload += (b"\x00" if v5 else b"") + rawmqtt.s(will[0]) + rawmqtt.s(will[1])
    payload += rawmqtt.s(user) + rawmqtt.s(password)
    level = 5 if v5 else 4
    body = rawmqtt.s("MQTT") + bytes([level, flags]) + (60).to_bytes(2, "big")
    if v5:
        body += b"\x00"
    raw = rawmqtt.Raw(port)
    raw.send(rawmqtt.packet(0x10, body + payload))
    first, data = raw.read_packet()
    assert first == 0x20
    return raw, data[1]


def ack_code(raw: rawmqtt.Raw) -> tuple[int, int, int]:
    """(packet type, packet id, reason code) of the next ack (reason 0 when absent)."""
    first, body = raw.read_packet()
    return first >> 4, int.from_bytes(body[:2], "big"), body[2] if len(body) > 2 else 0


def topic_of(m: Any) -> str:
    return str(m.topic)


def drain_until(c: Client, sentinels: set[str]) -> list[str]:
    """Topics received until every sentinel topic has arrived (bounded wait)."""
    got: list[str] = []
    left = set(sentinels)
    while left:
        t = topic_of(c.messages.get(timeout=WAIT))
        got.append(t)
        left.discard(t)
    return got


FILTERS = ["#", "+/+/#", "company/+/machine/+/telemetry", "$share/g/#"]


@pytest.mark.parametrize("version", [5, 4])
def test_each_tenant_reads_only_its_own_topics(tenants: ServerThread, version: int) -> None:
    port = tenants.port
    subs: dict[tuple[str, str], Client] = {}
    for tenant in ("1", "2"):
        for flt in FILTERS:
            if flt.startswith("$share") and version == 4:
                pass  # shared subscriptions are accepted from 3.1.1 clients too
            c = client(port, tenant, version)
            rcs = c.subscribe(flt, 1)
            assert [int(getattr(rc, "value", rc)) for rc in rcs] == [1], (tenant, flt, rcs)
            subs[(tenant, flt)] = c
    pubs = {t: client(port, t) for t in ("1", "2")}
    n = 50
    for i in range(n):
        for t, p in pubs.items():
            p.publish(f"company/{t}/machine/m{i % 3}/telemetry", json.dumps({"i": i}), 1)
    for t, p in pubs.items():
        p.publish(f"company/{t}/machine/end/telemetry", b"sentinel", 1)
    sentinels = {f"company/{t}/machine/end/telemetry" for t in ("1", "2")}
    for (tenant, flt), c in subs.items():
        own = f"company/{tenant}/machine/end/telemetry"
        got = drain_until(c, {own})
        c.barrier()
        while not c.messages.empty():
            got.append(topic_of(c.messages.get_nowait()))
        cross = [t for t in got if not t.startswith(f"company/{tenant}/")]
        assert cross == [], (tenant, flt, cross[:5])
        assert len(got) == n + 1, (tenant, flt, len(got))
        assert not (sentinels - {own}) & set(got)
    for c in [*subs.values(), *pubs.values()]:
        c.disconnect()
    denied = tenants.call(lambda: tenants.app.broker.stats.acl_denied_read)  # type: ignore[union-attr]
    # Every message of one tenant reached 3 non-shared subscribers of the other and was withheld.
    assert denied >= 2 * 3 * (n + 1)


def test_subscribe_to_another_tenants_tree_is_refused(tenants: ServerThread) -> None:
    c5 = client(tenants.port, "1")
    rcs = c5.subscribe("company/2/#", 1)
    assert [rc.value for rc in rcs] == [0x87]
    assert [rc.value for rc in c5.subscribe("$share/g/company/2/machine/+/telemetry", 1)] == [0x87]
    assert [rc.value for rc in c5.subscribe("company/+/machine/x/telemetry", 1)] == [1]
    c4 = client(tenants.port, "1", version=4)
    assert c4.subscribe("company/2/machine/+/telemetry", 1) == [128]
    assert c4.subscribe("company/1/#", 1) == [1]
    c5.disconnect()
    c4.disconnect()


def test_retained_of_the_other_tenant_not_delivered_on_subscribe(tenants: ServerThread) -> None:
    port = tenants.port
    for t in ("1", "2"):
        p = client(port, t)
        p.publish(f"company/{t}/machine/r/state", f"state-{t}".encode(), 1, retain=True)
        p.disconnect()
    for t in ("1", "2"):
        for flt in ("#", "+/+/#", "company/+/machine/r/state"):
            c = client(port, t)
            c.subscribe(flt, 1)
            (m,) = c.expect(1)
            assert m.topic == f"company/{t}/machine/r/state" and m.retain
            c.expect_nothing()
            c.disconnect()


@pytest.mark.parametrize(("v5", "code"), [(True, 0x87), (False, 5)])
def test_will_into_the_other_tenant_is_refused(tenants: ServerThread, v5: bool, code: int) -> None:
    raw, rc = raw_connect(
        tenants.port, "1", PASSWORDS["1"], "w1", v5, will=("company/2/machine/x/cmd", b"x")
    )
    assert rc == code
    raw.read_until_closed()
    raw, rc = raw_connect(
        tenants.port, "1", PASSWORDS["1"], "w2", v5, will=("company/1/machine/x/status", b"x")
    )
    assert rc == 0
    raw.sock.close()


def test_publish_into_the_other_tenant_is_refused(tenants: ServerThread) -> None:
    port = tenants.port
    watcher = client(port, "2")
    watcher.subscribe("#", 1)
    # v5: PUBACK 0x87 (QoS 1), PUBREC 0x87 (QoS 2); the connection stays.
    raw, rc = raw_connect(port, "1", PASSWORDS["1"], "intruder5")
    assert rc == 0
    raw.send(rawmqtt.publish("company/2/machine/x/commands", b"evil", 1, 7))
    assert ack_code(raw) == (4, 7, 0x87)
    raw.send(rawmqtt.publish("company/2/machine/x/commands", b"evil", 2, 8))
    assert ack_code(raw) == (5, 8, 0x87)
    raw.send(rawmqtt.publish("company/2/machine/x/commands", b"evil", 0))
    raw.send(rawmqtt.publish("company/1/machine/x/commands", b"fine", 1, 9))
    assert ack_code(raw) == (4, 9, 0)
    raw.sock.close()
    # 3.1.1: dropped, the plain PUBACK as Mosquitto sends, the connection stays.
    raw, rc = raw_connect(port, "1", PASSWORDS["1"], "intruder4", v5=False)
    assert rc == 0
    raw.send(rawmqtt.publish("company/2/machine/x/commands", b"evil", 1, 3, v5=False))
    assert ack_code(raw) == (4, 3, 0)
    raw.send(rawmqtt.publish("company/2/machine/x/commands", b"evil", 2, 4, v5=False))
    assert ack_code(raw) == (5, 4, 0)
    raw.send(rawmqtt.packet(0x62, (4).to_bytes(2, "big")))  # PUBREL
    assert ack_code(raw) == (7, 4, 0)  # PUBCOMP
    raw.sock.close()
    watcher.expect_nothing()
    denied = tenants.call(lambda: tenants.app.broker.stats.acl_denied_publish)  # type: ignore[union-attr]
    assert denied == 5
    watcher.disconnect()


@pytest.mark.parametrize("v5", [True, False])
def test_packets_pipelined_behind_a_checked_connect_wait_for_it(
    tenants: ServerThread, v5: bool
) -> None:
    # CONNECT (its password checked in a thread), SUBSCRIBE and PUBLISH in one write:
    # the SUBSCRIBE and PUBLISH are handled after the CONNACK, in order.
    flags = 0x02 | 0x80 | 0x40
    level = 5 if v5 else 4
    body = rawmqtt.s("MQTT") + bytes([level, flags]) + (60).to_bytes(2, "big")
    body += (b"\x00" if v5 else b"") + rawmqtt.s("pipe") + rawmqtt.s("1") + rawmqtt.s("pw-one")
    sub = (1).to_bytes(2, "big") + (b"\x00" if v5 else b"") + rawmqtt.s("company/1/#") + b"\x01"
    raw = rawmqtt.Raw(tenants.port)
    raw.send(
        rawmqtt.packet(0x10, body)
        + rawmqtt.packet(0x82, sub)
        + rawmqtt.publish("company/1/machine/p/telemetry", b"hello", 1, 5, v5=v5)
        + rawmqtt.publish("company/2/machine/p/telemetry", b"forged", 1, 6, v5=v5)
    )
    first, data = raw.read_packet()
    assert (first, data[1]) == (0x20, 0)
    first, data = raw.read_packet()
    assert first == 0x90 and data[-1] == 1  # SUBACK, QoS 1 granted
    seen = [raw.read_packet() for _ in range(3)]
    kinds = sorted(f >> 4 for f, _ in seen)
    assert kinds == [3, 4, 4]  # the message to itself, and two PUBACKs
    (msg,) = [b for f, b in seen if f >> 4 == 3]
    assert b"company/1/machine/p/telemetry" in msg and msg.endswith(b"hello")
    acks = {
        int.from_bytes(b[:2], "big"): (b[2] if len(b) > 2 else 0) for f, b in seen if f >> 4 == 4
    }
    assert acks == {5: 0, 6: 0x87 if v5 else 0}
    raw.sock.close()


def test_offline_session_queues_only_what_it_may_read(tenants: ServerThread) -> None:
    port = tenants.port
    sub = client(port, "1", client_id="persist-1", session_expiry=3600)
    sub.subscribe("#", 1)
    sub.disconnect()
    for t in ("2", "1"):
        p = client(port, t)
        p.publish(f"company/{t}/machine/q/telemetry", t.encode(), 1)
        p.disconnect()
    back = client(port, "1", client_id="persist-1", session_expiry=3600, clean_start=False)
    assert back.session_present
    (m,) = back.expect(1)
    assert m.topic == "company/1/machine/q/telemetry"
    back.expect_nothing()
    back.drop()
    # Another user resuming that client id gets a clean session, not tenant 1's queue.
    p = client(port, "1")
    p.publish("company/1/machine/q/telemetry", b"queued-for-1", 1)
    p.disconnect()
    thief = client(port, "2", client_id="persist-1", session_expiry=3600, clean_start=False)
    assert not thief.session_present
    thief.expect_nothing()
    thief.disconnect()


def test_device_publishes_only_telemetry_and_reads_only_commands(tenants: ServerThread) -> None:
    port = tenants.port
    dev = client(port, "sensor1", client_id="s1")
    assert [rc.value for rc in dev.subscribe("company/1/machine/s1/telemetry", 1)] == [0x87]
    assert [rc.value for rc in dev.subscribe("company/1/machine/s2/commands", 1)] == [0x87]
    assert [rc.value for rc in dev.subscribe("company/1/machine/s1/commands", 1)] == [1]
    assert [rc.value for rc in dev.subscribe("#", 1)] == [1]  # allowed, filtered on delivery
    backend = client(port, "1")
    backend.subscribe("company/1/#", 1)
    dev.publish("company/1/machine/s1/telemetry", b"t", 1)
    dev.publish("company/1/machine/s1/commands", b"forged", 1)  # refused (0x87)
    dev.publish("company/1/machine/s2/telemetry", b"forged", 1)  # refused
    (m,) = backend.expect(1)
    assert (m.topic, m.payload) == ("company/1/machine/s1/telemetry", b"t")
    backend.expect_nothing()
    backend.publish("company/1/machine/s1/commands", b"go", 1)
    backend.publish("company/1/machine/s2/commands", b"other", 1)
    (m,) = dev.expect(1)  # overlapping subscriptions: one delivery
    assert (m.topic, m.payload) == ("company/1/machine/s1/commands", b"go")
    dev.expect_nothing()
    dev.disconnect()
    backend.disconnect()


def test_acl_reload_revokes_a_live_subscription(tmp_path: Path, tenants: ServerThread) -> None:
    port = tenants.port
    sub = client(port, "2")
    sub.subscribe("company/2/#", 1)
    shared = client(port, "2")
    shared.subscribe("$share/g/company/2/#", 1)
    pub = client(port, "2")
    pub.publish("company/2/machine/a/telemetry", b"before", 1)
    assert sub.expect(1)[0].payload == b"before"
    assert shared.expect(1)[0].payload == b"before"
    app = tenants.app
    assert app is not None
    # A bad file on reload: logged, the old ACL kept.
    (tmp_path / "acl").write_text("topic read\nnonsense here\n")
    assert tenants.call(app.reload_auth) is False
    pub.publish("company/2/machine/a/telemetry", b"still", 1)
    assert sub.expect(1)[0].payload == b"still"
    assert shared.expect(1)[0].payload == b"still"
    # Tenant 2 loses read on its tree (keeps write): live subscriptions stop delivering.
    (tmp_path / "acl").write_text("pattern readwrite barrier/%c\npattern write company/%u/#\n")
    assert tenants.call(app.reload_auth) is True
    pub.publish("company/2/machine/a/telemetry", b"after", 1)
    sub.expect_nothing()
    shared.expect_nothing()
    for c in (sub, shared, pub):
        c.disconnect()


def test_acl_file_errors_name_file_and_line(tmp_path: Path, server_factory: Any) -> None:
    acl = tmp_path / "acl"
    acl.write_text("pattern readwrite company/%u/#\ntopic bogus a/b\n")
    with pytest.raises(ConfigError) as e:
        server_factory(acl_file=str(acl))
    assert e.value.path == str(acl) and "line 2" in str(e.value)


def test_failed_logins_are_counted_and_rate_limited(
    tmp_path: Path, server_factory: Callable[..., ServerThread]
) -> None:
    pw = tmp_path / "passwd"
    write_passwords(pw, PASSWORDS)
    srv = server_factory(
        password_file=str(pw),
        allow_anonymous=False,
        auth_failure_limit=3,
        auth_failure_window=600.0,
        auth_failure_cooldown=600.0,
    )
    port = srv.port
    bad = Client(port, username="1", password="wrong", connect=False)
    bad.connect(expect_rc=0x86)
    bad.c.loop_stop()
    unknown = Client(port, username="nobody", password="x", connect=False)
    unknown.connect(expect_rc=0x86)
    unknown.c.loop_stop()
    raw, rc = raw_connect(port, "1", "wrong", "v3", v5=False)
    assert rc == 4
    raw.read_until_closed()
    # Three failures from 127.0.0.1 within the window: even the right password is refused now.
    raw, rc = raw_connect(port, "1", PASSWORDS["1"], "ok5")
    assert rc == 0x9F
    raw.read_until_closed()
    stats = srv.call(lambda: srv.app.broker.stats)  # type: ignore[union-attr]
    assert stats.auth_failures == 4
    text = srv.call(lambda: _metrics_text(srv))
    assert "ingestd_auth_failures_total 4.0" in text


def _metrics_text(srv: ServerThread) -> str:
    from prometheus_client.exposition import generate_latest

    from ingestd.metrics import build_registry

    assert srv.app is not None
    registry, _ = build_registry(srv.app.broker, process_metrics=False)
    return generate_latest(registry).decode()


def test_without_a_limit_right_password_still_works(tenants: ServerThread) -> None:
    for _ in range(3):
        raw, rc = raw_connect(tenants.port, "2", "wrong", "x")
        assert rc == 0x86
        raw.read_until_closed()
    client(tenants.port, "2").disconnect()


MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or (
    "/usr/sbin/mosquitto_passwd" if Path("/usr/sbin/mosquitto_passwd").exists() else None
)


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_mosquitto_passwd_file_works_unchanged(
    tmp_path: Path, server_factory: Callable[..., ServerThread]
) -> None:
    assert MOSQUITTO_PASSWD is not None
    pw = tmp_path / "passwd"
    pw.touch()
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), "alice", "s3cret"], check=True)
    subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), "bob", "hunter2"], check=True)
    # An older sha512 ($6$) line as mosquitto_passwd -H sha512 wrote it.
    salt = os.urandom(12)
    digest = hashlib.sha512(b"legacy-pw" + salt).digest()
    b64 = base64.b64encode
    with pw.open("a") as f:
        f.write(f"carol:$6${b64(salt).decode()}${b64(digest).decode()}\n")
    assert load_password_file(str(pw))["alice"].startswith("$7$")
    srv = server_factory(password_file=str(pw), allow_anonymous=False)
    for user, password in (("alice", "s3cret"), ("bob", "hunter2"), ("carol", "legacy-pw")):
        Client(srv.port, username=user, password=password).disconnect()
    bad = Client(srv.port, username="alice", password="hunter2", connect=False)
    bad.connect(expect_rc=0x86)
    bad.c.loop_stop()


def test_password_schemes_unit() -> None:
    stored = hash_password("x", 1000)
    assert verify_password(stored, b"x") and not verify_password(stored, b"y")
    salt = b"0123456789ab"
    sha = hashlib.pbkdf2_hmac("sha512", b"pw", salt, 101)
    line = f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(sha).decode()}"
    assert verify_password(line, b"pw") and not verify_password(line, b"pX")
    assert not verify_password("$7$101$!!$!!", b"pw")


def test_unknown_users_cost_what_known_users_cost() -> None:
    # The dummy an unknown user is checked against has the file's scheme and cost.
    salt = base64.b64encode(b"0123456789ab").decode()
    users = {"a": f"$7$101${salt}$AAAA", "b": f"$7$101${salt}$BBBB", "c": hash_password("x", 7)}
    assert dummy_like(users).startswith("$7$101$")
    assert dummy_like({"c": hash_password("x", 1234)}).startswith("$pbkdf2-sha256$1234$")
    assert dummy_like({}).startswith("$pbkdf2-sha256$100000$")


def test_password_checks_run_off_the_loop_and_unknown_users_hash_too(
    tmp_path: Path, server_factory: Callable[..., ServerThread], monkeypatch: Any
) -> None:
    import threading

    import ingestd.broker.auth as auth_module

    calls: list[tuple[str, str]] = []
    real = auth_module.verify_password

    def spy(stored: str, password: bytes) -> bool:
        calls.append((threading.current_thread().name, stored))
        return real(stored, password)

    monkeypatch.setattr(auth_module, "verify_password", spy)
    pw = tmp_path / "passwd"
    write_passwords(pw, {"1": "pw-one"})
    srv = server_factory(password_file=str(pw), allow_anonymous=False)
    Client(srv.port, username="1", password="pw-one").disconnect()
    unknown = Client(srv.port, username="ghost", password="x", connect=False)
    unknown.connect(expect_rc=0x86)
    unknown.c.loop_stop()
    loop_thread = srv._thread.name
    assert len(calls) == 2
    assert all(name != loop_thread for name, _ in calls)
    # The unknown user was hashed against a dummy of the same scheme and cost.
    assert calls[1][1].split("$")[:3] == calls[0][1].split("$")[:3]
    assert calls[1][1] != calls[0][1]


def test_sighup_reload_reads_new_credentials(
    tmp_path: Path, server_factory: Callable[..., ServerThread]
) -> None:
    pw = tmp_path / "passwd"
    write_passwords(pw, {"1": "pw-one"})
    srv = server_factory(password_file=str(pw), allow_anonymous=False)
    app = srv.app
    assert app is not None
    newcomer = Client(srv.port, username="2", password="pw-two", connect=False)
    newcomer.connect(expect_rc=0x86)
    newcomer.c.loop_stop()
    pw.write_text("garbage line\n")
    assert srv.call(app.reload_auth) is False  # logged, the old file kept
    Client(srv.port, username="1", password="pw-one").disconnect()
    write_passwords(pw, {"2": "pw-two"})
    assert srv.call(app.reload_auth) is True
    Client(srv.port, username="2", password="pw-two").disconnect()
    gone = Client(srv.port, username="1", password="pw-one", connect=False)
    gone.connect(expect_rc=0x86)
    gone.c.loop_stop()


def test_passwd_refuses_a_colon_in_the_username() -> None:
    from ingestd.cli import main

    out = CliRunner().invoke(main, ["passwd", "a:b", "--password", "x"])
    assert out.exit_code != 0 and "':'" in out.output
    out = CliRunner().invoke(main, ["passwd", "ab", "--password", "x"])
    assert out.exit_code == 0 and out.output.startswith("ab:$pbkdf2-sha256$")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("#", "company/1/#", True),
        ("+/+/#", "company/1/#", True),
        ("company/2/#", "company/1/#", False),
        ("company/+/machine/+/telemetry", "company/1/#", True),
        ("company/1", "company/1/#", True),  # '#' matches the parent level
        ("company/1/x", "company/1/+", True),
        ("company/1/x/y", "company/1/+", False),
        ("company/1", "company/1/+", False),
        ("#", "$SYS/#", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/+", "$SYS/x", True),
        ("a/+/c", "a/b/+", True),
        ("a/+/c", "a/b/d", False),
    ],
)
def test_filters_intersect(a: str, b: str, expected: bool) -> None:
    assert filters_intersect(a, b) is expected
    assert filters_intersect(b, a) is expected


def test_may_read_any_is_never_stricter_than_may_read() -> None:
    acl = AclFile.parse(ACL + "user 2\ntopic deny company/2/secret\n")
    for user, cid in (("1", "a"), ("2", "b"), ("sensor1", "s1")):
        ca = acl.for_client(user, cid)
        topics = [
            f"company/{t}/machine/{m}/{k}"
            for t in ("1", "2")
            for m in ("s1", "x")
            for k in ("telemetry", "commands")
        ] + ["company/2/secret", f"barrier/{cid}", "other"]
        for flt in (*FILTERS[:3], "company/2/#", "company/1/machine/s1/+", "barrier/+"):
            readable = [t for t in topics if ca.may_read(t) and _matches(flt, t)]
            if readable:
                assert ca.may_read_any(flt), (user, flt, readable)


def _matches(flt: str, topic: str) -> bool:
    from ingestd.broker.acl import topic_matches

    return topic_matches(flt, topic)


# ----------------------------------------------------------------------------------------
# Ingestion: a publish the client may not make never becomes a row (fast path on and off)
# ----------------------------------------------------------------------------------------

ROUTE = """
[server]
http_listen = ""
[[routes]]
name = "telemetry"
topic = "company/{company}/machine/{machine}/telemetry"
table = "tenant_telemetry"
[routes.columns]
company = "topic.company"
machine = "topic.machine"
seq = "payload.seq::bigint"
login = "username"
"""


@pytest.mark.pg
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "per-message"])
def test_forged_publish_never_becomes_a_row(pg_dsn: str, tmp_path: Path, fast_path: bool) -> None:
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    pw = tmp_path / "passwd"
    write_passwords(pw, PASSWORDS)
    cfg = config_from_toml(
        ROUTE,
        tmp_path,
        pg_dsn,
        mqtt={"password_file": str(pw), "acl_file": str(acl), "allow_anonymous": False},
        ingest={"fast_path": fast_path},
        persistence={"enabled": False},
    )
    cfg.server.listen = ["127.0.0.1:0"]
    srv = ServerThread(cfg, database=True).start()
    try:
        raw, rc = raw_connect(srv.port, "2", PASSWORDS["2"], "t2-dev")
        assert rc == 0
        # A run of PUBLISHes in one write: forged ones between allowed ones.
        batch = b""
        for pid in range(1, 21):
            t = "1" if pid % 2 else "2"
            body = json.dumps({"seq": pid}).encode()
            batch += rawmqtt.publish(f"company/{t}/machine/m/telemetry", body, 1, pid)
        raw.send(batch)
        # In arrival order [MQTT-4.6.0-2]: a refusal waits behind acks held for the commit.
        acks = [ack_code(raw) for _ in range(20)]
        assert acks == [(4, pid, 0x87 if pid % 2 else 0) for pid in range(1, 21)]
        raw.sock.close()
        rows = wait_rows(
            pg_dsn,
            "SELECT company, seq, login FROM tenant_telemetry ORDER BY seq",
            until=lambda r: len(r) >= 10,
        )
        assert [tuple(r) for r in rows] == [("2", pid, "2") for pid in range(2, 21, 2)]
        # The same topic from its own tenant is ingested (the decision is per client).
        own = client(srv.port, "1")
        own.publish("company/1/machine/m/telemetry", json.dumps({"seq": 100}), 1)
        own.disconnect()
        rows = fetch_sync(
            pg_dsn, "SELECT company, seq, login FROM tenant_telemetry WHERE company = '1'"
        )
        assert [tuple(r) for r in rows] == [("1", 100, "1")]
    finally:
        srv.stop()


@pytest.mark.skipif(
    not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
    reason="mosquitto is not installed",
)
def test_refused_publish_acks_as_mosquitto(
    tmp_path: Path, server_factory: Callable[..., ServerThread]
) -> None:
    """The acks of a PUBLISH the ACL refuses, byte for byte as a real Mosquitto 2.0 sends."""
    from test_acl_mosquitto import _start, _stop

    acl = "topic readwrite allowed/#\n"
    mosq_dir = Path(tempfile.mkdtemp(prefix="ingestd-acl-"))
    os.chmod(mosq_dir, 0o755)  # readable after mosquitto drops root to user mosquitto
    mosq = _start(mosq_dir, acl)
    assert mosq is not None
    (tmp_path / "ours.acl").write_text(acl)
    ours = server_factory(acl_file=str(tmp_path / "ours.acl"))

    def exchange(port: int, v5: bool) -> list[tuple[int, bytes]]:
        r = rawmqtt.Raw(port)
        r.send(rawmqtt.connect_v5("chk") if v5 else rawmqtt.connect_v4("chk"))
        assert r.read_packet()[0] == 0x20
        got = []
        r.send(rawmqtt.publish("denied/x", b"p", 1, 3, v5=v5))
        got.append(r.read_packet())
        r.send(rawmqtt.publish("denied/x", b"p", 2, 4, v5=v5))
        got.append(r.read_packet())
        if not v5:  # v5: a PUBREC >= 0x80 ends the exchange
            r.send(rawmqtt.packet(0x62, (4).to_bytes(2, "big")))
            got.append(r.read_packet())
        r.send(rawmqtt.publish("allowed/x", b"p", 1, 5, v5=v5))
        got.append(r.read_packet())
        r.sock.close()
        return got

    try:
        for v5 in (False, True):
            got, want = exchange(ours.port, v5), exchange(mosq.port, v5)
            assert got[:-1] == want[:-1], v5
            # The allowed PUBLISH after them is acknowledged as a success by both
            # (Mosquitto says 0x10 "no matching subscribers" in v5; ingestd 0).
            assert got[-1][1][:2] == want[-1][1][:2] == b"\x00\x05"
            assert got[-1][1][2:3] in (b"", b"\x00")
    finally:
        _stop(mosq)
        shutil.rmtree(mosq_dir, ignore_errors=True)


def test_stored_sessions_keep_their_user_name() -> None:
    import msgspec

    from ingestd.broker.hooks import StoredSession
    from ingestd.broker.store import decode_session, encode_session

    s = StoredSession("c", 60, {"a/#": (1, False, False, 0, 0)}, 1.0, username="1", user_known=True)
    back = decode_session("c", encode_session(s))
    assert (back.username, back.user_known) == ("1", True)
    anon = decode_session("c", encode_session(StoredSession("c", 60, {}, 1.0, user_known=True)))
    assert (anon.username, anon.user_known) == (None, True)
    # A row written before user names were stored: the user is unknown (reads nothing).
    old = decode_session("c", msgspec.msgpack.encode([60, {}, 1.0, []]))
    assert (old.username, old.user_known) == (None, False)


@pytest.mark.pg
def test_restored_session_reads_under_its_users_acl(pg_dsn: str, tmp_path: Path) -> None:
    """After a restart, an offline session is still decided on its own user's ACL."""
    from ingestd.config import (
        Config,
        DatabaseConfig,
        MqttConfig,
        PersistenceConfig,
        PresenceConfig,
        ServerConfig,
    )

    acl = tmp_path / "acl"
    acl.write_text(ACL)
    pw = tmp_path / "passwd"
    write_passwords(pw, PASSWORDS)

    def config() -> Config:
        return Config(
            server=ServerConfig(listen=["127.0.0.1:0"], http_listen=None, data_dir=str(tmp_path)),
            mqtt=MqttConfig(acl_file=str(acl), password_file=str(pw), allow_anonymous=False),
            database=DatabaseConfig(dsn=pg_dsn),
            presence=PresenceConfig(enabled=False),
            persistence=PersistenceConfig(),
        )

    srv = ServerThread(config(), database=True).start()
    try:
        dev = client(srv.port, "1", client_id="keep-1", session_expiry=3600)
        dev.subscribe("#", 1)
        dev.disconnect()
    finally:
        srv.stop()
    srv2 = ServerThread(config(), database=True).start()
    try:
        for t in ("2", "1"):  # while keep-1 is offline, after the restart
            p = client(srv2.port, t)
            p.publish(f"company/{t}/machine/k/telemetry", t.encode(), 1)
            p.disconnect()
        back = client(srv2.port, "1", client_id="keep-1", session_expiry=3600, clean_start=False)
        assert back.session_present
        (m,) = back.expect(1)
        assert (m.topic, m.payload) == ("company/1/machine/k/telemetry", b"1")
        back.expect_nothing()
        back.disconnect()
    finally:
        srv2.stop()


def test_config_check_reads_the_acl_and_password_files(tmp_path: Path) -> None:
    from ingestd.cli import main

    acl = tmp_path / "acl"
    acl.write_text("pattern readwrite company/%u/#\nuser\n")
    pw = tmp_path / "passwd"
    write_passwords(pw, {"1": "x"})
    cfg = tmp_path / "ingestd.toml"
    cfg.write_text(f'[mqtt]\npassword_file = "{pw}"\nacl_file = "{acl}"\n')
    out = CliRunner().invoke(main, ["config", "check", str(cfg)])
    assert out.exit_code == 2
    assert str(acl) in out.output and "line 2" in out.output and "mqtt.acl_file" in out.output
    acl.write_text(ACL)
    out = CliRunner().invoke(main, ["config", "check", str(cfg)])
    assert out.exit_code == 0, out.output
    pw.write_text("1:plaintext\n")
    out = CliRunner().invoke(main, ["config", "check", str(cfg)])
    assert out.exit_code == 2 and str(pw) in out.output and "line 1" in out.output
