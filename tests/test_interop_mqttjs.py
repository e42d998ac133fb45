"""MQTT.js (from the npm registry) over WebSocket against the server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_config

JS = Path(__file__).parent / "js"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (JS / "node_modules" / "mqtt").exists(),
    reason="node and tests/js/node_modules (npm ci in tests/js) are needed",
)


def test_mqttjs_over_websocket(server_factory, tmp_path):
    cfg = make_config(tmp_path)
    cfg.server.ws_listen = ["127.0.0.1:0"]
    srv = server_factory(cfg)
    port = srv.app.port("ws")
    out = subprocess.run(
        ["node", str(JS / "interop.mjs"), f"ws://127.0.0.1:{port}/mqtt"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    check_interop_result(json.loads(out.stdout.strip().splitlines()[-1]), out.stderr)


def check_interop_result(result: dict, stderr: str) -> None:
    """What interop.mjs must have seen, over ws or wss."""
    assert "error" not in result, (result, stderr)
    assert result["granted"] == [1]
    msgs = sorted(result["messages"], key=lambda m: m["topic"])
    assert [(m["topic"], m["payload"], m["qos"]) for m in msgs] == [
        ("js/a/data", "from-v3-qos0", 0),
        ("js/b/data", "from-v3-qos2", 1),
        ("js/c/data", "from-v5-qos1", 1),
    ]
    assert all(m["subId"] in (5, [5]) for m in msgs)
    assert msgs[2]["userProperties"] == {"site": "north"}
    assert result["bigLength"] == 200000
