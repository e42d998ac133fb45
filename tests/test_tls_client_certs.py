"""TLS client certificates as identity (docs/security.md, "TLS client certificates").

The test makes its own CA, a second CA, a server certificate and client
certificates (``cryptography``), starts ingestd with ``server.tls_cafile`` and
``tls_use_identity_as_username`` (or the subject / a subjectAltName), and
connects real clients over TLS and WSS (paho-mqtt 3.1.1 and 5.0, Debian's
mosquitto_pub): the certificate's name is the user name the ACL decides on,
the CONNECT's user name and password are ignored, a certificate from another CA
or none at all is refused.
"""

from __future__ import annotations

import datetime
import queue
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import make_config
from ingestd.broker.certs import certificate_username, rfc2253
from ingestd.broker.channel import CONNECTED
from ingestd.broker.passwords import hash_password
from ingestd.config import Config
from ingestd.config.validate import validate_config
from ingestd.errors import ConfigError
from mqtt_clients import WAIT, Client
from rawmqtt import connect_v4, connect_v5

ACL = """\
user ops
topic read company/#

# the test clients' own barrier topic (mqtt_clients.Client.barrier)
pattern readwrite barrier/%c

pattern readwrite company/%u/#
"""


def _name(**attrs: str) -> x509.Name:
    oids = {
        "CN": NameOID.COMMON_NAME,
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "C": NameOID.COUNTRY_NAME,
    }
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs.items()])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class Pki:
    """A CA that issues certificates into a directory."""

    def __init__(self, d: Path, name: str) -> None:
        self.d = d
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(CN=f"{name} test CA")
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = d / f"{name}-ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, file: str, subject: x509.Name, sans: list[x509.GeneralName], server: bool = False
    ) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = (
            x509.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        crt, key_path = self.d / f"{file}.pem", self.d / f"{file}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return crt, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, object]:
    import ipaddress

    d = tmp_path_factory.mktemp("pki")
    ca, other = Pki(d, "main"), Pki(d, "other")
    server = ca.issue(
        "server",
        _name(CN="localhost"),
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        server=True,
    )
    t1 = ca.issue(
        "tenant-1",
        _name(C="DE", O="Acme, Inc.", OU="Geräte+Sensoren", CN="tenant-1"),
        [
            x509.RFC822Name("tenant-1@acme.example"),
            x509.UniformResourceIdentifier("urn:dev:tenant-1"),
        ],
    )
    t2 = ca.issue("tenant-2", _name(CN="tenant-2"), [])
    rogue = other.issue("rogue", _name(CN="tenant-2"), [])
    return {"ca": ca.pem, "server": server, "tenant-1": t1, "tenant-2": t2, "rogue": rogue}


def tls_config(tmp_path: Path, pki, **server: object) -> Config:
    cfg = make_config(tmp_path)
    (tmp_path / "acl").write_text(ACL)
    (tmp_path / "passwd").write_text(f"ops:{hash_password('ops-pw', 1000)}\n")
    cfg.mqtt.acl_file = str(tmp_path / "acl")
    cfg.mqtt.password_file = str(tmp_path / "passwd")
    cfg.mqtt.allow_anonymous = False
    s = cfg.server
    s.tls_listen = ["127.0.0.1:0"]
    s.tls_certfile, s.tls_keyfile = (str(p) for p in pki["server"])
    s.tls_cafile = str(pki["ca"])
    s.tls_use_identity_as_username = True
    for k, v in server.items():
        setattr(s, k, v)
    validate_config(cfg)
    return cfg


def tls_client(
    port: int, pki, cert: str | None, version: int = 5, transport: str = "tcp", **kw: object
) -> tuple[mqtt.Client, queue.Queue[tuple[str, object]]]:
    """A paho client over TLS presenting ``cert`` (a pki key), connected; its events."""
    events: queue.Queue[tuple[str, object]] = queue.Queue()
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"tls-{cert}-{version}",
        protocol=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311,
        transport=transport,
    )
    files = pki[cert] if cert else (None, None)
    c.tls_set(ca_certs=str(pki["ca"]), certfile=files[0], keyfile=files[1])
    if "username" in kw:
        c.username_pw_set(kw["username"], kw.get("password"))
    c.on_connect = lambda cl, u, f, rc, p: events.put(("connack", rc.value))
    c.on_publish = lambda cl, u, mid, rc, p: events.put(("puback", (mid, rc.value)))
    c.on_subscribe = lambda cl, u, mid, rcs, p: events.put(("suback", [r.value for r in rcs]))
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c, events


