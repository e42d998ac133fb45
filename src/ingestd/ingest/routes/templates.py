"""Topic templates (``a/{x}/b/{rest#}``) and MQTT filter validation."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ingestd.errors import ConfigError
from ingestd.ingest.routes.errors import RowError

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(#?)\}$")


@dataclass
class Template:
    """A parsed topic template."""

    levels: list[str]
    # placeholder -> level index (negative: from the end) or a slice for "{x#}"
    places: dict[str, int | slice]
    filter: str
    # Whether messages reaching the route must be checked against the template
    # (a multi-level placeholder that is not last, or a custom filter).
    needs_check: bool
    multi_at: int | None


def parse_template(template: str, key: str) -> Template:
    """Parse ``a/{x}/b/{rest#}`` into filter, placeholder positions. Raises ConfigError."""
    if not template:
        raise ConfigError("topic template is empty", key=key)
    if template.startswith("$"):
        raise ConfigError("topics starting with '$' are reserved for the broker", key=key)
    levels = template.split("/")
    places: dict[str, int | slice] = {}
    multi_at: int | None = None
    for i, lvl in enumerate(levels):
        m = _PLACEHOLDER.match(lvl)
        if m:
            name = m.group(1)
            if name in places:
                raise ConfigError(f"placeholder {{{name}}} appears twice", key=key)
            if m.group(2):
                if multi_at is not None:
                    raise ConfigError(
                        "only one multi-level placeholder {name#} is allowed", key=key
                    )
                multi_at = i
            places[name] = i
        elif "{" in lvl or "}" in lvl:
            raise ConfigError(
                f"level {lvl!r}: a placeholder must be a whole level, like {{name}} or {{name#}}",
                key=key,
            )
        elif "+" in lvl or "#" in lvl:
            raise ConfigError(
                f"level {lvl!r}: use {{name}} / {{name#}} placeholders instead of MQTT wildcards",
                key=key,
            )
        elif "\x00" in lvl:
            raise ConfigError("NUL character in topic template", key=key)
    n = len(levels)
    flt_levels: list[str] = []
    for i, lvl in enumerate(levels):
        if multi_at is not None and i == multi_at:
            flt_levels.append("#")
            break
        flt_levels.append("+" if _PLACEHOLDER.match(lvl) else lvl)
    needs_check = multi_at is not None and multi_at != n - 1
    if multi_at is not None:
        after = n - multi_at - 1
        for name, pos in list(places.items()):
            assert isinstance(pos, int)
            if pos == multi_at:
                places[name] = slice(multi_at, -after if after else None)
            elif pos > multi_at:
                places[name] = pos - n  # from the end
    return Template(levels, places, "/".join(flt_levels), needs_check, multi_at)


def validate_filter(flt: str) -> str | None:
    """None if ``flt`` is a valid MQTT topic filter, else the reason."""
    if not flt:
        return "empty filter"
    if "\x00" in flt:
        return "NUL character"
    parts = flt.split("/")
    for i, p in enumerate(parts):
        if "#" in p and (p != "#" or i != len(parts) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in p and p != "+":
            return "'+' must be a whole level"
    return None


def _template_checker(tpl: Template) -> Callable[[list[str]], None]:
    """A check that a topic fits the template (used when the filter is wider than it)."""
    levels = tpl.levels
    n = len(levels)
    multi = tpl.multi_at
    literal: list[tuple[int, str]] = []
    for i, lvl in enumerate(levels):
        if not _PLACEHOLDER.match(lvl):
            literal.append((i - n if multi is not None and i > multi else i, lvl))

    def check(topic_levels: list[str]) -> None:
        k = len(topic_levels)
        if (k != n) if multi is None else (k < n):
            raise RowError(f"topic does not fit the template {'/'.join(levels)!r}")
        for i, lvl in literal:
            if topic_levels[i] != lvl:
                raise RowError(f"topic does not fit the template {'/'.join(levels)!r}")

    return check
