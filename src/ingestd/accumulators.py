"""Accumulators the hot path writes and the Prometheus collector reads.

``Histogram`` (fixed buckets, plain ints: rows per COPY, seconds per COPY)
and ``LoopLagMonitor`` (event-loop stalls, and the loop thread's wait for a CPU).
No Prometheus objects here: the
collector in :mod:`ingestd.metrics` turns them into metric families at
scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from bisect import bisect_left
from collections.abc import Sequence

# Rows per COPY: ingest.batch_rows defaults to 5000; partial batches flushed by the timer are smaller.
BATCH_ROWS_BUCKETS: tuple[float, ...] = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# Seconds per COPY (one transaction holding one batch).
COPY_SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Histogram:
    """A fixed-bucket histogram accumulator for the hot path (no locks, no allocation).

    ``counts[i]`` is the number of observations ``v`` with
    ``bounds[i-1] < v <= bounds[i]`` (non-cumulative; the last slot is
    ``> bounds[-1]``). :meth:`buckets` gives Prometheus' cumulative ``le``
    buckets at scrape time.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        b = tuple(float(x) for x in bounds)
        if not b or any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
            raise ValueError("histogram bounds must be non-empty and strictly increasing")
        if math.isinf(b[-1]):
            b = b[:-1]
        self.bounds = b
        self.counts: list[int] = [0] * (len(b) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            out.append((_le(bound), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out

    def reset(self) -> None:
        for i in range(len(self.counts)):
            self.counts[i] = 0
        self.sum = 0.0
        self.count = 0

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, sum={self.sum:g})"


def batch_rows_histogram() -> Histogram:
    """The accumulator for ``ingestd_ingest_batch_rows`` (rows per COPY)."""
    return Histogram(BATCH_ROWS_BUCKETS)


def copy_seconds_histogram() -> Histogram:
    """The accumulator for ``ingestd_ingest_copy_seconds`` (seconds per COPY)."""
    return Histogram(COPY_SECONDS_BUCKETS)


def _le(bound: float) -> str:
    # Prometheus' own formatting of bucket bounds (floatToGoString-like: 5000.0, 0.001).
    return repr(float(bound))


class LoopLagMonitor:
    """Measures event-loop lag: sleeps ``interval`` seconds and records the overshoot.

    ``last`` is the latest overshoot; :meth:`take_max` returns the largest one
    since its previous call (each scrape sees the worst stall of its window);
    ``max_ever`` is the largest since start. :meth:`cpu_wait_seconds` tells the
    two kinds of stall apart: it grows while the loop's thread is ready to run
    but waits for a CPU (other processes on the cores), not while the loop works.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.last = 0.0
        self.max_ever = 0.0
        self.samples = 0
        self._window_max = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start measuring on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="ingestd-loop-lag"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def record(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.last = lag
        self.samples += 1
        if lag > self._window_max:
            self._window_max = lag
        if lag > self.max_ever:
            self.max_ever = lag

    @staticmethod
    def cpu_wait_seconds(path: str = "/proc/thread-self/schedstat") -> float | None:
        """Seconds the calling thread (the event loop's: the collector runs there) has
        waited on a run queue since it started, or None without Linux scheduler
        statistics. ``schedstat`` is "ns on CPU, ns waiting on a run queue, slices"."""
        try:
            with open(path) as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None

    def take_max(self) -> float:
        m = max(self._window_max, self.last)
        self._window_max = 0.0
        return m

    async def _run(self) -> None:
        interval = self.interval
        clock = time.monotonic
        while True:
            t0 = clock()
            await asyncio.sleep(interval)
            self.record(clock() - t0 - interval)