def expect(events: queue.Queue[tuple[str, object]], kind: str) -> object:
    got, value = events.get(timeout=WAIT)
    assert got == kind, (got, value)
    return value


def tls_usernames(srv) -> list[str | None]:
    return srv.call(
        lambda: sorted(
            c.username
            for c in srv.app.broker.connections
            if c.transport_name in ("tls", "wss") and c.state == CONNECTED
        )
    )


def ops(port: int) -> Client:
    cl = Client(port, username="ops", password="ops-pw")
    cl.subscribe("company/#", 1)
    return cl


# -- the identity in ACL decisions ----------------------------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_cn_is_the_username_the_acl_decides_on(server_factory, tmp_path, pki, version) -> None:
    srv = server_factory(tls_config(tmp_path, pki))
    watcher = ops(srv.port)
    # The CONNECT's user name and password are ignored: no password is checked.
    c, ev = tls_client(
        srv.app.port("mqtts"), pki, "tenant-1", version, username="ops", password="wrong"
    )
    try:
        assert expect(ev, "connack") == 0
        assert tls_usernames(srv) == ["tenant-1"]
        own = c.publish("company/tenant-1/m1/telemetry", b"mine", 1)
        assert expect(ev, "puback") == (own.mid, 0)
        other = c.publish("company/tenant-2/m1/telemetry", b"forged", 1)
        assert expect(ev, "puback") == (other.mid, 0x87 if version == 5 else 0)
        c.subscribe("company/tenant-2/#", 1)
        assert expect(ev, "suback") == [0x87 if version == 5 else 0x80]
        c.subscribe("company/tenant-1/#", 1)
        assert expect(ev, "suback") == [1]
    finally:
        c.disconnect()
        c.loop_stop()
    [m] = watcher.expect()
    assert (m.topic, m.payload) == ("company/tenant-1/m1/telemetry", b"mine")
    watcher.expect_nothing()
    stats = srv.call(lambda: srv.app.broker.stats)
    assert stats.auth_failures == 0
    assert stats.acl_denied_publish == 1


@pytest.mark.parametrize(
    ("listener", "cert"), [("mqtts", "tenant-2"), ("wss", "tenant-1")], ids=["tls", "wss"]
)
def test_each_certificate_writes_only_its_tenant(
    server_factory, tmp_path, pki, listener, cert
) -> None:
    """Another tenant's certificate gets the other tree; WSS takes the identity too."""
    cfg = tls_config(tmp_path, pki)
    cfg.server.wss_listen = ["127.0.0.1:0"]
    srv = server_factory(cfg)
    watcher = ops(srv.port)
    other = "tenant-1" if cert == "tenant-2" else "tenant-2"
    transport = "websockets" if listener == "wss" else "tcp"
    c, ev = tls_client(srv.app.port(listener), pki, cert, transport=transport)
    try:
        assert expect(ev, "connack") == 0
        assert tls_usernames(srv) == [cert]
        denied = c.publish(f"company/{other}/m1/telemetry", b"forged", 1)
        assert expect(ev, "puback") == (denied.mid, 0x87)
        own = c.publish(f"company/{cert}/m1/telemetry", listener.encode(), 1)
        assert expect(ev, "puback") == (own.mid, 0)
    finally:
        c.disconnect()
        c.loop_stop()
    assert [m.payload for m in watcher.expect()] == [listener.encode()]


