"""Configuration: msgspec Structs with every default in one place.

A TOML file (``--config``) is decoded into :class:`Config`; environment
variables ``INGESTD_<SECTION>__<KEY>`` override single keys; command-line
options override both. Invalid input raises :class:`ingestd.errors.ConfigError`
naming the file, the key and the reason.

Entry points: :func:`load_config` (file + env + overrides, then structural and
semantic validation) and :func:`dump_config` (the effective configuration as
TOML text, which :func:`load_config` reads back to an equal :class:`Config`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import tomllib
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

import msgspec

from ingestd.errors import ConfigError


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Listeners and process-level settings."""

    # TCP listeners, "HOST:PORT" ("[::1]:1883" for IPv6).
    listen: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0:1883"])
    # MQTT over TLS listeners; need tls_certfile and tls_keyfile.
    tls_listen: list[str] = msgspec.field(default_factory=list)
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_cafile: str | None = None  # client certificates are required when set
    # MQTT over WebSocket listeners (subprotocol "mqtt", any path).
    ws_listen: list[str] = msgspec.field(default_factory=list)
    # Prometheus /metrics, /healthz, /readyz.
    http_listen: str | None = "127.0.0.1:8080"
    data_dir: str = "./ingestd-data"
    log_level: str = "info"
    # Seconds granted to flush and close sessions on SIGTERM/SIGINT.
    shutdown_timeout: float = 10.0


class MqttConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Protocol limits. Every bound on memory the broker keeps is here."""

    # Largest packet accepted from a client (bytes, whole packet); v5 clients are told.
    max_packet_size: int = 1_048_576
    # Keepalive ceiling; a client asking more (or 0) is told this as Server Keep Alive (v5).
    max_keepalive: int = 65_535
    # Inbound QoS 1/2 publishes a client may have unacknowledged (our Receive Maximum).
    receive_maximum: int = 1_024
    # Outbound QoS 1/2 deliveries in flight per connection (further capped by the client's Receive Maximum).
    max_inflight: int = 256
    # Topic aliases a v5 client may use towards us (0 disables).
    topic_alias_maximum: int = 64
    # Per-connection outbound buffer bound (bytes written but not yet drained by the socket);
    # past it QoS 0 deliveries are dropped and counted, QoS 1/2 wait in the session queue.
    max_outbound_bytes: int = 1_048_576
    # Per-session queue of QoS 1/2 messages waiting for a free inflight slot or for the
    # client to come back; past it the oldest is dropped and counted.
    max_queued_messages: int = 10_000
    max_queued_bytes: int = 16_777_216
    # Ceiling on the Session Expiry Interval a v5 client may ask for (seconds).
    max_session_expiry: int = 7 * 24 * 3600
    # Session expiry for 3.1.1 clients with clean session 0 (seconds).
    persistent_session_expiry: int = 7 * 24 * 3600
    retain_available: bool = True
    max_retained_messages: int = 1_000_000
    allow_anonymous: bool = True
    # "user:password" lines, passwords hashed as written by `ingestd passwd` (optional).
    password_file: str | None = None
    # Seconds a new TCP connection may take to send CONNECT.
    connect_timeout: float = 10.0
    # Empty client ids get an assigned id with this prefix.
    assigned_id_prefix: str = "auto-"


# --------------------------------------------------------------------------
# Ingestion side
# --------------------------------------------------------------------------

AckMode = Literal["after-commit", "on-receipt"]


class DatabaseConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where rows go. An empty DSN starts an embedded PostgreSQL in ``<data_dir>/pg``."""

    dsn: str = ""
    # asyncpg pool size (connections). COPYs in flight are further capped by
    # ingest.max_concurrent_copies; the rest serve presence, lookups and replay.
    pool_size: int = 4
    # Seconds to open one connection before the attempt counts as failed.
    connect_timeout: float = 10.0
    # Seconds one statement (a COPY of a whole batch) may take before it is
    # abandoned and retried; guards against a half-dead server hanging a flush.
    command_timeout: float = 60.0


class IngestConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Batching, durability and back-pressure of the ingestion pipeline."""

    # "after-commit": a QoS 1/2 PUBLISH is acknowledged once its row is committed
    # (or fsync'd to the spool). "on-receipt": acknowledged at once (faster, may lose
    # the last batch on a crash). Routes may override it.
    ack: AckMode = "after-commit"
    # A table's batch is flushed when it holds this many rows...
    batch_rows: int = 5000
    # ...or this long after its first row arrived, whichever comes first.
    flush_interval_ms: float = 50.0
    # Rows received but not yet committed/spooled, over all tables. Past it the
    # engine reports `saturated` and the broker stops reading from publishers.
    max_pending_rows: int = 100_000
    # COPY statements in flight at once (each holds one pooled connection).
    max_concurrent_copies: int = 2
    # PUBLISHes whose topics only ingest routes take are handed to the batches a
    # read at a time by compiled code (docs/architecture.md, "Inbound fast path").
    # false: every PUBLISH goes through the per-message path (to compare, or to
    # rule the fast path out when chasing a problem); the result is the same.
    fast_path: bool = True
    # Retry backoff for a failing write: starts here, doubles up to retry_max_ms.
    retry_initial_ms: float = 100.0
    retry_max_ms: float = 5000.0
    # A batch that has kept failing this long is appended to the local spool
    # (<data_dir>/spool) instead, and replayed in order once PostgreSQL is back.
    spool_after_ms: float = 5000.0
    # Bound on the spool's size on disk; when full, batches stay in memory and
    # back-pressure (saturation) holds publishers.
    spool_max_bytes: int = 1_073_741_824
    # Undecodable/unconvertible messages land here (never stops the pipeline).
    dead_letter_table: str = "dead_letters"


class PresenceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Device presence: one row per client id, updated on connect/disconnect."""

    enabled: bool = True
    table: str = "device_presence"
    # Presence changes are merged in memory (last state per client wins) and
    # upserted in one statement this often.
    flush_interval_ms: float = 200.0
    # Also refresh last_seen from the messages a client publishes to ingest routes.
    touch_on_publish: bool = True
    # At startup, mark rows still "online" from a previous run offline
    # (disconnect_reason "server_restart"). Turn off when several ingestd
    # processes share one presence table.
    reset_on_start: bool = True


class PersistenceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Retained messages and persistent sessions kept in PostgreSQL across restarts."""

    enabled: bool = True
    # Write-behind period for retained/session changes (what a crash can lose at most).
    flush_interval_ms: float = 100.0
    # Journal persistent sessions' QoS 1/2 deliveries until they complete, so a crash
    # does not lose them. It writes only what is still undelivered after a flush
    # interval (a slow or offline subscriber); off: they are saved at a graceful stop only.
    session_journal: bool = True
    # Acknowledge a QoS 1/2 PUBLISH that reaches a persistent session only once the
    # journal holding its delivery is committed (as ack = "after-commit" does for
    # ingest routes): a crash then loses no acknowledged message, at the cost of up
    # to flush_interval_ms more publish->ack latency for such messages. Needs
    # session_journal. Off: acknowledged once queued in memory (written behind).
    ack_after_journal: bool = False


class ColumnSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One column of a route's table and where its value comes from.

    ``source`` grammar (see docs/ingest.md): ``topic``, ``topic.<placeholder>``,
    ``topic[<index>]``, ``payload``, ``payload.<path>``, ``received_at``,
    ``client_id``, ``username``, ``qos``, ``retain``, ``user_property.<name>``,
    ``lookup.<lookup name>.<column>``. A constant is written ``value = ...``
    with no source.
    """

    source: str | None = None
    type: str | None = None
    # Unit of numeric timestamps (timestamptz columns): seconds, ms, us, ns.
    unit: Literal["s", "ms", "us", "ns"] | None = None
    # Constant value (no source).
    value: Any = None
    # A message without a value for this column is a dead letter instead of a NULL.
    required: bool = False


class IndexSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """An index ingestd creates with the table (``CREATE INDEX IF NOT EXISTS``)."""

    columns: list[str]
    unique: bool = False
    method: Literal["btree", "brin", "hash", "gin"] = "btree"
    name: str | None = None


class RouteConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One topic template mapped to one table."""

    name: str
    # Topic template: MQTT levels, "{name}" captures one level, "{name#}" one or more.
    topic: str
    table: str
    # "append": one row per message. "latest": one row per key, upserted.
    kind: Literal["append", "latest"] = "append"
    # Key columns of a "latest" table (its primary key).
    key: list[str] = msgspec.field(default_factory=list)
    # Per-route override of ingest.ack.
    ack: AckMode | None = None
    # Subscription filters to use instead of the one derived from the template
    # (needed to narrow a template that has a multi-level placeholder).
    filter: list[str] | None = None
    columns: dict[str, str | ColumnSpec]
    indexes: list[list[str] | IndexSpec] = msgspec.field(default_factory=list)


class LookupConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A mapping table read into memory and consulted by ``lookup.<name>.<column>`` sources.

    ``key`` maps the lookup table's key columns to sources evaluated in the
    context of the route using the lookup (e.g. ``topic.socket_suffix``);
    ``columns`` lists the value columns and their types.
    """

    name: str
    table: str
    key: dict[str, str | ColumnSpec]
    columns: dict[str, str]
    # Whole-table reload period (seconds).
    refresh_s: float = 60.0
    # On a miss, reload at most this often (seconds) before giving up on the row;
    # 0 reloads on every miss.
    miss_refresh_s: float = 5.0
    # What a row whose key is not in the table becomes.
    on_miss: Literal["dead-letter", "null", "skip"] = "dead-letter"


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration of one ingestd process."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    presence: PresenceConfig = msgspec.field(default_factory=PresenceConfig)
    persistence: PersistenceConfig = msgspec.field(default_factory=PersistenceConfig)
    lookups: list[LookupConfig] = msgspec.field(default_factory=list)
    routes: list[RouteConfig] = msgspec.field(default_factory=list)


# Sections that take INGESTD_<SECTION>__<KEY> environment overrides.
_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "server": ServerConfig,
    "mqtt": MqttConfig,
    "database": DatabaseConfig,
    "ingest": IngestConfig,
    "presence": PresenceConfig,
    "persistence": PersistenceConfig,
}

ENV_PREFIX = "INGESTD_"

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_config(
    path: str | None,
    env: Mapping[str, str] = os.environ,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Read, merge and validate the configuration.

    Precedence, lowest first: defaults, the TOML file at ``path`` (None: no
    file), environment variables ``INGESTD_<SECTION>__<KEY>`` (value parsed by
    the field's type; lists as ``a,b`` or a JSON array; an empty string makes
    an optional field None), then ``overrides`` (``{"server": {"data_dir": ...}}``
    or ``{"server.data_dir": ...}``, typically from command-line options).

    Raises :class:`ConfigError` naming the file (or environment variable), the
    key path (``routes[2].columns.ts``) and the reason.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("file not found", path=path) from None
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror or e}", path=path) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid TOML: {e}", path=path) from None
    # Key path -> where the value came from, when not the file (for error messages).
    origins: dict[str, str] = {}
    _apply_env(raw, env, origins)
    if overrides:
        _apply_overrides(raw, overrides, origins)
    _empty_optional_strings(raw)
    try:
        _check_dict_values(raw)
    except ConfigError as e:
        raise ConfigError(_reason_of(e), path=path, key=e.key) from None
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as e:
        key, reason = _translate_validation_error(str(e))
        src = _origin_for(key, origins)
        raise ConfigError(reason, path=src or path, key=key or None) from None
    try:
        validate_config(cfg)
    except ConfigError as e:
        src = _origin_for(e.key or "", origins)
        if src or path:
            raise ConfigError(_reason_of(e), path=src or path, key=e.key) from None
        raise
    return cfg


