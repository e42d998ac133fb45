"""Checks of a decoded :class:`Config` beyond its types (ranges, listeners, combinations).

Routes, lookups and tables are not checked here: compiling them is their
validation (``ingestd.ingest.routes.compile_config``), done where they are used.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import msgspec

from ingestd.config.model import _LOG_LEVELS, HOOK_EVENTS, Config, MqttConfig, UpstreamConfig
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
                    "queue_pool_bytes",
                    "max_connections",
                    "max_connections_per_peer",
                    "sys_interval",
                    "max_retained_per_tree",
                    "max_topic_length",
                    "max_topic_levels",
                    "max_subscriptions_per_client",
                ),
            )
    if not cfg.mqtt.allow_anonymous and not (cfg.mqtt.password_file or cfg.mqtt.credentials_table):
        # Without a credential source every user name would be let in.
        raise ConfigError(
            "allow_anonymous = false needs a credential source: set mqtt.password_file"
            " or mqtt.credentials_table",
            key="mqtt.allow_anonymous",
        )
    table = cfg.mqtt.credentials_table
    if table is not None:
        parts = table.split(".")
        if len(parts) > 2 or not all(parts) or any(len(p.encode()) > 63 for p in parts):
            raise ConfigError(
                "must be a table name or schema.table (each part 1..63 bytes)",
                key="mqtt.credentials_table",
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
    _positive(cfg.http.max_body_bytes, "http.max_body_bytes")
    _positive(cfg.http.ingest_wait_s, "http.ingest_wait_s", allow_zero=True)
    if cfg.mqtt.max_topic_length > 65_535:
        raise ConfigError(
            "must be at most 65535 (MQTT's longest topic)", key="mqtt.max_topic_length"
        )
    _validate_upstreams(cfg)
    _validate_workers(cfg)
    _validate_hooks(cfg)
    _validate_http(cfg)
    from ingestd.config.devices import compile_schemes

    compile_schemes(cfg)
    # Routes, lookups and tables are validated by compiling them, where the
    # configuration is used (ingestd.ingest.routes.compile_config: `config check`,
    # `db init`, `serve`), so that reading a file does not import the ingest side.


MAX_WORKERS = 256


def _validate_workers(cfg: Config) -> None:
    """``server.workers > 1``: refuse what would be wrong across independent processes."""
    n = cfg.server.workers
    if not 1 <= n <= MAX_WORKERS:
        raise ConfigError(f"must be 1..{MAX_WORKERS}, got {n}", key="server.workers")
    if n == 1:
        return
    if cfg.persistence.enabled:
        # Each worker would restore every persisted session and retained message at
        # start-up and write its own behind over the same rows.
        raise ConfigError(
            f"must be false with server.workers = {n}: sessions and retained messages live"
            " in one worker's memory, and every worker would restore and overwrite the same"
            " persisted rows",
            key="persistence.enabled",
        )
    if cfg.server.http_listen:
        _host, port = parse_listen(cfg.server.http_listen)
        if port and port + n - 1 > 65535:
            raise ConfigError(
                f"worker i listens on port {port} + i: {port + n - 1} is past 65535",
                key="server.http_listen",
            )
    for i, up in enumerate(cfg.upstream):
        for j, flt in enumerate(up.subscriptions):
            if not flt.startswith("$share/"):
                raise ConfigError(
                    f"with server.workers = {n} every worker subscribes: {flt!r} would ingest"
                    " each message once per worker; use a shared subscription"
                    f" ($share/<group>/{flt}) so the workers split the stream",
                    key=f"upstream[{i}].subscriptions[{j}]",
                )


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
        password = upstream_password(up, at)
        if password is not None and up.username is None and up.protocol == 4:
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


def upstream_password(
    up: UpstreamConfig, at: str, env: Mapping[str, str] = os.environ
) -> str | None:
    """The password of one ``[[upstream]]``: ``password``, ``password_file`` or ``password_env``.

    Read where it is used (start-up: validation, then the client), never
    logged. Raises ConfigError naming the key (``upstream[0].password_file``),
    the file or variable and the reason: more than one source, a file missing,
    unreadable, not UTF-8 or empty, a variable unset or empty.
    """
    sources = [k for k in ("password", "password_file", "password_env") if getattr(up, k)]
    if len(sources) > 1:
        raise ConfigError(
            f"set only one of password, password_file, password_env (got {', '.join(sources)})",
            key=f"{at}.{sources[1]}",
        )
    if up.password_file:
        path = up.password_file
        try:
            with open(path, "rb") as f:
                raw = f.read(65_536)
        except OSError as e:
            raise ConfigError(
                f"cannot read {path}: {e.strerror or e}", key=f"{at}.password_file"
            ) from None
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text", key=f"{at}.password_file") from None
        # One line, as secrets are mounted (Docker, Kubernetes): a trailing newline is
        # the file's, not the password's.
        text = text.removesuffix("\n").removesuffix("\r")
        if not text:
            raise ConfigError(f"{path} is empty", key=f"{at}.password_file")
        if "\n" in text:
            raise ConfigError(
                f"{path} holds more than one line (the password is its only line)",
                key=f"{at}.password_file",
            )
        return text
    if up.password_env:
        value = env.get(up.password_env)
        if not value:
            raise ConfigError(
                f"environment variable {up.password_env} is {'empty' if value == '' else 'unset'}",
                key=f"{at}.password_env",
            )
        return value
    return up.password


# A header field name (RFC 9110 token) and value (no CR, LF or NUL).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(r"[\r\n\x00]")


def _validate_hooks(cfg: Config) -> None:
    """``[[hooks]]``: names unique, URLs http(s), known events, filters valid, bounds > 0."""
    from yarl import URL

    from ingestd._trie import validate_topic_filter

    seen: set[str] = set()
    for i, hook in enumerate(cfg.hooks):
        at = f"hooks[{i}]"
        if not hook.name or not _TOKEN.match(hook.name):
            raise ConfigError(
                "must be a non-empty name of letters, digits and -_. (a metric label)",
                key=f"{at}.name",
            )
        if hook.name in seen:
            raise ConfigError(f"duplicate hook name {hook.name!r}", key=f"{at}.name")
        seen.add(hook.name)
        try:
            url = URL(hook.url)
        except ValueError as e:
            raise ConfigError(f"not a URL: {e}", key=f"{at}.url") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(
                f"must be an http:// or https:// URL with a host, got {hook.url!r}",
                key=f"{at}.url",
            )
        if not hook.events:
            raise ConfigError(
                f"at least one event is needed, of: {', '.join(HOOK_EVENTS)}", key=f"{at}.events"
            )
        for j, event in enumerate(hook.events):
            if event not in HOOK_EVENTS:
                raise ConfigError(
                    f"unknown event {event!r}; expected one of: {', '.join(HOOK_EVENTS)}",
                    key=f"{at}.events[{j}]",
                )
        filters = hook_filters(hook.filter)
        if "message.published" in hook.events and not filters:
            raise ConfigError(
                "message.published needs the topic filters whose messages are sent",
                key=f"{at}.filter",
            )
        if filters and "message.published" not in hook.events:
            raise ConfigError(
                "a filter only applies to the message.published event", key=f"{at}.filter"
            )
        for flt in filters:
            if not validate_topic_filter(flt) or flt.startswith("$share/"):
                raise ConfigError(
                    f"invalid topic filter {flt!r} (no $share/ groups)", key=f"{at}.filter"
                )
        for name, value in hook.headers.items():
            if not _TOKEN.match(name):
                raise ConfigError(f"invalid header name {name!r}", key=f"{at}.headers")
            if _BAD_VALUE.search(value):
                raise ConfigError(
                    f"header {name!r}: value has CR, LF or NUL", key=f"{at}.headers.{name}"
                )
            if name.lower() in ("content-type", "content-length", "host", "transfer-encoding"):
                raise ConfigError(
                    f"header {name!r} is set by ingestd itself", key=f"{at}.headers.{name}"
                )
        _positive(hook.timeout_s, f"{at}.timeout_s")
        _positive(hook.retries, f"{at}.retries", allow_zero=True)
        _positive(hook.retry_initial_ms, f"{at}.retry_initial_ms")
        _positive(hook.retry_max_ms, f"{at}.retry_max_ms")
        if hook.retry_max_ms < hook.retry_initial_ms:
            raise ConfigError(
                f"must be >= retry_initial_ms ({hook.retry_initial_ms:g})",
                key=f"{at}.retry_max_ms",
            )
        _positive(hook.max_queue, f"{at}.max_queue")
        _positive(hook.batch_max, f"{at}.batch_max")


def hook_filters(value: str | list[str] | None) -> list[str]:
    """A hook's ``filter`` setting as a list (one filter, several, or none)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


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
