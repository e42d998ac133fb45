"""Route compilation: topic templates, column sources and value conversion.

A route maps a topic template such as
``company/{company_id}/machine/{machine_id}/telemetry`` to a table. Compiling
it yields the MQTT subscription filter (``company/+/machine/+/telemetry``),
the level positions of each placeholder, and one *getter* per column: a small
closure ``getter(message, levels, payload_obj) -> value`` that reads the
column's source and converts it to the column's PostgreSQL type (the Python
value asyncpg's binary COPY codec expects for that type).

Payload paths are decoded with one ``msgspec.json.Decoder`` per route whose
target type is a Struct generated from the route's paths: fields nobody asked
for are skipped without building Python objects, numbers/booleans are checked
and coerced by msgspec in C, and ``jsonb`` columns receive the raw JSON bytes
(``msgspec.Raw``) instead of a decoded-and-re-encoded value.

Conversion errors raise :class:`RowError`; the engine turns the message into a
dead letter. Everything here is synchronous and cheap; the engine runs it per
batch at flush time.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from ingestd._copy import fromtimestamp_utc
from ingestd._rows import RowBuilder
from ingestd.errors import ConfigError

if TYPE_CHECKING:
    from ingestd.broker.message import Message
    from ingestd.config import ColumnSpec, Config, IndexSpec, LookupConfig, RouteConfig

UTC = _dt.UTC
USER_PROPERTY = 0x26  # ingestd.protocol.Prop.USER_PROPERTY; the value is a list of (name, value)


class RowError(Exception):
    """A message cannot become a row (bad payload, wrong type, missing value)."""


class LookupMiss(Exception):
    """A lookup key is not (yet) in the lookup cache; the engine may reload and retry."""

    def __init__(self, lookup: LookupCache) -> None:
        super().__init__(lookup.name)
        self.lookup = lookup


class SkipRow(Exception):
    """The row is dropped on purpose (lookup miss with ``on_miss = "skip"``)."""


# --------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------

# Accepted spellings -> canonical name (the one used in configs and docs).
TYPE_ALIASES: dict[str, str] = {
    "double precision": "double precision",
    "float8": "double precision",
    "double": "double precision",
    "float": "double precision",
    "real": "real",
    "float4": "real",
    "bigint": "bigint",
    "int8": "bigint",
    "integer": "integer",
    "int": "integer",
    "int4": "integer",
    "smallint": "smallint",
    "int2": "smallint",
    "numeric": "numeric",
    "decimal": "numeric",
    "text": "text",
    "boolean": "boolean",
    "bool": "boolean",
    "timestamptz": "timestamptz",
    "timestamp with time zone": "timestamptz",
    "jsonb": "jsonb",
    "bytea": "bytea",
}

# Canonical name -> the name PostgreSQL's format_type() reports (and we use in DDL).
SQL_TYPE: dict[str, str] = {
    "double precision": "double precision",
    "real": "real",
    "bigint": "bigint",
    "integer": "integer",
    "smallint": "smallint",
    "numeric": "numeric",
    "text": "text",
    "boolean": "boolean",
    "timestamptz": "timestamp with time zone",
    "jsonb": "jsonb",
    "bytea": "bytea",
}

_INT_RANGE = {
    "bigint": (-(2**63), 2**63 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "smallint": (-(2**15), 2**15 - 1),
}
_REAL_MAX = 3.4028234663852886e38

_UNIT_DIV = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_TABLE = re.compile(r"^(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$")


def canonical_type(name: str) -> str | None:
    """The canonical name of a column type, or None when unknown."""
    return TYPE_ALIASES.get(" ".join(name.lower().split()))


def quote_ident(name: str) -> str:
    """Quote a (possibly schema-qualified) identifier for SQL."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _to_float(v: Any) -> float:
    t = type(v)
    if t is float:
        return v
    if t is int:
        return float(v)
    if t is str:
        try:
            return float(v)
        except ValueError:
            pass
    raise RowError(f"expected a number, got {_type_name(v)} {v!r:.40}")


def _to_real(v: Any) -> float:
    f = _to_float(v)
    # asyncpg packs float4 with struct; an out-of-range value would fail the whole COPY.
    if f == f and abs(f) > _REAL_MAX and abs(f) != float("inf"):
        raise RowError(f"{f!r} is out of range for real")
    return f


def _make_to_int(pgtype: str) -> Callable[[Any], int]:
    lo, hi = _INT_RANGE[pgtype]

    def to_int(v: Any) -> int:
        t = type(v)
        if t is int:
            i = v
        elif t is float and v.is_integer():
            i = int(v)
        elif t is str:
            try:
                i = int(v)
            except ValueError:
                raise RowError(f"expected an integer, got {v!r:.40}") from None
        else:
            raise RowError(f"expected an integer, got {_type_name(v)} {v!r:.40}")
        if not lo <= i <= hi:
            raise RowError(f"{i} is out of range for {pgtype}")
        return i

    return to_int


def _to_numeric(v: Any) -> Decimal:
    if isinstance(v, Decimal):
        return v
    if type(v) in (int, float, str):
        try:
            return Decimal(str(v) if type(v) is float else v)
        except InvalidOperation:
            pass
    raise RowError(f"expected a number, got {_type_name(v)} {v!r:.40}")


def _to_text(v: Any) -> str:
    t = type(v)
    if t is str:
        s = v
    elif t is bool:
        s = "true" if v else "false"
    elif t is int or t is float:
        s = repr(v)
    else:
        s = msgspec.json.encode(v).decode()
    if "\x00" in s:
        raise RowError("text contains a NUL character (PostgreSQL text cannot hold it)")
    return s


# Inline form for the generated converter: a str without NUL (the usual case) is
# returned as it is, exactly as _to_text would, without a call.
_to_text.inline = '(_v if (type(_v) is str and "\\x00" not in _v) else {conv}(_v))'  # type: ignore[attr-defined]


def _to_bool(v: Any) -> bool:
    t = type(v)
    if t is bool:
        return v
    if t is int and v in (0, 1):
        return bool(v)
    if t is str:
        low = v.strip().lower()
        if low in ("true", "t", "1", "yes", "on"):
            return True
        if low in ("false", "f", "0", "no", "off"):
            return False
    raise RowError(f"expected a boolean, got {_type_name(v)} {v!r:.40}")


