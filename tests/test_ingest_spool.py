"""The on-disk spool alone (no database)."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from ingestd.ingest.spool import Spool, SpoolFull
from ingestd.ingest.writing import Group, decode_groups, encode_groups


def drain(sp: Spool) -> list[bytes]:
    async def main() -> list[bytes]:
        out = []
        while (got := await sp.peek()) is not None:
            pos, body = got
            out.append(body)
            await sp.consume(pos)
        return out

    return asyncio.run(main())


def fill(sp: Spool, bodies: list[bytes]) -> None:
    async def main() -> None:
        for b in bodies:
            await sp.append(b)

    asyncio.run(main())


def test_append_replay_in_order_across_segments(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    sp.open()
    bodies = [f"entry-{i}".encode() * 3 for i in range(20)]
    fill(sp, bodies)
    assert len(list(tmp_path.glob("*.seg"))) > 3  # rolled over
    assert sp.size_bytes == sum(len(b) + 8 for b in bodies)
    assert drain(sp) == bodies
    assert sp.empty and sp.size_bytes == 0
    assert list(tmp_path.glob("*.seg")) == []  # replayed segments are removed


def test_survives_reopen_and_partial_replay(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=64)
    sp.open()
    bodies = [bytes([i]) * 20 for i in range(10)]
    fill(sp, bodies)

    async def take(n: int) -> None:
        for _ in range(n):
            got = await sp.peek()
            assert got is not None
            await sp.consume(got[0])

    asyncio.run(take(4))
    sp2 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=64)
    sp2.open()
    assert sp2.size_bytes == sum(len(b) + 8 for b in bodies[4:])
    fill(sp2, [b"late"])
    assert drain(sp2) == [*bodies[4:], b"late"]


def test_torn_tail_is_cut(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20)
    sp.open()
    fill(sp, [b"one", b"two"])
    (seg,) = tmp_path.glob("*.seg")
    with open(seg, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02")  # a header promising 64 bytes, then the crash
    sp2 = Spool(tmp_path, max_bytes=1 << 20)
    sp2.open()
    assert drain(sp2) == [b"one", b"two"]


def test_corrupt_entry_is_skipped(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=30)
    sp.open()
    fill(sp, [b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 10])
    first = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[10] ^= 0xFF  # flip a payload byte of the first entry
    first.write_bytes(bytes(data))
    sp2 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=30)
    sp2.open()
    got = drain(sp2)
    assert b"a" * 10 not in got and b"d" * 10 in got
    assert sp2.corrupt_entries == 1


def test_bounded_in_bytes(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=100)
    sp.open()
    fill(sp, [b"x" * 40, b"y" * 40])
    with pytest.raises(SpoolFull):
        fill(sp, [b"z" * 40])
    assert drain(sp) == [b"x" * 40, b"y" * 40]
    fill(sp, [b"z" * 40])  # room again after replay
    assert drain(sp) == [b"z" * 40]


def test_group_encoding_round_trip() -> None:
    g = Group(
        "t",
        "latest",
        "r",
        ("a", "b", "c", "d", "e", "f"),
        ("text", "timestamptz", "numeric", "bytea", "jsonb", "double precision"),
        ("a",),
        [
            (
                "k",
                dt.datetime(2024, 1, 1, 12, 0, 0, 123456, tzinfo=dt.UTC),
                Decimal("1.50"),
                b"\x00\x01",
                '{"x": 1}',
                2.5,
            ),
            ("k2", None, None, None, None, None),
        ],
    )
    (back,) = decode_groups(encode_groups([g]))
    assert back == g
    assert isinstance(back.records[0][2], Decimal) and back.records[0][2] == Decimal("1.50")