def _reason_of(e: ConfigError) -> str:
    """The bare reason of a ConfigError (without its "path: key: " prefix)."""
    return e.reason


def _origin_for(key: str, origins: dict[str, str]) -> str | None:
    for k, src in origins.items():
        if key == k or key.startswith(k + ".") or key.startswith(k + "["):
            return src
    return None


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], origins: dict[str, str]) -> None:
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            # INGESTD_TEST_DSN and friends are not configuration keys.
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        cls = _SECTIONS.get(section)
        if cls is None:
            raise ConfigError(
                f"unknown section {section!r} (known: {', '.join(_SECTIONS)})", path=f"${name}"
            )
        fields = {f.name: f for f in msgspec.structs.fields(cls)}
        if key not in fields:
            raise ConfigError(f"unknown key {key!r} in section [{section}]", path=f"${name}")
        try:
            value = parse_text_value(env[name], fields[key].type)
        except ValueError as e:
            raise ConfigError(str(e), path=f"${name}", key=f"{section}.{key}") from None
        sect = raw.setdefault(section, {})
        if not isinstance(sect, dict):
            raise ConfigError("not a table", key=section)
        sect[key] = value
        origins[f"{section}.{key}"] = f"${name}"


def _apply_overrides(
    raw: dict[str, Any], overrides: dict[str, Any], origins: dict[str, str]
) -> None:
    for k, v in overrides.items():
        if isinstance(v, dict) and "." not in k:
            for kk, vv in v.items():
                _set_dotted(raw, f"{k}.{kk}", vv)
                origins[f"{k}.{kk}"] = "override"
        else:
            _set_dotted(raw, k, v)
            origins[k] = "override"


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    d = raw
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError("not a table", key=dotted)
        d = nxt
    d[parts[-1]] = value


def _empty_optional_strings(raw: dict[str, Any]) -> None:
    """``key = ""`` means None for optional string fields (TOML has no null).

    This is also how :func:`dump_config` writes a None that differs from the
    default (``http_listen = ""`` disables the HTTP listener).
    """
    for section, cls in _SECTIONS.items():
        sect = raw.get(section)
        if not isinstance(sect, dict):
            continue
        for f in msgspec.structs.fields(cls):
            if sect.get(f.name) == "" and _is_optional(f.type) and str in _union_args(f.type):
                sect[f.name] = None


def _union_args(tp: Any) -> tuple[Any, ...]:
    if get_origin(tp) in (Union, types.UnionType):
        return get_args(tp)
    return (tp,)


def _is_optional(tp: Any) -> bool:
    return type(None) in _union_args(tp)


def parse_text_value(text: str, tp: Any) -> Any:
    """Parse an environment/command-line string as a value of type ``tp``.

    Raises ValueError with a readable reason.
    """
    args = _union_args(tp)
    if text == "" and type(None) in args:
        return None
    non_none = [a for a in args if a is not type(None)]
    if str in non_none:
        return text
    t = non_none[0] if len(non_none) == 1 else tp
    if get_origin(t) is list:
        s = text.strip()
        if s.startswith("["):
            try:
                items = json.loads(s)
            except ValueError as e:
                raise ValueError(f"invalid JSON array: {e}") from None
        else:
            items = [x.strip() for x in s.split(",") if x.strip()]
        (item_t,) = get_args(t) or (Any,)
        return [parse_text_value(x, item_t) if isinstance(x, str) else x for x in items]
    if t is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    try:
        return msgspec.convert(text.strip(), t, strict=False)
    except msgspec.ValidationError as e:
        raise ValueError(f"{e} (got {text!r})") from None


