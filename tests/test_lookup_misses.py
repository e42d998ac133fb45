"""LookupLoader.reload_for and convert_entries on a miss, without PostgreSQL.

A miss applies on_miss only once the cache reflects the table as of
``miss_wait_s`` after the message arrived (tests/test_e2e_examples.py covers a
mapping row added moments after a reading with paho and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ingestd.broker.message import Message
from ingestd.config import Config, LookupConfig, RouteConfig
from ingestd.ingest.conversion import convert_entries
from ingestd.ingest.lookups import LookupLoader
from ingestd.ingest.routes import compile_config


class Stats:
    lookup_reloads = 0


class FakePool:
    """``fetch`` returns ``rows`` (changed by the test), or raises when ``fail``."""

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.fail = False
        self.fetches: list[float] = []

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        self.fetches.append(time.monotonic())
        await asyncio.sleep(0.01)
        if self.fail:
            raise OSError("connection refused")
        return list(self.rows)


def setup(miss_wait_s: float, miss_refresh_s: float, on_miss: str = "dead-letter") -> Any:
    lc = LookupConfig(
        name="dev",
        table="devmap",
        key={"serial": "topic.serial"},
        columns={"device_id": "text"},
        miss_wait_s=miss_wait_s,
        miss_refresh_s=miss_refresh_s,
        on_miss=on_miss,
    )
    rc = RouteConfig(
        name="r",
        topic="s/{serial}",
        table="readings",
        columns={"serial": "topic.serial", "device_id": "lookup.dev.device_id"},
    )
    cc = compile_config(Config(lookups=[lc], routes=[rc]))
    return cc.routes[0], cc.lookups["dev"]


def test_a_row_added_moments_after_the_message_is_found() -> None:
    route, lk = setup(miss_wait_s=0.3, miss_refresh_s=0.05)
    pool = FakePool()
    loader = LookupLoader([lk], Stats())

    async def main() -> Any:
        await loader.load_all(pool)  # type: ignore[arg-type]
        msg = Message("s/x1", b"{}", 1)

        async def operator() -> None:
            await asyncio.sleep(0.1)  # "moments later"
            pool.rows = [("x1", "pump-1")]

        op = asyncio.ensure_future(operator())
        t0 = time.monotonic()
        out = await convert_entries([msg], route, "append", "dead_letters", loader.reload_for)
        await op
        return out, time.monotonic() - t0

    out, took = asyncio.run(main())
    assert out.dead == 0
    assert out.groups[0].records == [("x1", "pump-1")]
    assert took < 0.3 + 0.05 + 0.5  # bounded by miss_wait_s + miss_refresh_s + a reload


def test_a_key_still_missing_after_the_wait_is_a_dead_letter() -> None:
    route, lk = setup(miss_wait_s=0.2, miss_refresh_s=0.05)
    pool = FakePool()
    loader = LookupLoader([lk], Stats())

    async def main() -> Any:
        await loader.load_all(pool)  # type: ignore[arg-type]
        msgs = [Message("s/nope", b"{}", 1), Message("s/nope", b"{}", 1)]
        return await convert_entries(msgs, route, "append", "dead_letters", loader.reload_for)

    out = asyncio.run(main())
    assert out.dead == 2
    # one load at start, then reloads only until the cache was read miss_wait_s
    # after the messages arrived (a handful, throttled), not one per message
    assert 2 <= len(pool.fetches) <= 4


def test_the_throttle_delays_the_reload_instead_of_skipping_it() -> None:
    # A miss right after another miss's reload still gets a reload that sees the row.
    route, lk = setup(miss_wait_s=0.0, miss_refresh_s=0.3)
    pool = FakePool()
    loader = LookupLoader([lk], Stats())

    async def main() -> Any:
        await loader.load_all(pool)  # type: ignore[arg-type]
        first = await convert_entries(
            [Message("s/a", b"{}", 1)], route, "append", "dead_letters", loader.reload_for
        )
        assert first.dead == 1  # really unmapped
        pool.rows = [("b", "kettle")]  # mapped now; the throttle has not expired
        return await convert_entries(
            [Message("s/b", b"{}", 1)], route, "append", "dead_letters", loader.reload_for
        )

    out = asyncio.run(main())
    assert out.dead == 0 and out.groups[0].records == [("b", "kettle")]
    assert pool.fetches[-1] - pool.fetches[-2] >= 0.3 - 0.01


def test_a_failed_reload_applies_on_miss() -> None:
    route, lk = setup(miss_wait_s=0.0, miss_refresh_s=0.0, on_miss="null")
    pool = FakePool()
    loader = LookupLoader([lk], Stats())

    async def main() -> Any:
        await loader.load_all(pool)  # type: ignore[arg-type]
        pool.fail = True
        return await convert_entries(
            [Message("s/a", b"{}", 1)], route, "append", "dead_letters", loader.reload_for
        )

    out = asyncio.run(main())
    assert out.dead == 0 and out.groups[0].records == [("a", None)]
