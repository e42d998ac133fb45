"""Micro-benchmarks of the compiled subscription trie (pytest-benchmark).

Usage::

    PYTHONPATH=src .venv/bin/python -m pytest benchmarks/bench_trie.py --benchmark-enable -q
    ... -m "not slow"          # without the 1M-subscription trie

A realistic IoT trie at about 1k, 100k and 1M subscriptions: one
``company/{c}/machine/{m}/telemetry`` per machine (1,000 machines per
company), per company a ``company/{c}/#`` archiver and a
``company/{c}/machine/+/status`` watcher, plus four
``company/+/machine/+/telemetry`` dashboards and a four-member
``$share/ingest/company/+/machine/+/telemetry`` group.

``match`` is timed on a telemetry topic (6 plain matches at every size), on
a status topic (2) and on a topic outside the tree (0); ``match_all`` on the
telemetry topic (6 plain + 1 group). Its cost should not grow with the size
of the trie. Each size's build time and memory per subscription are in
``extra_info``; subscribe and unsubscribe throughput are timed on batches of
10,000 filters.
"""

from __future__ import annotations

import gc
import time

import pytest
from ingestd._trie import SubscriptionTrie

MACHINES = 1000  # per company
SIZES = {"1k": 1_000, "100k": 100_000, "1M": 1_000_000}
SIZE_PARAMS = [
    "1k",
    "100k",
    pytest.param("1M", marks=pytest.mark.slow),
]
BATCH = 10_000


def _rss() -> int:
    """Resident set size in bytes (Linux), 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


def build(n: int) -> tuple[SubscriptionTrie, dict]:
    companies = max(1, n // MACHINES)
    machines = min(n, MACHINES)
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    # The bulk build allocates millions of GC-tracked objects and no cycles:
    # generational collections would only re-scan the growing trie.
    gc.disable()
    try:
        t = SubscriptionTrie()
        sub = t.subscribe
        for c in range(companies):
            for m in range(machines):
                sub(f"company/{c}/machine/{m}/telemetry", ("machine", c, m), 1)
            sub(f"company/{c}/#", ("archiver", c), 0)
            sub(f"company/{c}/machine/+/status", ("status", c), 0)
        for i in range(4):
            sub("company/+/machine/+/telemetry", ("dashboard", i), 0)
            sub("$share/ingest/company/+/machine/+/telemetry", ("ingest", i), 1)
    finally:
        gc.enable()
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    gc.collect()
    full_collect = time.perf_counter() - t1
    gc.freeze()
    info = {
        "subscriptions": len(t),
        "nodes": t._node_count(),
        "build_s": round(elapsed, 2),
        "build_ns_per_subscribe": round(elapsed / len(t) * 1e9),
        "rss_bytes_per_subscription": round((_rss() - rss0) / len(t)),
        "gc_full_collect_s": round(full_collect, 3),
    }
    return t, info


_tries: dict[str, tuple[SubscriptionTrie, dict]] = {}


@pytest.fixture(scope="module")
def tries():
    """Tries built on first use and shared by this module's benchmarks.

    Each build ends with ``gc.freeze()``: otherwise every full collection
    during later benchmarks walks the millions of objects of the big tries
    (about a second at 1M subscriptions) and lands in whichever round it
    interrupts. A broker holding that many subscriptions pays the same,
    hence the ``gc_full_collect_s`` figure in ``extra_info``.
    """
    yield _tries
    _tries.clear()
    gc.unfreeze()


def trie_of(tries: dict, size: str) -> tuple[SubscriptionTrie, dict]:
    if size not in tries:
        tries[size] = build(SIZES[size])
    return tries[size]


def middle(size: str) -> tuple[int, int]:
    return max(1, SIZES[size] // MACHINES) // 2, min(SIZES[size], MACHINES) // 2


@pytest.mark.parametrize(
    ("case", "expected"),
    [("telemetry", 6), ("status", 2), ("no-match", 0)],
)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_match(benchmark, tries, size, case, expected):
    t, info = trie_of(tries, size)
    c, m = middle(size)
    topic = {
        "telemetry": f"company/{c}/machine/{m}/telemetry",
        "status": f"company/{c}/machine/{m}/status",
        "no-match": f"factory/{c}/line/{m}/telemetry",
    }[case]
    benchmark.extra_info.update(info)
    got = benchmark(t.match, topic)
    assert len(got) == expected


@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_match_all(benchmark, tries, size):
    t, info = trie_of(tries, size)
    c, m = middle(size)
    benchmark.extra_info.update(info)
    plain, groups = benchmark(t.match_all, f"company/{c}/machine/{m}/telemetry")
    assert len(plain) == 6
    assert [(g.name, len(g.members)) for g in groups] == [("ingest", 4)]


def batch_filters() -> list[str]:
    return [f"company/{c}/machine/{m}/telemetry" for c in range(BATCH // 100) for m in range(100)]


def test_subscribe_10k(benchmark):
    """10,000 telemetry filters into an empty trie (ns per subscribe in extra_info)."""
    filters = batch_filters()

    def run(t: SubscriptionTrie) -> None:
        sub = t.subscribe
        for i, f in enumerate(filters):
            sub(f, i, 1)

    benchmark.pedantic(run, setup=lambda: ((SubscriptionTrie(),), {}), rounds=20)
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_subscribe"] = round(benchmark.stats.stats.mean / BATCH * 1e9)


def test_subscribe_10k_into_100k(benchmark, tries):
    """10,000 new filters under new companies of the 100k trie, then removed again."""
    t, _ = trie_of(tries, "100k")
    filters = [
        f"company/x{c}/machine/{m}/telemetry" for c in range(BATCH // 100) for m in range(100)
    ]

    def run() -> None:
        sub = t.subscribe
        for f in filters:
            sub(f, "new", 1)

    def teardown() -> None:
        for f in filters:
            t.unsubscribe(f, "new")

    def setup():
        # pytest-benchmark has no teardown hook: undo the previous round here.
        teardown()
        return (), {}

    before = len(t)
    benchmark.pedantic(run, setup=setup, rounds=20)
    teardown()
    assert len(t) == before
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_subscribe"] = round(benchmark.stats.stats.mean / BATCH * 1e9)


def test_unsubscribe_10k(benchmark):
    """Removing 10,000 filters, pruning every node (ns per unsubscribe in extra_info)."""
    filters = batch_filters()

    def setup():
        t = SubscriptionTrie()
        for i, f in enumerate(filters):
            t.subscribe(f, i, 1)
        return (t,), {}

    def run(t: SubscriptionTrie) -> None:
        unsub = t.unsubscribe
        for i, f in enumerate(filters):
            unsub(f, i)
        assert t._node_count() == 0

    benchmark.pedantic(run, setup=setup, rounds=20)
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_unsubscribe"] = round(benchmark.stats.stats.mean / BATCH * 1e9)