def _make_to_ts(unit: str) -> Callable[[Any], _dt.datetime]:
    div = _UNIT_DIV[unit]
    fromts = fromtimestamp_utc

    def to_ts(v: Any) -> _dt.datetime:
        t = type(v)
        try:
            if t is float or t is int:
                return fromts(v / div if div != 1 else v, UTC)
            if t is _dt.datetime:
                return v if v.tzinfo is not None else v.replace(tzinfo=UTC)
            if t is str:
                s = v.strip()
                try:
                    num = float(s)
                except ValueError:
                    d = _dt.datetime.fromisoformat(s)
                    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)
                return fromts(num / div, UTC)
        except (ValueError, OverflowError, OSError) as e:
            raise RowError(f"invalid timestamp {v!r:.40}: {e}") from None
        raise RowError(f"expected a timestamp (number or ISO 8601 string), got {_type_name(v)}")

    # Inline form for the generated converter: numbers (the usual case) without
    # a call; anything else (and any error) through to_ts. An out-of-range number
    # raises from fromtimestamp, which Route.convert turns into a RowError.
    scaled = "_v" if div == 1 else f"_v / {div}"
    to_ts.inline = (  # type: ignore[attr-defined]
        f"_fromts({scaled}, _UTC) if (type(_v) is int or type(_v) is float) else {{conv}}(_v)"
    )
    to_ts.ts_div = div  # type: ignore[attr-defined]
    return to_ts


_json_encode = msgspec.json.encode


def _to_jsonb(v: Any) -> str | None:
    """Any decoded JSON value (or msgspec.Raw) -> JSON text for a jsonb column."""
    if type(v) is msgspec.Raw:
        b = bytes(v)
        if not b or b == b"null":
            return None
        return b.decode()
    if v is None:
        return None
    return _json_encode(v).decode()


def _to_bytea(v: Any) -> bytes:
    if type(v) is bytes:
        return v
    if type(v) is str:
        return v.encode()
    raise RowError(f"expected bytes or a string, got {_type_name(v)}")


def value_converter(pgtype: str, unit: str = "s") -> Callable[[Any], Any]:
    """The converter of a (decoded JSON or string) value to the Python value for ``pgtype``."""
    if pgtype == "double precision":
        return _to_float
    if pgtype == "real":
        return _to_real
    if pgtype in _INT_RANGE:
        return _make_to_int(pgtype)
    if pgtype == "numeric":
        return _to_numeric
    if pgtype == "text":
        return _to_text
    if pgtype == "boolean":
        return _to_bool
    if pgtype == "timestamptz":
        return _make_to_ts(unit)
    if pgtype == "jsonb":
        return _to_jsonb
    if pgtype == "bytea":
        return _to_bytea
    raise ValueError(pgtype)  # pragma: no cover - types are validated first


def string_converter(pgtype: str, unit: str = "s") -> Callable[[str], Any]:
    """Converter for values that arrive as strings (topic levels, user properties, ids)."""
    if pgtype == "jsonb":
        # A string source in a jsonb column is a JSON string.
        return lambda s: _json_encode(s).decode()
    if pgtype == "text":
        return _to_text
    return value_converter(pgtype, unit)


def _decode_type(pgtype: str) -> Any:
    """The msgspec type a payload leaf is decoded as (checked and coerced in C), or Any."""
    if pgtype in ("double precision", "real"):
        return float | None
    if pgtype in _INT_RANGE:
        lo, hi = _INT_RANGE[pgtype]
        return Annotated[int, msgspec.Meta(ge=lo, le=hi)] | None
    if pgtype == "boolean":
        return bool | None
    if pgtype == "numeric":
        return Decimal | None
    if pgtype == "jsonb":
        return msgspec.Raw
    # text (numbers become text), timestamptz (numbers or strings): converted in Python.
    return Any


def _post_decode(pgtype: str, unit: str) -> Callable[[Any], Any] | None:
    """What still has to happen after msgspec decoded a leaf as ``_decode_type(pgtype)``."""
    if pgtype == "real":
        return _to_real
    if pgtype in ("double precision", "boolean", "numeric") or pgtype in _INT_RANGE:
        return None
    if pgtype == "jsonb":
        return _raw_to_jsonb
    return value_converter(pgtype, unit)


def _raw_to_jsonb(v: msgspec.Raw) -> str | None:
    """A decoded ``msgspec.Raw`` leaf -> JSON text (absent or null: None)."""
    b = bytes(v)
    return None if b in (b"", b"null") else b.decode()


# Inline form for the generated converter (no call per row).
_raw_to_jsonb.inline = '(None if (_b := bytes(_v)) in (b"", b"null") else _b.decode())'  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Compiled structures
# --------------------------------------------------------------------------

Getter = Callable[["Message", "list[str] | None", Any], Any]


@dataclass(slots=True)
class Column:
    """One compiled column of a route."""

    name: str
    pgtype: str  # canonical
    source: str  # the source as written ("const" for constants)
    getter: Getter
    required: bool = False


@dataclass(slots=True)
class IndexDef:
    """An index to create: columns, unique, method, name."""

    columns: tuple[str, ...]
    unique: bool = False
    method: str = "btree"
    name: str | None = None


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
        "filters",
        "getters",
        "index",
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
    ) -> None:
        self.index = index
        self.name = name
        self.template = template
        self.filters = filters
        self.table = table
        self.kind = kind
        self.key = key
        self.ack = ack
        self.columns = columns
        self.column_names = tuple(c.name for c in columns)
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


# --------------------------------------------------------------------------
# Topic templates
# --------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(#?)\}$")


@dataclass
class Template:
    """A parsed topic template."""

    levels: list[str]
    # placeholder -> level index (negative: from the end) or a slice for "{x#}"
    places: dict[str, int | slice]
    filter: str
    # Whether messages reaching the route must be checked against the template
    # (a multi-level placeholder that is not last, or a custom filter).
    needs_check: bool
    multi_at: int | None