def _check_dict_values(raw: dict[str, Any]) -> None:
    """Validate the values of name-keyed tables (route columns, lookup keys) one by one.

    msgspec reports a bad dict value at ``$.routes[2].columns[...]``; checking
    each entry alone lets the error name the column (``routes[2].columns.ts``).
    Raises ConfigError with the precise key path.
    """
    checks: list[tuple[str, str, Any]] = [
        ("routes", "columns", str | ColumnSpec),
        ("lookups", "key", str | ColumnSpec),
        ("lookups", "columns", str),
    ]
    for section, field_name, tp in checks:
        items = raw.get(section)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            d = item.get(field_name) if isinstance(item, dict) else None
            if not isinstance(d, dict):
                continue
            for name, value in d.items():
                try:
                    msgspec.convert(value, tp, strict=True)
                except msgspec.ValidationError as e:
                    key, reason = _translate_validation_error(str(e))
                    where = f"{section}[{i}].{field_name}.{name}" + (f".{key}" if key else "")
                    raise ConfigError(reason, key=where) from None


_VE_AT = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")


def _translate_validation_error(msg: str) -> tuple[str, str]:
    """``"Expected `int`, got `str` - at `$.routes[2].columns.ts`"`` -> (key path, reason)."""
    m = _VE_AT.match(msg)
    if m is None:  # pragma: no cover - msgspec always matches the pattern
        return "", msg
    reason = m.group("reason")
    key = (m.group("path") or "").lstrip(".")
    mu = _UNKNOWN_FIELD.match(reason)
    if mu:
        key = f"{key}.{mu.group('field')}" if key else mu.group("field")
        reason = "unknown key"
    mm = _MISSING_FIELD.match(reason)
    if mm:
        key = f"{key}.{mm.group('field')}" if key else mm.group("field")
        reason = "required key is missing"
    # Dict values are reported as `[...]`; that is as precise as msgspec gets.
    return key, reason


# --------------------------------------------------------------------------
# Semantic validation
# --------------------------------------------------------------------------


def parse_listen(addr: str) -> tuple[str, int]:
    """``"HOST:PORT"`` / ``"[v6]:PORT"`` -> (host, port); raises ValueError.

    The broker's own parser (ingestd.transport.addr), so what validates here
    is exactly what the listeners accept.
    """
    from ingestd.transport.addr import parse_hostport

    return parse_hostport(addr)


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if (
        value < 0
        or (value == 0 and not allow_zero)
        or (isinstance(value, float) and math.isnan(value))
    ):
        raise ConfigError(f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}", key=key)


