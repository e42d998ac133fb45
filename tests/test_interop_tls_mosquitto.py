"""MQTT over TLS, and Debian's mosquitto clients (a third independent implementation)."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import paho.mqtt.client as mqtt
import pytest

from conftest import make_config
from mqtt_clients import WAIT, Client


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return d / "cert.pem", d / "key.pem"


def test_tls_listener_with_paho(server_factory, tmp_path, certs):
    cert, key = certs
    cfg = make_config(tmp_path)
    cfg.server.tls_listen = ["127.0.0.1:0"]
    cfg.server.tls_certfile = str(cert)
    cfg.server.tls_keyfile = str(key)
    srv = server_factory(cfg)
    plain = Client(srv.port)
    plain.subscribe("tls/#", 1)

    got = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-client", protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(cert), cert_reqs=ssl.CERT_REQUIRED)
    c.on_connect = lambda cl, u, f, rc, p: got.append(rc)
    c.connect("127.0.0.1", srv.app.port("mqtts"))
    c.loop_start()
    try:
        info = c.publish("tls/secure", b"over tls", 1)
        info.wait_for_publish(WAIT)
        assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()
    assert got and got[0] == 0
    [m] = plain.expect()
    assert (m.topic, m.payload) == ("tls/secure", b"over tls")


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto-clients not installed")
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients(server, version):
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(server.port), "-V", version,
         "-t", "mq/#", "-q", "1", "-C", "2", "-v", "-W", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        # Wait until the subscription exists before publishing (no sleeps).
        watcher = Client(server.port)
        deadline_ok = False
        for _ in range(200):
            if server.call(
                lambda: any("mq/#" in s.subscriptions for s in server.app.broker.sessions.values())
            ):
                deadline_ok = True
                break
            watcher.barrier()
        assert deadline_ok, "mosquitto_sub did not subscribe"
        for i in range(2):
            subprocess.run(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(server.port), "-V", version,
                 "-t", f"mq/{i}", "-m", f"hello {i}", "-q", "2"],
                check=True,
                timeout=20,
            )  # fmt: skip
        out, err = sub.communicate(timeout=30)
    finally:
        if sub.poll() is None:
            sub.kill()
    assert sub.returncode == 0, err
    assert out.splitlines() == ["mq/0 hello 0", "mq/1 hello 1"]
