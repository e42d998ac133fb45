"""The configuration as msgspec Structs, with every default in one place."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Listeners and process-level settings."""

    # TCP listeners, "HOST:PORT" ("[::1]:1883" for IPv6).
    listen: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0:1883"])
    # What serves the `listen` sockets: "epoll", the compiled transport (raw sockets on
    # one epoll instance per listener, ~50 bytes per idle connection; Linux), or
    # "asyncio", one uvloop transport per connection (~1.2 KB each). TLS and WebSocket
    # listeners always use asyncio's. docs/architecture.md, "Transport".
    tcp_transport: Literal["epoll", "asyncio"] = "epoll"
    # MQTT over TLS listeners; need tls_certfile and tls_keyfile.
    tls_listen: list[str] = msgspec.field(default_factory=list)
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    # CA bundle that client certificates are verified against (PEM). Unset: clients
    # present no certificate. Set: see tls_require_certificate (docs/security.md).
    tls_cafile: str | None = None
    # With tls_cafile: true, a client without a valid certificate fails the TLS handshake
    # (Mosquitto's require_certificate); false, a client may present one (verified when
    # presented) or none.
    tls_require_certificate: bool = True
    # Take a TLS client's user name from its certificate instead of CONNECT: the
    # certificate's identity (tls_identity_field) or its whole subject (RFC 2253 string,
    # as Mosquitto prints it). The CONNECT's user name and password are then ignored and
    # no password is checked; a TLS client without a certificate is refused (CONNACK
    # 0x86 / 4). Applies to tls_listen and wss_listen only. Mosquitto's
    # use_identity_as_username / use_subject_as_username; at most one of them.
    tls_use_identity_as_username: bool = False
    tls_use_subject_as_username: bool = False
    # Which part of the certificate tls_use_identity_as_username takes: "cn" (the
    # subject's Common Name, as Mosquitto), or the first subjectAltName of one kind:
    # "san_email", "san_dns", "san_uri".
    tls_identity_field: Literal["cn", "san_email", "san_dns", "san_uri"] = "cn"
    # MQTT over WebSocket listeners (subprotocol "mqtt", any path).
    ws_listen: list[str] = msgspec.field(default_factory=list)
    # MQTT over secure WebSocket (wss); the same tls_certfile / tls_keyfile / tls_cafile.
    wss_listen: list[str] = msgspec.field(default_factory=list)
    # Prometheus /metrics, /healthz, /readyz.
    http_listen: str | None = "127.0.0.1:8080"
    data_dir: str = "./ingestd-data"
    log_level: str = "info"
    # "text", or "json": one JSON object per line (ts, level, logger, msg, fields).
    log_format: Literal["text", "json"] = "text"
    # One info line per client connect and disconnect (Mosquitto's connection_messages);
    # subscribes and unsubscribes are logged at debug.
    log_connections: bool = True
    # Seconds granted to flush and close sessions on SIGTERM/SIGINT.
    shutdown_timeout: float = 10.0
    # Worker processes (`serve --workers N`), each with its own event loop, broker,
    # ingest engine and database pool, sharing the MQTT listening ports; for
    # ingest-only traffic: clients on different workers share no sessions, retained
    # messages or deliveries (docs/scaling.md, "Workers"). Needs persistence.enabled =
    # false. Worker i serves HTTP on http_listen's port + i and keeps its spool and
    # overflow files in <data_dir>/worker-<i>.
    workers: int = 1
    # How workers share a listening port: "reuseport" (each binds its own socket with
    # SO_REUSEPORT; the kernel spreads connections by hashing their address and
    # port) or "inherit" (the parent binds one socket, every worker accepts from it).
    worker_sockets: Literal["reuseport", "inherit"] = "reuseport"


class TokenConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A bearer token tied to a user: the API applies that user's mqtt.acl_file rights
    (read for /api/stream and /api/retained, write for publish, webhook, commands, RPC)."""

    token: str
    user: str


class HttpConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The JSON API on server.http_listen: bearer tokens (required beyond loopback)."""

    # A plain string is an admin token (no ACL, every request audited);
    # {token = "...", user = "alice"} acts with alice's ACL rights.
    tokens: list[str | TokenConfig] = msgspec.field(default_factory=list)
    # Largest /api request body (bytes); a larger one is answered 413 without being read.
    max_body_bytes: int = 8 * 1024 * 1024
    # POST /api/ingest/webhook while the ingest engine holds ingest.max_pending_rows rows
    # (or the batch would take it past them): the request waits up to this many seconds
    # for the engine to drain, then is answered 503 with Retry-After (nothing published).
    # 0: answer 503 at once.
    ingest_wait_s: float = 5.0
    # The web console at "/" (static files; it reads and publishes through /api, so it
    # needs a token wherever the API does).
    console: bool = True
    # POST /api/devices/{client_id}/rpc: the largest timeout_ms a request may ask for,
    # the one it gets when it asks none, and how many may wait for a reply at once.
    rpc_timeout_max_ms: int = 30_000
    rpc_timeout_default_ms: int = 5_000
    rpc_max_pending: int = 1_000
    # MQTT 5 devices answer on "<rpc_response_prefix>/<client id>/<request id>" (their ACL
    # needs "pattern write ingestd/rpc/%c/#" when mqtt.acl_file is set).
    rpc_response_prefix: str = "ingestd/rpc"
    # GET /api/stream: open streams at most, and messages waiting per stream before
    # further ones are dropped (counted) for that slow client.
    stream_max_clients: int = 32
    stream_queue_messages: int = 1_000


class DeviceSchemeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How to reach a device: where its template variables come from, where commands go.

    Variables (``{name}`` in a template) come from ``match`` (a topic template the
    device publishes to, e.g. ``company/{company_id}/machine/{machine_id}/#``: the
    broker keeps the variables of the last matching topic each client published)
    or from ``client_id`` (a template of the client id, e.g. ``{machine_id}`` or
    ``router-{id}``); ``{client_id}`` and (command topics) ``{name}`` always exist.
    """

    name: str
    match: str | None = None
    client_id: str | None = None
    # Where POST /api/devices/{client_id}/commands/{name} publishes.
    command_topic: str = "devices/{client_id}/commands/{name}"
    # QoS of a command whose body does not say.
    qos: Literal[0, 1, 2] = 1
    # POST /api/devices/{client_id}/rpc: where the request goes (default: command_topic
    # with name "rpc"). MQTT 3.1.1 devices need rpc_response_topic: they answer there
    # with a JSON object carrying the request's id in rpc_correlation_field.
    rpc_request_topic: str | None = None
    rpc_response_topic: str | None = None
    rpc_correlation_field: str = "id"
    # "auto": MQTT 5 devices get Response Topic + Correlation Data, 3.1.1 devices the
    # JSON field; "json": every device the JSON field (firmware that ignores the v5
    # properties); "properties": MQTT 5 only (3.1.1 devices are refused).
    rpc_style: Literal["auto", "json", "properties"] = "auto"


class DevicesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Devices addressed through the API (commands, RPC); the first scheme that can
    fill its templates for a client is the one used."""

    schemes: list[DeviceSchemeConfig] = msgspec.field(default_factory=list)


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
    # Per-session memory queue of QoS 1/2 messages waiting for a free inflight slot or for
    # the client to come back; past it they overflow to disk (below).
    # Connected clients at once, and per peer address (0: no limit, as Mosquitto's
    # max_connections -1). A CONNECT past either gets CONNACK 0x97 Quota exceeded
    # (3.1.1: 3 server unavailable); a client taking over its own session is not refused.
    max_connections: int = 0
    max_connections_per_peer: int = 0
    max_queued_messages: int = 10_000
    max_queued_bytes: int = 16_777_216
    # Memory (bytes, all sessions together, each queued delivery counted as payload + topic
    # + ~400 bytes of objects) that a session past its own bounds above may borrow, so a
    # burst waits in memory rather than making the disk round trip below. 0: none.
    queue_pool_bytes: int = 67_108_864
    # Disk budget (bytes, all sessions together) for QoS 1/2 deliveries past a session's
    # memory queue: they wait in order in segment files under overflow_dir. Past the budget
    # a delivery is dropped, counted (overflow_full) and logged. 0 turns overflow off (the
    # memory queue is then the last word: dropped as session_queue_full).
    overflow_max_bytes: int = 1_073_741_824
    # Where those files go (emptied at start-up); default <server.data_dir>/overflow.
    overflow_dir: str | None = None
    # Ceiling on the Session Expiry Interval a v5 client may ask for (seconds).
    max_session_expiry: int = 7 * 24 * 3600
    # Session expiry for 3.1.1 clients with clean session 0 (seconds).
    persistent_session_expiry: int = 7 * 24 * 3600
    retain_available: bool = True
    # Retained messages kept, in all; past it a RETAIN PUBLISH to a topic with no retained
    # message is delivered but not retained (counted in ingestd_limits_hit_total).
    max_retained_messages: int = 1_000_000
    # The same per topic tree: topics whose first retained_tree_levels levels are equal
    # (company/acme with 2) share max_retained_per_tree (0: no limit per tree), so one
    # tenant cannot fill the store for all.
    max_retained_per_tree: int = 0
    retained_tree_levels: int = 2
    # Longest topic name or filter (UTF-8 bytes) and most levels in one, for PUBLISH,
    # SUBSCRIBE and will topics (0: no limit beyond MQTT's 65,535 bytes). Past either a
    # PUBLISH is dropped (MQTT 5 PUBACK/PUBREC 0x90 Topic Name invalid; 3.1.1 the plain
    # ack), a filter refused (SUBACK 0x8F / 0x80), a will refused (CONNACK 0x90 / 3).
    max_topic_length: int = 4_096
    max_topic_levels: int = 128
    # Subscriptions one session may hold (0: no limit); a SUBSCRIBE for one more filter
    # than that gets SUBACK 0x97 Quota exceeded (3.1.1: 0x80) for it.
    max_subscriptions_per_client: int = 0
    allow_anonymous: bool = True
    # "user:password" lines, passwords hashed as written by `ingestd passwd` or
    # Mosquitto's `mosquitto_passwd` ($7$ / $6$) (optional; reloaded on SIGHUP).
    password_file: str | None = None
    # Mosquitto acl_file (user / topic / pattern lines; docs/security.md). Unset: no
    # topic ACL. Set: default deny. Reloaded on SIGHUP.
    acl_file: str | None = None
    # Credentials in a PostgreSQL table (e.g. "mqtt_credentials" or "auth.mqtt_users"),
    # created by `ingestd db init` and managed with `ingestd user ...`: user name,
    # password hash, optional client-id pin and tenant topic prefix (a readwrite ACL
    # grant on PREFIX/#; set, it makes the ACL default deny), enabled flag. Changes
    # apply at once (LISTEN/NOTIFY). Unset: off.
    credentials_table: str | None = None
    # Seconds between full reloads of that table (a safety net for notifications
    # missed while not listening; every reconnect reloads too).
    credentials_refresh_interval: float = 60.0
    # Failed logins per peer address: after this many within auth_failure_window
    # seconds, that address's CONNECTs are refused for auth_failure_cooldown seconds
    # (0 turns the limit off).
    auth_failure_limit: int = 10
    auth_failure_window: float = 60.0
    auth_failure_cooldown: float = 60.0
    # Password checks (PBKDF2) run in threads, at most this many at once.
    auth_max_concurrent: int = 4
    # Seconds a new TCP connection may take to send CONNECT.
    connect_timeout: float = 10.0
    # Empty client ids get an assigned id with this prefix.
    assigned_id_prefix: str = "auto-"
    # Seconds between publishes of the $SYS/ingestd/... statistics (retained, QoS 0;
    # docs/api.md). 0 turns them off.
    sys_interval: float = 10.0


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
    # With no [[routes]] configured, every non-$ PUBLISH lands in the table
    # `messages` (topic, client_id, username, qos, retain, received_at, payload as
    # jsonb when it is JSON, payload_raw as bytea when it is not). Configuring any
    # route replaces it; false turns it off.
    default_route: bool = True
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
    with no source. ``fallback`` / ``fallback_value``: what the column takes
    when ``source`` gives no value; ``keep_when_missing`` (``latest`` routes):
    keep the stored value instead of writing NULL.
    """

    source: str | None = None
    type: str | None = None
    # Unit of numeric timestamps (timestamptz columns): seconds, ms, us, ns.
    unit: Literal["s", "ms", "us", "ns"] | None = None
    # Constant value (no source).
    value: Any = None
    # A message without a value for this column is a dead letter instead of a NULL.
    required: bool = False
    # When ``source`` gives no value (missing or null): another source (not a
    # payload path, e.g. ``received_at``), or a constant ``fallback_value``.
    fallback: str | None = None
    fallback_value: Any = None
    # ``latest`` routes: a message with no value for this column keeps the
    # stored one (``SET col = COALESCE(EXCLUDED.col, col)``) instead of NULLing it.
    keep_when_missing: bool = False


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
    # A "latest" table that holds device state: GET /api/devices shows its row next to
    # the device whose MQTT client id equals the row's device column. true: the key's
    # one column is that column; a string names it (a text key column).
    device_state: bool | str = False


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
    # Reloads caused by misses happen at most this often (seconds); a batch with
    # a miss waits for the next one rather than giving up. 0: no limit.
    miss_refresh_s: float = 1.0
    # A miss becomes on_miss only once the table was read at least this long
    # after the message was received, so a mapping row added moments after the
    # message is still found (the batch waits; 0: read after receipt suffices).
    miss_wait_s: float = 2.0
    # What a row whose key is not in the table becomes.
    on_miss: Literal["dead-letter", "null", "skip"] = "dead-letter"


class UpstreamConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One broker ingestd connects to as an MQTT client (``[[upstream]]``, repeatable).

    What arrives on ``subscriptions`` goes through the same routes as a local
    PUBLISH; a QoS 1/2 message is acknowledged upstream only once every
    after-commit route holding it committed (or spooled) its row. See docs/scaling.md.
    """

    # Names this upstream in logs, metrics and (unless client_id is set) the client id.
    name: str
    host: str
    port: int = 1883
    # Our client id at the upstream; default "ingestd-<name>". A persistent session
    # (clean_start = false) is found again by this id.
    client_id: str | None = None
    username: str | None = None
    # At most one of: the password itself, a file holding it (one line; a trailing
    # newline is ignored; read at start-up), or the name of an environment variable
    # holding it. Never logged; a missing/unreadable/empty file or an unset
    # variable stops start-up.
    password: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    tls: bool = False
    ca_file: str | None = None  # default: the system's trust store
    cert_file: str | None = None  # client certificate (with key_file)
    key_file: str | None = None
    # false: no certificate or host name check (tests, private CAs you cannot load).
    verify: bool = True
    # MQTT protocol level: 4 (3.1.1) or 5 (5.0).
    protocol: Literal[4, 5] = 5
    # false: the upstream keeps our subscriptions and queues QoS 1/2 messages while we
    # are away (v5 for session_expiry seconds; 3.1.1: clean session 0, the broker's expiry).
    clean_start: bool = False
    session_expiry: int = 3600
    # Topic filters; "$share/{group}/{filter}" makes several consumers split a stream.
    subscriptions: list[str]
    # Subscription QoS (maximum QoS the upstream sends us): 0, 1 or 2.
    qos: Literal[0, 1, 2] = 1
    keepalive: int = 60
    # QoS 1/2 messages the upstream may have unacknowledged towards us (v5 Receive
    # Maximum; 3.1.1: we stop reading past it).
    receive_maximum: int = 1024
    # Reconnect backoff: starts here, doubles up to reconnect_max_s, with jitter.
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # Seconds to connect (TCP, TLS, CONNACK) before the attempt counts as failed.
    connect_timeout: float = 10.0
    # true: messages also reach local subscribers (sessions, shared groups, retained)
    # through Broker.publish; false: only ingest routes take them.
    local_publish: bool = True


