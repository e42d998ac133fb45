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
                in ("topic_alias_maximum", "auth_failure_limit", "overflow_max_bytes"),
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
    # Routes, lookups and tables are validated by compiling them, where the
    # configuration is used (ingestd.ingest.routes.compile_config: `config check`,
    # `db init`, `serve`), so that reading a file does not import the ingest side.