def parse_template(template: str, key: str) -> Template:
    """Parse ``a/{x}/b/{rest#}`` into filter, placeholder positions. Raises ConfigError."""
    if not template:
        raise ConfigError("topic template is empty", key=key)
    if template.startswith("$"):
        raise ConfigError("topics starting with '$' are reserved for the broker", key=key)
    levels = template.split("/")
    places: dict[str, int | slice] = {}
    multi_at: int | None = None
    for i, lvl in enumerate(levels):
        m = _PLACEHOLDER.match(lvl)
        if m:
            name = m.group(1)
            if name in places:
                raise ConfigError(f"placeholder {{{name}}} appears twice", key=key)
            if m.group(2):
                if multi_at is not None:
                    raise ConfigError(
                        "only one multi-level placeholder {name#} is allowed", key=key
                    )
                multi_at = i
            places[name] = i
        elif "{" in lvl or "}" in lvl:
            raise ConfigError(
                f"level {lvl!r}: a placeholder must be a whole level, like {{name}} or {{name#}}",
                key=key,
            )
        elif "+" in lvl or "#" in lvl:
            raise ConfigError(
                f"level {lvl!r}: use {{name}} / {{name#}} placeholders instead of MQTT wildcards",
                key=key,
            )
        elif "\x00" in lvl:
            raise ConfigError("NUL character in topic template", key=key)
    n = len(levels)
    flt_levels: list[str] = []
    for i, lvl in enumerate(levels):
        if multi_at is not None and i == multi_at:
            flt_levels.append("#")
            break
        flt_levels.append("+" if _PLACEHOLDER.match(lvl) else lvl)
    needs_check = multi_at is not None and multi_at != n - 1
    if multi_at is not None:
        after = n - multi_at - 1
        for name, pos in list(places.items()):
            assert isinstance(pos, int)
            if pos == multi_at:
                places[name] = slice(multi_at, -after if after else None)
            elif pos > multi_at:
                places[name] = pos - n  # from the end
    return Template(levels, places, "/".join(flt_levels), needs_check, multi_at)


