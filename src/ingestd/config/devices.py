"""Device schemes (``[[devices.schemes]]``): where a device's template variables come
from and how its command / RPC topics are made from them.

A template is text with ``{variable}`` placeholders. ``match`` is a topic
template the device publishes to (``company/{company_id}/machine/{machine_id}/#``:
a placeholder is one whole topic level, ``+`` one ignored level, a trailing
``#`` any rest); ``client_id`` is a template of the client id
(``router-{id}``: a placeholder is one or more characters). :func:`compile_schemes`
checks every template of the configuration (a command or RPC topic may only
use variables the scheme can learn, plus ``client_id`` and, for commands,
``name``) and raises :class:`ConfigError` naming the key.

The broker calls :meth:`DeviceSchemes.learn` with the topics a client
publishes (off the fast path: once per topic per connection, see
``Channel._attach_fast_path``); the API fills templates with
:meth:`DeviceScheme.variables` and :func:`fill`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ingestd.errors import ConfigError

if TYPE_CHECKING:
    from ingestd.config.model import Config, DeviceSchemeConfig

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Characters a variable's value may not hold once it is put in a topic.
_NOT_IN_LEVEL = re.compile(r"[/+#\x00]")


def placeholders(template: str, key: str) -> list[str]:
    """The variable names of ``template`` in order; raises ConfigError(key) on bad syntax."""
    names = _PLACEHOLDER.findall(template)
    for n in names:
        if not _NAME.match(n):
            raise ConfigError(
                f"{{{n}}} in {template!r} is not a variable name (letters, digits, _)", key=key
            )
    rest = _PLACEHOLDER.sub("", template)
    if "{" in rest or "}" in rest:
        raise ConfigError(f"unbalanced braces in {template!r}", key=key)
    return names


def level_error(value: str) -> str | None:
    """Why ``value`` cannot stand in a topic level (None: it can)."""
    if not value:
        return "it is empty"
    if _NOT_IN_LEVEL.search(value):
        return "it holds '/', '+', '#' or U+0000"
    return None


def fill(template: str, values: dict[str, str]) -> str:
    """``template`` with every placeholder replaced (every one must be in ``values``)."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _topic_regex(template: str, key: str) -> re.Pattern[str]:
    levels = template.split("/")
    parts: list[str] = []
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                raise ConfigError(f"'#' must be the last level of {template!r}", key=key)
            # "a/#" also matches "a" [MQTT-4.7.1-2]
            if parts:
                parts[-1] += "(?:/.*)?"
            else:
                parts.append(".*")
            continue
        if level == "+":
            parts.append("[^/]*")
            continue
        if "#" in level or "+" in level:
            raise ConfigError(f"'+' and '#' must be whole levels in {template!r}", key=key)
        names = _PLACEHOLDER.findall(level)
        if names and level != "{" + names[0] + "}":
            raise ConfigError(
                f"a placeholder must be a whole topic level in {template!r}, got {level!r}",
                key=key,
            )
        parts.append(f"(?P<{names[0]}>[^/]+)" if names else re.escape(level))
    return re.compile("/".join(parts))


def _text_regex(template: str) -> re.Pattern[str]:
    out = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>.+?)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class DeviceScheme:
    """One compiled ``[[devices.schemes]]`` entry."""

    index: int
    name: str
    match: re.Pattern[str] | None
    client_id: re.Pattern[str] | None
    command_topic: str
    qos: int
    rpc_request_topic: str
    rpc_response_topic: str | None
    rpc_correlation_field: str
    rpc_style: str
    # the variables ``match`` / ``client_id`` define (without client_id and name)
    defined: frozenset[str]

    def variables(
        self, client_id: str, learned: dict[int, dict[str, str]] | None
    ) -> dict[str, str] | None:
        """The variables for ``client_id`` (None: this scheme cannot fill its templates).

        ``learned``: what the broker learned from the client's topics, by scheme index.
        """
        values: dict[str, str] = {}
        if self.client_id is not None:
            m = self.client_id.fullmatch(client_id)
            if m is None:
                return None
            values.update(m.groupdict())
        if self.match is not None:
            got = None if learned is None else learned.get(self.index)
            if got is None:
                if self.client_id is None or not self.defined <= values.keys():
                    return None
            else:
                values.update(got)
        values["client_id"] = client_id
        return values

    def missing(self, values: dict[str, str], template: str) -> list[str]:
        return [n for n in _PLACEHOLDER.findall(template) if n not in values]


