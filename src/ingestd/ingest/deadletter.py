"""Dead letters: messages that cannot become rows, kept instead of dropped.

A message whose payload does not decode, whose value does not convert to the
column type, whose required column is missing, or whose row PostgreSQL
rejects (a data or constraint error found by bisecting the batch) becomes one
row of the dead-letter table::

    received_at timestamptz, route text, topic text, client_id text,
    payload bytea, error text

Dead letters are written in the same transaction as the batch they came from,
so an after-commit acknowledgement covers them too, and they never stop the
pipeline: the rest of the batch is committed normally.

A dead letter is never silent: once its batch is committed (or spooled),
:class:`DeadLetterLog` counts it by route and reason
(``ingestd_ingest_dead_letters_total{route,reason}``) and logs it with the
route, topic, client, error and the payload (as text when it is UTF-8),
at most ``max_lines`` lines per ``window_s`` (then one line saying how many
were not logged). Reasons: ``invalid_json``, ``missing_required``,
``lookup_miss``, ``topic_mismatch``, ``conversion`` (any other value the
column type refuses), ``rejected`` (PostgreSQL refused the row),
``replay_rejected`` (a spooled row refused at replay).
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from ingestd.ingest.schema import DEAD_LETTER_COLUMNS

if TYPE_CHECKING:
    from ingestd._message import Message

log = logging.getLogger("ingestd.ingest.deadletter")

COLUMNS: tuple[str, ...] = tuple(DEAD_LETTER_COLUMNS)
TYPES: tuple[str, ...] = tuple(DEAD_LETTER_COLUMNS.values())

# Errors longer than this are cut (a pathological payload must not make a huge row).
MAX_ERROR_CHARS = 2000

_fromts = _dt.datetime.fromtimestamp
_UTC = _dt.UTC


def _clean(s: str) -> str:
    # PostgreSQL text cannot hold NUL; an error message may quote the payload.
    s = s.replace("\x00", "\\x00")
    return s if len(s) <= MAX_ERROR_CHARS else s[: MAX_ERROR_CHARS - 3] + "..."


def record(route: str, msg: Message, error: str) -> tuple[Any, ...]:
    """The dead-letter row for a message (in COLUMNS order)."""
    return (
        _fromts(msg.received_at, _UTC),
        route,
        msg.topic,
        msg.client_id.replace("\x00", "") if msg.client_id else msg.client_id,
        msg.payload,
        _clean(error),
    )


def record_from_spooled(
    table: str, route: str, row: tuple[Any, ...], error: str
) -> tuple[Any, ...]:
    """The dead-letter row for a spooled row PostgreSQL rejected at replay.

    The original message is gone by then (the spool holds converted rows), so
    the payload column holds the row itself, msgpack-encoded, and the topic
    names the table: ``spool:<table>``.
    """
    return (
        _dt.datetime.now(_UTC),
        route,
        f"spool:{table}",
        None,
        msgspec.msgpack.encode(list(row)),
        _clean(error),
    )


def reason_of(topic: str, error: str) -> str:
    """The metric label of a dead letter, from its row's topic and error text."""
    if topic.startswith("spool:"):
        return "replay_rejected"
    if error.startswith("rejected by PostgreSQL"):
        return "rejected"
    if "not valid JSON" in error or "is not UTF-8" in error:
        return "invalid_json"
    if error.endswith("(required)"):
        return "missing_required"
    if error.startswith("lookup ") or ": lookup " in error:
        return "lookup_miss"
    if "does not fit the template" in error or "topic has no level" in error:
        return "topic_mismatch"
    return "conversion"


def preview(payload: bytes | None, limit: int = 200) -> str:
    """The payload for a log line: text when it is UTF-8, else hex; cut at ``limit``."""
    if payload is None:
        return "-"
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        head = payload[: limit // 2].hex()
        return f"0x{head}{'...' if len(payload) > limit // 2 else ''} ({len(payload)} bytes)"
    return repr(text if len(text) <= limit else text[:limit] + "...")


class DeadLetterLog:
    """Counts dead letters by (route, reason) and logs them, rate-limited."""

    def __init__(
        self,
        max_lines: int = 10,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_lines = max_lines
        self.window_s = window_s
        self.clock = clock
        self.counts: dict[tuple[str, str], int] = {}
        self._window_start = clock()
        self._lines = 0
        self._suppressed = 0

    def note(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Dead-letter rows (in COLUMNS order) that were just committed or spooled."""
        for _at, route, topic, client_id, payload, error in rows:
            reason = reason_of(topic or "", error or "")
            key = (route or "", reason)
            self.counts[key] = self.counts.get(key, 0) + 1
            now = self.clock()
            if now - self._window_start >= self.window_s:
                if self._suppressed:
                    log.warning(
                        "%d more dead letters were not logged in the last %.0f s"
                        " (see the dead-letter table and ingestd_ingest_dead_letters_total)",
                        self._suppressed,
                        self.window_s,
                    )
                self._window_start = now
                self._lines = self._suppressed = 0
            if self._lines >= self.max_lines:
                self._suppressed += 1
                continue
            self._lines += 1
            log.warning(
                "dead letter: route=%s reason=%s topic=%r client=%r error=%s payload=%s",
                route,
                reason,
                topic,
                client_id,
                error,
                preview(payload),
                extra={
                    "event": "dead_letter",
                    "route": route,
                    "reason": reason,
                    "topic": topic,
                    "client_id": client_id,
                },
            )
