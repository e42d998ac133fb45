"""Log output: plain text for a terminal, or one JSON object per line for a collector.

``configure(level, fmt)`` is called once by ``ingestd serve``. With ``fmt =
"json"`` every record is one line ``{"ts", "level", "logger", "msg", ...}``
where ``...`` are the structured fields the call passed with ``extra=``
(e.g. the connect log's ``client_id``, ``peer``, ``protocol``), and ``exc``
holds a traceback when there is one. Text output keeps the message as it
reads today; the same fields are already in it.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, UTC timestamps with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _WorkerField(logging.Filter):
    """Stamps every record with the worker's index (``serve --workers N``)."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def configure(level: str, fmt: str = "text", worker: int | None = None) -> None:
    """Root logging for the process: ``level`` (debug..error) in ``fmt`` (text or json).

    ``worker``: the index of a worker process; text lines then read ``... ingestd
    [worker 1]: ...`` and JSON objects carry ``"worker": 1``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    text = TEXT_FORMAT
    if worker is not None:
        text = text.replace("%(name)s:", "%(name)s [worker %(worker)s]:")
        handler.addFilter(_WorkerField(worker))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pgserver logs every initdb/pg_ctl command line at INFO; ingestd.db says what matters.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
