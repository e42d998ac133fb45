"""Prometheus metrics, read from plain counters at scrape time.

The hot path never calls the Prometheus client library: the broker bumps
plain ints in :class:`ingestd.broker.hooks.BrokerStats`, the ingest engine
bumps its own ints and :class:`Histogram` accumulators, and
:class:`IngestdCollector` turns them into metric families when ``/metrics``
is scraped. Everything here runs on the event loop thread (the HTTP server
calls ``generate_latest`` there), so the collector reads state without locks.

Wiring (see :func:`build_registry`)::

    lag = LoopLagMonitor()
    lag.start()
    registry, collector = build_registry(broker, engine, lag)
    # later, if the engine starts after the registry was built:
    collector.engine = engine
    ...
    await lag.stop()

What is read, and from where
----------------------------
Broker (``ingestd.broker.server.Broker``):

* ``broker.stats`` — ``BrokerStats``: ``connections_current`` /
  ``connections_total`` (dict protocol level -> int), ``messages_received`` /
  ``messages_delivered`` (list by QoS), ``bytes_received``, ``bytes_sent``,
  ``dropped`` (dict reason -> int), ``protocol_errors``, ``messages_fast_path``;
* ``broker.sessions`` — online when ``session.connection is not None``;
  ``len(session.inflight)`` summed as in-flight deliveries, ``len(session.queue)``
  summed as queued deliveries;
* ``broker.overflow`` — ``OverflowStore`` or None: ``used_bytes``,
  ``used_messages``, ``peak_bytes`` (the session overflow on disk);
  ``broker.pool`` — ``QueuePool`` or None: ``used``, ``peak``;
* ``broker.connections`` — per connection
  ``conn.transport.get_write_buffer_size() + conn._out_bytes`` (outbound bytes
  not yet on the wire: sum and max);
* ``len(broker.retained)`` and ``len(broker.trie)``.

Ingest engine (duck-typed; every attribute is optional and read with a
default, on ``engine.stats`` first and then on ``engine`` itself):

========================  =========================================  ==========================================
attribute                 type                                       metric
========================  =========================================  ==========================================
``rows_by_table``         ``dict[str, int]`` rows committed per table ``ingestd_ingest_rows_total{table}``
``rows_committed``        ``int`` (used when ``rows_by_table`` is      ``ingestd_ingest_rows_total{table="all"}``
                          absent, plus ``rows_replayed``)
``batch_rows``            :class:`Histogram` (rows per COPY)          ``ingestd_ingest_batch_rows``
``copy_seconds``          :class:`Histogram` (seconds per COPY)       ``ingestd_ingest_copy_seconds``
``pending_rows``          ``int``                                    ``ingestd_ingest_pending_rows``
``dead_letters``          ``int`` (when there is no ``dead_log``)     ``ingestd_ingest_dead_letters_total``
``dead_log.counts``       ``dict[(route, reason), int]``             ``ingestd_ingest_dead_letters_total{route,reason}``
``spool_bytes``           ``int``                                    ``ingestd_ingest_spool_bytes``
``write_errors``          ``int`` (failed write attempts)             ``ingestd_database_errors_total``
``messages_received``     ``int``                                    ``ingestd_ingest_messages_total``
``rows_spooled``          ``int``                                    ``ingestd_ingest_spooled_rows_total``
``rows_replayed``         ``int``                                    ``ingestd_ingest_replayed_rows_total``
``rows_skipped``          ``int``                                    ``ingestd_ingest_skipped_rows_total``
``rows_lost``             ``int``                                    ``ingestd_ingest_lost_rows_total``
``saturated``             ``bool``                                   ``ingestd_ingest_saturated``
========================  =========================================  ==========================================

The engine records a COPY with ``stats.batch_rows.observe(rows)`` and
``stats.copy_seconds.observe(seconds)`` (see :func:`batch_rows_histogram` and
:func:`copy_seconds_histogram` for the bucket layouts).

Upstream connections (``collector.upstreams``, set by the app: one
``ingestd.upstream.Upstream`` per ``[[upstream]]``), each labelled
``upstream="<name>"``: ``connected`` (``ingestd_upstream_connected``),
``messages_received``, ``acks_pending``, ``connects``, ``reconnects``,
``ack_failures``, ``sessions_lost`` (``ingestd_upstream_<attr>[_total]``). Their messages are not
in ``ingestd_messages_received_total`` (PUBLISHes from local clients).

Event hooks (``collector.hooks``, set by the app: one ``ingestd.http.hooks.Hook``
per ``[[hooks]]``), each labelled ``hook="<name>"``: ``queued``, ``sent``,
``failed``, ``dropped``, ``retries`` (``ingestd_hook_events_<attr>_total``,
``ingestd_hook_retries_total``) and ``depth`` (``ingestd_hook_queue_events``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from ingestd.accumulators import (
    BATCH_ROWS_BUCKETS,
    COPY_SECONDS_BUCKETS,
    Histogram,
    LoopLagMonitor,
    batch_rows_histogram,
    copy_seconds_histogram,
)

__all__ = [
    "BATCH_ROWS_BUCKETS",
    "COPY_SECONDS_BUCKETS",
    "Histogram",
    "IngestdCollector",
    "LoopLagMonitor",
    "batch_rows_histogram",
    "build_registry",
    "copy_seconds_histogram",
]


def _get(objs: Iterable[Any], name: str, default: Any = None) -> Any:
    """The first attribute ``name`` found on ``objs`` (None objects skipped)."""
    for o in objs:
        if o is None:
            continue
        v = getattr(o, name, None)
        if v is not None:
            return v
    return default


class IngestdCollector(Collector):
    """Builds every ``ingestd_*`` metric family from live objects at collect time.

    ``broker``, ``engine`` and ``lag`` are public attributes and may be set or
    replaced after the collector was registered (None: those families are
    omitted, except the ones with a meaningful zero).
    """

    def __init__(
        self,
        broker: Any = None,
        engine: Any = None,
        lag: LoopLagMonitor | None = None,
        *,
        version: str | None = None,
        codec: str | None = None,
    ) -> None:
        self.broker = broker
        self.engine = engine
        self.lag = lag
        # Upstream connections (ingestd.upstream.Upstream: name, connected,
        # messages_received, acks_pending, connects, reconnects, ack_failures).
        self.upstreams: list[Any] = []
        # Event hooks (ingestd.http.hooks.Hook: name, queued, sent, failed, dropped,
        # retries, depth).
        self.hooks: list[Any] = []
        if version is None:
            from ingestd import __version__

            version = __version__
        self.version: str = version
        self.codec: str = codec if codec is not None else _codec_implementation()

    # prometheus_client calls describe() at register time; returning [] makes it
    # skip the duplicate-name check (and calling collect() then, before the broker exists).
    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "ingestd_build_info",
            "ingestd version and packet codec implementation (value is always 1)",
            labels=["version", "codec"],
        )
        info.add_metric([self.version, self.codec], 1)
        yield info
        if self.broker is not None:
            yield from self._broker_metrics(self.broker)
        if self.engine is not None:
            yield from self._ingest_metrics(self.engine)
        if self.upstreams:
            yield from self._upstream_metrics(self.upstreams)
        if self.hooks:
            yield from self._hook_metrics(self.hooks)
        if self.lag is not None:
            yield GaugeMetricFamily(
                "ingestd_event_loop_lag_seconds",
                "Overshoot of the latest 0.25 s sleep on the event loop",
                value=self.lag.last,
            )
            yield GaugeMetricFamily(
                "ingestd_event_loop_lag_max_seconds",
                "Largest event-loop sleep overshoot since the previous scrape",
                value=self.lag.take_max(),
            )
            wait = self.lag.cpu_wait_seconds()
            if wait is not None:
                # A stall that grows this counter is the host's other work, not the loop's.
                yield CounterMetricFamily(
                    "ingestd_event_loop_cpu_wait_seconds",
                    "Seconds the event loop's thread was ready to run but waited for a CPU"
                    " (Linux scheduler statistics)",
                    value=wait,
                )

    # -- upstream mode ----------------------------------------------------------

    def _upstream_metrics(self, upstreams: list[Any]) -> Iterator[Metric]:
        for name, attr, doc, family in (
            ("ingestd_upstream_connected", "connected", "1 while connected and subscribed", 0),
            (
                "ingestd_upstream_messages_received",
                "messages_received",
                "PUBLISHes received from the upstream broker",
                1,
            ),
            (
                "ingestd_upstream_acks_pending",
                "acks_pending",
                "QoS 1/2 messages received and not yet acknowledged (waiting for commit)",
                0,
            ),
            ("ingestd_upstream_connects", "connects", "Successful connections", 1),
            (
                "ingestd_upstream_reconnects",
                "reconnects",
                "Connection attempts after the first",
                1,
            ),
            (
                "ingestd_upstream_ack_failures",
                "ack_failures",
                "Connections dropped because a message could not be made durable",
                1,
            ),
            (
                "ingestd_upstream_sessions_lost",
                "sessions_lost",
                "Reconnects that asked to resume a persistent session and found none"
                " (what the upstream held for us may be lost)",
                1,
            ),
        ):
            cls = CounterMetricFamily if family else GaugeMetricFamily
            m = cls(name, doc, labels=["upstream"])
            for up in upstreams:
                m.add_metric([up.name], float(getattr(up, attr, 0) or 0))
            yield m

    # -- event hooks -----------------------------------------------------------

    def _hook_metrics(self, hooks: list[Any]) -> Iterator[Metric]:
        for name, attr, doc, family in (
            ("ingestd_hook_events_queued", "queued", "Events accepted into the hook's queue", 1),
            ("ingestd_hook_events_sent", "sent", "Events in a POST answered 2xx", 1),
            (
                "ingestd_hook_events_failed",
                "failed",
                "Events in a POST that failed after its retries",
                1,
            ),
            (
                "ingestd_hook_events_dropped",
                "dropped",
                "Events dropped: the hook's queue was full (max_queue), or left at shutdown",
                1,
            ),
            ("ingestd_hook_retries", "retries", "POSTs tried again after a failure", 1),
            ("ingestd_hook_queue_events", "depth", "Events waiting or being sent", 0),
        ):
            cls = CounterMetricFamily if family else GaugeMetricFamily
            m = cls(name, doc, labels=["hook"])
            for hook in hooks:
                m.add_metric([hook.name], float(getattr(hook, attr, 0) or 0))
            yield m

    # -- broker --------------------------------------------------------------

    def _broker_metrics(self, broker: Any) -> Iterator[Metric]:
        st = broker.stats
        cur = CounterMetricFamily
        g = GaugeMetricFamily(
            "ingestd_connections",
            "Connected MQTT clients (after CONNACK) by protocol level (3, 4 = 3.1.1, 5)",
            labels=["protocol"],
        )
        for level, n in sorted(st.connections_current.items()):
            g.add_metric([str(level)], max(0, n))
        yield g
        # Not "ingestd_connections_total": OpenMetrics forbids a counter family
        # named like the gauge above.
        c = cur(
            "ingestd_connections_accepted",
            "MQTT clients accepted (CONNACK 0) by protocol level",
            labels=["protocol"],
        )
        for level, n in sorted(st.connections_total.items()):
            c.add_metric([str(level)], n)
        yield c
        c = cur(
            "ingestd_messages_received", "PUBLISH packets received from clients", labels=["qos"]
        )
        for q, n in enumerate(st.messages_received):
            c.add_metric([str(q)], n)
        yield c
        c = cur(
            "ingestd_messages_delivered",
            "PUBLISH packets sent to subscribers (at the QoS granted to each)",
            labels=["qos"],
        )
        for q, n in enumerate(st.messages_delivered):
            c.add_metric([str(q)], n)
        yield c
        yield cur("ingestd_received_bytes", "Bytes read from MQTT clients", value=st.bytes_received)
        yield cur("ingestd_sent_bytes", "Bytes written to MQTT clients", value=st.bytes_sent)
        c = cur(
            "ingestd_dropped_messages",
            "Messages not delivered, by reason (queue bounds, expiry, packet size)",
            labels=["reason"],
        )
        for reason, n in sorted(st.dropped.items()):
            c.add_metric([reason], n)
        yield c
        yield cur(
            "ingestd_protocol_errors",
            "Connections closed for a protocol violation",
            value=st.protocol_errors,
        )
        yield cur(
            "ingestd_auth_failures",
            "CONNECTs refused for bad or missing credentials, or while their peer"
            " address cools down after too many failures",
            value=st.auth_failures,
        )
        limits = CounterMetricFamily(
            "ingestd_limits_hit",
            "CONNECTs refused by a configured limit, by its key",
            labels=["limit"],
        )
        for key, n in sorted(getattr(st, "limits_hit", {}).items()):
            limits.add_metric([key], n)
        yield limits
        yield cur(
            "ingestd_credentials_revoked",
            "Connections closed because their user was removed, disabled, or its password"
            " or client-id pin changed (credentials table or password file)",
            value=st.credentials_revoked,
        )
        yield cur(
            "ingestd_acl_denied_publish",
            "PUBLISHes and wills refused by mqtt.acl_file (never routed nor ingested)",
            value=st.acl_denied_publish,
        )
        yield cur(
            "ingestd_acl_denied_deliveries",
            "Deliveries withheld because the subscriber may not read the topic",
            value=st.acl_denied_read,
        )
        yield cur(
            "ingestd_messages_fast_path",
            "PUBLISH packets handed to ingest batches by the compiled fast path"
            " (topics that only ingest routes subscribe to)",
            value=st.messages_fast_path,
        )

        conns = list(broker.connections)
        out_sum = out_max = 0
        for conn in conns:
            t = getattr(conn, "transport", None)
            size = getattr(conn, "_out_bytes", 0)
            if t is not None:
                try:
                    size += t.get_write_buffer_size()
                except Exception:  # closing transport, or one without the method
                    pass
            out_sum += size
            if size > out_max:
                out_max = size
        yield GaugeMetricFamily(
            "ingestd_open_sockets",
            "Open client sockets, including ones that have not sent CONNECT yet",
            value=len(conns),
        )
        yield GaugeMetricFamily(
            "ingestd_outbound_queue_bytes",
            "Bytes queued for clients but not yet written to their sockets (all connections)",
            value=out_sum,
        )
        yield GaugeMetricFamily(
            "ingestd_outbound_queue_max_bytes",
            "Largest outbound queue of a single connection, in bytes",
            value=out_max,
        )

        online = offline = inflight = queued = 0
        for s in list(broker.sessions.values()):
            if s.connection is not None:
                online += 1
            else:
                offline += 1
            inflight += len(s.inflight)
            queued += len(getattr(s, "queue", None) or ())
        g = GaugeMetricFamily("ingestd_sessions", "MQTT sessions by state", labels=["state"])
        g.add_metric(["online"], online)
        g.add_metric(["offline"], offline)
        yield g
        yield GaugeMetricFamily(
            "ingestd_inflight_messages",
            "Outbound QoS 1/2 deliveries sent and not yet acknowledged (all sessions)",
            value=inflight,
        )
        yield GaugeMetricFamily(
            "ingestd_queued_messages",
            "Outbound QoS 1/2 deliveries waiting for an inflight slot or an offline client",
            value=queued,
        )
        overflow = getattr(broker, "overflow", None)
        yield GaugeMetricFamily(
            "ingestd_session_overflow_bytes",
            "Bytes of QoS 1/2 deliveries waiting on disk past their session's memory queue"
            " (all sessions; bounded by mqtt.overflow_max_bytes)",
            value=0 if overflow is None else overflow.used_bytes,
        )
        yield GaugeMetricFamily(
            "ingestd_session_overflow_messages",
            "QoS 1/2 deliveries waiting on disk past their session's memory queue (all sessions)",
            value=0 if overflow is None else overflow.used_messages,
        )
        yield GaugeMetricFamily(
            "ingestd_session_overflow_peak_bytes",
            "The most ingestd_session_overflow_bytes has been since start",
            value=0 if overflow is None else overflow.peak_bytes,
        )
        pool = getattr(broker, "pool", None)
        yield GaugeMetricFamily(
            "ingestd_session_queue_pool_bytes",
            "Memory lent to sessions past their own queue bounds (all sessions; bounded by"
            " mqtt.queue_pool_bytes; payload + topic + object overhead per delivery)",
            value=0 if pool is None else pool.used,
        )
        yield GaugeMetricFamily(
            "ingestd_session_queue_pool_peak_bytes",
            "The most ingestd_session_queue_pool_bytes has been since start",
            value=0 if pool is None else pool.peak,
        )
        yield GaugeMetricFamily(
            "ingestd_retained_messages", "Retained messages stored", value=len(broker.retained)
        )
        yield GaugeMetricFamily(
            "ingestd_subscriptions",
            "Entries in the subscription trie (client subscriptions and ingest routes)",
            value=len(broker.trie),
        )

    # -- ingest --------------------------------------------------------------

    def _ingest_metrics(self, engine: Any) -> Iterator[Metric]:
        st = getattr(engine, "stats", None)
        src = (st, engine)
        rows = CounterMetricFamily(
            "ingestd_ingest_rows",
            "Rows committed to PostgreSQL, by table",
            labels=["table"],
        )
        by_table = _get(src, "rows_by_table")
        if isinstance(by_table, dict):
            for table, n in sorted(by_table.items()):
                rows.add_metric([str(table)], n)
        else:
            total = int(_get(src, "rows_committed", 0)) + int(_get(src, "rows_replayed", 0))
            rows.add_metric(["all"], total)
        yield rows
        for name, attr, bounds in (
            ("ingestd_ingest_batch_rows", "batch_rows", BATCH_ROWS_BUCKETS),
            ("ingestd_ingest_copy_seconds", "copy_seconds", COPY_SECONDS_BUCKETS),
        ):
            h = _get(src, attr)
            if not isinstance(h, Histogram):
                h = Histogram(bounds)  # engine does not record it: an empty histogram
            yield HistogramMetricFamily(
                name,
                "Rows per COPY batch" if attr == "batch_rows" else "Duration of one COPY batch",
                buckets=h.buckets(),
                sum_value=h.sum,
            )
        yield GaugeMetricFamily(
            "ingestd_ingest_pending_rows",
            "Rows received and not yet committed or spooled",
            value=_get(src, "pending_rows", 0),
        )
        yield GaugeMetricFamily(
            "ingestd_ingest_saturated",
            "1 while pending rows are at the bound and publishers are paused",
            value=1 if _get(src, "saturated", False) else 0,
        )
        yield GaugeMetricFamily(
            "ingestd_ingest_spool_bytes",
            "Bytes waiting in the local spool for PostgreSQL",
            value=_get(src, "spool_bytes", 0),
        )
        dead_log = getattr(engine, "dead_log", None)
        counts = getattr(dead_log, "counts", None)
        if isinstance(counts, dict):
            dead = CounterMetricFamily(
                "ingestd_ingest_dead_letters",
                "Messages written to the dead-letter table, by route and reason",
                labels=["route", "reason"],
            )
            for (route, reason), n in sorted(counts.items()):
                dead.add_metric([route, reason], n)
            yield dead
        else:
            yield CounterMetricFamily(
                "ingestd_ingest_dead_letters",
                "Messages written to the dead-letter table",
                value=_get(src, "dead_letters", 0),
            )
        for name, attr, doc in (
            (
                "ingestd_database_errors",
                "write_errors",
                "Failed PostgreSQL write attempts (each retry counts)",
            ),
            ("ingestd_ingest_messages", "messages_received", "Messages taken by ingest routes"),
            ("ingestd_ingest_spooled_rows", "rows_spooled", "Rows appended to the local spool"),
            ("ingestd_ingest_replayed_rows", "rows_replayed", "Rows committed from the spool"),
            (
                "ingestd_ingest_skipped_rows",
                "rows_skipped",
                "Rows skipped (lookup miss with on_miss = skip)",
            ),
            (
                "ingestd_ingest_lost_rows",
                "rows_lost",
                "Rows neither committed nor spooled at shutdown",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=_get(src, attr, 0))


def _codec_implementation() -> str:
    try:
        from ingestd.build_info import codec_implementation

        return codec_implementation()
    except Exception:
        return "unknown"


def build_registry(
    broker: Any = None,
    engine: Any = None,
    lag: LoopLagMonitor | None = None,
    *,
    process_metrics: bool = True,
) -> tuple[CollectorRegistry, IngestdCollector]:
    """A private registry (never the global one) holding an :class:`IngestdCollector`.

    With ``process_metrics`` it also holds prometheus_client's process and
    platform collectors (``process_resident_memory_bytes``,
    ``process_cpu_seconds_total``, ``python_info``, ...).
    """
    from prometheus_client import PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    collector = IngestdCollector(broker, engine, lag)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry, collector
