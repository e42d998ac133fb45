"""The effective configuration as TOML text (read back by load_config to an equal Config)."""

from __future__ import annotations

import datetime
import math
import re
from typing import Any

import msgspec

from ingestd.config.model import Config

# --------------------------------------------------------------------------
# Dumping (a tiny TOML emitter: no dependency, and it only has to write what
# Config can hold: scalars, lists, tables, arrays of tables).
# --------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _toml_str(k)


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_TOML_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')


def _toml_str(s: str) -> str:
    """A TOML basic string: quote, backslash and every control character (incl. DEL) escaped."""

    def esc(m: re.Match[str]) -> str:
        c = m.group()
        return _TOML_ESCAPES.get(c) or f"\\u{ord(c):04x}"

    return '"' + _TOML_NEEDS_ESCAPE.sub(esc, s) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, datetime.datetime | datetime.date | datetime.time):
        return v.isoformat()  # TOML date/time literals are ISO 8601 (RFC 3339)
    if isinstance(v, msgspec.Struct):
        v = _struct_items(v, inline=True)
    if isinstance(v, dict):
        inner = ", ".join(
            f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None
        )
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _struct_items(obj: msgspec.Struct, inline: bool = False) -> dict[str, Any]:
    """Field name -> value, None written as "" when it differs from a non-None default."""
    out: dict[str, Any] = {}
    omit = inline and obj.__struct_config__.omit_defaults
    for f in msgspec.structs.fields(obj):
        v = getattr(obj, f.name)
        default = f.default if f.default is not msgspec.NODEFAULT else None
        if f.default_factory is not msgspec.NODEFAULT:
            default = f.default_factory()
        if omit and v == default:
            continue
        if v is None:
            if default is not None:
                out[f.name] = ""
            continue
        out[f.name] = v
    return out


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, msgspec.Struct) for x in v)


def _emit_table(
    lines: list[str],
    header: str | None,
    items: dict[str, Any],
    array: bool = False,
    inline_structs: bool = False,
) -> None:
    # Scalars, lists (and, inside a plain dict such as `columns`, Structs as
    # inline tables) first: TOML puts a table's own keys before its sub-tables.
    simple = {
        k: v
        for k, v in items.items()
        if (inline_structs or not isinstance(v, msgspec.Struct))
        and not isinstance(v, dict)
        and not _is_table_array(v)
    }
    if header is not None:
        lines.append("")
        lines.append(f"[[{header}]]" if array else f"[{header}]")
    for k, v in simple.items():
        lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in items.items():
        if k in simple:
            continue
        sub = f"{header}.{_toml_key(k)}" if header else _toml_key(k)
        if isinstance(v, msgspec.Struct):
            _emit_table(lines, sub, _struct_items(v))
        elif isinstance(v, dict):
            _emit_table(lines, sub, v, inline_structs=True)
        else:
            for x in v:
                _emit_table(lines, sub, _struct_items(x, inline=True), array=True)


def dump_config(cfg: Config) -> str:
    """The effective configuration as TOML; ``load_config`` reads it back to an equal Config."""
    lines = ["# ingestd effective configuration"]
    _emit_table(lines, None, _struct_items(cfg))
    return "\n".join(lines).lstrip("\n") + "\n"