def validate_config(cfg: Config) -> None:
    """Checks beyond types: addresses, bounds, and the routes (compiled to find errors)."""
    s = cfg.server
    for field_name in ("listen", "tls_listen", "ws_listen"):
        for i, addr in enumerate(getattr(s, field_name)):
            try:
                parse_listen(addr)
            except ValueError as e:
                raise ConfigError(str(e), key=f"server.{field_name}[{i}]") from None
    if s.http_listen is not None:
        try:
            parse_listen(s.http_listen)
        except ValueError as e:
            raise ConfigError(str(e), key="server.http_listen") from None
    if s.tls_listen and not (s.tls_certfile and s.tls_keyfile):
        raise ConfigError(
            "TLS listeners need tls_certfile and tls_keyfile", key="server.tls_listen"
        )
    if s.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"must be one of {', '.join(_LOG_LEVELS)}", key="server.log_level")
    _positive(s.shutdown_timeout, "server.shutdown_timeout", allow_zero=True)
    for f in msgspec.structs.fields(MqttConfig):
        v = getattr(cfg.mqtt, f.name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            _positive(v, f"mqtt.{f.name}", allow_zero=f.name == "topic_alias_maximum")
    _positive(cfg.database.pool_size, "database.pool_size")
    _positive(cfg.database.connect_timeout, "database.connect_timeout")
    _positive(cfg.database.command_timeout, "database.command_timeout")
    ing = cfg.ingest
    for name in (
        "batch_rows",
        "flush_interval_ms",
        "max_pending_rows",
        "max_concurrent_copies",
        "retry_initial_ms",
        "retry_max_ms",
        "spool_max_bytes",
    ):
        _positive(getattr(ing, name), f"ingest.{name}")
    _positive(ing.spool_after_ms, "ingest.spool_after_ms", allow_zero=True)
    if cfg.database.pool_size < 1:
        raise ConfigError("must be >= 1", key="database.pool_size")
    if ing.max_concurrent_copies >= cfg.database.pool_size:
        # Writers would hold every pooled connection and starve presence upserts,
        # lookup reloads and the broker store's write-behind for as long as ingest is busy.
        raise ConfigError(
            f"must be less than database.pool_size ({cfg.database.pool_size}): each COPY"
            " holds a pooled connection and presence, lookups and the broker store need one",
            key="ingest.max_concurrent_copies",
        )
    _positive(cfg.presence.flush_interval_ms, "presence.flush_interval_ms")
    if cfg.persistence.ack_after_journal and not (
        cfg.persistence.enabled and cfg.persistence.session_journal
    ):
        raise ConfigError(
            "needs persistence.enabled and persistence.session_journal: the acknowledgement"
            " waits for the delivery journal",
            key="persistence.ack_after_journal",
        )
    # Routes, lookups and tables are validated by compiling them, where the
    # configuration is used (ingestd.ingest.routes.compile_config: `config check`,
    # `db init`, `serve`), so that reading a file does not import the ingest side.


# --------------------------------------------------------------------------
# Dumping (a tiny TOML emitter: no dependency, and it only has to write what
# Config can hold: scalars, lists, tables, arrays of tables).
# --------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _toml_str(k)


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_TOML_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')


def _toml_str(s: str) -> str:
    """A TOML basic string: quote, backslash and every control character (incl. DEL) escaped."""

    def esc(m: re.Match[str]) -> str:
        c = m.group()
        return _TOML_ESCAPES.get(c) or f"\\u{ord(c):04x}"

    return '"' + _TOML_NEEDS_ESCAPE.sub(esc, s) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, datetime.datetime | datetime.date | datetime.time):
        return v.isoformat()  # TOML date/time literals are ISO 8601 (RFC 3339)
    if isinstance(v, msgspec.Struct):
        v = _struct_items(v, inline=True)
    if isinstance(v, dict):
        inner = ", ".join(
            f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None
        )
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _struct_items(obj: msgspec.Struct, inline: bool = False) -> dict[str, Any]:
    """Field name -> value, None written as "" when it differs from a non-None default."""
    out: dict[str, Any] = {}
    omit = inline and obj.__struct_config__.omit_defaults
    for f in msgspec.structs.fields(obj):
        v = getattr(obj, f.name)
        default = f.default if f.default is not msgspec.NODEFAULT else None
        if f.default_factory is not msgspec.NODEFAULT:
            default = f.default_factory()
        if omit and v == default:
            continue
        if v is None:
            if default is not None:
                out[f.name] = ""
            continue
        out[f.name] = v
    return out


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, msgspec.Struct) for x in v)


def _emit_table(
    lines: list[str],
    header: str | None,
    items: dict[str, Any],
    array: bool = False,
    inline_structs: bool = False,
) -> None:
    # Scalars, lists (and, inside a plain dict such as `columns`, Structs as
    # inline tables) first: TOML puts a table's own keys before its sub-tables.
    simple = {
        k: v
        for k, v in items.items()
        if (inline_structs or not isinstance(v, msgspec.Struct))
        and not isinstance(v, dict)
        and not _is_table_array(v)
    }
    if header is not None:
        lines.append("")
        lines.append(f"[[{header}]]" if array else f"[{header}]")
    for k, v in simple.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in items.items():
        if k in simple:
            continue
        sub = f"{header}.{_toml_key(k)}" if header else _toml_key(k)
        if isinstance(v, msgspec.Struct):
            _emit_table(lines, sub, _struct_items(v))
        elif isinstance(v, dict):
            _emit_table(lines, sub, v, inline_structs=True)
        else:
            for x in v:
                _emit_table(lines, sub, _struct_items(x, inline=True), array=True)


def dump_config(cfg: Config) -> str:
    """The effective configuration as TOML; ``load_config`` reads it back to an equal Config."""
    lines = ["# ingestd effective configuration"]
    _emit_table(lines, None, _struct_items(cfg))
    return "\n".join(lines).lstrip("\n") + "\n"