class DeviceSchemes:
    """Every scheme of the configuration; the broker's learner of topic variables."""

    def __init__(self, schemes: list[DeviceScheme]) -> None:
        self.schemes = schemes
        self._matchers = [(s.index, s.match) for s in schemes if s.match is not None]

    @property
    def learns(self) -> bool:
        """Whether any scheme learns variables from published topics."""
        return bool(self._matchers)

    def learn(
        self, learned: dict[int, dict[str, str]] | None, topic: str
    ) -> dict[int, dict[str, str]] | None:
        """``learned`` updated with the variables of ``topic`` for each scheme it matches.

        Returns the (possibly new) dict, or ``learned`` unchanged when nothing matched.
        """
        for index, rx in self._matchers:
            m = rx.fullmatch(topic)
            if m is not None:
                if learned is None:
                    learned = {}
                learned[index] = m.groupdict()
        return learned


def compile_schemes(cfg: Config) -> DeviceSchemes:
    """The compiled ``[[devices.schemes]]`` of ``cfg``; raises ConfigError naming the key."""
    out: list[DeviceScheme] = []
    seen: set[str] = set()
    for i, sc in enumerate(cfg.devices.schemes):
        out.append(_compile_one(i, sc, seen))
    if not out:
        # No scheme configured: commands go to devices/{client_id}/commands/{name}.
        from ingestd.config.model import DeviceSchemeConfig

        out.append(_compile_one(0, DeviceSchemeConfig(name="default"), seen))
    return DeviceSchemes(out)


def _compile_one(i: int, sc: DeviceSchemeConfig, seen: set[str]) -> DeviceScheme:
    at = f"devices.schemes[{i}]"
    if not sc.name or sc.name in seen:
        raise ConfigError(
            "must be a unique, non-empty name"
            + (f" ({sc.name!r} is used twice)" if sc.name else ""),
            key=f"{at}.name",
        )
    seen.add(sc.name)
    defined: set[str] = set()
    match_rx = client_rx = None
    if sc.match is not None:
        names = placeholders(sc.match, f"{at}.match")
        if not names:
            raise ConfigError(
                f"{sc.match!r} has no {{variable}}: there is nothing to learn", key=f"{at}.match"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"a variable appears twice in {sc.match!r}", key=f"{at}.match")
        match_rx = _topic_regex(sc.match, f"{at}.match")
        defined.update(names)
    if sc.client_id is not None:
        names = placeholders(sc.client_id, f"{at}.client_id")
        if not names or len(set(names)) != len(names):
            raise ConfigError(
                f"{sc.client_id!r} must hold each {{variable}} once, and at least one",
                key=f"{at}.client_id",
            )
        client_rx = _text_regex(sc.client_id)
        defined.update(names)
    reserved = defined & {"client_id", "name"}
    if reserved:
        raise ConfigError(
            f"{{{sorted(reserved)[0]}}} is always given; do not capture it",
            key=f"{at}.{'match' if sc.match else 'client_id'}",
        )
    from ingestd._trie import validate_topic_name

    def check(template: str | None, key: str, extra: set[str]) -> None:
        if template is None:
            return
        names = placeholders(template, key)
        unknown = [n for n in names if n not in defined and n not in extra]
        if unknown:
            raise ConfigError(
                f"{{{unknown[0]}}} in {template!r} is not a variable of this scheme"
                f" (it has: {', '.join(sorted(defined | extra))})",
                key=key,
            )
        if not validate_topic_name(fill(template, dict.fromkeys(names, "x"))):
            raise ConfigError(f"{template!r} does not make a valid topic name", key=key)

    check(sc.command_topic, f"{at}.command_topic", {"client_id", "name"})
    check(sc.rpc_request_topic, f"{at}.rpc_request_topic", {"client_id"})
    check(sc.rpc_response_topic, f"{at}.rpc_response_topic", {"client_id"})
    if sc.rpc_response_topic is not None and not sc.rpc_correlation_field:
        raise ConfigError("must not be empty", key=f"{at}.rpc_correlation_field")
    if sc.rpc_style == "json" and sc.rpc_response_topic is None:
        raise ConfigError(
            'rpc_style = "json" needs rpc_response_topic (where devices answer)',
            key=f"{at}.rpc_style",
        )
    request = sc.rpc_request_topic
    if request is None:
        request = sc.command_topic.replace("{name}", "rpc")
    return DeviceScheme(
        index=i,
        name=sc.name,
        match=match_rx,
        client_id=client_rx,
        command_topic=sc.command_topic,
        qos=sc.qos,
        rpc_request_topic=request,
        rpc_response_topic=sc.rpc_response_topic,
        rpc_correlation_field=sc.rpc_correlation_field,
        rpc_style=sc.rpc_style,
        defined=frozenset(defined),
    )
