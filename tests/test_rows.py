"""ingestd._rows.RowBuilder == the route's generated converter, row for row.

The compiled builder must return exactly the tuple the generated converter
returns for every message, and raise whenever the converter raises (the
caller then converts message by message and gets the exact RowError). Routes:
the example configs, the benchmark route and routes with every column kind;
payloads: hypothesis JSON values at the paths the routes read, including
wrong types, NULs, nulls, huge numbers and non-JSON bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingestd._rows import RowBuilder

from ingestd.broker.message import Message
from ingestd.config import load_config
from ingestd.ingest.routes import Route, RowError, compile_config

ROOT = Path(__file__).resolve().parent.parent

KINDS = """
[server]
http_listen = ""

[[routes]]
name = "kinds"
topic = "k/{dev}/{rest#}"
table = "k_rows"
[routes.columns]
dev = "topic.dev"
dev_int = "topic.dev::integer"
level1 = "topic[1]"
rest = "topic.rest"
whole_topic = "topic"
t = "payload.t::text"
t_req = { source = "payload.tr", type = "text", required = true }
i = "payload.i::integer"
s = "payload.s::smallint"
b = "payload.b::bigint"
f = "payload.f::double precision"
r = "payload.r::real"
n = "payload.n::numeric"
flag = "payload.flag::boolean"
ts_s = { source = "payload.ts", type = "timestamptz" }
ts_ms = { source = "payload.tms", type = "timestamptz", unit = "ms" }
ts_ns = { source = "payload.tns", type = "timestamptz", unit = "ns" }
j = "payload.j::jsonb"
nested = "payload.o.x::double precision"
arr = "payload.a[0]::integer"
whole = "payload"
raw = "payload::bytea"
at = "received_at"
at_f = "received_at::double precision"
cid = "client_id"
user = "username"
q = "qos"
ret = "retain"
fw = "user_property.fw"
const_s = { value = "north" }
const_i = { value = 7 }
ts_fb = { source = "payload.ts", type = "timestamptz", fallback = "received_at" }
tms_fb = { source = "payload.tms", type = "timestamptz", unit = "ms", fallback = "received_at", required = true }
t_fb = { source = "payload.t", type = "text", fallback = "client_id" }
i_fb = { source = "payload.i", type = "integer", fallback_value = -1 }
dev_fb = { source = "user_property.fw", fallback = "topic.dev" }
user_fb = { source = "username", fallback = "user_property.fw" }

[[routes]]
name = "latest"
topic = "l/{dev}"
table = "l_rows"
kind = "latest"
key = ["dev", "k"]
[routes.columns]
dev = "topic.dev"
k = "payload.k::bigint"
v = "payload.v::double precision"
"""


def routes_of(text_or_path: str, tmp_path: Path | None = None) -> list[Route]:
    if text_or_path.endswith(".toml"):
        path = ROOT / text_or_path
    else:
        assert tmp_path is not None
        path = tmp_path / "r.toml"
        path.write_text(text_or_path)
    return compile_config(load_config(str(path), env={})).routes


def reference(route: Route, msgs: list[Message]) -> list[Any] | None:
    """The generated converter's rows, or None if it raises for any message."""
    try:
        return [route._fast(m) for m in msgs]
    except Exception:
        return None


def check(route: Route, msgs: list[Message]) -> None:
    want = reference(route, msgs)
    if want is None:
        with pytest.raises(Exception):  # noqa: B017 - any error: the caller falls back
            route.convert_many(msgs)
        return
    got = route.convert_many(msgs)
    assert got == want
    # ...and the getters (the reference, column by column) agree with both
    assert [route.convert_slow(m) for m in msgs] == want
    # same types too (True vs 1, 1.0 vs 1 compare equal)
    assert [[type(v) for v in row] for row in got] == [[type(v) for v in row] for row in want]


json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-1e12, max_value=4e12),
    st.text(max_size=12),
    st.sampled_from(["a\x00b", "1.5", "true", "2024-05-01T10:00:00+02:00", "", " 12 "]),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
KEYS = ["t", "tr", "i", "s", "b", "f", "r", "n", "flag", "ts", "tms", "tns", "j", "o", "a"]
KEYS += ["k", "v", "seq", "battery", "ts", "status", "fw", "name", "voltage", "current"]
KEYS += ["power", "run", "pub", "temperature", "pressure", "id", "model", "level", "value"]
KEYS += ["solar_v", "solar_a", "water", "extra", "energy", "area", "deviceId", "type"]
KEYS += ["positionMs", "sessionId", "timestamp"]


