"""Differential test of ingestd.broker.acl against a real Mosquitto.

A ``mosquitto`` (the Debian package, 2.0.x) is started on a free loopback
port with a generated config and an ACL file; paho clients with several
usernames and client ids subscribe and publish, and what Mosquitto does is
compared with what :class:`~ingestd.broker.acl.AclFile` predicts:

- each SUBACK reason code (granted or 0x80+) with ``may_subscribe``;
- each PUBACK reason code (0x00/0x10 accepted, 0x87 Not authorized) of a
  QoS 1 PUBLISH with ``may_publish``;
- the set of (publisher, topic) each client received with ``may_publish``
  of the publisher and ``may_read`` of the receiver (and a granted
  subscription matching the topic).

Deliveries are waited for deterministically: after all publishes, each
client sends one more QoS 1 PUBLISH and waits for its PUBACK (which Mosquitto
sends whether or not the publish is allowed). Mosquitto is single-threaded
and writes every packet for a client in order, so the messages it queued to
that client before are received before that PUBACK. The test also checks
that Mosquitto refuses to start exactly on the ACL files AclFile.load rejects.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ingestd.broker.acl import AclFile, topic_matches
from ingestd.errors import ConfigError

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
pytestmark = pytest.mark.skipif(
    MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto)"
)

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

WAIT = 10.0  # upper bound of every single wait; not a speed assertion
PAYLOAD_PREFIX = b"acl-test:"
BARRIER_TOPIC = "zz/barrier"

ACL = """\
# Anonymous clients (before any user line): read the public tree, write their corner.
topic read public/#
topic write public/anon/+
topic read $SYS/broker/connection/+/state
# No access word and one word: readwrite on the topic "deny".
topic deny

user admin
topic readwrite #
topic readwrite $SYS/#
topic readwrite $app/#

# A device: writes only its telemetry, reads only its commands.
user device-7
topic write telemetry/device-7/#
topic read commands/device-7

# Operations: everything under company/ except one tenant's secrets.
user ops
topic readwrite company/#
topic deny company/acme/secret/#
topic read $SYS/#
topic read spaced topic/with blanks

user alice
topic read company/+/announcements

# A tenant's own section: its grant wins over the deny pattern below.
user acme
topic read company/acme/locked/#

   user   bob
topic write public/+/bob

# A client id with '+' and '#': its user section still applies, the patterns not.
user eve
topic read public/#

# A second section for alice is merged with the first.
user alice
topic write $app/alice
topic deny company/globex/announcements

