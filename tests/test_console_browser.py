"""The web console in a real browser: Debian's chromium, headless, driven by playwright.

The page asks for the API's bearer token, lists a connected paho device as
online with its device-state row, and a message published from its form
reaches a paho subscriber. No browser is ever downloaded: the test uses
/usr/bin/chromium (apt-get install chromium) and skips where it is absent.
Set INGESTD_CONSOLE_SCREENSHOT=docs/console.png to refresh the screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from mqtt_clients import WAIT, Client
from pg_fixtures import wait_rows
from test_api import pg_server
from test_api_devices import FLEET

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "console-test-token"
WAIT_MS = WAIT * 1000

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it as root)",
)

# test_api_devices.py's fleet (presence, device-state routes), behind a token.
CONFIG = f'[http]\ntokens = ["{TOKEN}"]\n' + FLEET


@pytest.fixture
def console_srv(pg_dsn: str, tmp_path: Path) -> Any:
    yield from pg_server(CONFIG, tmp_path, pg_dsn)


def test_console_shows_devices_and_publishes(console_srv: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    srv, dsn = console_srv
    assert srv.app is not None
    base = f"http://127.0.0.1:{srv.app.port('http')}"
    device = Client(srv.port, client_id="sensor-1", version=5)
    device.subscribe("cmd/sensor-1/#", qos=1)
    device.publish("dev/sensor-1/status", json.dumps({"status": "running", "level": 87.5}), 1)
    device.publish("dev/sensor-1/status", b"not json", qos=1)  # a dead letter to list
    device.publish("devices/sensor-1/config", json.dumps({"interval_s": 10}), 1, retain=True)
    gone = Client(srv.port, client_id="sensor-2", version=4)
    gone.disconnect()
    wait_rows(dsn, "SELECT 1 FROM dev_presence WHERE client_id = 'sensor-2' AND NOT online")
    wait_rows(dsn, "SELECT 1 FROM dev_status WHERE device_id = 'sensor-1'")

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 600})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on(
                "console",
                lambda m: (
                    problems.append(m.text) if m.type == "error" and "401" not in m.text else None
                ),
            )
            page.goto(base + "/")
            # The API answers 401 without a token: the page asks for one.
            page.wait_for_selector("#token-form:not([hidden])", timeout=WAIT_MS)
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            row = page.locator("#devices tr.device", has_text="sensor-1")
            row.locator("td.online").wait_for(timeout=WAIT_MS)
            assert "running" in row.inner_text() and "87.5" in row.inner_text()
            page.locator("#devices tr.device", has_text="sensor-2").locator("td.offline").wait_for(
                timeout=WAIT_MS
            )
            page.locator("#dead td.error", has_text="payload").first.wait_for(timeout=WAIT_MS)
            page.locator("#routes td", has_text="dev_status").first.wait_for(timeout=WAIT_MS)
            page.locator("#retained td", has_text="devices/sensor-1/config").wait_for(
                timeout=WAIT_MS
            )
            assert page.locator("#token-form").is_hidden()

            page.fill("#p-topic", "cmd/sensor-1/reboot")
            page.fill("#p-payload", '{"delay": 5}')
            page.select_option("#p-qos", "1")
            page.click("#publish button")
            page.wait_for_selector("#p-result:has-text('published')", timeout=WAIT_MS)
            (m,) = device.expect()
            assert (m.topic, m.payload, m.qos) == ("cmd/sensor-1/reboot", b'{"delay": 5}', 1)

            # The token stays in this tab's sessionStorage, not in a cookie.
            assert page.evaluate("sessionStorage.getItem('ingestd.token')") == TOKEN
            assert page.context.cookies() == []
            # Rates need two readings of /api/stats: wait for a number to appear.
            # (Not wait_for_function: the page's CSP forbids eval, which it would use.)
            expect(page.locator("#r-in")).not_to_have_text(
                "\u2013", timeout=WAIT_MS
            )  # the en dash placeholder
            shot = tmp_path / "console.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            target = os.environ.get("INGESTD_CONSOLE_SCREENSHOT")
            if target:
                shutil.copyfile(shot, target)
        finally:
            browser.close()
    assert problems == []
    device.disconnect()