def validate_filter(flt: str) -> str | None:
    """None if ``flt`` is a valid MQTT topic filter, else the reason."""
    if not flt:
        return "empty filter"
    if "\x00" in flt:
        return "NUL character"
    parts = flt.split("/")
    for i, p in enumerate(parts):
        if "#" in p and (p != "#" or i != len(parts) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in p and p != "+":
            return "'+' must be a whole level"
    return None


def _template_checker(tpl: Template) -> Callable[[list[str]], None]:
    """A check that a topic fits the template (used when the filter is wider than it)."""
    levels = tpl.levels
    n = len(levels)
    multi = tpl.multi_at
    literal: list[tuple[int, str]] = []
    for i, lvl in enumerate(levels):
        if not _PLACEHOLDER.match(lvl):
            literal.append((i - n if multi is not None and i > multi else i, lvl))

    def check(topic_levels: list[str]) -> None:
        k = len(topic_levels)
        if (k != n) if multi is None else (k < n):
            raise RowError(f"topic does not fit the template {'/'.join(levels)!r}")
        for i, lvl in literal:
            if topic_levels[i] != lvl:
                raise RowError(f"topic does not fit the template {'/'.join(levels)!r}")

    return check


# --------------------------------------------------------------------------
# Column sources
# --------------------------------------------------------------------------

_SIMPLE_SOURCES = {
    "received_at": "timestamptz",
    "client_id": "text",
    "username": "text",
    "qos": "smallint",
    "retain": "boolean",
    "topic": "text",
}
_PATH_TOKEN = re.compile(r'\.([A-Za-z0-9_\-$@:]+)|\.?"((?:[^"\\]|\\.)*)"|\[(-?\d+)\]')


def parse_payload_path(path: str) -> list[str | int] | None:
    """``.a.b[0]."x.y"`` (after "payload") -> ["a", "b", 0, "x.y"]; None if malformed."""
    out: list[str | int] = []
    pos = 0
    while pos < len(path):
        m = _PATH_TOKEN.match(path, pos)
        if m is None:
            return None
        if m.group(1) is not None:
            out.append(m.group(1))
        elif m.group(2) is not None:
            out.append(m.group(2).replace('\\"', '"').replace("\\\\", "\\"))
        else:
            out.append(int(m.group(3)))
        pos = m.end()
    return out


def _normalize_column(
    spec: str | ColumnSpec, key: str
) -> tuple[str | None, str | None, str, Any, bool]:
    """-> (source, type or None, unit, constant, required). ``"src::type"`` shorthand."""
    from ingestd.config import ColumnSpec

    if isinstance(spec, str):
        src, sep, typ = spec.partition("::")
        return src.strip(), (typ.strip() if sep else None), "s", None, False
    assert isinstance(spec, ColumnSpec)
    if spec.source is None and spec.value is None:
        raise ConfigError("a column needs a source or a constant value", key=key)
    if spec.source is not None and spec.value is not None:
        raise ConfigError("give either source or value, not both", key=key)
    return spec.source, spec.type, spec.unit or "s", spec.value, spec.required


def _infer_const_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "bigint"
    if isinstance(value, float):
        return "double precision"
    if isinstance(value, str):
        return "text"
    if isinstance(value, _dt.datetime):
        return "timestamptz"
    return "jsonb"


class _PayloadNode:
    """A node of the tree of payload paths a route reads."""

    __slots__ = ("children", "leaves", "tails")

    def __init__(self) -> None:
        self.children: dict[str, _PayloadNode] = {}
        # columns whose path ends here: (column index, pgtype)
        self.leaves: list[tuple[int, str]] = []
        # columns whose path continues with an array index from here: (column index, rest)
        self.tails: list[tuple[int, list[str | int]]] = []


class _RouteBuilder:
    """Compiles one route's columns (also used for lookup keys in a route's context)."""

    def __init__(self, route_key: str, tpl: Template, lookups: dict[str, LookupCache]) -> None:
        self.route_key = route_key
        self.tpl = tpl
        self.lookups = lookups
        self.needs_levels = False
        self.root = _PayloadNode()
        self.uses_payload_paths = False
        self.whole_payload_json = False
        # column index -> callable(payload_obj) -> converted value, set by finish()
        self.payload_getters: dict[int, Callable[[Any], Any]] = {}
        self.pending_payload: list[tuple[int, list[str | int], str, str]] = []
        self.decoder: msgspec.json.Decoder[Any] | None = None

    # -- one column --------------------------------------------------------

    def column(
        self, idx: int, name: str, spec: str | ColumnSpec, key: str
    ) -> tuple[str, Getter, bool]:
        """-> (canonical type, getter, required). Payload getters are bound in finish()."""
        source, typ, unit, const, required = _normalize_column(spec, key)
        pgtype: str | None = None
        if typ is not None:
            pgtype = canonical_type(typ)
            if pgtype is None:
                raise ConfigError(
                    f"unknown column type {typ!r} (known: {', '.join(sorted(set(TYPE_ALIASES.values())))})",
                    key=key,
                )
        if source is None:
            pgtype = pgtype or _infer_const_type(const)
            try:
                value = value_converter(pgtype, unit)(const)
            except RowError as e:
                raise ConfigError(f"constant {const!r}: {e}", key=key) from None
            return pgtype, _constant(value), required
        return self._source(idx, source, pgtype, unit, key, required)

    def _source(
        self, idx: int, source: str, pgtype: str | None, unit: str, key: str, required: bool
    ) -> tuple[str, Getter, bool]:
        if source in _SIMPLE_SOURCES:
            pgtype = pgtype or _SIMPLE_SOURCES[source]
            return pgtype, self._simple(source, pgtype, unit), required
        if source.startswith("topic.") or source.startswith("topic["):
            t, g = self._topic(source, pgtype or "text", unit, key)
            return t, g, required
        if source == "payload" or source.startswith("payload.") or source.startswith("payload["):
            pgtype = pgtype or "jsonb"
            if source == "payload":
                return pgtype, self._whole_payload(pgtype, unit), required
            path = parse_payload_path(source[len("payload") :])
            if not path:
                raise ConfigError(f"malformed payload path {source!r}", key=key)
            if pgtype == "bytea":
                raise ConfigError("bytea columns can only take the whole payload", key=key)
            self.uses_payload_paths = True
            self.pending_payload.append((idx, path, pgtype, unit))
            return pgtype, _unbound, required
        if source.startswith("user_property."):
            prop = source[len("user_property.") :]
            if not prop:
                raise ConfigError("user_property needs a name: user_property.<name>", key=key)
            pgtype = pgtype or "text"
            conv = string_converter(pgtype, unit)

            def get_user_property(m: Message, lv: Any, o: Any) -> Any:
                pairs = m.properties.get(USER_PROPERTY) if m.properties else None
                if pairs:
                    for k, v in pairs:
                        if k == prop:
                            return conv(v)
                return None

            return pgtype, get_user_property, required
        if source.startswith("lookup."):
            return self._lookup(source, pgtype, key, required)
        raise ConfigError(
            f"unknown source {source!r} (expected topic, topic.<name>, topic[<i>], payload, "
            "payload.<path>, received_at, client_id, username, qos, retain, "
            "user_property.<name>, lookup.<lookup>.<column>, or a constant `value`)",
            key=key,
        )

    def _simple(self, source: str, pgtype: str, unit: str) -> Getter:
        if source == "received_at":
            if pgtype == "timestamptz":
                fromts = fromtimestamp_utc
                return _fast(
                    lambda m, lv, o: fromts(m.received_at, UTC),
                    "_fromts(m.received_at, _UTC)",
                    op=("received_ts",),
                )
            conv = value_converter(pgtype, unit)
            return lambda m, lv, o: conv(m.received_at)
        if source == "qos":
            vconv = value_converter(pgtype, unit)
            return lambda m, lv, o: vconv(m.qos)
        if source == "retain":
            vconv = value_converter(pgtype, unit)
            return lambda m, lv, o: vconv(m.retain)
        sconv = string_converter(pgtype, unit)
        if source == "topic":
            if pgtype == "text":
                # MQTT topic names cannot contain U+0000 [MQTT-4.7.3-2]: no check needed.
                return _fast(lambda m, lv, o: m.topic, "m.topic", op=("topic",))
            return lambda m, lv, o: sconv(m.topic)
        if source == "client_id":
            return lambda m, lv, o: sconv(m.client_id)
        # username may be None
        return lambda m, lv, o: None if m.username is None else sconv(m.username)

    def _topic(self, source: str, pgtype: str, unit: str, key: str) -> tuple[str, Getter]:
        self.needs_levels = True
        conv = string_converter(pgtype, unit)
        if source.startswith("topic["):
            m = re.fullmatch(r"topic\[(-?\d+)\]", source)
            if m is None:
                raise ConfigError(
                    f"malformed topic level {source!r} (expected topic[<index>])", key=key
                )
            i = int(m.group(1))
            n = len(self.tpl.levels)
            if self.tpl.multi_at is None and not -n <= i < n:
                raise ConfigError(f"topic level {i} is outside the template's {n} levels", key=key)

            def get_level(msg: Message, lv: Any, o: Any) -> Any:
                try:
                    return conv(lv[i])
                except IndexError:
                    raise RowError(f"topic has no level {i}") from None

            return pgtype, get_level
        name = source[len("topic.") :]
        pos = self.tpl.places.get(name)
        if pos is None:
            known = ", ".join(self.tpl.places) or "none"
            raise ConfigError(
                f"placeholder {{{name}}} is not in the topic template (placeholders: {known})",
                key=key,
            )
        if isinstance(pos, slice):
            sl = pos

            def get_multi(msg: Message, lv: Any, o: Any) -> Any:
                part = lv[sl]
                if not part:
                    raise RowError(f"topic has no level for {{{name}#}}")
                return conv("/".join(part))

            return pgtype, get_multi
        p = pos
        if pgtype == "text":
            # A topic level is a str without NUL already.
            return pgtype, _fast(lambda msg, lv, o: lv[p], f"lv[{p}]", op=("level", p))
        return pgtype, _fast(
            lambda msg, lv, o: conv(lv[p]),
            f"{{conv}}(lv[{p}])",
            op=("level_conv", p, conv),
            conv=conv,
        )

    def _whole_payload(self, pgtype: str, unit: str) -> Getter:
        if pgtype == "bytea":
            return lambda m, lv, o: m.payload
        if pgtype == "jsonb":
            self.whole_payload_json = True

            def get_json(m: Message, lv: Any, o: Any) -> Any:
                # The route decoder validated the JSON already (see finish()).
                p = m.payload
                if not p:
                    return None
                try:
                    s = p.decode()
                except UnicodeDecodeError:
                    raise RowError("payload is not UTF-8") from None
                if "\\u0000" in s:
                    raise RowError("payload contains \\u0000, which jsonb cannot store")
                return None if s.strip() == "null" else s

            return get_json
        sconv = string_converter(pgtype, unit) if pgtype == "text" else None
        jconv = value_converter(pgtype, unit)
        dec = msgspec.json.Decoder()

        def get_scalar(m: Message, lv: Any, o: Any) -> Any:
            p = m.payload
            if not p:
                return None
            if sconv is not None:
                try:
                    return sconv(p.decode())
                except UnicodeDecodeError:
                    raise RowError("payload is not UTF-8") from None
            try:
                v = dec.decode(p)
            except msgspec.DecodeError:
                # A bare word such as `on` or an unquoted ISO date: try it as text.
                try:
                    v = p.decode().strip()
                except UnicodeDecodeError:
                    raise RowError("payload is not UTF-8") from None
            return None if v is None else jconv(v)

        return get_scalar

    def _lookup(
        self, source: str, pgtype: str | None, key: str, required: bool
    ) -> tuple[str, Getter, bool]:
        parts = source.split(".")
        if len(parts) != 3:
            raise ConfigError(
                f"malformed lookup source {source!r} (expected lookup.<lookup>.<column>)", key=key
            )
        lk = self.lookups.get(parts[1])
        if lk is None:
            raise ConfigError(
                f"no lookup named {parts[1]!r} (defined: {', '.join(self.lookups) or 'none'})",
                key=key,
            )
        if parts[2] not in lk.value_columns:
            raise ConfigError(
                f"lookup {lk.name!r} has no column {parts[2]!r} (columns: {', '.join(lk.value_columns)})",
                key=key,
            )
        vi = lk.value_columns.index(parts[2])
        vtype = lk.value_types[vi]
        if pgtype is not None and pgtype != vtype:
            raise ConfigError(
                f"type {pgtype} differs from the lookup column's type {vtype}", key=key
            )
        key_getters = self._lookup_key_getters(lk, key)
        if lk.on_miss == "null" and required:
            raise ConfigError(
                "a required column cannot come from a lookup with on_miss = 'null'", key=key
            )

        def get_lookup(m: Message, lv: Any, o: Any) -> Any:
            k = tuple([g(m, lv, o) for g in key_getters])
            row = lk.data.get(k)
            if row is None:
                if not lk.final:
                    raise LookupMiss(lk)
                if lk.on_miss == "null":
                    return None
                if lk.on_miss == "skip":
                    raise SkipRow(lk.name)
                raise RowError(f"lookup {lk.name!r}: no row in {lk.table} for key {k!r}")
            return row[vi]

        return vtype, get_lookup, required

    def _lookup_key_getters(self, lk: LookupCache, key: str) -> list[Getter]:
        out: list[Getter] = []
        for col, ktype in zip(lk.key_columns, lk.key_types, strict=True):
            spec = lk.key_specs[col]
            src, _t, unit, const, _r = _normalize_column(spec, key)
            if src is None:
                out.append(_constant(value_converter(ktype, unit)(const)))
                continue
            if src.startswith("payload") or src.startswith("lookup."):
                # Payload keys would need the route's decoder; keep lookups on metadata.
                raise ConfigError(
                    f"lookup {lk.name!r} key {col!r}: source {src!r} is not supported in lookup keys "
                    "(use topic, client_id, username, user_property or a constant)",
                    key=key,
                )
            _pt, g, _req = self._source(
                -1, src, ktype, unit, f"{key} (lookup {lk.name} key {col})", False
            )
            out.append(g)
        return out

    # -- payload decoder ---------------------------------------------------

    def finish(self, columns: list[Column]) -> None:
        """Build the route's payload decoder and bind the payload getters."""
        if not self.pending_payload:
            if self.whole_payload_json:
                # Validate the JSON without building objects.
                self.decoder = msgspec.json.Decoder(msgspec.Raw)
            return
        for idx, path, pgtype, _unit in self.pending_payload:
            node = self.root
            i = 0
            while i < len(path) and isinstance(path[i], str):
                node = node.children.setdefault(path[i], _PayloadNode())  # type: ignore[arg-type]
                i += 1
            if i == len(path):
                node.leaves.append((idx, pgtype))
            else:
                node.tails.append((idx, path[i:]))
        units = {idx: unit for idx, _p, _t, unit in self.pending_payload}
        types = {idx: t for idx, _p, t, _u in self.pending_payload}
        counter = [0]

        def build(node: _PayloadNode, accessor: list[str]) -> Any:
            """-> msgspec type for this node; records each column's accessor chain."""
            mixed = bool(node.tails) or (node.leaves and node.children)
            leaf_types = {t for _i, t in node.leaves}
            if node is not self.root and not mixed and node.leaves and len(leaf_types) == 1:
                t = next(iter(leaf_types))
                for ci, _t in node.leaves:
                    bind(ci, accessor, [], _post_decode(t, units[ci]), True)
                return _decode_type(t)
            if mixed or (node is self.root and (node.leaves or node.tails)):
                # Decode this subtree fully and walk it in Python.
                for ci, _t in node.leaves:
                    bind(ci, accessor, [], value_converter(types[ci], units[ci]), False)
                for ci, rest in node.tails:
                    bind(ci, accessor, rest, value_converter(types[ci], units[ci]), False)
                for k, child in node.children.items():
                    for ci, rest in _collect(child, [k]):
                        bind(ci, accessor, rest, value_converter(types[ci], units[ci]), False)
                return Any
            if node.leaves:  # several leaf types at one path: decode as Any
                for ci, _t in node.leaves:
                    bind(ci, accessor, [], value_converter(types[ci], units[ci]), False)
                return Any
            fields = []
            rename = {}
            for k, child in node.children.items():
                counter[0] += 1
                fname = f"f{counter[0]}"
                rename[fname] = k
                ftype = build(child, [*accessor, fname])
                default: Any = msgspec.Raw() if ftype is msgspec.Raw else None
                if isinstance(ftype, type) and issubclass(ftype, msgspec.Struct):
                    ftype = ftype | None  # a null intermediate object: NULL columns
                fields.append((fname, ftype, default))
            counter[0] += 1
            # gc=False: a decoded payload holds JSON values only and nothing refers back
            # to it, so it cannot be in a cycle; untracked, the one built per row
            # neither triggers nor lengthens garbage collections.
            return msgspec.defstruct(f"Payload{counter[0]}", fields, rename=rename, gc=False)

        def bind(
            ci: int,
            attrs: list[str],
            rest: list[str | int],
            conv: Callable[[Any], Any] | None,
            typed: bool,
        ) -> None:
            self.payload_getters[ci] = _payload_getter(attrs, rest, conv, typed)

        root_type = build(self.root, [])
        self.decoder = msgspec.json.Decoder(root_type, strict=False)
        for idx in self.payload_getters:
            getter = self.payload_getters[idx]
            col = columns[idx]
            col.getter = _with_obj(getter)
            fast = getattr(getter, "fast", None)
            if fast is not None:
                col.getter.fast = fast  # type: ignore[attr-defined]
                col.getter.op = getter.op  # type: ignore[attr-defined]


def _collect(node: _PayloadNode, prefix: list[str | int]) -> list[tuple[int, list[str | int]]]:
    out: list[tuple[int, list[str | int]]] = [(ci, list(prefix)) for ci, _t in node.leaves]
    out += [(ci, [*prefix, *rest]) for ci, rest in node.tails]
    for k, child in node.children.items():
        out += _collect(child, [*prefix, k])
    return out


def _constant(value: Any) -> Getter:
    return _fast(lambda m, lv, o: value, "{v}", op=("const", value), v=value)


def _fast(getter: Any, expr: str, op: tuple[Any, ...] | None = None, **env: Any) -> Any:
    """Attach an inline expression equivalent to ``getter`` for the generated converter.

    ``expr`` reads ``m`` (message), ``lv`` (topic levels), ``o`` (decoded
    payload); ``{name}`` placeholders refer to objects in ``env``. ``op``: the
    same as an operation of the compiled :class:`ingestd._rows.RowBuilder`
    (``(kind, arg...)``, see :func:`_row_ops`).
    """
    getter.fast = (expr, env)
    if op is not None:
        getter.op = op
    return getter


def _unbound(m: Message, lv: Any, o: Any) -> Any:  # pragma: no cover - replaced in finish()
    raise AssertionError("payload getter not bound")


def _with_obj(f: Callable[[Any], Any]) -> Getter:
    return lambda m, lv, o: f(o)


def _payload_getter(
    attrs: list[str], rest: list[str | int], conv: Callable[[Any], Any] | None, typed: bool
) -> Callable[[Any], Any]:
    """Read ``obj.f1.f2`` (Struct fields) then ``[k][0]...`` (decoded JSON), then convert."""
    attrs_t = tuple(attrs)
    rest_t = tuple(rest)
    fast: tuple[str, dict[str, Any]] | None = None
    op: tuple[Any, ...] | None = None
    if len(attrs_t) == 1 and not rest_t:
        if conv is None:
            fast = (f"o.{attrs_t[0]}", {})
            op = ("attr", attrs_t[0])
        else:
            inline = getattr(conv, "inline", "{conv}(_v)")
            fast = (f"(None if (_v := o.{attrs_t[0]}) is None else ({inline}))", {"conv": conv})
            if conv is _to_text:
                op = ("attr_text", attrs_t[0], conv)
            elif hasattr(conv, "ts_div"):
                div = conv.ts_div
                op = ("attr_ts", attrs_t[0], conv, None if div == 1 else div)
            else:
                op = ("attr_conv", attrs_t[0], conv)

    def get(obj: Any) -> Any:
        v = obj
        for a in attrs_t:
            v = getattr(v, a)
            if v is None:
                return None
        for step in rest_t:
            # Missing or null: NULL. Something other than the array or object the path
            # steps into: an error, as msgspec reports it for the typed part of a path
            # (docs/ingest.md), so a column does not depend on what other columns read.
            if type(step) is int:
                if type(v) is not list:
                    raise RowError(f"expected an array at [{step}], got {_type_name(v)}")
                try:
                    v = v[step]
                except IndexError:
                    return None
            else:
                if type(v) is not dict:
                    raise RowError(f"expected an object at {step!r}, got {_type_name(v)}")
                v = v.get(step)
            if v is None:
                return None
        return v if conv is None else conv(v)

    if fast is not None:
        get.fast = fast  # type: ignore[attr-defined]
        get.op = op  # type: ignore[attr-defined]
    return get


# --------------------------------------------------------------------------
# Whole-config compilation
# --------------------------------------------------------------------------


def _check_ident(name: str, key: str, what: str) -> None:
    if not _IDENT.match(name):
        raise ConfigError(
            f"{what} {name!r} must be a lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 chars)",
            key=key,
        )


def _index_defs(
    specs: list[list[str] | IndexSpec], key: str, columns: dict[str, str]
) -> list[IndexDef]:
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, list):
            d = IndexDef(tuple(spec))
        else:
            d = IndexDef(tuple(spec.columns), spec.unique, spec.method, spec.name)
            if spec.name is not None:
                _check_ident(spec.name, f"{key}[{i}].name", "index name")
        if not d.columns:
            raise ConfigError("an index needs at least one column", key=f"{key}[{i}]")
        for c in d.columns:
            if c not in columns:
                raise ConfigError(
                    f"index column {c!r} is not a column of the route", key=f"{key}[{i}]"
                )
        out.append(d)
    return out


