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
"""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any

import msgspec

from ingestd.ingest.schema import DEAD_LETTER_COLUMNS

if TYPE_CHECKING:
    from ingestd._message import Message

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
