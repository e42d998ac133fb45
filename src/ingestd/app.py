"""App: one ingestd process — broker, listeners, ingest engine, HTTP endpoint.

``App.start()`` brings the parts up in dependency order (database and ingest
first, so no message arrives before its routes exist; listeners last) and
``App.stop()`` takes them down in reverse: stop accepting, close sessions with
v5 "server shutting down", flush the ingest batches, close the database.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ingestd.broker.channel import Channel
from ingestd.broker.server import Broker
from ingestd.config import Config
from ingestd.errors import ConfigError
from ingestd.transport.addr import parse_hostport
from ingestd.transport.tcp import StreamConnection

log = logging.getLogger("ingestd")


@dataclass
class BoundListener:
    kind: str  # "mqtt", "mqtts", "ws", "http"
    host: str
    port: int


# What each listener kind is, and where it is configured (for bind errors).
_LISTENERS = {
    "mqtt": ("MQTT", "server.listen", "--listen"),
    "mqtts": ("MQTT over TLS", "server.tls_listen", None),
    "ws": ("MQTT over WebSocket", "server.ws_listen", "--ws-listen"),
    "wss": ("MQTT over secure WebSocket", "server.wss_listen", "--wss-listen"),
    "http": ("the HTTP endpoint (/metrics, /healthz)", "server.http_listen", "--http-listen"),
}


def listen_error(kind: str, host: str, port: int, exc: OSError) -> OSError:
    """A bind failure that names the listener and the setting that chose its address.

    No fallback to another port: a listener that moves silently breaks the
    devices, scrapers and health checks configured for the address asked for.
    """
    what, key, flag = _LISTENERS[kind]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    how = f"{flag} or {key}" if flag else key
    reason = exc.strerror or str(exc)
    return OSError(exc.errno, f"cannot listen for {what} on {where}: {reason} (set by {how})")


def _channel_factory(broker: Broker, transport_name: str) -> Any:
    """What a transport calls with itself (the port) once its socket is up.

    Made once per listener, not per connection: an idle connection holds no closure."""
    return functools.partial(Channel, broker, transport_name=transport_name)


def _stream(broker: Broker, transport_name: str) -> Callable[[], StreamConnection]:
    """A TCP/TLS listener's protocol factory: one socket feeding one broker Channel."""
    return functools.partial(
        StreamConnection,
        _channel_factory(broker, transport_name),
        broker.config.mqtt.max_outbound_bytes,
        broker.stats,
        transport_name,
    )


