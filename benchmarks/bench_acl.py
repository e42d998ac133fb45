"""Micro-benchmarks of the ACL decisions (pytest-benchmark).

Usage::

    .venv/bin/python -m pytest benchmarks/bench_acl.py --benchmark-enable -q -p no:cacheprovider

One client (``alice``, client id ``dev-1``) of a file of 10 or 1,000 rules,
nearly all of them in alice's own ``user`` section (the worst case: every
rule is a candidate for her), plus two ``%u`` patterns. Timed per decision:

- ``cached``: ``ClientAcl.may_read`` of a topic already decided (a dict hit);
- ``uncached``: the same with the cache disabled (``cache_size=0``): a trie
  walk of the user list and one of the patterns;
- ``list``: the alternative design, a plain per-client list of pre-split
  filters scanned in Python, for comparison;
- ``for_client_cold``: building a ClientAcl for the first client of a
  username (its user list and patterns are compiled); ``for_client_warm``:
  another client of the same username (compiled rules reused);
- ``parse``: parsing the file text.
"""

from __future__ import annotations

import pytest

from ingestd.broker.acl import READ, AclFile

SIZES = [10, 1000]
TOPIC = (
    "site/7/machine/42/telemetry"  # allowed by the last user rule for 1,000, a middle one for 10
)


def acl_text(n: int) -> str:
    lines = ["pattern readwrite company/%u/#", "pattern deny company/%u/locked/#", "user alice"]
    lines.append("topic deny site/+/machine/13/#")
    for i in range(n - 4):
        lines.append(f"topic read site/{(i * 7919) % 100000}/machine/+/telemetry")
    lines.append("topic read site/7/machine/+/telemetry")
    return "\n".join(lines) + "\n"


class _ListAcl:
    """A linear scan of (levels, access) entries: the design the trie replaced."""

    def __init__(self, a: AclFile, username: str) -> None:
        self.entries = [
            (tuple(e.topic.split("/")), e.access)
            for e in a.entries
            if not e.pattern and e.username == username
        ]
        self.entries.sort(key=lambda e: e[1] != 0)  # deny first

    def may_read(self, topic: str) -> bool:
        levels = topic.split("/")
        n = len(levels)
        for flt, access in self.entries:
            ok = True
            for i, s in enumerate(flt):
                if s == "#":
                    break
                if i >= n or (s != "+" and s != levels[i]):
                    ok = False
                    break
            else:
                ok = len(flt) == n
            if ok:
                if not access:
                    return False
                if access & READ:
                    return True
        return False


@pytest.mark.parametrize("n", SIZES)
def test_cached(benchmark, n):
    c = AclFile.parse(acl_text(n)).for_client("alice", "dev-1")
    assert c.may_read(TOPIC)
    assert benchmark(c.may_read, TOPIC)


@pytest.mark.parametrize("n", SIZES)
def test_uncached(benchmark, n):
    c = AclFile.parse(acl_text(n), cache_size=0).for_client("alice", "dev-1")
    assert benchmark(c.may_read, TOPIC)
    assert not c.may_read("site/7/machine/13/telemetry")


@pytest.mark.parametrize("n", SIZES)
def test_list(benchmark, n):
    c = _ListAcl(AclFile.parse(acl_text(n)), "alice")
    assert benchmark(c.may_read, TOPIC)


@pytest.mark.parametrize("n", SIZES)
def test_for_client_cold(benchmark, n):
    entries = list(AclFile.parse(acl_text(n)).entries)

    def build():
        return AclFile(entries).for_client("alice", "dev-1")

    assert benchmark(build).may_read(TOPIC)


@pytest.mark.parametrize("n", SIZES)
def test_for_client_warm(benchmark, n):
    a = AclFile.parse(acl_text(n))
    a.for_client("alice", "dev-0")
    assert benchmark(a.for_client, "alice", "dev-1").may_read(TOPIC)


@pytest.mark.parametrize("n", SIZES)
def test_parse(benchmark, n):
    text = acl_text(n)
    assert len(benchmark(AclFile.parse, text).entries) == n