text = st.text(max_size=8) | st.sampled_from(["a\x00b", "x"])
small = st.integers(-1000, 1000)
number = st.integers(-(2**40), 2**40) | st.floats(-1e9, 1e9)
# A value of the type the example routes expect, per key (most rows then convert).
TYPED: dict[str, Any] = {
    **{k: text for k in ("t", "tr", "status", "name", "model", "run", "id", "fw")},
    **{k: text for k in ("deviceId", "type", "sessionId")},
    **{k: small for k in ("i", "s", "pub", "level", "k", "positionMs")},
    **{k: st.integers(-(2**40), 2**40) for k in ("b", "seq")},
    **{k: number for k in ("f", "r", "v", "n", "value", "battery", "temperature")},
    **{k: number for k in ("pressure", "voltage", "current", "power")},
    **{k: number for k in ("solar_v", "solar_a", "water", "energy", "area")},
    "timestamp": st.integers(0, 4 * 10**12) | st.sampled_from(["2024-05-01T12:00:00Z"]),
    "extra": st.fixed_dictionaries({"temp": number, "vibration": number}) | json_value,
    "flag": st.booleans(),
    "ts": st.floats(0, 4e9) | st.integers(0, 4 * 10**9),
    "tms": st.integers(0, 4 * 10**12),
    "tns": st.integers(0, 4 * 10**18),
    "j": json_value,
    "o": st.fixed_dictionaries({"x": number}),
    "a": st.lists(small, max_size=3),
}


@st.composite
def payloads(draw: Any) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(
            st.sampled_from(
                [
                    *(b"", b"not json", b"[1,2]", b"null", b'{"a":', b"\xff", b" null\r\n"),
                    *(b"nul", b'"a\\u0000"', b'"\xff"', b'\t{"x":1}\n', b"\x0c1", b"1 2"),
                    b'"\\u00e9"',
                ]
            )
        )
    if kind <= 3:  # any JSON at the keys the routes read
        keys = draw(st.lists(st.sampled_from(KEYS), max_size=12))
        return json.dumps({k: draw(json_value) for k in keys}).encode()
    # well typed (every key, or most), maybe one value of another kind
    keys = [k for k in TYPED if draw(st.integers(0, 9)) > 0]
    obj = {k: draw(TYPED[k]) for k in keys}
    if keys and kind == 9:
        obj[draw(st.sampled_from(keys))] = draw(json_value)
    return json.dumps(obj).encode()


@st.composite
def messages(draw: Any, topics: list[str]) -> Message:
    props = draw(st.sampled_from([{}, {0x26: [("fw", "1.2")]}, {0x26: [("x", "y")]}]))
    return Message(
        draw(st.sampled_from(topics)),
        draw(payloads()),
        draw(st.integers(0, 2)),
        draw(st.booleans()),
        props,
        draw(st.sampled_from(["dev-1", "d\x00", "12"])),
        draw(st.sampled_from([None, "alice", "a\x00"])),
        draw(st.sampled_from([1_700_000_000.123456, 1.5e9])),
    )


EXAMPLES = [
    "config/solar-fleet.toml",
    "config/device-fleet.toml",
    "benchmarks/ingest-bench.toml",
    "benchmarks/latency-ingest.toml",
]
TOPICS = [
    "company/acme/machine/m1/telemetry",
    "company/acme/machine/m1/status",
    "devices/d1/status",
    "devices/d1/heartbeat",
    "devices/d1/events",
    "devices/discovery/announce",
    "devices/d1/lwt",
    "k/12/x/y",
    "k/-3/x",
    "k/dev/z",
    "k/5",
    "l/a",
]


# The message's own fields and the payload_json / payload_raw pair, in the types
# users give them (client_id::integer mostly fails: its own route).
MESSAGE = """
[server]
http_listen = ""

[[routes]]
name = "message"
topic = "k/{dev}/{rest#}"
table = "m_rows"
[routes.columns]
pj = "payload_json"
pr = "payload_raw"
q = "qos"
q_t = "qos::text"
q_s = "qos::smallint"
ret = "retain"
ret_t = "retain::text"
cid = "client_id"
user = "username"
user_j = "username::jsonb"

[[routes]]
name = "client_int"
topic = "k/{dev}/{rest#}"
table = "c_rows"
[routes.columns]
cid_i = "client_id::integer"
"""