def _merge_table(tables: dict[str, TableSpec], spec: TableSpec, key: str) -> None:
    """Add a table definition; a table defined twice must agree (kind, key, column types)."""
    old = tables.get(spec.name)
    if old is None:
        tables[spec.name] = spec
        return
    if old.kind != spec.kind:
        raise ConfigError(
            f"table {spec.name!r} is {spec.kind!r} here but {old.kind!r} at {old.origin}", key=key
        )
    if old.key != spec.key:
        raise ConfigError(
            f"table {spec.name!r} has key {list(spec.key)} here but {list(old.key)} at {old.origin}",
            key=key,
        )
    for c, t in spec.columns.items():
        ot = old.columns.get(c)
        if ot is None:
            old.columns[c] = t
        elif ot != t:
            raise ConfigError(
                f"column {spec.name}.{c} is {t} here but {ot} at {old.origin}",
                key=f"{key}.columns.{c}",
            )
    have = {(i.columns, i.unique, i.method) for i in old.indexes}
    for i in spec.indexes:
        if (i.columns, i.unique, i.method) not in have:
            old.indexes.append(i)


def compile_config(cfg: Config) -> CompiledConfig:
    """Compile lookups, routes and tables; raises ConfigError with the key path of any mistake."""
    lookups: dict[str, LookupCache] = {}
    tables: dict[str, TableSpec] = {}
    for li, lc in enumerate(cfg.lookups):
        lookups_key = f"lookups[{li}]"
        lk = _compile_lookup(lc, lookups_key)
        if lk.name in lookups:
            raise ConfigError(f"duplicate lookup name {lk.name!r}", key=f"{lookups_key}.name")
        lookups[lk.name] = lk
        cols = dict(zip(lk.key_columns, lk.key_types, strict=True))
        cols.update(zip(lk.value_columns, lk.value_types, strict=True))
        _merge_table(
            tables,
            TableSpec(lk.table, "lookup", lk.key_columns, cols, [], lookups_key),
            lookups_key,
        )
    routes: list[Route] = []
    names: set[str] = set()
    for ri, rc in enumerate(cfg.routes):
        rkey = f"routes[{ri}]"
        route = compile_route(ri, rc, cfg.ingest.ack, lookups, rkey)
        if route.name in names:
            raise ConfigError(f"duplicate route name {route.name!r}", key=f"{rkey}.name")
        names.add(route.name)
        cols = {c.name: c.pgtype for c in route.columns}
        spec = TableSpec(
            route.table,
            route.kind,
            route.key,
            cols,
            _index_defs(rc.indexes, f"{rkey}.indexes", cols),
            rkey,
        )
        _merge_table(tables, spec, rkey)
        routes.append(route)
    reserved = {cfg.ingest.dead_letter_table: "ingest.dead_letter_table"}
    if cfg.presence.enabled:
        reserved[cfg.presence.table] = "presence.table"
    for tname, what in reserved.items():
        if not _TABLE.match(tname):
            raise ConfigError(f"invalid table name {tname!r}", key=what)
        if tname in tables:
            raise ConfigError(f"table {tname!r} is also used by {tables[tname].origin}", key=what)
    if cfg.presence.enabled and cfg.presence.table == cfg.ingest.dead_letter_table:
        raise ConfigError("presence and dead letters need different tables", key="presence.table")
    return CompiledConfig(routes, tables, lookups)


