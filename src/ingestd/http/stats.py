"""``GET /api/stats``: the counters /metrics exposes, as one small JSON object.

The console polls it and computes rates (messages/s, rows/s) from two
readings and their ``time``. Everything here is a plain counter read (no
walk over sessions or connections), so polling it costs the broker nothing
measurable: ``sessions`` is ``len(broker.sessions)`` and ``connections`` the
sum of ``BrokerStats.connections_current``.
"""

from __future__ import annotations

import time
from typing import Any


def _ingest(engine: Any) -> dict[str, Any] | None:
    if engine is None:
        return None
    st = engine.stats
    return {
        "messages": st.messages_received,
        "rows": sum(st.rows_by_table.values()),
        "rows_by_table": dict(st.rows_by_table),
        "pending_rows": engine.pending_rows,
        "saturated": bool(engine.saturated),
        "spool_bytes": engine.spool_bytes,
        "dead_letters": sum(engine.dead_log.counts.values()),
        "database_errors": st.write_errors,
        "database": engine.database is not None,
    }


def _routes(engine: Any) -> list[dict[str, Any]]:
    if engine is None:
        return []
    rows = engine.stats.rows_by_table
    dead: dict[str, int] = {}
    for (route, _reason), n in engine.dead_log.counts.items():
        dead[route] = dead.get(route, 0) + n
    return [
        {
            "name": r.name,
            "topic": r.template,
            "table": r.table,
            "kind": r.kind,
            "device_state": r.device_column,
            # Rows are counted per table: routes of one table share the figure.
            "table_rows": rows.get(r.table, 0),
            "dead_letters": dead.get(r.name, 0),
        }
        for r in engine.compiled.routes
    ]


def stats_summary(broker: Any, engine: Any) -> dict[str, Any]:
    """Counters of the broker and the ingest engine (None: no ingest)."""
    st = broker.stats
    return {
        "time": time.time(),
        "broker": {
            "connections": sum(max(0, n) for n in st.connections_current.values()),
            "sessions": len(broker.sessions),
            "messages_received": sum(st.messages_received),
            "messages_delivered": sum(st.messages_delivered),
            "bytes_received": st.bytes_received,
            "bytes_sent": st.bytes_sent,
            "dropped": sum(st.dropped.values()),
            "retained": len(broker.retained),
            "subscriptions": len(broker.trie),
        },
        "ingest": _ingest(engine),
        "routes": _routes(engine),
    }