# -- refusals ---------------------------------------------------------------------


def raw_tls(port: int, pki, cert: str | None, packet: bytes) -> bytes:
    """Connect with Python's ssl, send ``packet``; the first bytes the server sends
    (b"" if it closes or refuses the handshake first)."""
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        ctx.load_cert_chain(*(str(p) for p in pki[cert]))
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        try:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(packet)
                out = tls.recv(4096)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            pass  # refused in the handshake (TLS 1.3: on the first read)
    return out


@pytest.mark.parametrize("cert", ["rogue", None], ids=["other-ca", "no-certificate"])
def test_refused_in_the_handshake_when_required(server_factory, tmp_path, pki, cert) -> None:
    srv = server_factory(tls_config(tmp_path, pki))
    assert raw_tls(srv.app.port("mqtts"), pki, cert, connect_v5("x")) == b""  # no CONNACK
    assert raw_tls(srv.app.port("mqtts"), pki, "tenant-1", connect_v5("y"))[:1] == b"\x20"


def test_optional_certificate(server_factory, tmp_path, pki) -> None:
    """tls_require_certificate = false: without a certificate the handshake succeeds but a
    user name must come from one (CONNACK 0x86 / 4, as Mosquitto); a certificate from
    another CA still fails the handshake."""
    srv = server_factory(tls_config(tmp_path, pki, tls_require_certificate=False))
    port = srv.app.port("mqtts")
    refused = raw_tls(port, pki, None, connect_v5("a"))  # with a Reason String
    assert (refused[0], refused[2:4]) == (0x20, b"\x00\x86")
    assert raw_tls(port, pki, None, connect_v4("b")) == b"\x20\x02\x00\x04"
    assert raw_tls(port, pki, "rogue", connect_v5("c")) == b""
    assert srv.call(lambda: srv.app.broker.stats.auth_failures) == 2
    c, ev = tls_client(port, pki, "tenant-1", 4)
    try:
        assert expect(ev, "connack") == 0
        assert tls_usernames(srv) == ["tenant-1"]
    finally:
        c.disconnect()
        c.loop_stop()


def test_optional_certificate_without_identity_uses_the_password(
    server_factory, tmp_path, pki
) -> None:
    """No identity option: TLS clients log in with CONNECT's user name and password, with
    or without a certificate."""
    srv = server_factory(
        tls_config(tmp_path, pki, tls_require_certificate=False, tls_use_identity_as_username=False)
    )
    port = srv.app.port("mqtts")
    c, ev = tls_client(port, pki, None, username="ops", password="ops-pw")
    d, ev2 = tls_client(port, pki, "tenant-1", username="ops", password="wrong")
    try:
        assert expect(ev, "connack") == 0
        assert expect(ev2, "connack") == 0x86
        assert tls_usernames(srv) == ["ops"]
    finally:
        for cl in (c, d):
            cl.disconnect()
            cl.loop_stop()


# -- other identity fields, WSS, mosquitto clients ---------------------------------


def test_subject_as_username_matches_openssl(server_factory, tmp_path, pki) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to print the subject independently")
    printed = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253",
         "-in", str(pki["tenant-1"][0])],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    assert printed.startswith("subject=")
    expected = printed.removeprefix("subject=")
    assert "\\" in expected  # the test covers escapes: "Acme\, Inc.", "Ger\C3\A4te\+..."
    srv = server_factory(
        tls_config(
            tmp_path, pki, tls_use_identity_as_username=False, tls_use_subject_as_username=True
        )
    )
    c, ev = tls_client(srv.app.port("mqtts"), pki, "tenant-1")
    try:
        assert expect(ev, "connack") == 0
        assert tls_usernames(srv) == [expected]
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.parametrize(
    ("field", "name"), [("san_email", "tenant-1@acme.example"), ("san_uri", "urn:dev:tenant-1")]
)
def test_subject_alt_name_as_username(server_factory, tmp_path, pki, field, name) -> None:
    srv = server_factory(tls_config(tmp_path, pki, tls_identity_field=field))
    port = srv.app.port("mqtts")
    c, ev = tls_client(port, pki, "tenant-1")
    try:
        assert expect(ev, "connack") == 0
        assert tls_usernames(srv) == [name]
    finally:
        c.disconnect()
        c.loop_stop()
    # tenant-2's certificate has no subjectAltName: no user name, refused.
    d, ev2 = tls_client(port, pki, "tenant-2")
    try:
        assert expect(ev2, "connack") == 0x86
    finally:
        d.loop_stop()


