"""Exact message accounting and latency sampling for the load generator.

Every benchmark payload starts with a 16-byte header (``HEADER``): the
publisher's global index, its sequence number (0, 1, 2, ... per publisher)
and the send time (``time.monotonic_ns()``, one clock for every process on
the host). A subscriber marks each (publisher, sequence) it receives in a
per-publisher bitmap, so at the end

* ``unique``     = distinct (publisher, sequence) pairs received,
* ``duplicates`` = received - unique,
* ``lost``       = expected - unique, where expected is the sum of what the
  publishers it matches report as sent.

These are exact counts, not estimates.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Iterable, Sequence

# publisher index (u32), sequence (u32), send time in ns (u64), big-endian.
HEADER = struct.Struct(">IIQ")
HEADER_SIZE = HEADER.size


class SeqTracker:
    """Which sequence numbers of which publishers one subscriber has seen."""

    __slots__ = ("duplicates", "received", "seen", "unique")

    def __init__(self, publishers: int) -> None:
        self.seen: list[bytearray] = [bytearray(1024) for _ in range(publishers)]
        self.received = 0
        self.unique = 0
        self.duplicates = 0

    def mark(self, pub: int, seq: int) -> bool:
        """Record one message; False if it is a duplicate (or from an unknown publisher)."""
        self.received += 1
        seen = self.seen
        if pub >= len(seen):
            seen.extend(bytearray(1024) for _ in range(pub + 1 - len(seen)))
        bits = seen[pub]
        if seq >= len(bits):
            bits.extend(bytes(max(len(bits), seq + 1 - len(bits))))
        if bits[seq]:
            self.duplicates += 1
            return False
        bits[seq] = 1
        self.unique += 1
        return True

    def unique_by_publisher(self) -> list[int]:
        return [len(b) - b.count(0) for b in self.seen]

    def missing(self, pub: int, sent: int, limit: int = 10) -> list[int]:
        """The first ``limit`` sequence numbers below ``sent`` never received from ``pub``."""
        bits = self.seen[pub] if pub < len(self.seen) else bytearray()
        out: list[int] = []
        for seq in range(sent):
            if seq >= len(bits) or not bits[seq]:
                out.append(seq)
                if len(out) >= limit:
                    break
        return out


class LatencySampler:
    """Latency samples in microseconds, bounded in memory.

    Keeps every sample up to ``cap``; past it, drops every other kept sample
    and from then on keeps one in two (then four, ...) — a uniform thinning
    over the whole run, so percentiles stay unbiased.
    """

    __slots__ = ("_n", "cap", "max_us", "samples", "stride")

    def __init__(self, cap: int = 1_000_000) -> None:
        self.samples = array("q")
        self.cap = cap
        self.stride = 1
        self._n = 0
        self.max_us = 0

    def add(self, us: int) -> None:
        if us > self.max_us:
            self.max_us = us
        n = self._n
        self._n = n + 1
        # Keep messages 0, stride, 2*stride, ...: after s[::2] the kept ones are
        # exactly the multiples of the doubled stride, so the phase stays aligned.
        if n % self.stride:
            return
        s = self.samples
        s.append(us)
        if len(s) >= self.cap:
            self.samples = s[::2]
            self.stride *= 2

    def add_many(self, values: list[int]) -> None:
        """``add`` each value, in order (one extend while nothing is thinned)."""
        if not values:
            return
        if self.stride == 1 and len(self.samples) + len(values) < self.cap:
            top = max(values)
            if top > self.max_us:
                self.max_us = top
            self.samples.extend(values)
            self._n += len(values)
            return
        for us in values:
            self.add(us)

    @property
    def count(self) -> int:
        return self._n


def percentiles(
    samples: Iterable[int], qs: Sequence[float] = (50, 90, 99)
) -> dict[str, float | None]:
    """Nearest-rank percentiles (``p50`` ...) and ``max``, in the samples' unit."""
    data = sorted(samples)
    out: dict[str, float | None] = {}
    for q in qs:
        key = f"p{q:g}"
        if not data:
            out[key] = None
            continue
        rank = max(1, math.ceil(q / 100 * len(data)))
        out[key] = float(data[rank - 1])
    out["max"] = float(data[-1]) if data else None
    return out


def merge_samples(parts: Iterable[tuple[array[int] | Sequence[int], int]]) -> list[int]:
    """Merge per-process samples thinned at different strides into one weighted list.

    ``parts`` are (samples, stride); a sample kept at stride s stands for s
    messages, so it is repeated s / min_stride times relative to the others.
    """
    parts = list(parts)
    if not parts:
        return []
    base = min(stride for _, stride in parts)
    out: list[int] = []
    for samples, stride in parts:
        k = max(1, stride // base)
        if k == 1:
            out.extend(samples)
        else:
            for s in samples:
                out.extend([s] * k)
    return out
