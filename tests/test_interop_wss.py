"""MQTT.js over secure WebSocket (wss), trusting a CA the test makes; a plain-text client
on the same port gets nothing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import make_config
from test_interop_mqttjs import check_interop_result

JS = Path(__file__).parent / "js"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None
    or not (JS / "node_modules" / "mqtt").exists()
    or shutil.which("openssl") is None,
    reason="node, tests/js/node_modules (npm ci in tests/js) and openssl are needed",
)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def ca_and_server_cert(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A throw-away CA, and a server certificate for 127.0.0.1 / localhost signed by it."""
    d = tmp_path_factory.mktemp("wss-ca")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=ingestd test CA",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(d / "server.key"),
        "-out",
        str(d / "server.csr"),
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(d / "san.ext"), "-out", str(d / "server.pem"))  # fmt: skip
    return d / "ca.pem", d / "server.pem", d / "server.key"


def test_mqttjs_over_wss_with_a_test_ca(server_factory, tmp_path, ca_and_server_cert):
    ca, cert, key = ca_and_server_cert
    cfg = make_config(tmp_path)
    cfg.server.wss_listen = ["127.0.0.1:0"]
    cfg.server.tls_certfile = str(cert)
    cfg.server.tls_keyfile = str(key)
    srv = server_factory(cfg)
    port = srv.app.port("wss")
    out = subprocess.run(
        ["node", str(JS / "interop.mjs"), f"wss://127.0.0.1:{port}/mqtt"],
        capture_output=True,
        text=True,
        timeout=60,
        # Node verifies the server against the test CA (and nothing weaker).
        env={**os.environ, "NODE_EXTRA_CA_CERTS": str(ca)},
    )
    check_interop_result(json.loads(out.stdout.strip().splitlines()[-1]), out.stderr)
    # Without the CA node refuses the certificate: the TLS really is verified.
    untrusted = subprocess.run(
        ["node", str(JS / "interop.mjs"), f"wss://127.0.0.1:{port}/mqtt"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"},
    )
    refused = json.loads(untrusted.stdout.strip().splitlines()[-1])
    assert "error" in refused
    # A plain (non-TLS) WebSocket upgrade on the wss port gets no HTTP answer.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        try:
            data = s.recv(1024)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert not data.startswith(b"HTTP/1.1 101")


def test_wss_needs_certificate_files(tmp_path):
    from ingestd.config import load_config
    from ingestd.errors import ConfigError

    path = tmp_path / "c.toml"
    path.write_text('[server]\nwss_listen = ["127.0.0.1:0"]\n')
    with pytest.raises(ConfigError, match=r"server\.wss_listen"):
        load_config(str(path), env={})
