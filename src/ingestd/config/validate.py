"""Checks of a decoded :class:`Config` beyond its types (ranges, listeners, combinations).

Routes, lookups and tables are not checked here: compiling them is their
validation (``ingestd.ingest.routes.compile_config``), done where they are used.
"""

from __future__ import annotations

import math

import msgspec

from ingestd.config.model import _LOG_LEVELS, Config, MqttConfig
from ingestd.errors import ConfigError

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
    for field_name in ("listen", "tls_listen", "ws_listen", "wss_listen"):
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
    for field_name in ("tls_listen", "wss_listen"):
        if getattr(s, field_name) and not (s.tls_certfile and s.tls_keyfile):
            raise ConfigError(
                "TLS listeners need tls_certfile and tls_keyfile", key=f"server.{field_name}"
            )
    if s.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"must be one of {', '.join(_LOG_LEVELS)}", key="server.log_level")
    _positive(s.shutdown_timeout, "server.shutdown_timeout", allow_zero=True)
    for f in msgspec.structs.fields(MqttConfig):
        v = getattr(cfg.mqtt, f.name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            _positive(
                v,
                f"mqtt.{f.name}",
                allow_zero=f.name
                in (
                    "topic_alias_maximum",
                    "auth_failure_limit",
                    "overflow_max_bytes",
                    "max_connections",
                    "max_connections_per_peer",
                ),
            )
    if not cfg.mqtt.allow_anonymous and not cfg.mqtt.password_file:
        # Without a credential source every user name would be let in.
        raise ConfigError(
            "allow_anonymous = false needs a credential source: set mqtt.password_file",
            key="mqtt.allow_anonymous",
        )
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
    _validate_upstreams(cfg)
    _validate_http(cfg)
    from ingestd.config.devices import compile_schemes

    compile_schemes(cfg)
    # Routes, lookups and tables are validated by compiling them, where the
    # configuration is used (ingestd.ingest.routes.compile_config: `config check`,
    # `db init`, `serve`), so that reading a file does not import the ingest side.


def _validate_upstreams(cfg: Config) -> None:
    """``[[upstream]]``: names unique, ports and bounds in range, filters valid, TLS files paired."""
    from ingestd._trie import validate_topic_filter

    seen: set[str] = set()
    ids: set[tuple[str, int, str]] = set()
    for i, up in enumerate(cfg.upstream):
        at = f"upstream[{i}]"
        if not up.name or "/" in up.name:
            raise ConfigError("must be a non-empty name without '/'", key=f"{at}.name")
        if up.name in seen:
            raise ConfigError(f"duplicate upstream name {up.name!r}", key=f"{at}.name")
        seen.add(up.name)
        if not up.host:
            raise ConfigError("must not be empty", key=f"{at}.host")
        if not 0 < up.port < 65536:
            raise ConfigError(f"must be 1..65535, got {up.port}", key=f"{at}.port")
        client_id = up.client_id if up.client_id is not None else f"ingestd-{up.name}"
        if not client_id:
            raise ConfigError(
                "must not be empty: a persistent upstream session is found by its client id",
                key=f"{at}.client_id",
            )
        if len(client_id.encode()) > 65535:
            raise ConfigError("longer than 65535 bytes", key=f"{at}.client_id")
        key = (up.host, up.port, client_id)
        if key in ids:
            # Two connections with one client id take each other's session over, forever.
            raise ConfigError(
                f"client id {client_id!r} is already used for {up.host}:{up.port}",
                key=f"{at}.client_id",
            )
        ids.add(key)
        if up.password is not None and up.username is None and up.protocol == 4:
            raise ConfigError(
                "MQTT 3.1.1 sends a password only with a username", key=f"{at}.password"
            )
        if not up.subscriptions:
            raise ConfigError("at least one topic filter is needed", key=f"{at}.subscriptions")
        for j, flt in enumerate(up.subscriptions):
            if not validate_topic_filter(flt):
                raise ConfigError(f"invalid topic filter {flt!r}", key=f"{at}.subscriptions[{j}]")
        if (up.cert_file is None) != (up.key_file is None):
            raise ConfigError("cert_file and key_file go together", key=f"{at}.cert_file")
        if not up.tls and (up.ca_file or up.cert_file):
            raise ConfigError("TLS files are set but tls = false", key=f"{at}.tls")
        if not 0 <= up.keepalive <= 65535:
            raise ConfigError(f"must be 0..65535, got {up.keepalive}", key=f"{at}.keepalive")
        if not 0 <= up.session_expiry <= 0xFFFFFFFF:
            raise ConfigError("must be 0..4294967295", key=f"{at}.session_expiry")
        if not 1 <= up.receive_maximum <= 65535:
            raise ConfigError(
                f"must be 1..65535, got {up.receive_maximum}", key=f"{at}.receive_maximum"
            )
        _positive(up.reconnect_min_s, f"{at}.reconnect_min_s")
        _positive(up.reconnect_max_s, f"{at}.reconnect_max_s")
        _positive(up.connect_timeout, f"{at}.connect_timeout")
        if up.reconnect_max_s < up.reconnect_min_s:
            raise ConfigError(
                f"must be >= reconnect_min_s ({up.reconnect_min_s})", key=f"{at}.reconnect_max_s"
            )


def _validate_http(cfg: Config) -> None:
    """``[http]``: tokens unique and non-empty, user tokens need an ACL; API bounds."""
    from ingestd._trie import validate_topic_name

    h = cfg.http
    seen: set[str] = set()
    for i, tok in enumerate(h.tokens):
        at = f"http.tokens[{i}]"
        text = tok if isinstance(tok, str) else tok.token
        if not text.strip():
            raise ConfigError("a token must not be empty", key=at)
        if text != text.strip() or any(c.isspace() for c in text):
            raise ConfigError("a token must not hold white space", key=at)
        if text in seen:
            raise ConfigError("this token is listed twice", key=at)
        seen.add(text)
        if not isinstance(tok, str):
            if not tok.user:
                raise ConfigError("must not be empty", key=f"{at}.user")
            if not cfg.mqtt.acl_file:
                # Without an ACL every user may do everything: the token would be an
                # admin token in disguise.
                raise ConfigError(
                    "a token tied to a user needs mqtt.acl_file (the user's rights come from it)",
                    key=f"{at}.user",
                )
    for name in ("rpc_timeout_max_ms", "rpc_timeout_default_ms", "rpc_max_pending"):
        _positive(getattr(h, name), f"http.{name}")
    for name in ("stream_max_clients", "stream_queue_messages"):
        _positive(getattr(h, name), f"http.{name}")
    if h.rpc_timeout_default_ms > h.rpc_timeout_max_ms:
        raise ConfigError(
            f"must be <= http.rpc_timeout_max_ms ({h.rpc_timeout_max_ms})",
            key="http.rpc_timeout_default_ms",
        )
    prefix = h.rpc_response_prefix
    if prefix.startswith("$") or not validate_topic_name(prefix + "/c/r"):
        raise ConfigError(
            f"{prefix!r} must be topic levels without wildcards and not start with '$'"
            " (devices publish their replies under it)",
            key="http.rpc_response_prefix",
        )