def _compile_lookup(lc: LookupConfig, key: str) -> LookupCache:
    _check_ident(lc.name, f"{key}.name", "lookup name")
    if not _TABLE.match(lc.table):
        raise ConfigError(f"invalid table name {lc.table!r}", key=f"{key}.table")
    if not lc.key:
        raise ConfigError("a lookup needs at least one key column", key=f"{key}.key")
    if not lc.columns:
        raise ConfigError("a lookup needs at least one value column", key=f"{key}.columns")
    key_types = []
    for col, spec in lc.key.items():
        _check_ident(col, f"{key}.key.{col}", "column")
        _src, typ, _u, _c, _r = _normalize_column(spec, f"{key}.key.{col}")
        t = canonical_type(typ) if typ else "text"
        if t is None:
            raise ConfigError(f"unknown column type {typ!r}", key=f"{key}.key.{col}")
        key_types.append(t)
    value_types = []
    for col, typ in lc.columns.items():
        _check_ident(col, f"{key}.columns.{col}", "column")
        if col in lc.key:
            raise ConfigError(
                f"{col!r} is both a key and a value column", key=f"{key}.columns.{col}"
            )
        t = canonical_type(typ)
        if t is None:
            raise ConfigError(f"unknown column type {typ!r}", key=f"{key}.columns.{col}")
        value_types.append(t)
    if not lc.refresh_s > 0:
        raise ConfigError("must be > 0", key=f"{key}.refresh_s")
    # 0 is allowed: reload on every miss (small mapping tables that change often).
    if not lc.miss_refresh_s >= 0:
        raise ConfigError("must be >= 0", key=f"{key}.miss_refresh_s")
    return LookupCache(
        name=lc.name,
        table=lc.table,
        key_columns=tuple(lc.key),
        key_types=tuple(key_types),
        value_columns=tuple(lc.columns),
        value_types=tuple(value_types),
        refresh_s=lc.refresh_s,
        miss_refresh_s=lc.miss_refresh_s,
        on_miss=lc.on_miss,
        key_specs=dict(lc.key),
    )


