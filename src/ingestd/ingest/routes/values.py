"""Value converters: a decoded JSON or string value -> the Python value COPY expects per PostgreSQL type."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import msgspec

from ingestd._copy import fromtimestamp_utc, fromunits_utc
from ingestd.ingest.routes.errors import RowError

UTC = _dt.UTC

_INT_RANGE = {
    "bigint": (-(2**63), 2**63 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "smallint": (-(2**15), 2**15 - 1),
}
_REAL_MAX = 3.4028234663852886e38

_UNIT_DIV = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _to_float(v: Any) -> float:
    t = type(v)
    if t is float:
        return v
    if t is int:
        return float(v)
    if t is str:
        try:
            return float(v)
        except ValueError:
            pass
    raise RowError(f"expected a number, got {_type_name(v)} {v!r:.40}")


def _to_real(v: Any) -> float:
    f = _to_float(v)
    # asyncpg packs float4 with struct; an out-of-range value would fail the whole COPY.
    if f == f and abs(f) > _REAL_MAX and abs(f) != float("inf"):
        raise RowError(f"{f!r} is out of range for real")
    return f


def _make_to_int(pgtype: str) -> Callable[[Any], int]:
    lo, hi = _INT_RANGE[pgtype]

    def to_int(v: Any) -> int:
        t = type(v)
        if t is int:
            i = v
        elif t is float and v.is_integer():
            i = int(v)
        elif t is str:
            try:
                i = int(v)
            except ValueError:
                raise RowError(f"expected an integer, got {v!r:.40}") from None
        else:
            raise RowError(f"expected an integer, got {_type_name(v)} {v!r:.40}")
        if not lo <= i <= hi:
            raise RowError(f"{i} is out of range for {pgtype}")
        return i

    return to_int


def _to_numeric(v: Any) -> Decimal:
    if isinstance(v, Decimal):
        return v
    if type(v) in (int, float, str):
        try:
            return Decimal(str(v) if type(v) is float else v)
        except InvalidOperation:
            pass
    raise RowError(f"expected a number, got {_type_name(v)} {v!r:.40}")


def _to_text(v: Any) -> str:
    t = type(v)
    if t is str:
        s = v
    elif t is bool:
        s = "true" if v else "false"
    elif t is int or t is float:
        s = repr(v)
    else:
        s = msgspec.json.encode(v).decode()
    if "\x00" in s:
        raise RowError("text contains a NUL character (PostgreSQL text cannot hold it)")
    return s


# Inline form for the generated converter: a str without NUL (the usual case) is
# returned as it is, exactly as _to_text would, without a call.
_to_text.inline = '(_v if (type(_v) is str and "\\x00" not in _v) else {conv}(_v))'  # type: ignore[attr-defined]


def _to_bool(v: Any) -> bool:
    t = type(v)
    if t is bool:
        return v
    if t is int and v in (0, 1):
        return bool(v)
    if t is str:
        low = v.strip().lower()
        if low in ("true", "t", "1", "yes", "on"):
            return True
        if low in ("false", "f", "0", "no", "off"):
            return False
    raise RowError(f"expected a boolean, got {_type_name(v)} {v!r:.40}")


def _make_to_ts(unit: str) -> Callable[[Any], _dt.datetime]:
    div = _UNIT_DIV[unit]
    fromts = fromtimestamp_utc
    fromunits = fromunits_utc

    def to_ts(v: Any) -> _dt.datetime:
        t = type(v)
        try:
            if t is float or t is int:
                # An integer count of ms/us/ns exactly (no float division).
                return fromunits(v, div) if div != 1 else fromts(v, UTC)
            if t is _dt.datetime:
                return v if v.tzinfo is not None else v.replace(tzinfo=UTC)
            if t is str:
                s = v.strip()
                try:
                    num = float(s)
                except ValueError:
                    d = _dt.datetime.fromisoformat(s)
                    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)
                return fromts(num / div, UTC)
        except (ValueError, OverflowError, OSError) as e:
            raise RowError(f"invalid timestamp {v!r:.40}: {e}") from None
        raise RowError(f"expected a timestamp (number or ISO 8601 string), got {_type_name(v)}")

    # Inline form for the generated converter: numbers (the usual case) without
    # a call; anything else (and any error) through to_ts. An out-of-range number
    # raises from fromtimestamp, which Route.convert turns into a RowError.
    scaled = "_fromts(_v, _UTC)" if div == 1 else f"_fromunits(_v, {div})"
    to_ts.inline = (  # type: ignore[attr-defined]
        f"{scaled} if (type(_v) is int or type(_v) is float) else {{conv}}(_v)"
    )
    to_ts.ts_div = div  # type: ignore[attr-defined]
    return to_ts


_json_encode = msgspec.json.encode


def _to_jsonb(v: Any) -> str | None:
    """Any decoded JSON value (or msgspec.Raw) -> JSON text for a jsonb column."""
    if type(v) is msgspec.Raw:
        b = bytes(v)
        if not b or b == b"null":
            return None
        return b.decode()
    if v is None:
        return None
    return _json_encode(v).decode()


def _to_bytea(v: Any) -> bytes:
    if type(v) is bytes:
        return v
    if type(v) is str:
        return v.encode()
    raise RowError(f"expected bytes or a string, got {_type_name(v)}")


def value_converter(pgtype: str, unit: str = "s") -> Callable[[Any], Any]:
    """The converter of a (decoded JSON or string) value to the Python value for ``pgtype``."""
    if pgtype == "double precision":
        return _to_float
    if pgtype == "real":
        return _to_real
    if pgtype in _INT_RANGE:
        return _make_to_int(pgtype)
    if pgtype == "numeric":
        return _to_numeric
    if pgtype == "text":
        return _to_text
    if pgtype == "boolean":
        return _to_bool
    if pgtype == "timestamptz":
        return _make_to_ts(unit)
    if pgtype == "jsonb":
        return _to_jsonb
    if pgtype == "bytea":
        return _to_bytea
    raise ValueError(pgtype)  # pragma: no cover - types are validated first


def string_converter(pgtype: str, unit: str = "s") -> Callable[[str], Any]:
    """Converter for values that arrive as strings (topic levels, user properties, ids)."""
    if pgtype == "jsonb":
        # A string source in a jsonb column is a JSON string.
        return lambda s: _json_encode(s).decode()
    if pgtype == "text":
        return _to_text
    return value_converter(pgtype, unit)


def _decode_type(pgtype: str) -> Any:
    """The msgspec type a payload leaf is decoded as (checked and coerced in C), or Any."""
    if pgtype in ("double precision", "real"):
        return float | None
    if pgtype in _INT_RANGE:
        lo, hi = _INT_RANGE[pgtype]
        return Annotated[int, msgspec.Meta(ge=lo, le=hi)] | None
    if pgtype == "boolean":
        return bool | None
    if pgtype == "numeric":
        return Decimal | None
    if pgtype == "jsonb":
        return msgspec.Raw
    # text (numbers become text), timestamptz (numbers or strings): converted in Python.
    return Any


def _post_decode(pgtype: str, unit: str) -> Callable[[Any], Any] | None:
    """What still has to happen after msgspec decoded a leaf as ``_decode_type(pgtype)``."""
    if pgtype == "real":
        return _to_real
    if pgtype in ("double precision", "boolean", "numeric") or pgtype in _INT_RANGE:
        return None
    if pgtype == "jsonb":
        return _raw_to_jsonb
    return value_converter(pgtype, unit)


def _raw_to_jsonb(v: msgspec.Raw) -> str | None:
    """A decoded ``msgspec.Raw`` leaf -> JSON text (absent or null: None)."""
    b = bytes(v)
    return None if b in (b"", b"null") else b.decode()


# Inline form for the generated converter (no call per row).
_raw_to_jsonb.inline = '(None if (_b := bytes(_v)) in (b"", b"null") else _b.decode())'  # type: ignore[attr-defined]
