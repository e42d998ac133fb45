"""`ingestd serve` as a real process: start, serve a client, stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mqtt_clients import WAIT, Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("server did not start listening")


@pytest.fixture
def serve_cmd(tmp_path):
    def make(*args: str) -> list[str]:
        return [sys.executable, "-m", "ingestd", "serve", "--data-dir", str(tmp_path), *args]

    return make


def test_serve_help_documents_options():
    out = subprocess.run(
        [sys.executable, "-m", "ingestd", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for opt in ("--listen", "--config", "--data-dir"):
        assert opt in out


def test_sigterm_disconnects_v5_clients_with_server_shutting_down(serve_cmd, tmp_path):
    port = free_port()
    cfg = tmp_path / "ingestd.toml"
    cfg.write_text("[server]\nhttp_listen = ''\n[presence]\nenabled = false\n")
    proc = subprocess.Popen(
        serve_cmd("--listen", f"127.0.0.1:{port}", "--config", str(cfg), "--no-db"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_listening(port, proc)
        c = Client(port)
        c.subscribe("t", 1)
        proc.send_signal(signal.SIGTERM)
        rc = c.disconnects.get(timeout=WAIT)
        assert int(rc.value) == 0x8B  # Server shutting down
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_bad_config_fails_at_start_with_file_key_reason(serve_cmd, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[mqtt]\nmax_packet_size = 'huge'\n")
    out = subprocess.run(
        serve_cmd("--config", str(cfg)), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert str(cfg) in out.stderr
    assert "max_packet_size" in out.stderr


def _held_port() -> socket.socket:
    """A listening socket on a free loopback port, as another program would hold it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        ("--http-listen", "HTTP endpoint"),
        ("--listen", "MQTT on"),
        ("--ws-listen", "MQTT over WebSocket"),
    ],
)
def test_a_taken_port_names_its_listener_and_setting(serve_cmd, flag, named):
    held = _held_port()
    try:
        port = held.getsockname()[1]
        args = ["--no-db", flag, f"127.0.0.1:{port}"]
        if flag != "--listen":
            args += ["--listen", f"127.0.0.1:{free_port()}"]
        if flag != "--http-listen":
            args += ["--http-listen", ""]
        out = subprocess.run(serve_cmd(*args), capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert out.returncode == 1
    assert named in out.stderr
    assert f"127.0.0.1:{port}" in out.stderr
    assert flag in out.stderr
    assert "Traceback" not in out.stderr


def test_http_listen_flag_moves_the_http_endpoint(serve_cmd):
    import urllib.request

    mqtt_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        serve_cmd(
            "--no-db",
            "--listen",
            f"127.0.0.1:{mqtt_port}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_listening(mqtt_port, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