# No routes: the default route (ingest.default_route), the one every new user runs.
DEFAULT = """
[server]
http_listen = ""
"""


@pytest.mark.parametrize("source", ["kinds", "message", "default", *EXAMPLES])
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_builder_equals_generated_converter(source: str, tmp_path: Path, data: Any) -> None:
    text = {"kinds": KINDS, "message": MESSAGE, "default": DEFAULT}.get(source, source)
    routes = routes_of(text, tmp_path)
    for route in routes:
        msgs = data.draw(st.lists(messages(TOPICS), min_size=1, max_size=4))
        # A route sees only messages whose topic its filter matched.
        msgs = [m for m in msgs if _matches(route, m.topic)]
        if msgs:
            check(route, msgs)
            for m in msgs:
                check(route, [m])


def _matches(route: Route, topic: str) -> bool:
    from pg_fixtures import topic_matches

    return any(topic_matches(f, topic) for f in route.filters)


def test_valid_rows_are_built_and_equal(tmp_path: Path) -> None:
    """A deterministic positive case per kind (the hypothesis test may draw few)."""
    (route, _latest) = routes_of(KINDS, tmp_path)
    body = {
        "t": "hé",
        "tr": "x",
        "i": 7,
        "s": 3,
        "b": 2**40,
        "f": 1.25,
        "r": 0.5,
        "n": 12.5,
        "flag": True,
        "ts": 1_700_000_000.5,
        "tms": 1_700_000_000_123,
        "tns": 1_700_000_000_123_456_789,
        "j": {"a": [1, 2]},
        "o": {"x": 2.5},
        "a": [4, 5],
    }
    msgs = [
        Message("k/12/x/y", json.dumps(body).encode(), 1, False, {0x26: [("fw", "9")]}, "c", "u"),
        Message("k/13/z", json.dumps({**body, "t": None}).encode(), 0, True, {}, "c2", None),
    ]
    want = [route._fast(m) for m in msgs]
    assert route.convert_many(msgs) == want
    assert want[0][0] == "12" and want[0][1] == 12 and want[1][5] is None
    assert [route.convert_slow(m) for m in msgs] == want
    col = dict(zip(route.column_names, zip(*want, strict=True), strict=True))
    # fallbacks: the payload value when there is one, else the fallback
    assert col["ts_fb"] == col["ts_s"]
    assert col["t_fb"] == ("hé", "c2")  # payload.t, then client_id when t is null
    assert col["i_fb"] == (7, 7)
    assert col["dev_fb"] == ("9", "13")  # user property fw, else topic.dev
    assert col["user_fb"] == ("u", None)  # username, else user property fw (none)


def test_fallback_when_the_payload_has_no_value(tmp_path: Path) -> None:
    (route, _latest) = routes_of(KINDS, tmp_path)
    props = {0x26: [("fw", "7")]}
    m = Message("k/4/x", b'{"tr": "x", "t": null}', 1, False, props, "c9", None, 1.7e9)
    for row in (route._fast(m), route.convert_slow(m), route.convert_many([m])[0]):
        col = dict(zip(route.column_names, row, strict=True))
        assert col["ts_fb"] == col["at"] == col["tms_fb"]
        assert col["t_fb"] == "c9" and col["i_fb"] == -1 and col["dev_fb"] == "7"
        assert col["user_fb"] == "7"  # anonymous: the user property


def test_required_fallback_is_an_error_only_when_both_give_nothing(tmp_path: Path) -> None:
    (route,) = routes_of(
        """
[[routes]]
name = "r"
topic = "r/{dev}"
table = "r_rows"
[routes.columns]
dev = "topic.dev"
who = { source = "payload.who", type = "text", fallback = "username", required = true }
""",
        tmp_path,
    )
    ok = Message("r/1", b"{}", 1, False, {}, "c", "alice", 1.7e9)
    assert (
        route._fast(ok) == route.convert_slow(ok) == route.convert_many([ok])[0] == ("1", "alice")
    )
    bad = Message("r/1", b"{}", 1, False, {}, "c", None, 1.7e9)
    with pytest.raises(RowError, match="column who: no value"):
        route.convert(bad)
    with pytest.raises(Exception):  # noqa: B017 - the builder raises; convert() decides
        route.convert_many([bad])