def test_mosquitto_pub_with_a_client_certificate(server_factory, tmp_path, pki) -> None:
    if shutil.which("mosquitto_pub") is None:
        pytest.fail("mosquitto-clients (mosquitto_pub) are part of the test tools")
    srv = server_factory(tls_config(tmp_path, pki))
    watcher = ops(srv.port)
    port = str(srv.app.port("mqtts"))

    def pub(cert: str, topic: str, payload: str) -> subprocess.CompletedProcess[str]:
        crt, key = pki[cert]
        return subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-V", "mqttv5", "-q", "1",
             "--cafile", str(pki["ca"]), "--cert", str(crt), "--key", str(key),
             "-t", topic, "-m", payload],
            capture_output=True, text=True, timeout=WAIT * 3,
        )  # fmt: skip

    assert pub("tenant-2", "company/tenant-2/m/t", "from mosquitto").returncode == 0
    [m] = watcher.expect()
    assert (m.topic, m.payload) == ("company/tenant-2/m/t", b"from mosquitto")
    denied = pub("tenant-2", "company/tenant-1/m/t", "forged")
    assert "Not authorized" in denied.stderr or denied.returncode != 0
    assert pub("rogue", "company/tenant-2/m/t", "rogue").returncode != 0
    watcher.expect_nothing()


# -- configuration and the name rules -----------------------------------------------


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        (
            {"tls_use_identity_as_username": True, "tls_use_subject_as_username": True},
            "server.tls_use_subject_as_username",
        ),
        ({"tls_use_identity_as_username": True}, "server.tls_use_identity_as_username"),
        ({"tls_identity_field": "san_dns"}, "server.tls_identity_field"),
    ],
)
def test_bad_certificate_settings_fail_at_start(tmp_path, settings, key) -> None:
    from ingestd.config import load_config

    lines = "".join(f"{k} = {'true' if v is True else repr(v).replace(chr(39), chr(34))}\n"
                    for k, v in settings.items())  # fmt: skip
    path = tmp_path / "ingestd.toml"
    path.write_text("[server]\n" + lines)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert key in str(err.value) and str(path) in str(err.value)


def test_rfc2253_escapes_as_openssl() -> None:
    subject = (
        (("countryName", "DE"),),
        (("organizationName", "Acme, Inc."),),
        (("organizationalUnitName", "#1 <lab>; ü"),),
        (("commonName", " dev "), ("userId", "7")),
    )
    assert rfc2253(subject) == (
        "CN=\\ dev\\ +UID=7,OU=\\#1 \\<lab\\>\\; \\C3\\BC,O=Acme\\, Inc.,C=DE"
    )


def test_certificate_username_rules() -> None:
    cert = {
        "subject": ((("commonName", "first"),), (("commonName", "second"),)),
        "subjectAltName": (("DNS", "dev.example"), ("email", "a@b"), ("DNS", "other")),
    }
    assert certificate_username(cert, "cn") == "first"  # the first CN, as Mosquitto
    assert certificate_username(cert, "san_dns") == "dev.example"
    assert certificate_username(cert, "san_email") == "a@b"
    assert certificate_username(cert, "san_uri") is None
    assert certificate_username(None, "cn") is None
    assert certificate_username({}, "cn") is None
    nul = {"subject": ((("commonName", "a\x00b"),),)}
    assert certificate_username(nul, "cn") is None  # an embedded NUL is refused


