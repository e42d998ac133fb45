"""Dead letters are never silent: counted by route and reason, logged with the payload."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from ingestd.ingest.deadletter import DeadLetterLog, preview, reason_of


def row(route: str, topic: str, payload: bytes | None, error: str) -> tuple:
    return (dt.datetime.now(dt.UTC), route, topic, "dev-1", payload, error)


@pytest.mark.parametrize(
    ("topic", "error", "reason"),
    [
        ("a/b", "payload is not valid JSON: unexpected character", "invalid_json"),
        ("a/b", "payload is not UTF-8", "invalid_json"),
        ("a/b", "column ts: no value (required)", "missing_required"),
        ("a/b", "column site: lookup 'sites': no row in sites for key ('x',)", "lookup_miss"),
        ("a/b", "topic does not fit the template 'a/b'", "topic_mismatch"),
        ("a/b", "column battery: expected a number, got str 'x'", "conversion"),
        ("a/b", "rejected by PostgreSQL: CheckViolationError: ...", "rejected"),
        ("spool:telemetry", "rejected by PostgreSQL: ...", "replay_rejected"),
    ],
)
def test_reasons(topic: str, error: str, reason: str) -> None:
    assert reason_of(topic, error) == reason


def test_preview_shows_text_when_utf8_and_hex_otherwise() -> None:
    assert preview(b'{"battery": "x"}') == repr('{"battery": "x"}')
    assert preview(b"\xff\x00\x01") == "0xff0001 (3 bytes)"
    assert preview(b"a" * 500).endswith("...'")
    assert preview(None) == "-"


def test_counts_every_one_and_logs_at_most_max_lines_per_window(caplog) -> None:
    now = [0.0]
    dl = DeadLetterLog(max_lines=3, window_s=10.0, clock=lambda: now[0])
    bad = row(
        "telemetry",
        "company/1/machine/7/telemetry",
        b'{"battery": "x"}',
        "column battery: expected a number, got str 'x'",
    )
    with caplog.at_level(logging.WARNING, logger="ingestd.ingest.deadletter"):
        dl.note([bad] * 5)
        dl.note([row("status", "s/1", b"\xff", "payload is not valid JSON: x")])
        now[0] = 11.0  # next window: one line says how many were not logged
        dl.note([bad])
    assert dl.counts == {("telemetry", "conversion"): 6, ("status", "invalid_json"): 1}
    lines = [r.getMessage() for r in caplog.records]
    assert (
        len([m for m in lines if m.startswith("dead letter:")]) == 4
    )  # 3, then 1 after the window
    first = lines[0]
    assert "route=telemetry" in first and "reason=conversion" in first
    assert "topic='company/1/machine/7/telemetry'" in first and "client='dev-1'" in first
    assert 'payload=\'{"battery": "x"}\'' in first
    assert any(m.startswith("3 more dead letters were not logged") for m in lines)