def test_required_missing_and_bad_payload_raise(tmp_path: Path) -> None:
    (route, _latest) = routes_of(KINDS, tmp_path)
    for payload in (b'{"t": "a"}', b"nope", b'{"tr": "a\\u0000b"}'):
        m = Message("k/1/x", payload, 1)
        with pytest.raises(Exception):  # noqa: B017
            route.convert_many([m])
        with pytest.raises(Exception):  # noqa: B017
            route._fast(m)


def test_fallbacks_run_in_the_builder(tmp_path: Path) -> None:
    """The solar-fleet ts (payload.ts else received_at) stays on the compiled path."""
    from ingestd.ingest.routes.codegen import _row_ops

    (telemetry, _status) = routes_of("config/solar-fleet.toml")
    ops = dict(zip(telemetry.column_names, _row_ops(telemetry.columns), strict=True))
    assert ops["ts"][0] == "attr_ts" and ops["ts"][5] == ("received_ts", None)
    (kinds, _latest) = routes_of(KINDS, tmp_path)
    ops = dict(zip(kinds.column_names, _row_ops(kinds.columns), strict=True))
    assert ops["i_fb"][0] in ("attr", "attr_conv") and ops["i_fb"][5] == ("const", -1)
    assert ops["t_fb"][0] == "attr_text" and ops["t_fb"][5][0] == "py"
    assert ops["tms_fb"][1] is True  # required: checked after the fallback


def test_payload_fields_read_from_their_slots_equal_getattr() -> None:
    """RowBuilder reads a payload field at its slot offset in the decoded Struct's type
    (the first payload's type); a payload of another type, a field that is not a plain
    slot (a property), or a slot left unset goes through getattr, with its result or
    its AttributeError."""

    class A(msgspec.Struct, gc=False):
        x: Any = None
        y: Any = None

    class B(msgspec.Struct):
        pad: int = 0
        y: Any = None
        x: Any = None

    class C:
        __slots__ = ("x", "y")

    class P:
        @property
        def x(self) -> str:
            return "from a property"

        y = "class attribute"

    c_full = C()
    c_full.x, c_full.y = "cx", "cy"
    c_unset = C()
    c_unset.y = "only y"
    objs: list[Any] = [A(1, "a"), B(7, "b", 2.5), A(None, [1]), P(), c_full, A("s", None)]
    it = iter(objs)
    rb = RowBuilder(
        [("attr", False, "x", None, None), ("attr", False, "y", None, None)],
        lambda _payload: next(it),
        False,
        None,
    )
    msgs = [Message("t", b"{}", 0) for _ in objs]
    assert rb.build(msgs) == [(getattr(o, "x"), getattr(o, "y")) for o in objs]  # noqa: B009
    it = iter([A(3, 4), c_unset])
    with pytest.raises(AttributeError):
        rb.build(msgs[:2])
    # The slots of C itself (its first payload), one of them unset (NULL) in the second.
    it2 = iter([c_full, c_unset])
    rb2 = RowBuilder([("attr", False, "x", None, None)], lambda _p: next(it2), False, None)
    with pytest.raises(AttributeError):
        rb2.build(msgs[:2])
    it2 = iter([c_full])
    assert rb2.build(msgs[:1]) == [("cx",)]


def test_default_route_is_built_natively(tmp_path: Path) -> None:
    """Every column of the default route has a RowBuilder operation (no Python getter
    per row), and a JSON, a null, a binary and an empty payload give the rows the
    getters give: jsonb text or NULL, and the bytes only when the payload is not JSON."""
    from ingestd.ingest.routes.codegen import _row_ops

    (route,) = routes_of(DEFAULT, tmp_path)
    assert [op[0] for op in _row_ops(route.columns)] == [
        "topic",
        "msg",
        "msg",
        "msg",
        "msg",
        "received_ts",
        "payload_json",
        "payload_raw",
    ]
    msgs = [
        Message("a/b", p, 1, False, {}, "dev-1", None, 1_700_000_000.5)
        for p in (b'{"battery": 13.5}', b" null ", b"\x00\xff", b"", b'"\\u0000"')
    ]
    rows = route.convert_many(msgs)
    assert [(r[6], r[7]) for r in rows] == [
        ('{"battery": 13.5}', None),
        (None, None),
        (None, b"\x00\xff"),
        (None, None),
        (None, b'"\\u0000"'),
    ]
    assert rows == [route.convert_slow(m) for m in msgs]
    assert rows[0][:5] == ("a/b", "dev-1", None, 1, False)
