"""The ingestion side: MQTT messages -> rows in PostgreSQL.

:class:`~ingestd.ingest.engine.IngestEngine` is the one object the broker
talks to; the modules below it are its parts:

* :mod:`.routes`     topic templates, column sources, value conversion
* :mod:`.schema`     DDL for the configured tables and checks of existing ones
* :mod:`.batcher`    per-table batches, COPY / upsert, after-commit futures
* :mod:`.deadletter` where messages that cannot become rows go
* :mod:`.spool`      the local fsync'd spool used while PostgreSQL is down
* :mod:`.presence`   the device presence table fed by connection events
"""

from __future__ import annotations

from typing import Any

__all__ = ["IngestEngine", "IngestStats"]


def __getattr__(name: str) -> Any:
    # Lazy: config validation imports ingest.routes, which must not pull in the
    # engine (and asyncpg) just to check a file.
    if name in __all__:
        from ingestd.ingest import engine

        return getattr(engine, name)
    raise AttributeError(name)
