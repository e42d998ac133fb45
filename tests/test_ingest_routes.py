"""Route compilation and value conversion (no database)."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingestd.broker.message import Message
from ingestd.config import Config, RouteConfig
from ingestd.errors import ConfigError
from ingestd.ingest.routes import (
    Route,
    RowError,
    compile_config,
    parse_payload_path,
    parse_template,
    validate_filter,
)

UTC = dt.UTC


def route(columns: dict[str, Any], topic: str = "dev/{id}/data", **kw: Any) -> Route:
    import msgspec

    rc = msgspec.convert(
        {"name": "r", "topic": topic, "table": "t", "columns": columns, **kw}, RouteConfig
    )
    return compile_config(Config(routes=[rc])).routes[0]


def msg(payload: bytes | str = b"{}", topic: str = "dev/d1/data", **kw: Any) -> Message:
    if isinstance(payload, str):
        payload = payload.encode()
    return Message(topic, payload, **kw)


def one(columns: dict[str, Any], payload: bytes | str = b"{}", **kw: Any) -> Any:
    r = route(columns)
    return r.convert(msg(payload, **kw))[0]


# -- templates ---------------------------------------------------------------


def test_template_to_filter_and_positions() -> None:
    t = parse_template("company/{company_id}/machine/{machine_id}/telemetry", "k")
    assert t.filter == "company/+/machine/+/telemetry"
    assert t.places == {"company_id": 1, "machine_id": 3}
    assert not t.needs_check


def test_multi_level_placeholder_at_end() -> None:
    t = parse_template("logs/{path#}", "k")
    assert t.filter == "logs/#"
    r = route({"p": "topic.path"}, topic="logs/{path#}")
    assert r.convert(msg(topic="logs/a/b/c"))[0] == "a/b/c"
    with pytest.raises(RowError, match="no level"):
        r.convert(msg(topic="logs"))


def test_multi_level_placeholder_in_the_middle() -> None:
    r = route(
        {"base": "topic.base", "sock": "topic.sock"},
        topic="{base#}/{sock}",
        filter=["hopt/+/pkt/+"],
    )
    assert r.filters == ["hopt/+/pkt/+"]
    assert r.convert(msg(topic="hopt/tang3/pkt/socket1")) == ("hopt/tang3/pkt", "socket1")
    r2 = route({"base": "topic.base", "x": "topic.x"}, topic="a/{base#}/z/{x}")
    assert r2.filters == ["a/#"]
    assert r2.convert(msg(topic="a/b/c/z/9")) == ("b/c", "9")
    with pytest.raises(RowError, match="does not fit"):
        r2.convert(msg(topic="a/b/c/y/9"))


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "empty"),
        ("a/{x}/{x}", "twice"),
        ("a/+/b", "wildcards"),
        ("a/dev-{id}", "whole level"),
        ("{a#}/{b#}", "only one"),
        ("$SYS/{x}", "reserved"),
    ],
)
def test_bad_templates(topic: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_template(topic, "routes[0].topic")


def test_filter_validation() -> None:
    assert validate_filter("a/+/#") is None
    assert validate_filter("a/#/b")
    assert validate_filter("a/b+")
    assert validate_filter("")


@given(st.lists(st.text(alphabet="abcxyz09-_", min_size=1, max_size=6), min_size=1, max_size=6))
def test_placeholders_extract_levels(levels: list[str]) -> None:
    template = "/".join(f"{{p{i}}}" for i in range(len(levels)))
    r = route({f"p{i}": f"topic.p{i}" for i in range(len(levels))}, topic=template)
    assert list(r.convert(msg(topic="/".join(levels)))) == levels


def test_payload_path_parsing() -> None:
    assert parse_payload_path(".a.b[0]") == ["a", "b", 0]
    assert parse_payload_path('."x.y".z') == ["x.y", "z"]
    assert parse_payload_path("[2].a") == [2, "a"]
    assert parse_payload_path(".a..b") is None


# -- sources -------------------------------------------------------------------


def test_metadata_sources() -> None:
    r = route(
        {
            "topic": "topic",
            "lvl0": "topic[0]",
            "last": "topic[-1]",
            "id": "topic.id",
            "cid": "client_id",
            "user": "username",
            "qos": "qos",
            "retain": "retain",
            "at": "received_at",
            "fw": "user_property.fw",
            "nope": "user_property.missing",
            "k": {"value": "fixed"},
            "n": {"value": 7, "type": "integer"},
        }
    )
    m = msg(
        b"{}",
        qos=1,
        retain=True,
        client_id="c1",
        username="bob",
        received_at=1_700_000_000.25,
        properties={0x26: [("fw", "1.2"), ("fw", "ignored")]},
    )
    assert r.convert(m) == (
        "dev/d1/data",
        "dev",
        "data",
        "d1",
        "c1",
        "bob",
        1,
        True,
        dt.datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=UTC),
        "1.2",
        None,
        "fixed",
        7,
    )
    assert r.convert(msg(b"{}"))[5] is None  # no username


def test_payload_paths_and_types() -> None:
    r = route(
        {
            "f": "payload.v.f::double precision",
            "r": "payload.v.r::real",
            "i": "payload.i::integer",
            "b": "payload.b::bigint",
            "s": "payload.s::smallint",
            "num": "payload.num::numeric",
            "t": "payload.t::text",
            "tn": "payload.tn::text",
            "ok": "payload.ok::boolean",
            "j": "payload.j",
            "arr": "payload.arr[1]::integer",
            "deep": "payload.arr[2].k::text",
            "missing": "payload.nope::double precision",
        }
    )
    row = r.convert(
        msg(
            '{"v": {"f": 1.5, "r": 2}, "i": "42", "b": 9007199254740993, "s": 3.0, "num": 12.345,'
            ' "t": "hi", "tn": 12, "ok": "true", "j": {"a": [1, null]}, "arr": [5, 6, {"k": "x"}],'
            ' "other": [1, 2, 3]}'
        )
    )
    assert row == (
        1.5,
        2.0,
        42,
        9007199254740993,
        3,
        Decimal("12.345"),
        "hi",
        "12",
        True,
        '{"a": [1, null]}',
        6,
        "x",
        None,
    )


def test_nested_objects_absent_or_null() -> None:
    r = route({"x": "payload.a.b.c::bigint", "y": "payload.a.d::text"})
    assert r.convert(msg('{"a": {"b": {"c": 1}, "d": "z"}}')) == (1, "z")
    assert r.convert(msg('{"a": {"b": null}}')) == (None, None)
    assert r.convert(msg('{"a": null}')) == (None, None)
    assert r.convert(msg("{}")) == (None, None)
    with pytest.raises(RowError, match=re.escape("Expected `object | null`, got `int`")):
        r.convert(msg('{"a": 5}'))


def test_same_path_two_types_and_prefix_paths() -> None:
    r = route(
        {
            "a": "payload.x::text",
            "b": "payload.x::double precision",
            "j": "payload.y",
            "k": "payload.y.z::bigint",
        }
    )
    assert r.convert(msg('{"x": 2.5, "y": {"z": 4}}')) == ("2.5", 2.5, '{"z":4}', 4)


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("1700000000", "s", dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("1700000000.5", "s", dt.datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)),
        ("1700000000123", "ms", dt.datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)),
        ("1700000000123456", "us", dt.datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)),
        ('"2024-05-01T12:00:00Z"', "s", dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ('"2024-05-01T12:00:00+02:00"', "s", dt.datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ('"2024-05-01 12:00:00"', "s", dt.datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ('"1700000000"', "s", dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
    ],
)
def test_timestamps(value: str, unit: str, expected: dt.datetime) -> None:
    got = one(
        {"ts": {"source": "payload.ts", "type": "timestamptz", "unit": unit}}, f'{{"ts": {value}}}'
    )
    assert got == expected


def test_whole_payload_forms() -> None:
    assert one({"p": "payload"}, '{"a": 1}') == '{"a": 1}'
    assert one({"p": "payload::bytea"}, b"\x00\xff") == b"\x00\xff"
    assert one({"p": "payload::text"}, "hello") == "hello"
    assert one({"p": "payload::double precision"}, "23.5") == 23.5
    assert one({"p": "payload::boolean"}, "on") is True
    assert one({"p": "payload::timestamptz"}, "1700000000") == dt.datetime(
        2023, 11, 14, 22, 13, 20, tzinfo=UTC
    )
    assert one({"p": "payload"}, "null") is None
    with pytest.raises(RowError, match="not valid JSON"):
        one({"p": "payload"}, "{nope")


@pytest.mark.parametrize(
    ("column", "payload", "error"),
    [
        ("payload.x::double precision", '{"x": "abc"}', "Expected `float"),
        ("payload.x::double precision", '{"x": true}', "Expected `float"),
        ("payload.x::integer", '{"x": 2147483648}', "<= 2147483647"),
        ("payload.x::smallint", '{"x": 1.5}', "Expected `int"),
        ("payload.x::boolean", '{"x": "maybe"}', "Expected `bool"),
        ("payload.x::timestamptz", '{"x": "yesterday"}', "invalid timestamp"),
        ("payload.x::timestamptz", '{"x": 1e300}', "invalid timestamp"),
        ("payload.x::text", '{"x": "a\\u0000b"}', "NUL"),
        ("payload.x::real", '{"x": 1e39}', "out of range for real"),
        ("payload.x::double precision", "[1, 2]", "Expected `object`"),
        ("payload.x::double precision", "not json", "not valid JSON"),
        ("topic.id::integer", "{}", "expected an integer"),
    ],
)
def test_conversion_errors(column: str, payload: str, error: str) -> None:
    with pytest.raises(RowError, match=error):
        one({"c": column}, payload)


def test_required_and_latest_keys() -> None:
    r = route({"id": "topic.id", "v": {"source": "payload.v", "type": "bigint", "required": True}})
    with pytest.raises(RowError, match="column v: no value"):
        r.convert(msg("{}"))
    r = route({"id": "payload.id::text", "v": "payload.v::bigint"}, kind="latest", key=["id"])
    with pytest.raises(RowError, match="column id"):
        r.convert(msg('{"v": 1}'))


# -- config errors -------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "kw", "error"),
    [
        ({"a": "topic.nope"}, {}, r"placeholder \{nope\} is not in the topic template"),
        ({"a": "payload.x::varchar(3)"}, {}, "unknown column type"),
        ({"a": "wat"}, {}, "unknown source"),
        ({"a": "topic[7]"}, {}, "outside the template"),
        (
            {"a": "payload::bytea", "b": "payload.x::bytea"},
            {},
            "bytea columns can only take the whole payload",
        ),
        ({"A": "topic"}, {}, "lowercase SQL identifier"),
        ({"a": {"value": "x", "type": "integer"}}, {}, "constant"),
        ({"a": {"type": "integer"}}, {}, "needs a source or a constant"),
        ({"a": "topic.id"}, {"kind": "latest"}, "needs key columns"),
        ({"a": "topic.id"}, {"kind": "latest", "key": ["b"]}, "not a column"),
        ({"a": "topic.id"}, {"key": ["a"]}, "only 'latest'"),
        ({"a": "topic.id"}, {"filter": ["a/#/b"]}, "invalid MQTT filter"),
        ({"a": "lookup.x.y"}, {}, "no lookup named"),
        ({"a": {"source": "payload.a", "fallback": "payload.b"}}, {}, "cannot read the payload"),
        ({"a": {"source": "payload.a", "fallback": "payload"}}, {}, "cannot read the payload"),
        ({"a": {"source": "payload.a", "fallback": "wat"}}, {}, "unknown source"),
        ({"a": {"value": 1, "fallback": "received_at"}}, {}, "constant column has no fallback"),
        (
            {"a": {"source": "payload.a", "fallback": "client_id", "fallback_value": "x"}},
            {},
            "either fallback or fallback_value",
        ),
        (
            {"a": {"source": "payload.a", "type": "integer", "fallback_value": "x"}},
            {},
            "fallback_value 'x'",
        ),
        ({"a": {"source": "payload.a", "keep_when_missing": True}}, {}, "'latest' routes only"),
        (
            {"a": {"source": "topic.id", "keep_when_missing": True}},
            {"kind": "latest", "key": ["a"]},
            "key column cannot be keep_when_missing",
        ),
    ],
)
def test_route_config_errors(columns: dict[str, Any], kw: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error) as ei:
        route(columns, **kw)
    assert "routes[0]" in str(ei.value)


# -- the generated converter's shortcuts ----------------------------------------


def test_topic_levels_cache_is_bounded_and_exact() -> None:
    from ingestd.ingest.routes import codegen as routes_mod

    r = route({"id": "topic.id", "v": "payload.v::bigint"})
    cache = r._fast.__globals__["_lvc"]
    n = routes_mod._LEVELS_CACHE_MAX + 500
    for i in range(n):
        assert r.convert(msg(f'{{"v": {i}}}', topic=f"dev/d{i}/data")) == (f"d{i}", i)
        assert len(cache) <= routes_mod._LEVELS_CACHE_MAX
    # Topics seen before the cache was cleared still convert the same.
    assert r.convert(msg('{"v": 1}', topic="dev/d0/data")) == ("d0", 1)


_json_scalars = st.one_of(
    st.text(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
)


@given(value=_json_scalars)
def test_text_column_inline_path_matches_to_text(value: Any) -> None:
    import msgspec

    from ingestd.ingest.routes.values import _to_text

    payload = msgspec.json.encode({"x": value})
    decoded = msgspec.json.decode(payload)["x"]
    r = route({"c": "payload.x::text"})
    try:
        expected: Any = _to_text(decoded)
    except RowError as e:
        expected = e
    try:
        got: Any = r.convert(msg(payload))[0]
    except RowError as e:
        got = e
    if isinstance(expected, RowError):
        assert isinstance(got, RowError)
    else:
        assert got == expected


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ('{"a": 5, "vs": [1, 2]}', "expected an object at 'b', got int"),
        ('{"a": {"b": 1}, "vs": 7}', r"expected an array at \[1\], got int"),
    ],
)
def test_a_value_of_the_wrong_kind_on_a_path_is_an_error_whatever_else_reads_it(
    payload: str, error: str
) -> None:
    # payload.a is also read whole, so payload.a.b is walked in Python, not typed by msgspec;
    # the outcome must be the same as when msgspec checks the path (a RowError).
    r = route(
        {
            "b": "payload.a.b::double precision",
            "a": "payload.a::jsonb",
            "v": "payload.vs[1]::bigint",
            "vs": "payload.vs::jsonb",
        }
    )
    with pytest.raises(RowError, match=error):
        r.convert(msg(payload))
    alone = route({"b": "payload.a.b::double precision", "v": "payload.vs[1]::bigint"})
    with pytest.raises(RowError):
        alone.convert(msg(payload))
    # Missing and null stay NULL.
    assert r.convert(msg('{"a": {"c": 1}, "vs": [1]}'))[0::2] == (None, None)
    assert r.convert(msg('{"a": null, "vs": null}')) == (None, None, None, None)
