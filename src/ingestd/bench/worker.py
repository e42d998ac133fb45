"""A load-generator worker process: one uvloop event loop driving a share of the clients.

The parent (:mod:`ingestd.bench.runner`) talks to each worker over a pipe:

==========  ==========================  ==========================================
direction   message                     meaning
==========  ==========================  ==========================================
worker ->   ("ready", info)             clients connected (and subscribed)
parent ->   ("go", {"deadline_ns"})     start publishing / connecting now
worker ->   ("published", info)         every publisher finished (acked + PINGRESP)
parent ->   ("drain", {"expected"})     wait until each subscriber has ``expected``
                                        distinct messages, or is idle for the drain timeout
worker ->   ("result", info)            final counts, latency samples; the worker exits
worker ->   ("error", text)             something failed; the worker exits
==========  ==========================  ==========================================

Progress (sent, acked, received) is published in a shared array the parent
polls for its status line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ingestd.bench import procstat

if TYPE_CHECKING:
    from ingestd.bench.client import PreEncoded

TOPIC_FILTER = "company/+/machine/+/telemetry"

# Ingest messages per worker that are encoded before the run (~150 bytes each); a
# larger count, or a --duration run, builds each batch as it goes.
PREBUILD_MAX = 2_000_000


def publisher_topic(i: int) -> str:
    return f"company/c{i}/machine/m{i}/telemetry"


@dataclass
class Plan:
    """Everything a worker needs (picklable)."""

    scenario: str
    host: str
    port: int
    version: int = 4
    qos: int = 0
    payload_size: int = 100
    publishers: int = 1
    subscribers: int = 0
    messages: int | None = None  # per publisher
    duration: float | None = None  # seconds of publishing
    rate: float | None = None  # messages/s over all publishers
    inflight: int = 64
    processes: int = 1
    keepalive: int = 60
    topic_filter: str = TOPIC_FILTER
    run_id: str = ""
    connections: int = 0  # "connections" scenario
    hold: float = 0.0  # seconds the idle connections stay open after all connected
    connect_concurrency: int = 256
    # connections scenario: connect from 127.0.0.1 .. 127.0.0.N round-robin (each
    # source address has ~28k ephemeral ports; loopback only)
    source_addresses: int = 1
    drain_timeout: float = 5.0
    batch: int = 64
    # Subscribers connect with a persistent session (removed after the run).
    persistent_subscribers: bool = False
    client_prefix: str = "bench"
    connect_timeout: float = 30.0
    latency_cap: int = 1_000_000
    # Seconds each subscriber stops reading its socket once it has half of the messages
    # (then it resumes): a consumer that falls behind mid-run (0: never).
    stall_subscriber: float = 0.0
    # Publisher i logs in as c{i}, subscribers as "reader" (an ACL's user sections).
    usernames: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def _split(self) -> tuple[int, int]:
        """(first publisher worker, number of publisher workers).

        With one process everything shares it. With more, subscribers get the
        first workers (at most half) and publishers the rest, so receiving and
        sending do not compete for one event loop.
        """
        if self.processes == 1 or not self.subscribers or not self.publishers:
            return 0, self.processes
        ps = min(self.subscribers, max(1, self.processes // 2))
        return ps, self.processes - ps

    def my_subscribers(self, w: int) -> list[int]:
        first_pub, _ = self._split()
        n_sub_workers = first_pub or self.processes
        if w >= n_sub_workers:
            return []
        return [j for j in range(self.subscribers) if j % n_sub_workers == w]

    def my_publishers(self, w: int) -> list[int]:
        first, n = self._split()
        if w < first:
            return []
        return [i for i in range(self.publishers) if i % n == w - first]

    def source_address(self, k: int) -> str | None:
        """The local address connection ``k`` binds (None: the kernel's choice)."""
        if self.source_addresses <= 1:
            return None
        return f"127.0.0.{1 + k % self.source_addresses}"

    def my_connections(self, w: int) -> list[int]:
        return [k for k in range(self.connections) if k % self.processes == w]

    def publisher_rate(self) -> float | None:
        return self.rate / self.publishers if self.rate and self.publishers else None


def json_payloads(
    run_id: str, pub: int, payload_size: int, count: int | None, deadline_ns: int | None
) -> Iterator[bytes]:
    """The ingest scenario's JSON payloads of one publisher, sequence numbers 0, 1, ...

    Each is one object ``{"run", "pub", "seq", "ts" (time.time_ns()),
    "temperature", "pressure", "pad"}`` without spaces, where ``pad`` is a
    string of ``x`` that makes the payload exactly ``payload_size`` bytes when
    it would be shorter (``pad`` is empty otherwise). Stops after ``count``
    payloads or at ``deadline_ns`` (``time.monotonic_ns()``), whichever comes
    first; the deadline is checked before each payload.
    """
    # Everything but seq, ts and the pad is formatted once; the temperature
    # cycles through 100 values (20.0 .. 29.9).
    head = b'{"run":%s,"pub":%d,"seq":' % (json.dumps(run_id).encode(), pub)
    temps = [b',"temperature":%s' % repr(20.0 + k / 10).encode() for k in range(100)]
    tail = b',"pressure":%s,"pad":"' % repr(1000.0 + (pub % 50)).encode()
    ends: dict[int, bytes] = {}  # pad length -> pad + '"}' (a few lengths occur)
    ts_key = b',"ts":'
    clock = time.monotonic_ns
    now_ns = time.time_ns
    seq = 0
    while (count is None or seq < count) and (deadline_ns is None or clock() < deadline_ns):
        body = b"%s%d%s%d%s%s" % (head, seq, ts_key, now_ns(), temps[seq % 100], tail)
        short = max(payload_size - 2 - len(body), 0)
        end = ends.get(short)
        if end is None:
            end = ends[short] = b"x" * short + b'"}'
        yield body + end
        seq += 1


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def worker_main(plan: Plan, w: int, conn: Any, progress: Any) -> None:
    """Process entry point (multiprocessing target)."""
    raise_fd_limit()
    try:
        import uvloop

        uvloop.run(_Worker(plan, w, conn, progress).run())
    except BaseException as e:  # reported to the parent, which prints it
        with contextlib.suppress(Exception):
            conn.send(("error", f"worker {w}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        with contextlib.suppress(Exception):
            conn.close()


class _Worker:
    def __init__(self, plan: Plan, w: int, conn: Any, progress: Any) -> None:
        self.plan = plan
        self.w = w
        self.conn = conn
        self.progress = progress
        self.subs: list[Any] = []
        self.pubs: list[tuple[int, Any]] = []
        self.errors: list[str] = []
        self.peak_util = 0.0
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._stalled_until_ns = 0  # when the last --stall-subscriber pause ends
        self._wait0: float | None = None  # run-queue wait at "go" (procstat)

    async def recv(self) -> tuple[str, Any]:
        msg = await asyncio.get_running_loop().run_in_executor(None, self.conn.recv)
        assert isinstance(msg, tuple)
        return msg

    def send(self, kind: str, info: Any) -> None:
        self.conn.send((kind, info))

    async def run(self) -> None:
        if self.plan.scenario == "connections":
            await self._run_connections()
        else:
            await self._run_traffic()

    # -- clients -------------------------------------------------------------------

    async def _open(self, client_id: str, **kw: Any) -> Any:
        from ingestd.bench.client import BenchClient

        p = self.plan
        return await BenchClient.open(
            p.host,
            p.port,
            client_id,
            p.version,
            keepalive=p.keepalive,
            timeout=p.connect_timeout,
            latency_cap=p.latency_cap,
            **kw,
        )

    async def _gather_limited(self, coros: list[Any]) -> list[Any]:
        sem = asyncio.Semaphore(self.plan.connect_concurrency)

        async def one(c: Any) -> Any:
            async with sem:
                return await c

        return await asyncio.gather(*(one(c) for c in coros))

    def _update_progress(self) -> None:
        now, cpu = time.monotonic(), time.process_time()
        t_prev, c_prev = self._cpu_mark
        if now - t_prev >= 0.19:
            self.peak_util = max(self.peak_util, (cpu - c_prev) / (now - t_prev))
            self._cpu_mark = (now, cpu)
        base = self.w * 3
        arr = self.progress
        arr[base] = sum(c.sent for _, c in self.pubs)
        arr[base + 1] = sum(c.acked for _, c in self.pubs)
        arr[base + 2] = sum(s.tracker.received if s.tracker else 0 for s in self.subs)

    async def _progress_loop(self) -> None:
        while True:
            self._update_progress()
            await asyncio.sleep(0.2)

    # -- publish/subscribe scenarios -------------------------------------------------

    async def _run_traffic(self) -> None:
        p = self.plan
        pre = f"{p.client_prefix}-{p.run_id}"
        self.subs = await self._gather_limited(
            [
                self._open(
                    f"{pre}-s{j}",
                    publishers=p.publishers,
                    track=True,
                    persistent=p.persistent_subscribers,
                    username="reader" if p.usernames else None,
                )
                for j in p.my_subscribers(self.w)
            ]
        )
        await asyncio.gather(*(s.subscribe(p.topic_filter, p.qos) for s in self.subs))
        my_pubs = p.my_publishers(self.w)
        clients = await self._gather_limited(
            [self._open(f"{pre}-p{i}", username=f"c{i}" if p.usernames else None) for i in my_pubs]
        )
        self.pubs = list(zip(my_pubs, clients, strict=True))
        # A count of ingest messages that fits in memory is encoded now, before the clock
        # starts: a fleet's devices build their messages on their own CPUs, not on the
        # cores the broker and PostgreSQL share with this generator.
        from ingestd.bench.client import PreEncoded

        prebuilt: dict[int, PreEncoded] = {}
        if (
            p.scenario == "ingest"
            and p.messages is not None
            and p.duration is None
            and p.messages * len(my_pubs) <= PREBUILD_MAX
        ):
            prebuilt = {
                i: PreEncoded(
                    publisher_topic(i),
                    json_payloads(p.run_id, i, p.payload_size, p.messages, None),
                    p.qos,
                    c.version,
                )
                for i, c in self.pubs
            }
        # What exists now lives for the run: out of the collector's scans, as the broker
        # does at start-up (a young collection found the clients' buffers and took 3-7 ms
        # in the middle of a latency run); collect the young generation less often.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        self.send("ready", {"subscribers": len(self.subs), "publishers": len(self.pubs)})
        kind, info = await self.recv()
        if kind != "go":
            return
        self._cpu_mark = (time.monotonic(), time.process_time())
        progress = asyncio.get_running_loop().create_task(self._progress_loop())
        stall = None
        if p.stall_subscriber and self.subs and p.messages:
            stall = asyncio.get_running_loop().create_task(
                self._stall_subscribers(p.publishers * p.messages // 2, p.stall_subscriber)
            )
        t0 = time.monotonic_ns()
        cpu0 = time.process_time()
        self._wait0 = procstat.runqueue_wait_seconds("self")
        rate = p.publisher_rate()
        deadline = info.get("deadline_ns")
        if p.scenario == "ingest":
            coros = [
                c.publish_each(
                    publisher_topic(i),
                    prebuilt.get(i)
                    or json_payloads(p.run_id, i, p.payload_size, p.messages, deadline),
                    p.qos,
                    window=p.inflight,
                    batch=p.batch,
                )
                for i, c in self.pubs
            ]
        else:
            coros = [
                c.publish_stream(
                    i,
                    publisher_topic(i),
                    p.qos,
                    p.payload_size,
                    count=p.messages,
                    deadline_ns=deadline,
                    rate=rate,
                    window=p.inflight,
                    batch=p.batch,
                )
                for i, c in self.pubs
            ]
        results = await asyncio.gather(*coros, return_exceptions=True)
        for (i, c), r in zip(self.pubs, results, strict=True):
            if isinstance(r, BaseException):
                self.errors.append(f"publisher {i}: {r}")
            elif c.rejected:
                self.errors.append(f"publisher {i}: {c.rejected} publishes rejected by the server")
        t_pub = time.monotonic_ns()
        self.send(
            "published",
            {
                "sent": {i: c.sent for i, c in self.pubs},
                "acked": {i: c.acked for i, c in self.pubs},
                "t_start_ns": t0,
                "t_done_ns": t_pub,
            },
        )
        kind, info = await self.recv()
        expected = int(info.get("expected", 0)) if kind == "drain" else 0
        await self._drain(expected)
        progress.cancel()
        if stall is not None:
            stall.cancel()
        self._update_progress()
        cpu = time.process_time() - cpu0
        self.send("result", self._result(cpu))
        await asyncio.gather(
            *(c.disconnect() for c in [*self.subs, *(c for _, c in self.pubs)]),
            return_exceptions=True,
        )
        if p.persistent_subscribers:
            # Leave no session behind: a clean-start connection discards it.
            for s in self.subs:
                with contextlib.suppress(Exception):
                    await (await self._open(s.client_id)).disconnect()

    async def _stall_subscribers(self, after: int, seconds: float) -> None:
        """Each subscriber stops reading its socket once it has ``after`` distinct
        messages, for ``seconds``, then reads again (a consumer that falls behind)."""

        async def one(s: Any) -> None:
            while s.tracker.unique < after:
                await asyncio.sleep(0.005)
            if s.transport is None:
                return
            s.transport.pause_reading()
            until = time.monotonic_ns() + int(seconds * 1e9)
            self._stalled_until_ns = max(self._stalled_until_ns, until)
            try:
                await asyncio.sleep(seconds)
            finally:
                if s.transport is not None:
                    s.transport.resume_reading()

        await asyncio.gather(*(one(s) for s in self.subs))

    async def _drain(self, expected: int) -> None:
        """Wait until every subscriber has ``expected`` distinct messages or stops receiving."""
        timeout_ns = int(self.plan.drain_timeout * 1e9)
        start = time.monotonic_ns()
        while self.subs:
            if all(s.tracker.unique >= expected for s in self.subs):
                return
            # A stalled subscriber receives nothing on purpose: its timeout starts at the end.
            last = max([start, self._stalled_until_ns, *(s.last_rx_ns for s in self.subs)])
            if time.monotonic_ns() - last > timeout_ns:
                return
            if all(s.transport is None for s in self.subs):
                return
            await asyncio.sleep(0.01)

    def _result(self, cpu: float) -> dict[str, Any]:
        subs = []
        lat_parts = []
        for s in self.subs:
            t = s.tracker
            subs.append(
                {
                    "received": t.received,
                    "unique": t.unique,
                    "duplicates": t.duplicates,
                    "unique_by_publisher": t.unique_by_publisher(),
                    "foreign": s.foreign,
                    "first_rx_ns": s.first_rx_ns,
                    "last_rx_ns": s.last_rx_ns,
                }
            )
            lat_parts.append((s.latency.samples, s.latency.stride))
            if s.error is not None:
                self.errors.append(str(s.error))
        ack_parts = [(c.ack_latency.samples, c.ack_latency.stride) for _, c in self.pubs]
        return {
            "subscribers": subs,
            "latency": lat_parts,
            "latency_max_us": max([0, *(s.latency.max_us for s in self.subs)]),
            "ack_latency": ack_parts,
            "ack_latency_max_us": max([0, *(c.ack_latency.max_us for _, c in self.pubs)]),
            "acked": {i: c.acked for i, c in self.pubs},
            "rejected": sum(c.rejected for _, c in self.pubs),
            "window_wait_s": sum(c.window_wait_ns for _, c in self.pubs) / 1e9,
            "cpu_s": cpu,
            "runqueue_wait_s": _since(self._wait0, procstat.runqueue_wait_seconds("self")),
            "peak_util": self.peak_util,
            "errors": self.errors,
            "pid": os.getpid(),
        }

    # -- connections scenario ----------------------------------------------------------

    async def _run_connections(self) -> None:
        p = self.plan
        mine = p.my_connections(self.w)
        self.send("ready", {"connections": len(mine)})
        kind, _ = await self.recv()
        if kind != "go":
            return
        pre = f"{p.client_prefix}-{p.run_id}-c"
        t0 = time.monotonic_ns()
        cpu0 = time.process_time()
        results = await self._gather_limited(
            [_capture(self._open(f"{pre}{k}", source=p.source_address(k))) for k in mine]
        )
        t1 = time.monotonic_ns()
        cpu1 = time.process_time()
        clients = [r for r in results if not isinstance(r, BaseException)]
        failures = [str(r) for r in results if isinstance(r, BaseException)]
        self.send(
            "published",
            {
                "connected": len(clients),
                "failed": len(failures),
                "errors": failures[:5],
                "t_start_ns": t0,
                "t_done_ns": t1,
            },
        )
        kind, _ = await self.recv()  # "drain": hold until the parent has measured
        alive = sum(1 for c in clients if c.transport is not None)
        cpu = time.process_time() - cpu0
        self.send(
            "result",
            {
                "alive": alive,
                "cpu_s": cpu,
                # connecting phase only: CPU seconds per wall second
                "peak_util": (cpu1 - cpu0) / max((t1 - t0) / 1e9, 1e-9),
                "errors": failures[:5],
                "subscribers": [],
                "latency": [],
                "ack_latency": [],
                "latency_max_us": 0,
                "ack_latency_max_us": 0,
                "acked": {},
                "rejected": 0,
                "pid": os.getpid(),
            },
        )
        await self._gather_limited([c.disconnect() for c in clients])


def _since(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


async def _capture(coro: Any) -> Any:
    try:
        return await coro
    except Exception as e:
        return e
