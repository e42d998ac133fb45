"""The generated converter of a route (one straight-line function per route) and its RowBuilder operations."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ingestd._copy import fromtimestamp_utc, fromunits_utc
from ingestd.ingest.routes.errors import RowError
from ingestd.ingest.routes.values import UTC

if TYPE_CHECKING:
    from ingestd._message import Message
    from ingestd.ingest.routes.model import Column


def _row_ops(columns: list[Column]) -> list[tuple[Any, ...]]:
    """Per column, the RowBuilder operation: (kind, required, arg0, arg1, arg2, fallback).

    A column kind with an inline form gives its operation (``ColumnRead.op``,
    routes/kinds.py); any other column is called as the generated converter
    calls it (its getter decides a required column's None itself).
    """
    ops: list[tuple[Any, ...]] = []
    for c in columns:
        op = c.read.op()
        if op is None:
            ops.append(("py", False, c.getter, None, None))
            continue
        fallback = None
        if op[0] == "fallback":  # ("fallback", first op, (FALLBACKS name, arg))
            op, fallback = op[1], op[2]
        args = (*op[1:], None, None, None)[:3]
        ops.append((op[0], c.read.required, *args, fallback))
    return ops


# Topics whose split levels one route's converters keep (cleared when full).
_LEVELS_CACHE_MAX = 4096


def _generate_converter(
    columns: list[Column],
    decoder: msgspec.json.Decoder[Any] | None,
    needs_levels: bool,
    check: Callable[[list[str]], None] | None,
    levels: dict[str, list[str]] | None = None,
) -> Callable[[Message], tuple[Any, ...]]:
    """Generate one straight-line function building a row (the per-message path of a flush).

    ``levels``: the topic -> split levels cache to use (bounded by
    ``_LEVELS_CACHE_MAX``), shared with the route's RowBuilder.

    Columns whose kind has an inline expression (``ColumnRead.expr``,
    routes/kinds.py) are inlined; the others' getters are called. Several times faster than calling one
    closure per column. Errors raise RowError exactly like the getters do.
    """
    env: dict[str, Any] = {
        "_UTC": UTC,
        "_fromts": fromtimestamp_utc,
        "_fromunits": fromunits_utc,
        "RowError": RowError,
        "_VE": msgspec.ValidationError,
        "_DE": msgspec.DecodeError,
        "_decode": decoder.decode if decoder is not None else None,
        "_check": check,
    }
    exprs = []
    for i, c in enumerate(columns):
        fast = c.read.expr()
        if fast is None:
            env[f"_g{i}"] = c.getter
            exprs.append(f"_g{i}(m, lv, o)")
            continue
        expr, names = fast
        mapping = {}
        for k, v in names.items():
            n = f"_e{i}_{k}"
            env[n] = v
            mapping[k] = n
        exprs.append(expr.format(**mapping))
    lines = ["def convert(m):"]
    if needs_levels or check is not None:
        # Devices publish to the same few topics over and over: keep their split
        # levels (read-only for every getter) instead of splitting each message.
        env["_lvc"] = levels if levels is not None else {}
        env["_LVC_MAX"] = _LEVELS_CACHE_MAX
        lines += [
            "    t = m.topic",
            "    lv = _lvc.get(t)",
            "    if lv is None:",
            "        lv = t.split('/')",
            "        if len(_lvc) >= _LVC_MAX:",
            "            _lvc.clear()",
            "        _lvc[t] = lv",
        ]
    else:
        lines.append("    lv = None")
    if check is not None:
        lines.append("    _check(lv)")
    if decoder is not None:
        lines += [
            "    try:",
            "        o = _decode(m.payload)",
            "    except _VE as e:",
            "        raise RowError(f'payload: {e}') from None",
            "    except _DE as e:",
            "        raise RowError(f'payload is not valid JSON: {e}') from None",
        ]
    else:
        lines.append("    o = None")
    lines.append("    return (" + "".join(e + ", " for e in exprs) + ")")
    code = "\n".join(lines)
    exec(compile(code, "<ingestd route converter>", "exec"), env)
    fn: Callable[[Message], tuple[Any, ...]] = env["convert"]
    return fn
