"""ingestd._copy.CopyEncoder: rows -> PostgreSQL binary COPY, the same as asyncpg would send.

Three ways, as for the MQTT codec:

* golden bytes built by hand here with ``struct`` (never by the code under test);
* PostgreSQL as the oracle: the same rows written through our encoder and
  through asyncpg's ``copy_records_to_table`` must read back identically, for
  edge values of every supported type and for hypothesis-generated rows;
* refusals: a value asyncpg refuses is refused with the same exception class,
  which the writer's dead-letter bisection relies on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import struct
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingestd._copy import TYPE_CODES, CopyEncoder, fromtimestamp_utc, fromunits_utc, supports

from ingestd.ingest.pgtypes import SQL_TYPE

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER = SIGNATURE + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)
UTC = dt.UTC

# Every type with a binary encoder, in one table (column c<i> has TYPES[i]).
TYPES = (
    "double precision",
    "real",
    "bigint",
    "integer",
    "smallint",
    "text",
    "boolean",
    "timestamptz",
    "jsonb",
    "bytea",
)


def field(fmt: str, *values: Any) -> bytes:
    body = struct.pack("!" + fmt, *values)
    return struct.pack("!i", len(body)) + body


def var(body: bytes) -> bytes:
    return struct.pack("!i", len(body)) + body


def pg_micros(d: dt.datetime) -> int:
    delta = d - dt.datetime(2000, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


# ---------------------------------------------------------------- golden bytes


def test_supported_types_are_the_column_types_except_numeric() -> None:
    assert set(TYPE_CODES) == set(SQL_TYPE) - {"numeric"}
    assert supports(TYPES)
    assert not supports(("text", "numeric"))
    with pytest.raises(ValueError, match="numeric"):
        CopyEncoder(("text", "numeric"))


def test_empty_batch_is_header_and_trailer() -> None:
    assert CopyEncoder(("text",)).encode([]) == HEADER + TRAILER


def test_golden_row_of_every_type() -> None:
    ts = dt.datetime(2026, 11, 29, 5, 6, 7, 890123, tzinfo=UTC)
    row = (1.5, 2.25, -(2**40), 123456, -2, "héllo", True, ts, '{"a": 1}', b"\x00\xff")
    expected = (
        HEADER
        + struct.pack("!h", 10)
        + field("d", 1.5)
        + field("f", 2.25)
        + field("q", -(2**40))
        + field("i", 123456)
        + field("h", -2)
        + var("héllo".encode())
        + var(b"\x01")
        + field("q", pg_micros(ts))
        + var(b"\x01" + b'{"a": 1}')
        + var(b"\x00\xff")
        + TRAILER
    )
    assert CopyEncoder(TYPES).encode([row]) == expected


def test_nulls_and_several_rows() -> None:
    enc = CopyEncoder(("integer", "text"))
    got = enc.encode([(None, None), (7, "x"), [8, None]])
    expected = (
        HEADER
        + struct.pack("!hii", 2, -1, -1)
        + struct.pack("!h", 2)
        + field("i", 7)
        + var(b"x")
        + struct.pack("!h", 2)
        + field("i", 8)
        + struct.pack("!i", -1)
        + TRAILER
    )
    assert got == expected


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2000, 1, 1, tzinfo=UTC),
        dt.datetime(1970, 1, 1, tzinfo=UTC),
        dt.datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        dt.datetime(1899, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        dt.datetime(2400, 2, 29, 12, tzinfo=UTC),
        dt.datetime(2026, 3, 1, 0, 0, 0, 1, tzinfo=UTC),
        dt.datetime(2026, 6, 1, 2, 30, tzinfo=dt.timezone(dt.timedelta(hours=-3, minutes=-30))),
    ],
    ids=str,
)
def test_timestamps_are_microseconds_since_2000_utc(value: dt.datetime) -> None:
    got = CopyEncoder(("timestamptz",)).encode([(value,)])
    assert got == HEADER + struct.pack("!h", 1) + field("q", pg_micros(value)) + TRAILER


def test_datetime_max_and_min_are_infinity_as_asyncpg_sends_them() -> None:
    enc = CopyEncoder(("timestamptz",))
    inf = HEADER + struct.pack("!h", 1) + field("q", 2**63 - 1) + TRAILER
    ninf = HEADER + struct.pack("!h", 1) + field("q", -(2**63)) + TRAILER
    assert enc.encode([(dt.datetime.max,)]) == inf
    assert enc.encode([(dt.datetime.min,)]) == ninf
    # The same instants as aware UTC datetimes (asyncpg compares the microseconds).
    assert enc.encode([(dt.datetime.max.replace(tzinfo=UTC),)]) == inf
    assert enc.encode([(dt.datetime.min.replace(tzinfo=UTC),)]) == ninf


def test_wrong_row_length_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="2 values"):
        CopyEncoder(("text",)).encode([("a", "b")])


# ---------------------------------------------------------------- PostgreSQL as the oracle


async def _roundtrip(dsn: str, rows: list[tuple[Any, ...]]) -> tuple[list[Any], list[Any]]:
    """Write rows via asyncpg and via CopyEncoder into twin tables; read both back."""
    conn = await asyncpg.connect(dsn)
    try:
        cols = ", ".join(f"c{i} {SQL_TYPE[t]}" for i, t in enumerate(TYPES))
        names = [f"c{i}" for i in range(len(TYPES))]
        for t in ("via_asyncpg", "via_encoder"):
            await conn.execute(f"DROP TABLE IF EXISTS {t}")
            await conn.execute(f"CREATE TABLE {t} (id bigserial PRIMARY KEY, {cols})")
        await conn.copy_records_to_table("via_asyncpg", records=rows, columns=names)
        data = CopyEncoder(TYPES).encode(rows)
        await conn.copy_to_table(
            "via_encoder", source=memoryview(data), columns=names, format="binary"
        )
        # Text forms compare NaN and -0.0 exactly, and jsonb as PostgreSQL normalised it.
        sel = ", ".join(f"c{i}::text" for i in range(len(TYPES)))
        a = [tuple(r) for r in await conn.fetch(f"SELECT {sel} FROM via_asyncpg ORDER BY id")]
        b = [tuple(r) for r in await conn.fetch(f"SELECT {sel} FROM via_encoder ORDER BY id")]
        return a, b
    finally:
        await conn.close()


EDGE_ROWS: list[tuple[Any, ...]] = [
    (0.0, 0.0, 0, 0, 0, "", False, dt.datetime(2000, 1, 1, tzinfo=UTC), "null", b""),
    (
        -0.0,
        -0.0,
        2**63 - 1,
        2**31 - 1,
        2**15 - 1,
        "ünïcødé ✓ 😀",
        True,
        dt.datetime.now(UTC),
        '{"nested": {"a": [1, 2.5, "x"]}, "b": null}',
        bytes(range(256)) * 40,
    ),
    (
        math.nan,
        math.inf,
        -(2**63),
        -(2**31),
        -(2**15),
        "x" * 100_000,
        None,
        dt.datetime(1969, 7, 20, 20, 17, 40, tzinfo=UTC),
        '"a string"',
        bytearray(b"ba"),
    ),
    (
        -math.inf,
        3.4028234663852886e38,
        12,
        True,  # bool is an int; asyncpg writes it as 1
        7,
        "tab\tnewline\nquote'\"backslash\\",
        False,
        dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=45))),
        "[]",
        memoryview(b"mv"),
    ),
    (
        1e-310,  # subnormal
        1.5,
        Decimal(42),  # objects with __int__ go through int(), as asyncpg does
        41.9,
        Decimal("-3.7"),
        "end",
        True,
        dt.datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC),
        "123.5e10",
        b"\x00",
    ),
    tuple([None] * len(TYPES)),
]


def test_edge_values_read_back_as_asyncpg_wrote_them(pg_dsn: str) -> None:
    a, b = asyncio.run(_roundtrip(pg_dsn, EDGE_ROWS))
    assert len(a) == len(EDGE_ROWS)
    assert b == a


_texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
_ts = st.datetimes(
    min_value=dt.datetime(1, 1, 2),
    max_value=dt.datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [UTC, dt.timezone(dt.timedelta(hours=9)), dt.timezone(dt.timedelta(hours=-11, minutes=-30))]
    ),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=6,
)


def _json_text(v: Any) -> str:
    import json

    return json.dumps(v)


_row = st.tuples(
    st.none() | st.floats(allow_nan=True),
    st.none() | st.floats(width=32),
    st.none() | st.integers(-(2**63), 2**63 - 1),
    st.none() | st.integers(-(2**31), 2**31 - 1),
    st.none() | st.integers(-(2**15), 2**15 - 1),
    st.none() | _texts,
    st.none() | st.booleans(),
    st.none() | _ts,
    st.none() | _json.map(_json_text),
    st.none() | st.binary(max_size=64),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rows=st.lists(_row, min_size=1, max_size=40))
def test_random_rows_read_back_as_asyncpg_wrote_them(pg_dsn: str, rows: list[Any]) -> None:
    a, b = asyncio.run(_roundtrip(pg_dsn, rows))
    assert b == a


# ---------------------------------------------------------------- refusals


REFUSED = [
    ("integer", 2**31, OverflowError),
    ("integer", -(2**31) - 1, OverflowError),
    ("smallint", 2**15, OverflowError),
    ("bigint", 2**63, OverflowError),
    ("integer", "5", TypeError),
    ("bigint", [1], TypeError),
    ("real", 1e39, ValueError),
    ("double precision", "1.5", TypeError),
    ("text", 5, TypeError),
    ("jsonb", {"a": 1}, TypeError),
    ("boolean", 1, TypeError),
    ("timestamptz", 1700000000, TypeError),
    ("bytea", "text", TypeError),
]


@pytest.mark.parametrize(("pgtype", "value", "exc"), REFUSED, ids=lambda x: repr(x)[:30])
def test_refuses_what_asyncpg_refuses_with_the_same_class(
    pg_dsn: str, pgtype: str, value: Any, exc: type[BaseException]
) -> None:
    with pytest.raises(exc):
        CopyEncoder((pgtype,)).encode([(value,)])

    async def via_asyncpg() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f"CREATE TABLE t (c {SQL_TYPE[pgtype]})")
            await conn.copy_records_to_table("t", records=[(value,)], columns=["c"])
        finally:
            await conn.close()

    with pytest.raises(exc):
        asyncio.run(via_asyncpg())


def test_a_refused_value_leaves_the_encoder_usable() -> None:
    enc = CopyEncoder(("integer",))
    with pytest.raises(OverflowError):
        enc.encode([(1,), (2**40,)])
    assert enc.encode([(1,)]) == HEADER + struct.pack("!h", 1) + field("i", 1) + TRAILER


# ---------------------------------------------------------------- fromtimestamp_utc


def _both(t: Any) -> tuple[Any, Any]:
    """(datetime.fromtimestamp(t, UTC), fromtimestamp_utc(t)): a value or the exception class."""
    out = []
    for f in (dt.datetime.fromtimestamp, fromtimestamp_utc):
        try:
            out.append(f(t, UTC))
        except Exception as e:
            out.append(type(e))
    return out[0], out[1]


@pytest.mark.parametrize(
    "t",
    [
        0,
        0.0,
        -0.0,
        1.5,
        -1.5,
        0.0000005,  # exactly half a microsecond: rounds to even
        0.0000015,
        -0.0000005,
        -0.0000015,
        1.0000005,
        1764394000.1234567,
        1764394000123456789 / 1e9,
        -1e9,
        253402300799,  # 9999-12-31T23:59:59
        253402300799.9999995,  # rounds up past datetime.max
        253402300800,
        -62135596800,  # 0001-01-01
        -62135596800.0000005,
        -62135596801,
        10**30,
        -(10**30),
        math.nan,
        math.inf,
        -math.inf,
        True,
        Decimal("1.5"),
        "1.5",
    ],
    ids=repr,
)
def test_fromtimestamp_utc_equals_datetime_fromtimestamp(t: Any) -> None:
    expected, got = _both(t)
    assert got == expected
    if isinstance(expected, dt.datetime):
        assert got.tzinfo is UTC


@given(
    st.one_of(
        st.floats(min_value=-62135596801, max_value=253402300801),
        st.integers(min_value=-62135596801, max_value=253402300801),
        st.integers(min_value=-(2**62), max_value=2**62).map(lambda ns: ns / 1e9),
        st.integers(min_value=-(2**50), max_value=2**50).map(lambda us: us / 1e6 + 5e-7),
    )
)
def test_fromtimestamp_utc_equals_datetime_fromtimestamp_anywhere(t: float | int) -> None:
    expected, got = _both(t)
    assert got == expected


# ---------------------------------------------------------------- fromunits_utc

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def _exact(v: int, div: int) -> Any:
    """The datetime of ``v`` / ``div`` seconds, microseconds rounded half-even, from
    integers only (timedelta), or the exception class fromtimestamp raises there."""
    q, r = divmod(v * 10**6, div)
    if 2 * r > div or (2 * r == div and q % 2):
        q += 1
    try:
        got = _EPOCH + dt.timedelta(microseconds=q)
    except OverflowError:
        return OverflowError
    if not (-62135596800 <= q // 10**6 <= 253402300799):
        return ValueError
    return got


def _units(v: Any, div: int) -> Any:
    try:
        return fromunits_utc(v, div)
    except Exception as e:
        return type(e)


@pytest.mark.parametrize(
    ("v", "div"),
    [
        (1764394000123456789, 10**9),
        (1764394000123456500, 10**9),  # half a microsecond: rounds to even (down)
        (1764394000123457500, 10**9),  # (up)
        (1764394000999999500, 10**9),  # rounds up into the next second
        (-1, 10**9),
        (-500, 10**9),
        (-1500, 10**9),
        (-1764394000123456789, 10**9),
        (1764394000123456, 10**6),
        (-1764394000123, 10**3),
        (0, 10**9),
        (10**20 + 123, 10**9),  # past 64 bits: through the float path
    ],
    ids=repr,
)
def test_fromunits_utc_is_exact(v: int, div: int) -> None:
    got = _units(v, div)
    if v > 2**63:
        assert got == fromtimestamp_utc(v / div)
    else:
        assert got == _exact(v, div)
        assert got.tzinfo is UTC


@given(
    st.sampled_from([10**3, 10**6, 10**9]),
    st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1),
)
def test_fromunits_utc_is_exact_anywhere(div: int, v: int) -> None:
    expected = _exact(v, div)
    got = _units(v, div)
    if isinstance(expected, type):
        # Out of datetime's range: the same error as before (the float path).
        assert isinstance(got, type) and issubclass(got, (OverflowError, ValueError, OSError))
    else:
        assert got == expected


@pytest.mark.parametrize("v", [1.5e18, 1764394000.25, 10**30, -(10**30), math.nan])
def test_fromunits_utc_of_a_float_or_a_huge_int_is_the_float_division(v: Any) -> None:
    expected, got = _both(v / 10**9)
    assert _units(v, 10**9) == got == expected


def test_fromtimestamp_utc_with_another_zone_is_datetime_fromtimestamp() -> None:
    tz = dt.timezone(dt.timedelta(hours=3))
    got = fromtimestamp_utc(1_700_000_000.25, tz)
    assert got == dt.datetime.fromtimestamp(1_700_000_000.25, tz)
    assert got.tzinfo is tz