def compile_route(
    index: int, rc: RouteConfig, default_ack: str, lookups: dict[str, LookupCache], key: str
) -> Route:
    """Compile one route. ``key`` is its config path (``routes[2]``) for error messages."""
    if not _ROUTE_NAME.match(rc.name):
        raise ConfigError(f"route name {rc.name!r} must match [A-Za-z0-9_.-]+", key=f"{key}.name")
    tpl = parse_template(rc.topic, f"{key}.topic")
    if not _TABLE.match(rc.table):
        raise ConfigError(f"invalid table name {rc.table!r}", key=f"{key}.table")
    filters = [tpl.filter]
    custom = rc.filter is not None
    if rc.filter is not None:
        if not rc.filter:
            raise ConfigError("filter list is empty", key=f"{key}.filter")
        for i, f in enumerate(rc.filter):
            why = validate_filter(f)
            if why:
                raise ConfigError(f"invalid MQTT filter {f!r}: {why}", key=f"{key}.filter[{i}]")
        filters = list(rc.filter)
    else:
        why = validate_filter(tpl.filter)
        if why:  # pragma: no cover - templates are validated above
            raise ConfigError(f"invalid MQTT filter {tpl.filter!r}: {why}", key=f"{key}.topic")
    if not rc.columns:
        raise ConfigError("a route needs at least one column", key=f"{key}.columns")
    b = _RouteBuilder(key, tpl, lookups)
    columns: list[Column] = []
    for idx, (cname, spec) in enumerate(rc.columns.items()):
        ckey = f"{key}.columns.{cname}"
        _check_ident(cname, ckey, "column")
        pgtype, getter, required = b.column(idx, cname, spec, ckey)
        src = spec if isinstance(spec, str) else (spec.source or "const")
        columns.append(Column(cname, pgtype, src, getter, required))
    b.finish(columns)
    key_cols: tuple[str, ...] = tuple(rc.key)
    if rc.kind == "latest":
        if not key_cols:
            raise ConfigError("a 'latest' route needs key columns", key=f"{key}.key")
        names = {c.name for c in columns}
        for k in key_cols:
            if k not in names:
                raise ConfigError(
                    f"key column {k!r} is not a column of the route", key=f"{key}.key"
                )
        if len(set(key_cols)) != len(key_cols):
            raise ConfigError("duplicate key column", key=f"{key}.key")
        for c in columns:
            if c.name in key_cols:
                c.required = True
    elif key_cols:
        raise ConfigError("only 'latest' routes have a key", key=f"{key}.key")
    for c in columns:
        if c.required:
            c.getter = _required(c.getter, c.name)
    return Route(
        index=index,
        name=rc.name,
        template=rc.topic,
        filters=filters,
        table=rc.table,
        kind=rc.kind,
        key=key_cols,
        ack=rc.ack or default_ack,
        columns=columns,
        decoder=b.decoder,
        needs_levels=b.needs_levels,
        check=_template_checker(tpl) if (custom or tpl.needs_check) else None,
    )


