"""Lookup tables kept in memory (LookupCache)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ingestd.ingest.pgtypes import quote_ident


@dataclass
class LookupCache:
    """A lookup table kept in memory: key tuple -> tuple of value columns.

    Loaded whole at start, reloaded every ``refresh_s`` and, on a miss, at
    most every ``miss_refresh_s`` (the engine does the loading; see engine.py).
    """

    name: str
    table: str
    key_columns: tuple[str, ...]
    key_types: tuple[str, ...]
    value_columns: tuple[str, ...]
    value_types: tuple[str, ...]
    refresh_s: float
    miss_refresh_s: float
    on_miss: str
    # key column -> its source spec (evaluated in the context of each route using the lookup)
    key_specs: dict[str, Any] = field(default_factory=dict)
    data: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)
    loaded_at: float = 0.0  # time.monotonic() of the last successful load
    miss_reloaded_at: float = 0.0  # time.monotonic() of the last reload caused by a miss
    # While False, a miss raises LookupMiss (the engine reloads and retries);
    # once True (retry pass) a miss applies on_miss.
    final: bool = False

    def select_sql(self) -> str:
        cols = ", ".join(quote_ident(c) for c in (*self.key_columns, *self.value_columns))
        return f"SELECT {cols} FROM {quote_ident(self.table)}"

    def replace(self, rows: Sequence[Sequence[Any]]) -> None:
        n = len(self.key_columns)
        self.data = {tuple(r[:n]): tuple(r[n:]) for r in rows}