# -- the same decisions as Mosquitto ------------------------------------------------

MOSQ_ACL = """\
user ops
topic read company/#

user CN=tenant-1,OU=Ger\\C3\\A4te\\+Sensoren,O=Acme\\, Inc.,C=DE
topic write subject/#

pattern readwrite company/%u/#
"""


def _mosquitto_puback_codes(port: int, pki, cert: str | None) -> dict[str, object]:
    """What a paho v5 client with ``cert`` (user name "ops", a wrong password) gets."""
    c, ev = tls_client(port, pki, cert, 5, username="ops", password="wrong")
    out: dict[str, object] = {}
    try:
        out["connack"] = code = expect(ev, "connack")
        if code == 0:
            for topic in ("company/tenant-1/x", "company/tenant-2/x", "subject/x"):
                info = c.publish(topic, b"x", 1)
                mid, rc = expect(ev, "puback")  # type: ignore[misc]
                assert mid == info.mid
                # Success or refusal: Mosquitto says 0x10 No matching subscribers where
                # ingestd says 0 (both success, < 0x80); the refusals must be equal.
                out[topic] = rc if rc >= 0x80 else "ok"
    finally:
        c.disconnect()
        c.loop_stop()
    return out


@pytest.mark.parametrize(
    "option", ["use_identity_as_username", "use_subject_as_username"], ids=["cn", "subject"]
)
def test_the_same_decisions_as_mosquitto(server_factory, tmp_path, pki, option) -> None:
    """Mosquitto 2.0 and ingestd, configured alike, decide alike for each certificate."""
    import os
    import tempfile
    import time

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        pytest.fail("mosquitto is part of the test tools (tests/test_acl_mosquitto.py)")
    cfg = tls_config(
        tmp_path,
        pki,
        tls_use_identity_as_username=option == "use_identity_as_username",
        tls_use_subject_as_username=option == "use_subject_as_username",
    )
    Path(cfg.mqtt.acl_file).write_text(MOSQ_ACL)  # type: ignore[arg-type]
    srv = server_factory(cfg)
    with tempfile.TemporaryDirectory(prefix="ingestd-tls-") as d:
        os.chmod(d, 0o755)  # mosquitto reads it after dropping root to user mosquitto
        md = Path(d)
        files = {}
        for name in ("ca", "server"):
            srcs = [pki[name]] if name == "ca" else list(pki[name])
            for i, src in enumerate(srcs):
                dst = md / f"{name}{i}.pem"
                shutil.copy(src, dst)
                os.chmod(dst, 0o644)
                files[f"{name}{i}"] = dst
        (md / "acl").write_text(MOSQ_ACL)
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        mport = port.getsockname()[1]
        port.close()
        (md / "m.conf").write_text(
            f"listener {mport} 127.0.0.1\n"
            f"cafile {files['ca0']}\ncertfile {files['server0']}\nkeyfile {files['server1']}\n"
            f"require_certificate true\n{option} true\n"
            f"acl_file {md / 'acl'}\nallow_anonymous false\npersistence false\n"
        )
        with open(md / "m.log", "wb") as log:
            proc = subprocess.Popen([mosquitto, "-c", str(md / "m.conf")], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + WAIT
            while True:
                assert proc.poll() is None, (md / "m.log").read_text()
                try:
                    socket.create_connection(("127.0.0.1", mport), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "mosquitto did not listen"
                    time.sleep(0.02)  # polling for the listener, not a timing assumption
            for cert in ("tenant-1", "tenant-2"):
                theirs = _mosquitto_puback_codes(mport, pki, cert)
                ours = _mosquitto_puback_codes(srv.app.port("mqtts"), pki, cert)
                assert ours == theirs, (cert, (md / "m.log").read_text())
                assert theirs["connack"] == 0
                assert 0x87 in theirs.values()  # something was refused, by both
        finally:
            proc.terminate()
            proc.wait(WAIT)