HOOK_EVENTS = (
    "client.connected",
    "client.disconnected",
    "will.published",
    "session.subscribed",
    "session.unsubscribed",
    "message.published",
)


class HookConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One event hook (``[[hooks]]``, repeatable): broker events POSTed as JSON to a URL.

    The broker only appends an event to the hook's bounded queue; a task per hook
    sends it (several per POST, as a JSON array). See docs/api.md, "Event hooks".
    """

    # Names the hook in logs and metrics (label hook="<name>").
    name: str
    # http:// or https:// URL the events are POSTed to.
    url: str
    # Which of HOOK_EVENTS to send.
    events: list[str]
    # message.published: the topic filters whose messages are sent (one or a list).
    filter: str | list[str] | None = None
    # Extra request headers, e.g. { Authorization = "Bearer ..." }.
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    # Seconds one POST may take (connect, send, answer) before it counts as failed.
    timeout_s: float = 5.0
    # A failed POST (connection error, timeout, 408, 429 or 5xx) is tried again this
    # many times, after retry_initial_ms doubling up to retry_max_ms; then its events
    # are counted as failed. Other 4xx answers fail at once.
    retries: int = 3
    retry_initial_ms: float = 200.0
    retry_max_ms: float = 5000.0
    # Events waiting to be sent; past it a new event is dropped and counted.
    max_queue: int = 10_000
    # Events per POST (a JSON array of up to this many).
    batch_max: int = 100


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration of one ingestd process."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    presence: PresenceConfig = msgspec.field(default_factory=PresenceConfig)
    persistence: PersistenceConfig = msgspec.field(default_factory=PersistenceConfig)
    lookups: list[LookupConfig] = msgspec.field(default_factory=list)
    routes: list[RouteConfig] = msgspec.field(default_factory=list)
    # Brokers to consume from as an MQTT client (upstream mode).
    upstream: list[UpstreamConfig] = msgspec.field(default_factory=list)
    # Broker events POSTed to HTTP endpoints.
    hooks: list[HookConfig] = msgspec.field(default_factory=list)
    devices: DevicesConfig = msgspec.field(default_factory=DevicesConfig)


# Sections that take INGESTD_<SECTION>__<KEY> environment overrides.
_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "server": ServerConfig,
    "http": HttpConfig,
    "mqtt": MqttConfig,
    "database": DatabaseConfig,
    "ingest": IngestConfig,
    "presence": PresenceConfig,
    "persistence": PersistenceConfig,
}

ENV_PREFIX = "INGESTD_"

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