pattern readwrite company/%u/#
pattern deny company/%u/locked/#
pattern read devices/%c/config
pattern write $SYS/broker/connection/%c/state
pattern read %u/broker/#
"""

# (username, client id): tenants, a device, a user whose name has a '/', a
# user and a client id with wildcard characters, anonymous clients.
CLIENTS: list[tuple[str | None, str]] = [
    (None, "anon-1"),
    (None, "bridge-1"),
    ("admin", "admin-1"),
    ("device-7", "dev7"),
    ("ops", "ops-1"),
    ("acme", "acme-1"),
    ("globex", "globex-1"),
    ("alice", "alice-1"),
    ("bob", "bob-1"),
    ("acme/x", "acmex-1"),
    ("mal+", "mal-1"),
    ("+", "plus-1"),
    ("", "empty-1"),
    ("$SYS", "sys-user"),
    ("eve", "e+ve#"),
]

TOPICS = [
    "public/news",
    "public/anon/x",
    "public/anon/x/y",
    "public/acme/bob",
    "company",
    "company/acme",
    "company/acme/data",
    "company/acme/secret/plan",
    "company/acme/locked/a",
    "company/acme/announcements",
    "company/acme/x/data",
    "company/globex/data",
    "company/globex/locked",
    "company/globex/announcements",
    "company//x",
    "company/$SYS/x",
    "telemetry/device-7/temp",
    "telemetry/device-7",
    "telemetry/device-8/temp",
    "commands/device-7",
    "commands/device-8",
    "devices/dev7/config",
    "devices/anon-1/config",
    "spaced topic/with blanks",
    "deny",
    "$SYS/broker/connection/anon-1/state",
    "$SYS/broker/connection/bridge-1/state",
    "$SYS/broker/uptime",
    "$app/alice",
    "$app/other",
    "$share/g/public/news",
]

FILTERS = [
    "#",
    "$SYS/#",
    "$app/#",
    "company/+/secret/#",
    "commands/device-7",
    "telemetry/#",
    "$SYS/broker/connection/+/state",
    "+/+",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


def _start(tmp: Path, acl_text: str, name: str = "acl") -> Broker | None:
    """Start mosquitto with ``acl_text``; None if it refused to start (bad ACL file)."""
    assert MOSQUITTO is not None
    acl = tmp / f"{name}.acl"
    acl.write_text(acl_text, encoding="utf-8")
    port = _free_port()
    conf = tmp / f"{name}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"acl_file {acl}\n"
        "persistence false\n"
        "max_queued_messages 100000\n"
        "log_type all\n",
        encoding="utf-8",
    )
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=out, stderr=out)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Broker(proc, port, log)
        except OSError:
            time.sleep(0.02)  # polling for the listener, not a timing assumption
    proc.kill()
    proc.wait()
    raise AssertionError(f"mosquitto neither listened nor exited: {log.read_text()}")


def _stop(b: Broker) -> None:
    b.proc.terminate()
    try:
        b.proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        b.proc.kill()
        b.proc.wait()


@dataclass
class Peer:
    """A paho MQTT 5 client recording SUBACK/PUBACK reason codes and messages."""

    username: str | None
    client_id: str
    port: int
    received: set[tuple[str, str]] = field(default_factory=set)
    stray: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._acks: queue.Queue[tuple[int, int]] = queue.Queue()
        self._subacks: queue.Queue[list[int]] = queue.Queue()
        self._connected: queue.Queue[int] = queue.Queue()
        self._lock = threading.Lock()
        c = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5
        )
        if self.username is not None:
            c.username_pw_set(self.username)
        c.on_connect = lambda cl, u, flags, rc, p: self._connected.put(rc.value)
        c.on_subscribe = lambda cl, u, mid, rcs, p: self._subacks.put([r.value for r in rcs])
        c.on_publish = lambda cl, u, mid, rc, p: self._acks.put((mid, rc.value))
        c.on_message = self._on_message
        self.c = c

    def _on_message(self, cl: object, u: object, m: object) -> None:
        payload: bytes = m.payload  # type: ignore[attr-defined]
        topic: str = m.topic  # type: ignore[attr-defined]
        with self._lock:
            if payload.startswith(PAYLOAD_PREFIX):
                self.received.add((payload[len(PAYLOAD_PREFIX) :].decode(), topic))
            elif topic != BARRIER_TOPIC and not topic.startswith("$SYS/"):
                self.stray.append((topic, payload))  # $SYS: the broker's own messages

    def connect(self) -> None:
        self.c.connect("127.0.0.1", self.port, keepalive=60)
        self.c.loop_start()
        assert self._connected.get(timeout=WAIT) == 0

    def subscribe(self, filters: list[str]) -> list[int]:
        self.c.subscribe([(f, SubscribeOptions(qos=0)) for f in filters])
        return self._subacks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes) -> int:
        """PUBACK reason code of a QoS 1 publish."""
        info = self.c.publish(topic, payload, qos=1)
        mid, rc = self._acks.get(timeout=WAIT)
        assert mid == info.mid
        return rc

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def mosq_dir() -> Iterator[Path]:
    """A directory the broker can read after it drops root privileges to user mosquitto."""
    with tempfile.TemporaryDirectory(prefix="ingestd-acl-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


@pytest.fixture
def broker(mosq_dir: Path) -> Iterator[Broker]:
    b = _start(mosq_dir, ACL)
    assert b is not None, "mosquitto refused the test ACL file"
    yield b
    _stop(b)


def test_mosquitto_matches_acl_model(broker: Broker) -> None:
    model = AclFile.parse(ACL, source="acl.acl")
    peers = [Peer(u, cid, broker.port) for u, cid in CLIENTS]
    try:
        for p in peers:
            p.connect()

        # SUBSCRIBE: one own-group shared subscription each as well.
        filters: dict[str, list[str]] = {}
        sub_mismatch = []
        for i, p in enumerate(peers):
            fl = [*FILTERS, f"$share/g{i}/public/#"]
            codes = p.subscribe(fl)
            assert len(codes) == len(fl)
            filters[p.client_id] = [f for f, rc in zip(fl, codes, strict=True) if rc < 0x80]
            for f, rc in zip(fl, codes, strict=True):
                if (rc < 0x80) != model.may_subscribe(p.username, p.client_id, f):
                    sub_mismatch.append((p.username, p.client_id, f, rc))
        assert sub_mismatch == []

        # PUBLISH: every client every topic, QoS 1.
        accepted: list[tuple[str, str]] = []
        pub_mismatch = []
        for p in peers:
            for t in TOPICS:
                rc = p.publish(t, PAYLOAD_PREFIX + p.client_id.encode())
                assert rc in (0x00, 0x10, 0x87), f"unexpected PUBACK {rc:#x}"
                ok = rc != 0x87
                if ok:
                    accepted.append((p.client_id, t))
                if ok != model.may_publish(p.username, p.client_id, t):
                    pub_mismatch.append((p.username, p.client_id, t, rc))
        assert pub_mismatch == []
        assert len(accepted) > 40, "the scenario should let many publishes through"

        # Barrier: a QoS 1 round trip after everything was published.
        for p in peers:
            p.publish(BARRIER_TOPIC, b"barrier")

        read_mismatch = []
        total = 0
        for p in peers:
            subs = filters[p.client_id]

            def subscribed(t: str, subs: list[str] = subs) -> bool:
                return any(
                    topic_matches(f.split("/", 2)[2] if f.startswith("$share/") else f, t)
                    for f in subs
                )

            expected = {
                (src, t)
                for src, t in accepted
                if subscribed(t) and model.may_read(p.username, p.client_id, t)
            }
            with p._lock:
                got = set(p.received)
                stray = list(p.stray)
            total += len(got)
            assert stray == [], f"{p.client_id} got messages from no publisher: {stray}"
            if got != expected:
                read_mismatch.append(
                    (p.username, p.client_id, sorted(got - expected), sorted(expected - got))
                )
        assert read_mismatch == []
        assert total > 50, "the scenario should deliver many messages"
    finally:
        for p in peers:
            try:
                p.close()
            except Exception:
                pass


def test_retained_messages_are_delivered_by_may_read(broker: Broker) -> None:
    """Retained messages sent on SUBSCRIBE go through the same read check (retain__process)."""
    model = AclFile.parse(ACL, source="acl.acl")
    admin = Peer("admin", "admin-r", broker.port)
    peers = [Peer(u, f"r-{i}", broker.port) for i, (u, _cid) in enumerate(CLIENTS)]
    retained = []
    try:
        admin.connect()
        for t in TOPICS:
            info = admin.c.publish(t, PAYLOAD_PREFIX + b"retained", qos=1, retain=True)
            _mid, rc = admin._acks.get(timeout=WAIT)
            assert _mid == info.mid
            if rc != 0x87:
                retained.append(t)
        assert model.may_publish("admin", "admin-r", retained[0])
        assert len(retained) > 20
        mismatch = []
        for p in peers:
            p.connect()
            assert all(rc < 0x80 for rc in p.subscribe(["#", "$SYS/#", "$app/#"]))
            p.publish(BARRIER_TOPIC, b"barrier")
            with p._lock:
                got = {t for _src, t in p.received}
            expected = {t for t in retained if model.may_read(p.username, p.client_id, t)}
            if got != expected:
                mismatch.append((p.username, p.client_id, sorted(got ^ expected)))
        assert mismatch == []
    finally:
        for p in [admin, *peers]:
            try:
                p.close()
            except Exception:
                pass


# Files Mosquitto refuses to start with and AclFile.load must refuse too; and
# odd files both accept.
BAD_FILES = [
    "topic read a/#/b\n",
    "topic READ a\n",
    "topic\n",
    "pattern\n",
    "user\n",
    "user   \n",
    "\ttopic read a\n",
    "  # an indented comment is not a comment\n",
    "topic read a # trailing comment\n",
    "topic read a/b+\n",
    "topics read a\n",
    "topic read a\nuser x\nbogus\n",
    "topic\tread a\n",
]
GOOD_FILES = [
    "",
    "# only a comment\n\n   \n",
    "topic read\tfoo\n",
    "topic read\n",
    "topic deny\n",
    "   topic    read    a/b   \r\n",
    "topic read a b c/d\n",
    "user a b\ntopic a\n",
    "pattern write foo/%u%c/bar\n",
    "pattern read nothing/substituted\n",
    "topic read +/+/#\ntopic write #\n",
    "topic read a",
]


@pytest.mark.parametrize("text", BAD_FILES + GOOD_FILES)
def test_mosquitto_and_aclfile_agree_on_file_validity(mosq_dir: Path, text: str) -> None:
    path = mosq_dir / "f.acl"
    path.write_text(text, encoding="utf-8")
    try:
        AclFile.load(path)
        ours = True
    except ConfigError:
        ours = False
    b = _start(mosq_dir, text, name="validity")
    theirs = b is not None
    if b is not None:
        _stop(b)
    assert ours == theirs, (text, ours, theirs)
    assert ours == (text in GOOD_FILES)
