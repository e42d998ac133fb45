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


def _validate_client_certificates(cfg: Config) -> None:
    """The client-certificate keys of [server] (docs/security.md, "TLS client certificates")."""
    s = cfg.server
    if s.tls_use_identity_as_username and s.tls_use_subject_as_username:
        raise ConfigError(
            "tls_use_identity_as_username and tls_use_subject_as_username are exclusive: set one",
            key="server.tls_use_subject_as_username",
        )
    for key in ("tls_use_identity_as_username", "tls_use_subject_as_username"):
        if getattr(s, key) and not s.tls_cafile:
            raise ConfigError(
                "needs server.tls_cafile: a client certificate is only trusted when it"
                " is verified against a CA",
                key=f"server.{key}",
            )
    if s.tls_identity_field != "cn" and not s.tls_use_identity_as_username:
        raise ConfigError(
            "only means something with tls_use_identity_as_username = true",
            key="server.tls_identity_field",
        )


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
    _validate_client_certificates(cfg)
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
                    "max_retained_per_tree",
                    "max_topic_length",
                    "max_topic_levels",
                    "max_subscriptions_per_client",
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
    if cfg.mqtt.max_topic_length > 65_535:
        raise ConfigError(
            "must be at most 65535 (MQTT's longest topic)", key="mqtt.max_topic_length"
        )
    _validate_upstreams(cfg)
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
