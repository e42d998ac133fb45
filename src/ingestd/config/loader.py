"""Reading the configuration: TOML file, ``INGESTD_*`` environment, overrides -> :class:`Config`.

Errors name the file (or environment variable), the key path and the reason.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin

import msgspec

from ingestd.config.model import _SECTIONS, ENV_PREFIX, ColumnSpec, Config
from ingestd.config.validate import validate_config
from ingestd.errors import ConfigError

# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_config(
    path: str | None,
    env: Mapping[str, str] = os.environ,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Read, merge and validate the configuration.

    Precedence, lowest first: defaults, the TOML file at ``path`` (None: no
    file), environment variables ``INGESTD_<SECTION>__<KEY>`` (value parsed by
    the field's type; lists as ``a,b`` or a JSON array; an empty string makes
    an optional field None), then ``overrides`` (``{"server": {"data_dir": ...}}``
    or ``{"server.data_dir": ...}``, typically from command-line options).

    Raises :class:`ConfigError` naming the file (or environment variable), the
    key path (``routes[2].columns.ts``) and the reason.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("file not found", path=path) from None
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror or e}", path=path) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid TOML: {e}", path=path) from None
    # Key path -> where the value came from, when not the file (for error messages).
    origins: dict[str, str] = {}
    _apply_env(raw, env, origins)
    if overrides:
        _apply_overrides(raw, overrides, origins)
    _empty_optional_strings(raw)
    try:
        _check_dict_values(raw)
    except ConfigError as e:
        raise ConfigError(_reason_of(e), path=path, key=e.key) from None
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as e:
        key, reason = _translate_validation_error(str(e))
        src = _origin_for(key, origins)
        raise ConfigError(reason, path=src or path, key=key or None) from None
    try:
        validate_config(cfg)
    except ConfigError as e:
        src = _origin_for(e.key or "", origins)
        if src or path:
            raise ConfigError(_reason_of(e), path=src or path, key=e.key) from None
        raise
    return cfg


def _reason_of(e: ConfigError) -> str:
    """The bare reason of a ConfigError (without its "path: key: " prefix)."""
    return e.reason


def _origin_for(key: str, origins: dict[str, str]) -> str | None:
    for k, src in origins.items():
        if key == k or key.startswith(k + ".") or key.startswith(k + "["):
            return src
    return None


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], origins: dict[str, str]) -> None:
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            # INGESTD_TEST_DSN and friends are not configuration keys.
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        section, key = section.lower(), key.lower()
        cls = _SECTIONS.get(section)
        if cls is None:
            raise ConfigError(
                f"unknown section {section!r} (known: {', '.join(_SECTIONS)})", path=f"${name}"
            )
        fields = {f.name: f for f in msgspec.structs.fields(cls)}
        if key not in fields:
            raise ConfigError(f"unknown key {key!r} in section [{section}]", path=f"${name}")
        try:
            value = parse_text_value(env[name], fields[key].type)
        except ValueError as e:
            raise ConfigError(str(e), path=f"${name}", key=f"{section}.{key}") from None
        sect = raw.setdefault(section, {})
        if not isinstance(sect, dict):
            raise ConfigError("not a table", key=section)
        sect[key] = value
        origins[f"{section}.{key}"] = f"${name}"


def _apply_overrides(
    raw: dict[str, Any], overrides: dict[str, Any], origins: dict[str, str]
) -> None:
    for k, v in overrides.items():
        if isinstance(v, dict) and "." not in k:
            for kk, vv in v.items():
                _set_dotted(raw, f"{k}.{kk}", vv)
                origins[f"{k}.{kk}"] = "override"
        else:
            _set_dotted(raw, k, v)
            origins[k] = "override"


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    d = raw
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError("not a table", key=dotted)
        d = nxt
    d[parts[-1]] = value


def _empty_optional_strings(raw: dict[str, Any]) -> None:
    """``key = ""`` means None for optional string fields (TOML has no null).

    This is also how :func:`dump_config` writes a None that differs from the
    default (``http_listen = ""`` disables the HTTP listener).
    """
    for section, cls in _SECTIONS.items():
        sect = raw.get(section)
        if not isinstance(sect, dict):
            continue
        for f in msgspec.structs.fields(cls):
            if sect.get(f.name) == "" and _is_optional(f.type) and str in _union_args(f.type):
                sect[f.name] = None


def _union_args(tp: Any) -> tuple[Any, ...]:
    if get_origin(tp) in (Union, types.UnionType):
        return get_args(tp)
    return (tp,)


def _is_optional(tp: Any) -> bool:
    return type(None) in _union_args(tp)


def parse_text_value(text: str, tp: Any) -> Any:
    """Parse an environment/command-line string as a value of type ``tp``.

    Raises ValueError with a readable reason.
    """
    args = _union_args(tp)
    if text == "" and type(None) in args:
        return None
    non_none = [a for a in args if a is not type(None)]
    if str in non_none:
        return text
    t = non_none[0] if len(non_none) == 1 else tp
    if get_origin(t) is list:
        s = text.strip()
        if s.startswith("["):
            try:
                items = json.loads(s)
            except ValueError as e:
                raise ValueError(f"invalid JSON array: {e}") from None
        else:
            items = [x.strip() for x in s.split(",") if x.strip()]
        (item_t,) = get_args(t) or (Any,)
        return [parse_text_value(x, item_t) if isinstance(x, str) else x for x in items]
    if t is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    try:
        return msgspec.convert(text.strip(), t, strict=False)
    except msgspec.ValidationError as e:
        raise ValueError(f"{e} (got {text!r})") from None


def _check_dict_values(raw: dict[str, Any]) -> None:
    """Validate the values of name-keyed tables (route columns, lookup keys) one by one.

    msgspec reports a bad dict value at ``$.routes[2].columns[...]``; checking
    each entry alone lets the error name the column (``routes[2].columns.ts``).
    Raises ConfigError with the precise key path.
    """
    checks: list[tuple[str, str, Any]] = [
        ("routes", "columns", str | ColumnSpec),
        ("lookups", "key", str | ColumnSpec),
        ("lookups", "columns", str),
    ]
    for section, field_name, tp in checks:
        items = raw.get(section)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            d = item.get(field_name) if isinstance(item, dict) else None
            if not isinstance(d, dict):
                continue
            for name, value in d.items():
                try:
                    msgspec.convert(value, tp, strict=True)
                except msgspec.ValidationError as e:
                    key, reason = _translate_validation_error(str(e))
                    where = f"{section}[{i}].{field_name}.{name}" + (f".{key}" if key else "")
                    raise ConfigError(reason, key=where) from None


_VE_AT = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")


def _translate_validation_error(msg: str) -> tuple[str, str]:
    """``"Expected `int`, got `str` - at `$.routes[2].columns.ts`"`` -> (key path, reason)."""
    m = _VE_AT.match(msg)
    if m is None:  # pragma: no cover - msgspec always matches the pattern
        return "", msg
    reason = m.group("reason")
    key = (m.group("path") or "").lstrip(".")
    mu = _UNKNOWN_FIELD.match(reason)
    if mu:
        key = f"{key}.{mu.group('field')}" if key else mu.group("field")
        reason = "unknown key"
    mm = _MISSING_FIELD.match(reason)
    if mm:
        key = f"{key}.{mm.group('field')}" if key else mm.group("field")
        reason = "required key is missing"
    # Dict values are reported as `[...]`; that is as precise as msgspec gets.
    return key, reason
