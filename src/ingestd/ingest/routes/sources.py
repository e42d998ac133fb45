"""Column sources: which kind of read (:mod:`.kinds`) a source spec is, checked against
the route (template placeholders, lookups), and the route's payload decoder (a
Struct generated from the payload paths its columns read)."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ingestd.errors import ConfigError
from ingestd.ingest.pgtypes import TYPE_ALIASES, canonical_type
from ingestd.ingest.routes.errors import LookupMiss, RowError, SkipRow
from ingestd.ingest.routes.kinds import (
    ColumnRead,
    Constant,
    MessageField,
    PayloadField,
    PayloadPair,
    ReceivedAt,
    TopicLevel,
    TopicName,
)
from ingestd.ingest.routes.model import Column, Getter
from ingestd.ingest.routes.templates import Template
from ingestd.ingest.routes.values import (
    _decode_type,
    _post_decode,
    string_converter,
    value_converter,
)

if TYPE_CHECKING:
    from ingestd._message import Message
    from ingestd.config import ColumnSpec
    from ingestd.ingest.lookups import LookupCache

USER_PROPERTY = (
    0x26  # ingestd.mqtt.constants.Prop.USER_PROPERTY; the value is a list of (name, value)
)

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
        # column index -> its payload read, set by finish()
        self.payload_reads: dict[int, PayloadField] = {}
        self.pending_payload: list[tuple[int, list[str | int], str, str]] = []
        self.decoder: msgspec.json.Decoder[Any] | None = None

    # -- one column --------------------------------------------------------

    def column(
        self, idx: int, name: str, spec: str | ColumnSpec, key: str
    ) -> tuple[str, ColumnRead, bool]:
        """-> (canonical type, read, required). Payload reads are bound in finish()."""
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
            return pgtype, Constant(value), required
        return self._source(idx, source, pgtype, unit, key, required)

    def _source(
        self, idx: int, source: str, pgtype: str | None, unit: str, key: str, required: bool
    ) -> tuple[str, ColumnRead, bool]:
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
            return pgtype, ColumnRead(_unbound), required
        if source in ("payload_json", "payload_raw"):
            want = "jsonb" if source == "payload_json" else "bytea"
            if pgtype not in (None, want):
                raise ConfigError(f"{source} is a {want} column", key=key)
            return want, PayloadPair(source[len("payload_") :]), required
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

            return pgtype, ColumnRead(get_user_property), required
        if source.startswith("lookup."):
            return self._lookup(source, pgtype, key, required)
        raise ConfigError(
            f"unknown source {source!r} (expected topic, topic.<name>, topic[<i>], payload, "
            "payload.<path>, payload_json, payload_raw, received_at, client_id, username, qos, retain, "
            "user_property.<name>, lookup.<lookup>.<column>, or a constant `value`)",
            key=key,
        )

    def _simple(self, source: str, pgtype: str, unit: str) -> ColumnRead:
        if source == "received_at":
            if pgtype == "timestamptz":
                return ReceivedAt()
            conv = value_converter(pgtype, unit)
            return ColumnRead(lambda m, lv, o: conv(m.received_at))
        if source in ("qos", "retain"):
            vconv = value_converter(pgtype, unit)
            return MessageField(source, vconv, _fast_values(pgtype))
        sconv = string_converter(pgtype, unit)
        if source == "topic":
            if pgtype == "text":
                return TopicName()
            return ColumnRead(lambda m, lv, o: sconv(m.topic))
        # client_id, or username (None stays NULL)
        return MessageField(source, sconv, _fast_values(pgtype))

    def _topic(self, source: str, pgtype: str, unit: str, key: str) -> tuple[str, ColumnRead]:
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

            return pgtype, ColumnRead(get_level)
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

            return pgtype, ColumnRead(get_multi)
        # A topic level is a str without NUL already: text needs no converter.
        return pgtype, TopicLevel(pos, None if pgtype == "text" else conv)

    def _whole_payload(self, pgtype: str, unit: str) -> ColumnRead:
        if pgtype == "bytea":
            return ColumnRead(lambda m, lv, o: m.payload)
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

            return ColumnRead(get_json)
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

        return ColumnRead(get_scalar)

    def _lookup(
        self, source: str, pgtype: str | None, key: str, required: bool
    ) -> tuple[str, ColumnRead, bool]:
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

        return vtype, ColumnRead(get_lookup), required

    def _lookup_key_getters(self, lk: LookupCache, key: str) -> list[Getter]:
        out: list[Getter] = []
        for col, ktype in zip(lk.key_columns, lk.key_types, strict=True):
            spec = lk.key_specs[col]
            src, _t, unit, const, _r = _normalize_column(spec, key)
            if src is None:
                out.append(Constant(value_converter(ktype, unit)(const)).getter)
                continue
            if src.startswith("payload") or src.startswith("lookup."):
                # Payload keys would need the route's decoder; keep lookups on metadata.
                raise ConfigError(
                    f"lookup {lk.name!r} key {col!r}: source {src!r} is not supported in lookup keys "
                    "(use topic, client_id, username, user_property or a constant)",
                    key=key,
                )
            _pt, read, _req = self._source(
                -1, src, ktype, unit, f"{key} (lookup {lk.name} key {col})", False
            )
            out.append(read.getter)
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
                    bind(ci, accessor, [], _post_decode(t, units[ci]))
                return _decode_type(t)
            if mixed or (node is self.root and (node.leaves or node.tails)):
                # Decode this subtree fully and walk it in Python.
                for ci, _t in node.leaves:
                    bind(ci, accessor, [], value_converter(types[ci], units[ci]))
                for ci, rest in node.tails:
                    bind(ci, accessor, rest, value_converter(types[ci], units[ci]))
                for k, child in node.children.items():
                    for ci, rest in _collect(child, [k]):
                        bind(ci, accessor, rest, value_converter(types[ci], units[ci]))
                return Any
            if node.leaves:  # several leaf types at one path: decode as Any
                for ci, _t in node.leaves:
                    bind(ci, accessor, [], value_converter(types[ci], units[ci]))
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
        ) -> None:
            self.payload_reads[ci] = PayloadField(attrs, rest, conv)

        root_type = build(self.root, [])
        self.decoder = msgspec.json.Decoder(root_type, strict=False)
        for idx, read in self.payload_reads.items():
            columns[idx].read = read


def _fast_values(pgtype: str) -> str | None:
    """The values the converter of ``pgtype`` returns unchanged (MessageField's ``fast``)."""
    if pgtype == "text":
        return "text"
    if pgtype in ("smallint", "integer", "bigint"):
        return "int"
    if pgtype == "boolean":
        return "bool"
    return None


def _collect(node: _PayloadNode, prefix: list[str | int]) -> list[tuple[int, list[str | int]]]:
    out: list[tuple[int, list[str | int]]] = [(ci, list(prefix)) for ci, _t in node.leaves]
    out += [(ci, [*prefix, *rest]) for ci, rest in node.tails]
    for k, child in node.children.items():
        out += _collect(child, [*prefix, k])
    return out


def _unbound(m: Message, lv: Any, o: Any) -> Any:  # pragma: no cover - replaced in finish()
    raise AssertionError("payload getter not bound")
