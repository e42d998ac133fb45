"""Logs a person and a collector can use: connects/disconnects, text or JSON lines."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

from ingestd.logs import JsonFormatter
from mqtt_clients import Client
from test_cli_serve import free_port, wait_listening


def test_json_formatter_keeps_the_structured_fields() -> None:
    rec = logging.LogRecord("ingestd.broker", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    rec.client_id = "dev-1"
    line = json.loads(JsonFormatter().format(rec))
    assert line["msg"] == "hello x"
    assert line["level"] == "info" and line["logger"] == "ingestd.broker"
    assert line["client_id"] == "dev-1"
    assert line["ts"].endswith("+00:00")


def _serve(tmp_path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ingestd", "serve", "--no-db", "--http-listen", "",
         "--data-dir", str(tmp_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _run_one_client(tmp_path, *args: str) -> str:
    port = free_port()
    proc = _serve(tmp_path, "--listen", f"127.0.0.1:{port}", *args)
    try:
        wait_listening(port, proc)
        c = Client(port, client_id="dev-42", version=4)
        c.subscribe("a/#", 1)
        c.disconnect()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return err


def test_connects_and_disconnects_are_logged_as_json_lines(tmp_path) -> None:
    err = _run_one_client(tmp_path, "--log-format", "json")
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    events = {line.get("event"): line for line in lines if line.get("event")}
    assert events["connect"]["client_id"] == "dev-42"
    assert events["connect"]["protocol"] == "3.1.1"
    assert events["connect"]["peer"].startswith("127.0.0.1:")
    assert events["disconnect"]["client_id"] == "dev-42"
    assert events["disconnect"]["reason"] == "normal"


def test_text_logs_say_the_same_and_can_be_turned_off(tmp_path) -> None:
    err = _run_one_client(tmp_path)
    assert "client connected: id='dev-42'" in err
    assert "protocol=3.1.1" in err
    assert "client disconnected: id='dev-42'" in err and "reason=normal" in err
    cfg = tmp_path / "quiet.toml"
    cfg.write_text("[server]\nlog_connections = false\n")
    quiet = _run_one_client(tmp_path, "--config", str(cfg))
    assert "client connected" not in quiet
