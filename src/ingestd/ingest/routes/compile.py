"""Whole-config compilation: lookups, routes and their tables (compile_config, compile_route)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ingestd.errors import ConfigError
from ingestd.ingest.lookups import LookupCache
from ingestd.ingest.pgtypes import canonical_type
from ingestd.ingest.routes.errors import RowError
from ingestd.ingest.routes.kinds import ColumnRead, Constant, Fallback, Required
from ingestd.ingest.routes.model import Column, CompiledConfig, IndexDef, Route, TableSpec
from ingestd.ingest.routes.sources import _normalize_column, _RouteBuilder
from ingestd.ingest.routes.templates import _template_checker, parse_template, validate_filter
from ingestd.ingest.routes.values import value_converter

if TYPE_CHECKING:
    from ingestd.config import ColumnSpec, Config, IndexSpec, LookupConfig, RouteConfig

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_TABLE = re.compile(r"^(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$")


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


def compile_config(cfg: Config, path: str | None = None) -> CompiledConfig:
    """Compile lookups, routes and tables; raises ConfigError with the key path of any mistake.

    This is the validation of routes, lookups and tables (``load_config`` checks
    structure and types only). ``path``: the file ``cfg`` was read from, named
    in the error.
    """
    try:
        return _compile_config(cfg)
    except ConfigError as e:
        if path is None or e.path is not None:
            raise
        raise ConfigError(e.reason, path=path, key=e.key) from None


def _compile_config(cfg: Config) -> CompiledConfig:
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
    route_configs = list(cfg.routes)
    default = not route_configs and cfg.ingest.default_route
    if default:
        route_configs = [default_route_config()]
    for ri, rc in enumerate(route_configs):
        rkey = "ingest.default_route" if default else f"routes[{ri}]"
        route = compile_route(ri, rc, cfg.ingest.ack, lookups, rkey)
        if route.name in names:
            raise ConfigError(f"duplicate route name {route.name!r}", key=f"{rkey}.name")
        names.add(route.name)
        cols = {c.name: c.pgtype for c in route.columns}
        indexes = _index_defs(rc.indexes, f"{rkey}.indexes", cols)
        dev = route.device_column
        if dev is not None and route.key[0] != dev:
            # GET /api/devices looks rows up by this column: the primary key only
            # serves that when it comes first.
            indexes.append(IndexDef((dev,)))
        spec = TableSpec(route.table, route.kind, route.key, cols, indexes, rkey)
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


DEFAULT_TABLE = "messages"


def default_route_config() -> RouteConfig:
    """The route that stands in for none (``ingest.default_route``): every non-``$``
    message, whatever its payload, into ``messages``. Binary and non-JSON payloads
    keep their bytes (``payload_raw``) instead of becoming dead letters."""
    from ingestd.config import RouteConfig
    from ingestd.config.model import IndexSpec

    return RouteConfig(
        name="messages",
        topic="{topic#}",
        table=DEFAULT_TABLE,
        kind="append",
        columns={
            "topic": "topic",
            "client_id": "client_id",
            "username": "username",
            "qos": "qos",
            "retain": "retain",
            "received_at": "received_at",
            "payload": "payload_json",
            "payload_raw": "payload_raw",
        },
        # BRIN: time-range queries without a B-tree to keep up per row (docs/ingest.md:
        # a (topic, received_at) B-tree cost the stock fan-in a fifth of its rate).
        indexes=[IndexSpec(columns=["received_at"], method="brin")],
    )


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
    if not 0 <= lc.miss_wait_s <= 60:
        raise ConfigError(
            "must be between 0 and 60 (a batch with a miss waits this long)",
            key=f"{key}.miss_wait_s",
        )
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
        miss_wait_s=lc.miss_wait_s,
        key_specs=dict(lc.key),
    )


def _fallback_read(b: _RouteBuilder, pgtype: str, spec: ColumnSpec, key: str) -> ColumnRead | None:
    """The read of a column's ``fallback`` source or ``fallback_value``, or None."""
    if spec.fallback is None and spec.fallback_value is None:
        return None
    if spec.source is None:
        raise ConfigError("a constant column has no fallback", key=f"{key}.fallback")
    if spec.fallback is not None and spec.fallback_value is not None:
        raise ConfigError("give either fallback or fallback_value, not both", key=f"{key}.fallback")
    unit = spec.unit or "s"
    if spec.fallback_value is not None:
        try:
            return Constant(value_converter(pgtype, unit)(spec.fallback_value))
        except RowError as e:
            raise ConfigError(
                f"fallback_value {spec.fallback_value!r}: {e}", key=f"{key}.fallback_value"
            ) from None
    fb = spec.fallback
    assert fb is not None
    if fb == "payload" or fb.startswith(("payload.", "payload[", "payload_")):
        raise ConfigError(
            f"fallback {fb!r}: a fallback cannot read the payload (use received_at, topic, "
            "topic.<name>, client_id, username, user_property.<name>, lookup.<lookup>.<column>, "
            "or a constant fallback_value)",
            key=f"{key}.fallback",
        )
    _t, read, _r = b._source(-1, fb, pgtype, unit, f"{key}.fallback", False)
    return read


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
        pgtype, read, required = b.column(idx, cname, spec, ckey)
        src = spec if isinstance(spec, str) else (spec.source or "const")
        columns.append(Column(cname, pgtype, src, read, required))
    b.finish(columns)
    # After finish(): the first source's payload read is bound; before Required: a
    # required column with a fallback is an error only when both give nothing.
    for c, spec in zip(columns, rc.columns.values(), strict=True):
        if isinstance(spec, str):
            continue
        ckey = f"{key}.columns.{c.name}"
        second = _fallback_read(b, c.pgtype, spec, ckey)
        if second is not None:
            c.read = Fallback(c.read, second)
            c.source = f"{c.source} else {spec.fallback or 'fallback_value'}"
        if spec.keep_when_missing:
            if rc.kind != "latest":
                raise ConfigError(
                    "keep_when_missing applies to 'latest' routes only (an append row has "
                    "no stored value to keep)",
                    key=f"{ckey}.keep_when_missing",
                )
            c.keep = True
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
                if c.keep:
                    raise ConfigError(
                        "a key column cannot be keep_when_missing (it is always required)",
                        key=f"{key}.columns.{c.name}.keep_when_missing",
                    )
    elif key_cols:
        raise ConfigError("only 'latest' routes have a key", key=f"{key}.key")
    device_column = _device_column(rc, key_cols, columns, key)
    for c in columns:
        if c.required:
            c.read = Required(c.read, c.name)
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
        device_column=device_column,
    )


def _device_column(
    rc: RouteConfig, key_cols: tuple[str, ...], columns: list[Column], key: str
) -> str | None:
    """The column ``device_state`` names (the device's MQTT client id), or None."""
    ds = rc.device_state
    if ds is False:
        return None
    where = f"{key}.device_state"
    if rc.kind != "latest":
        raise ConfigError("device_state needs kind = 'latest' (one row per device)", key=where)
    if ds is True:
        if len(key_cols) != 1:
            raise ConfigError(
                f"the key {list(key_cols)} has several columns: name the one holding the"
                ' device\'s client id (device_state = "<column>")',
                key=where,
            )
        ds = key_cols[0]
    if ds not in key_cols:
        raise ConfigError(
            f"device_state column {ds!r} is not a key column (key: {list(key_cols)})", key=where
        )
    pgtype = next(c.pgtype for c in columns if c.name == ds)
    if pgtype != "text":
        raise ConfigError(
            f"device_state column {ds!r} is {pgtype}; it must be text (it holds a client id)",
            key=where,
        )
    return ds