class App:
    """Owns every long-lived object of the process (no module-level state)."""

    def __init__(
        self,
        config: Config,
        *,
        database: bool = True,
        listen_sockets: dict[tuple[str, str], socket.socket] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        # False: broker only (no PostgreSQL, no ingest routes, no presence).
        self.database = database
        # Worker processes (ingestd.workers): listening sockets the parent bound, by
        # (kind, configured address), or SO_REUSEPORT on sockets of our own.
        self.listen_sockets = listen_sockets or {}
        self.reuse_port = reuse_port
        self.ingest: Any = None
        self.broker: Broker | None = None
        self.servers: list[asyncio.AbstractServer] = []
        self.bound: list[BoundListener] = []
        self.extras: list[Any] = []  # started plugins with an async stop()
        self.http: Any = None
        self.lag: Any = None
        self.registry: Any = None
        self.collector: Any = None
        self.upstreams: Any = None
        self.sys: Any = None  # the $SYS publisher (mqtt.sys_interval > 0)
        self.credentials: Any = None  # the CredentialWatcher (mqtt.credentials_table)
        self._stopped = asyncio.Event()

    def port(self, kind: str = "mqtt") -> int:
        """The first bound port of a listener kind (tests listen on port 0)."""
        for b in self.bound:
            if b.kind == kind:
                return b.port
        raise LookupError(kind)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self.broker = broker = Broker(cfg, loop)
        if self.database:
            # Routes exist before the first message can arrive: start ingest before listening.
            from ingestd.ingest.engine import IngestEngine

            self.ingest = engine = IngestEngine(cfg)
            await engine.start()
            self.extras.append(engine)
            for topic_filter, sink in engine.sinks():
                broker.add_sink(topic_filter, sink)
            broker.add_listener(engine)
            broker.set_ingest(engine)
            if cfg.persistence.enabled:
                # Retained messages and sessions come back before any client can connect.
                from ingestd.broker.store import PgBrokerStore

                assert engine.database is not None  # started by engine.start()
                store = PgBrokerStore(
                    engine.database.pool, cfg.persistence.flush_interval_ms / 1000.0
                )
                await store.start()
                # The store first: restored sessions journal their deliveries in it.
                broker.store = store
                broker.journal = store if cfg.persistence.session_journal else None
                broker.ack_after_journal = cfg.persistence.ack_after_journal
                broker.restore(*await store.load())
                # Stopped before the engine (extras stop in reverse), while the pool is open.
                self.extras.append(store)
        if cfg.mqtt.credentials_table:
            # Before the listeners: the first CONNECT finds the table's snapshot loaded.
            await self._start_credentials(broker)
        await self._start_http(broker)
        if cfg.hooks:
            # Before the listeners: the first client's connect is an event too.
            from ingestd.http.hooks import EventHooks

            hooks = EventHooks(cfg.hooks)
            for topic_filter, hook_sink in hooks.sinks():
                broker.add_sink(topic_filter, hook_sink)
            broker.events = hooks
            await hooks.start()
            self.extras.append(hooks)  # stopped after the broker's connections closed
            self.collector.hooks = hooks.hooks
        if cfg.mqtt.sys_interval > 0:
            from ingestd import __version__
            from ingestd.broker.sysinfo import SysPublisher

            self.sys = SysPublisher(broker, cfg.mqtt.sys_interval, __version__)
            self.sys.start()
            self.extras.append(self.sys)
        m = cfg.mqtt
        for addr in cfg.server.listen:
            if cfg.server.tcp_transport == "epoll":
                await self._listen_epoll(broker, addr)
            else:
                await self._listen("mqtt", addr, _stream(broker, "tcp"))
        if cfg.server.tls_listen:
            ctx = self._tls_context()
            for addr in cfg.server.tls_listen:
                await self._listen("mqtts", addr, _stream(broker, "tls"), ssl=ctx)
        if cfg.server.ws_listen or cfg.server.wss_listen:
            from ingestd.transport.websocket import WebSocketProtocol

            def websocket(name: str) -> Callable[[], WebSocketProtocol]:
                return functools.partial(
                    WebSocketProtocol,
                    _channel_factory(broker, name),
                    m.max_packet_size,
                    m.max_outbound_bytes,
                    broker.stats,
                    name,
                )

            for addr in cfg.server.ws_listen:
                await self._listen("ws", addr, websocket("ws"))
            if cfg.server.wss_listen:
                ctx = self._tls_context()
                for addr in cfg.server.wss_listen:
                    await self._listen("wss", addr, websocket("wss"), ssl=ctx)
        if cfg.upstream:
            # Upstream mode: consume from other brokers into the same routes, after the
            # listeners (like a local client, a message needs its routes to exist).
            from ingestd.upstream import Upstreams

            self.upstreams = Upstreams(cfg.upstream, broker)
            await self.upstreams.start()
            self.extras.append(self.upstreams)  # stopped first: no message after the engine
            self.collector.upstreams = self.upstreams.clients
        # Everything built at start-up lives as long as the process: keep it out of the
        # collector's scans, and collect the young generation less often (every message
        # allocates a few objects). Measured: ~8% more msgs per broker CPU-second in
        # fan-in QoS 1 (ingestd bench --compare of both settings, 4 rounds).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        log.info(
            "ingestd listening on %s%s",
            ", ".join(f"{b.kind}://{b.host}:{b.port}" for b in self.bound) or "nothing",
            "".join(f"; upstream {u.name} at {u.host}:{u.port}" for u in cfg.upstream),
        )

    async def _start_credentials(self, broker: Broker) -> None:
        """mqtt.credentials_table: load it and keep watching it (docs/security.md).

        An unreachable database does not stop the start: the watcher retries, and
        the table's users are refused until a snapshot is loaded."""
        from ingestd.broker.credentials import CredentialWatcher

        cfg = self.config
        table = cfg.mqtt.credentials_table
        assert table
        if self.ingest is not None:
            dsn = self.ingest.database.dsn
        elif cfg.database.dsn:
            dsn = cfg.database.dsn
        else:
            raise ConfigError(
                "needs a database: without one (--no-db) set database.dsn",
                key="mqtt.credentials_table",
            )
        watcher = CredentialWatcher(
            dsn,
            table,
            cfg.mqtt.credentials_refresh_interval,
            broker.credentials_changed,
            cfg.database.connect_timeout,
        )
        await watcher.start()
        self.credentials = watcher
        self.extras.append(watcher)  # stopped before the engine closes the database

    async def _start_http(self, broker: Broker) -> None:
        """/metrics, /healthz, /readyz and the JSON API (server.http_listen; empty disables)."""
        from ingestd.http import Api, HttpServer, readiness_probe
        from ingestd.http.console import ConsoleRoutes
        from ingestd.metrics import LoopLagMonitor, build_registry

        self.lag = LoopLagMonitor()
        self.lag.start()
        self.registry, self.collector = build_registry(broker, self.ingest, self.lag)
        listen = self.config.server.http_listen
        if not listen:
            return
        try:
            host, port = parse_hostport(listen)
        except ValueError as exc:
            raise ConfigError(str(exc), key="server.http_listen") from None
        ingest = self.ingest
        ready = readiness_probe(
            # Ready once the MQTT listeners are up; with none (a pure upstream consumer,
            # server.listen = []) once started.
            lambda: (
                (not self.config.server.listen or any(b.kind == "mqtt" for b in self.bound))
                and not broker.closing
            ),
            lambda: None if ingest is None else ingest.database.pool,
        )
        h = self.config.http
        api = Api(broker, ingest, h.tokens, h, ingest_wait_s=h.ingest_wait_s)
        console = ConsoleRoutes() if h.console else None
        self.http = HttpServer(
            self.registry, ready, api=api, max_api_body_bytes=h.max_body_bytes, console=console
        )
        try:
            bound_port = await self.http.start(host, port)
        except OSError as exc:
            raise listen_error("http", host, port, exc) from None
        self.bound.append(BoundListener("http", host, bound_port))

    def _tls_context(self) -> ssl.SSLContext:
        s = self.config.server
        if not s.tls_certfile or not s.tls_keyfile:
            raise ConfigError(
                "tls_listen needs tls_certfile and tls_keyfile", key="server.tls_certfile"
            )
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(s.tls_certfile, s.tls_keyfile)
            if s.tls_cafile:
                ctx.load_verify_locations(s.tls_cafile)
                # Optional: a client may present a certificate (verified if it does).
                ctx.verify_mode = (
                    ssl.CERT_REQUIRED if s.tls_require_certificate else ssl.CERT_OPTIONAL
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files: {exc}", key="server.tls_certfile") from exc
        return ctx

    async def _listen(self, kind: str, addr: str, factory: Any, **kw: Any) -> None:
        try:
            host, port = parse_hostport(addr)
        except ValueError as exc:
            raise ConfigError(str(exc), key=f"server.{kind}_listen") from None
        loop = asyncio.get_running_loop()
        inherited = self.listen_sockets.get((kind, addr))
        try:
            if inherited is not None:
                server = await loop.create_server(factory, sock=inherited, backlog=4096, **kw)
            else:
                server = await loop.create_server(
                    factory,
                    host,
                    port,
                    reuse_address=True,
                    reuse_port=self.reuse_port or None,
                    backlog=4096,
                    **kw,
                )
        except OSError as exc:
            raise listen_error(kind, host, port, exc) from None
        self.servers.append(server)
        for sock in server.sockets:
            name = sock.getsockname()
            self.bound.append(BoundListener(kind, name[0], name[1]))

    async def _listen_epoll(self, broker: Broker, addr: str) -> None:
        """A ``server.listen`` address on the compiled epoll transport (transport/epoll.py)."""
        from ingestd.transport.epoll import serve

        try:
            host, port = parse_hostport(addr)
        except ValueError as exc:
            raise ConfigError(str(exc), key="server.listen") from None
        try:
            hub = serve(
                _channel_factory(broker, "tcp"),
                broker.config.mqtt.max_outbound_bytes,
                broker.stats,
                "tcp",
                host,
                port,
                sock=self.listen_sockets.get(("mqtt", addr)),
                reuse_port=self.reuse_port,
            )
        except OSError as exc:
            raise listen_error("mqtt", host, port, exc) from None
        self.servers.append(hub)
        for sock in hub.sockets:
            name = sock.getsockname()
            self.bound.append(BoundListener("mqtt", name[0], name[1]))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        if self.broker is not None:
            await self.broker.shutdown()
        for extra in reversed(self.extras):
            try:
                await extra.stop()
            except Exception:
                log.exception("error stopping %r", extra)
        for server in self.servers:
            await server.wait_closed()
        if self.http is not None:
            await self.http.stop()
        if self.lag is not None:
            await self.lag.stop()
        self._stopped.set()

    def reload_auth(self) -> bool:
        """Reload the password and ACL files (SIGHUP); False if one was bad (old one kept)."""
        if self.broker is None:
            return False
        log.info("SIGHUP: reloading the password and ACL files")
        return self.broker.reload_auth()

    async def run(
        self, *, lifeline: int | None = None, started: Callable[[], None] | None = None
    ) -> None:
        """Start, serve until SIGTERM/SIGINT, then stop gracefully.

        A worker process (ingestd.workers) passes ``lifeline``, the read end of a
        pipe its parent holds open: end of file there (the parent is gone) stops it
        as SIGTERM would; ``started`` is called once the listeners are up.
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP: re-read mqtt.password_file and mqtt.acl_file (a bad file keeps the old one).
        loop.add_signal_handler(signal.SIGHUP, self.reload_auth)
        if lifeline is not None:
            loop.add_reader(lifeline, stop.set)
        try:
            await self.start()
            if started is not None:
                started()
            await stop.wait()
            log.info("shutting down")
        finally:
            await self.stop()
