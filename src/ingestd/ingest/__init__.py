"""The ingestion side: MQTT messages -> rows in PostgreSQL.

:class:`~ingestd.ingest.engine.IngestEngine` is the one object the broker
talks to; the modules below it are its parts:

* :mod:`.engine`     lifecycle, pending-row bound (back-pressure), persist/retry/spool/replay
* :mod:`.batching`   per-table batches, flush timing, writer-task slots
* :mod:`.conversion` a closed batch -> Groups of rows (RowBuilder, then the generated converter)
* :mod:`.writing`    COPY / upsert / dead-letter bisection against PostgreSQL
* :mod:`.routes`     the compiled routes (a package: templates, sources, values, codegen, ...)
* :mod:`.pgtypes`    PostgreSQL type names, identifier quoting
* :mod:`.lookups`    lookup tables kept in memory
* :mod:`.schema`     DDL for the configured tables and checks of existing ones
* :mod:`.deadletter` where messages that cannot become rows go
* :mod:`.spool`      the local fsync'd spool used while PostgreSQL is down
* :mod:`.presence`   the device presence table fed by connection events
"""

from __future__ import annotations

from typing import Any

__all__ = ["IngestEngine", "IngestStats"]


def __getattr__(name: str) -> Any:
    # Lazy: `config check` imports ingest.routes, which must not pull in the
    # engine (and asyncpg) just to check a file.
    if name in __all__:
        from ingestd.ingest import engine

        return getattr(engine, name)
    raise AttributeError(name)