def _required(g: Getter, name: str) -> Getter:
    def get(m: Message, lv: Any, o: Any) -> Any:
        v = g(m, lv, o)
        if v is None:
            raise RowError(f"column {name}: no value (required)")
        return v

    inner = getattr(g, "fast", None)
    if inner is not None:
        # Outer reference to the inner expression: rename its placeholders.
        expr, env = inner
        env2 = {f"r_{k}": v for k, v in env.items()}
        for k in env:
            expr = expr.replace("{" + k + "}", "{r_" + k + "}")
        get.fast = (  # type: ignore[attr-defined]
            f"(_w if (_w := {expr}) is not None else {{missing}}({name!r}))",
            {**env2, "missing": _missing},
        )
        op = getattr(g, "op", None)
        if op is not None:
            get.op = op  # type: ignore[attr-defined]
            get.op_required = True  # type: ignore[attr-defined]
    return get


def _missing(name: str) -> Any:
    raise RowError(f"column {name}: no value (required)")


def _row_ops(columns: list[Column]) -> list[tuple[Any, ...]]:
    """Per column, the RowBuilder operation: (kind, required, arg0, arg1, arg2).

    A getter with an inline expression carries the equivalent operation (``op``);
    any other column is called as the generated converter calls it.
    """
    ops: list[tuple[Any, ...]] = []
    for c in columns:
        op = getattr(c.getter, "op", None)
        if op is None:
            ops.append(("py", False, c.getter, None, None))
            continue
        args = (*op[1:], None, None, None)[:3]
        ops.append((op[0], bool(getattr(c.getter, "op_required", False)), *args))
    return ops


# Topics whose split levels one route's converters keep (cleared when full).
_LEVELS_CACHE_MAX = 4096


def _generate_converter(
    columns: list[Column],
    decoder: msgspec.json.Decoder[Any] | None,
    needs_levels: bool,
    check: Callable[[list[str]], None] | None,
    levels: dict[str, list[str]] | None = None,
) -> Callable[[Message], tuple[Any, ...]]:
    """Generate one straight-line function building a row (the per-message path of a flush).

    ``levels``: the topic -> split levels cache to use (bounded by
    ``_LEVELS_CACHE_MAX``), shared with the route's RowBuilder.

    Columns whose getter carries an inline expression (``getter.fast``) are
    inlined; the others are called. Several times faster than calling one
    closure per column. Errors raise RowError exactly like the getters do.
    """
    env: dict[str, Any] = {
        "_UTC": UTC,
        "_fromts": fromtimestamp_utc,
        "RowError": RowError,
        "_VE": msgspec.ValidationError,
        "_DE": msgspec.DecodeError,
        "_decode": decoder.decode if decoder is not None else None,
        "_check": check,
    }
    exprs = []
    for i, c in enumerate(columns):
        fast = getattr(c.getter, "fast", None)
        if fast is None:
            env[f"_g{i}"] = c.getter
            exprs.append(f"_g{i}(m, lv, o)")
            continue
        expr, names = fast
        mapping = {}
        for k, v in names.items():
            n = f"_e{i}_{k}"
            env[n] = v
            mapping[k] = n
        exprs.append(expr.format(**mapping))
    lines = ["def convert(m):"]
    if needs_levels or check is not None:
        # Devices publish to the same few topics over and over: keep their split
        # levels (read-only for every getter) instead of splitting each message.
        env["_lvc"] = levels if levels is not None else {}
        env["_LVC_MAX"] = _LEVELS_CACHE_MAX
        lines += [
            "    t = m.topic",
            "    lv = _lvc.get(t)",
            "    if lv is None:",
            "        lv = t.split('/')",
            "        if len(_lvc) >= _LVC_MAX:",
            "            _lvc.clear()",
            "        _lvc[t] = lv",
        ]
    else:
        lines.append("    lv = None")
    if check is not None:
        lines.append("    _check(lv)")
    if decoder is not None:
        lines += [
            "    try:",
            "        o = _decode(m.payload)",
            "    except _VE as e:",
            "        raise RowError(f'payload: {e}') from None",
            "    except _DE as e:",
            "        raise RowError(f'payload is not valid JSON: {e}') from None",
        ]
    else:
        lines.append("    o = None")
    lines.append("    return (" + "".join(e + ", " for e in exprs) + ")")
    code = "\n".join(lines)
    exec(compile(code, "<ingestd route converter>", "exec"), env)
    fn: Callable[[Message], tuple[Any, ...]] = env["convert"]
    return fn
