"""The compiled route model: Column, IndexDef, TableSpec, Route, CompiledConfig."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from ingestd._rows import RowBuilder
from ingestd.ingest.routes.codegen import _LEVELS_CACHE_MAX, _generate_converter, _row_ops
from ingestd.ingest.routes.errors import RowError

if TYPE_CHECKING:
    from ingestd._message import Message
    from ingestd.ingest.lookups import LookupCache
    from ingestd.ingest.routes.kinds import ColumnRead

Getter = Callable[["Message", "list[str] | None", Any], Any]


@dataclass(slots=True)
class Column:
    """One compiled column of a route."""

    name: str
    pgtype: str  # canonical
    source: str  # the source as written ("const" for constants)
    read: ColumnRead  # its kind: getter, inline expression, RowBuilder op (routes/kinds.py)
    required: bool = False
    # latest routes: a NULL keeps the stored value (keep_when_missing)
    keep: bool = False

    @property
    def getter(self) -> Getter:
        """``getter(message, levels, payload_obj) -> value``: the reference per-column read."""
        return self.read.getter


@dataclass(slots=True)
class IndexDef:
    """An index to create: columns, unique, method, name (and a collation for all columns)."""

    columns: tuple[str, ...]
    unique: bool = False
    method: str = "btree"
    name: str | None = None
    collate: str | None = None


@dataclass
class TableSpec:
    """A table as the configured routes (or lookups) need it."""

    name: str
    kind: str  # "append" | "latest" | "lookup"
    key: tuple[str, ...]
    columns: dict[str, str]  # name -> canonical type, in first-seen order
    indexes: list[IndexDef] = field(default_factory=list)
    # Config key path of the first definition, for error messages.
    origin: str = ""


class Route:
    """A compiled route: how one message becomes one row of one table."""

    __slots__ = (
        "_check",
        "_fast",
        "_rows",
        "ack",
        "column_names",
        "columns",
        "decoder",
        "device_column",
        "filters",
        "getters",
        "index",
        "keep",
        "key",
        "kind",
        "name",
        "needs_levels",
        "table",
        "template",
    )

    def __init__(
        self,
        *,
        index: int,
        name: str,
        template: str,
        filters: list[str],
        table: str,
        kind: str,
        key: tuple[str, ...],
        ack: str,
        columns: list[Column],
        decoder: msgspec.json.Decoder[Any] | None,
        needs_levels: bool,
        check: Callable[[list[str]], None] | None,
        device_column: str | None = None,
    ) -> None:
        self.index = index
        # device_state: the text key column that holds a device's MQTT client id.
        self.device_column = device_column
        self.name = name
        self.template = template
        self.filters = filters
        self.table = table
        self.kind = kind
        self.key = key
        self.ack = ack
        self.columns = columns
        self.column_names = tuple(c.name for c in columns)
        # Columns whose NULL keeps the stored value in the upsert (keep_when_missing).
        self.keep = tuple(c.name for c in columns if c.keep)
        self.getters = tuple(c.getter for c in columns)
        self.decoder = decoder
        self.needs_levels = needs_levels or check is not None
        self._check = check
        # Devices publish to the same few topics over and over: both converters keep
        # the split levels of a topic (read-only), in one dict.
        levels: dict[str, list[str]] = {}
        self._fast = _generate_converter(columns, decoder, self.needs_levels, check, levels)
        # The same rows for a whole chunk, compiled (ext/ingestd/_rows.pyx); it raises
        # instead of deciding any error, and the caller then uses convert() per message.
        self._rows = RowBuilder(
            _row_ops(columns),
            decoder.decode if decoder is not None else None,
            self.needs_levels,
            check,
            levels,
            _LEVELS_CACHE_MAX,
        )

    def convert_many(self, msgs: list[Message]) -> list[tuple[Any, ...]]:
        """The rows of ``msgs``, or an exception if any needs :meth:`convert` (an error)."""
        rows: list[tuple[Any, ...]] = self._rows.build(msgs)
        return rows

    def convert(self, msg: Message) -> tuple[Any, ...]:
        """The row for one message (in ``column_names`` order). Raises RowError."""
        try:
            return self._fast(msg)
        except Exception:
            # Redo it column by column: names the failing column, and turns
            # conversion errors the inlined expressions let through (e.g. an
            # OverflowError from a huge timestamp) into RowError.
            return self.convert_slow(msg)

    def convert_slow(self, msg: Message) -> tuple[Any, ...]:
        """``convert`` through the per-column getters (names the failing column)."""
        levels = msg.topic.split("/") if self.needs_levels else None
        if self._check is not None:
            self._check(levels)  # type: ignore[arg-type]
        obj = None
        if self.decoder is not None:
            try:
                obj = self.decoder.decode(msg.payload)
            except msgspec.ValidationError as e:
                raise RowError(f"payload: {e}") from None
            except msgspec.DecodeError as e:
                raise RowError(f"payload is not valid JSON: {e}") from None
        try:
            return tuple([g(msg, levels, obj) for g in self.getters])
        except RowError as e:
            # Name the column: find the failing getter (only on the error path).
            for c in self.columns:
                try:
                    c.getter(msg, levels, obj)
                except RowError:
                    if str(e).startswith("column "):
                        raise
                    raise RowError(f"column {c.name}: {e}") from None
            raise

    def __repr__(self) -> str:
        return f"Route({self.name!r}, {self.template!r} -> {self.table})"


@dataclass
class CompiledConfig:
    """Everything ingest needs, derived from :class:`ingestd.config.Config`."""

    routes: list[Route]
    tables: dict[str, TableSpec]
    lookups: dict[str, LookupCache]
