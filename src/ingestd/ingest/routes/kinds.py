"""Column kinds: how a column reads its value, one class per kind.

A route builds each row in three ways that must agree exactly
(``tests/test_rows.py``, ``tests/test_ingest_routes.py``):

* the **getter** ``getter(message, levels, payload_obj) -> value``: the
  reference, used column by column on the error path (``Route.convert_slow``),
  so it decides every RowError and names the failing column;
* the **inline expression** the generated converter (:mod:`.codegen`) puts in
  its one straight-line function instead of calling the getter;
* the **RowBuilder operation** the compiled builder (``ext/ingestd/_rows.pyx``)
  runs for a whole chunk of messages.

Each kind below defines all three in one place: :meth:`ColumnRead.expr` and
:meth:`ColumnRead.op` return None for a kind that has no inline form (the
generated converter and the RowBuilder then call its getter, which is the
base class, :class:`ColumnRead` itself). Adding a column kind is one class
here (plus, only if the RowBuilder should run it natively, an ``OP_*`` in
``_rows.pyx``/``.pxd``); :mod:`.sources` decides which kind a source spec is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ingestd._copy import fromtimestamp_utc
from ingestd._rows import MSG_FAST, MSG_FIELDS
from ingestd.ingest.routes.errors import RowError
from ingestd.ingest.routes.values import UTC, _to_text, _type_name

if TYPE_CHECKING:
    from ingestd._message import Message
    from ingestd.ingest.routes.model import Getter

# An inline expression: the text (reading ``m`` message, ``lv`` topic levels,
# ``o`` decoded payload; ``{name}`` placeholders) and the objects it names.
Inline = tuple[str, dict[str, Any]]


class ColumnRead:
    """A column read through a Python getter only (no inline form).

    ``getter`` is the getter itself, kept as given: the generated converter
    and the RowBuilder call this very function per row.
    """

    __slots__ = ("getter",)

    # The RowBuilder refuses a None from this column (see Required).
    required = False

    def __init__(self, getter: Getter) -> None:
        self.getter = getter

    def expr(self) -> Inline | None:
        """The generated converter's inline expression, or None: it calls ``getter``."""
        return None

    def op(self) -> tuple[Any, ...] | None:
        """The RowBuilder operation ``(kind, arg...)`` (kinds: ``KINDS`` in _rows.pyx),
        or None: it calls ``getter``."""
        return None


class Constant(ColumnRead):
    """A constant value (``value = ...`` in the config, or a constant lookup key)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value
        super().__init__(lambda m, lv, o: value)

    def expr(self) -> Inline:
        return "{v}", {"v": self.value}

    def op(self) -> tuple[Any, ...]:
        return ("const", self.value)


class TopicName(ColumnRead):
    """The whole topic as text. MQTT topic names cannot contain U+0000
    [MQTT-4.7.3-2]: no check needed."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(lambda m, lv, o: m.topic)

    def expr(self) -> Inline:
        return "m.topic", {}

    def op(self) -> tuple[Any, ...]:
        return ("topic",)


class ReceivedAt(ColumnRead):
    """When the broker received the message, as a timestamptz."""

    __slots__ = ()

    def __init__(self) -> None:
        fromts = fromtimestamp_utc
        super().__init__(lambda m, lv, o: fromts(m.received_at, UTC))

    def expr(self) -> Inline:
        return "_fromts(m.received_at, _UTC)", {}

    def op(self) -> tuple[Any, ...]:
        return ("received_ts",)


class MessageField(ColumnRead):
    """The message's ``client_id``, ``username`` (None stays NULL), ``qos`` or
    ``retain``, through the column type's converter ``conv``. ``fast`` names the
    values ``conv`` returns unchanged ("text": a str without NUL, "int": an int
    within smallint's range, "bool": a bool; None: none), which the RowBuilder
    takes as they are instead of calling it."""

    __slots__ = ("conv", "fast", "name")

    def __init__(self, name: str, conv: Callable[[Any], Any], fast: str | None) -> None:
        self.name = name
        self.conv = conv
        self.fast = fast
        if name == "client_id":
            super().__init__(lambda m, lv, o: conv(m.client_id))
        elif name == "username":
            super().__init__(lambda m, lv, o: None if m.username is None else conv(m.username))
        elif name == "qos":
            super().__init__(lambda m, lv, o: conv(m.qos))
        else:
            super().__init__(lambda m, lv, o: conv(m.retain))

    def op(self) -> tuple[Any, ...]:
        return ("msg", MSG_FIELDS[self.name], self.conv, MSG_FAST[self.fast])


_validate_json = msgspec.json.Decoder(msgspec.Raw).decode
_NOT_JSON = (msgspec.DecodeError, UnicodeDecodeError)


def json_text(payload: bytes) -> str | None:
    """The payload as jsonb text when it is a JSON document jsonb can store, else None."""
    if not payload:
        return None
    try:
        _validate_json(payload)
        text = payload.decode()
    except _NOT_JSON:
        return None
    if "\\u0000" in text:
        return None
    return text


def _json_or_null(m: Message, lv: Any, o: Any) -> Any:
    text = json_text(m.payload)
    return None if text is None or text.strip() == "null" else text


def _raw_unless_json(m: Message, lv: Any, o: Any) -> Any:
    p = m.payload
    return p if p and json_text(p) is None else None


class PayloadPair(ColumnRead):
    """The whole payload split over two columns: ``payload_json`` (``source`` "json":
    the payload when it is JSON, ``null`` staying NULL, else NULL) and ``payload_raw``
    ("raw": the payload's bytes when it is not JSON, else NULL). The RowBuilder
    validates a row's payload once for both."""

    __slots__ = ("source",)

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__(_json_or_null if source == "json" else _raw_unless_json)

    def op(self) -> tuple[Any, ...]:
        return (f"payload_{self.source}", _validate_json, _NOT_JSON)


class TopicLevel(ColumnRead):
    """One topic level at a fixed position (a placeholder of the template),
    as text (a level is a str without NUL already) or through ``conv``."""

    __slots__ = ("conv", "pos")

    def __init__(self, pos: int, conv: Callable[[str], Any] | None) -> None:
        self.pos = pos
        self.conv = conv
        p = pos
        if conv is None:
            super().__init__(lambda msg, lv, o: lv[p])  # type: ignore[index]
        else:
            f = conv
            super().__init__(lambda msg, lv, o: f(lv[p]))  # type: ignore[index]

    def expr(self) -> Inline:
        if self.conv is None:
            return f"lv[{self.pos}]", {}
        return f"{{conv}}(lv[{self.pos}])", {"conv": self.conv}

    def op(self) -> tuple[Any, ...]:
        if self.conv is None:
            return ("level", self.pos)
        return ("level_conv", self.pos, self.conv)


class PayloadField(ColumnRead):
    """A payload path: ``obj.f1.f2`` (fields of the route's decoded Struct), then
    ``[k][0]...`` (decoded JSON walked in Python), then ``conv`` (None: the value
    as msgspec decoded it). A path of one Struct field has inline forms."""

    __slots__ = ("attrs", "conv", "rest")

    def __init__(
        self, attrs: list[str], rest: list[str | int], conv: Callable[[Any], Any] | None
    ) -> None:
        self.attrs = attrs_t = tuple(attrs)
        self.rest = rest_t = tuple(rest)
        self.conv = conv

        def get(obj: Any) -> Any:
            v = obj
            for a in attrs_t:
                v = getattr(v, a)
                if v is None:
                    return None
            for step in rest_t:
                # Missing or null: NULL. Something other than the array or object the path
                # steps into: an error, as msgspec reports it for the typed part of a path
                # (docs/ingest.md), so a column does not depend on what other columns read.
                if type(step) is int:
                    if type(v) is not list:
                        raise RowError(f"expected an array at [{step}], got {_type_name(v)}")
                    try:
                        v = v[step]
                    except IndexError:
                        return None
                else:
                    if type(v) is not dict:
                        raise RowError(f"expected an object at {step!r}, got {_type_name(v)}")
                    v = v.get(step)
                if v is None:
                    return None
            return v if conv is None else conv(v)

        super().__init__(lambda m, lv, o: get(o))

    def _simple(self) -> bool:
        return len(self.attrs) == 1 and not self.rest

    def expr(self) -> Inline | None:
        if not self._simple():
            return None
        if self.conv is None:
            return f"o.{self.attrs[0]}", {}
        inline = getattr(self.conv, "inline", "{conv}(_v)")
        return f"(None if (_v := o.{self.attrs[0]}) is None else ({inline}))", {"conv": self.conv}

    def op(self) -> tuple[Any, ...] | None:
        if not self._simple():
            return None
        name, conv = self.attrs[0], self.conv
        if conv is None:
            return ("attr", name)
        if conv is _to_text:
            return ("attr_text", name, conv)
        div = getattr(conv, "ts_div", None)
        if div is not None:
            return ("attr_ts", name, conv, None if div == 1 else div)
        return ("attr_conv", name, conv)


def _renamed(inline: Inline, prefix: str) -> Inline:
    """An inline expression with its placeholders renamed ``{k}`` -> ``{<prefix>k}``,
    so that an outer kind can embed it next to its own placeholders."""
    expr, env = inline
    for k in env:
        expr = expr.replace("{" + k + "}", "{" + prefix + k + "}")
    return expr, {f"{prefix}{k}": v for k, v in env.items()}


class Fallback(ColumnRead):
    """``first``'s value, or ``second``'s when ``first`` gives none (missing or null):
    ``{ source = "payload.ts", fallback = "received_at" }``.

    ``second`` is read only when needed. Its errors (and a lookup miss) are its own;
    an error of ``first`` (a value of the wrong type) is not hidden by the fallback.
    """

    __slots__ = ("first", "second")

    def __init__(self, first: ColumnRead, second: ColumnRead) -> None:
        self.first = first
        self.second = second
        g1 = first.getter
        g2 = second.getter

        def get(m: Message, lv: Any, o: Any) -> Any:
            v = g1(m, lv, o)
            return v if v is not None else g2(m, lv, o)

        super().__init__(get)

    def expr(self) -> Inline | None:
        a = self.first.expr()
        b = self.second.expr()
        if a is None or b is None:
            return None
        e1, env1 = _renamed(a, "f1_")
        e2, env2 = _renamed(b, "f2_")
        # `_f` is this kind's own name: the inner expressions use `_v` (payload
        # fields) and the outer Required `_w`, so nesting never clobbers a value.
        return f"(_f if (_f := {e1}) is not None else {e2})", {**env1, **env2}

    def op(self) -> tuple[Any, ...] | None:
        # ("fallback", first's op, (FALLBACKS name in _rows.pyx, arg)): the builder
        # runs the first read natively and the fallback only when it gives None.
        first = self.first.op()
        if first is None:
            return None
        second = self.second.op()
        if second is not None and second[0] == "received_ts":
            fb: tuple[str, Any] = ("received_ts", None)
        elif second is not None and second[0] == "const":
            fb = ("const", second[1])
        else:
            fb = ("py", self.second.getter)
        return ("fallback", first, fb)


class Required(ColumnRead):
    """Any read whose None is an error: ``column <name>: no value (required)``."""

    __slots__ = ("inner", "name")

    required = True

    def __init__(self, inner: ColumnRead, name: str) -> None:
        self.inner = inner
        self.name = name
        g = inner.getter

        def get(m: Message, lv: Any, o: Any) -> Any:
            v = g(m, lv, o)
            if v is None:
                raise RowError(f"column {name}: no value (required)")
            return v

        super().__init__(get)

    def expr(self) -> Inline | None:
        inner = self.inner.expr()
        if inner is None:
            return None
        # Outer reference to the inner expression: rename its placeholders.
        expr, env2 = _renamed(inner, "r_")
        return (
            f"(_w if (_w := {expr}) is not None else {{missing}}({self.name!r}))",
            {**env2, "missing": _missing},
        )

    def op(self) -> tuple[Any, ...] | None:
        # The RowBuilder checks `required` itself (it raises; Route.convert then
        # produces the RowError through this getter).
        return self.inner.op()


def _missing(name: str) -> Any:
    raise RowError(f"column {name}: no value (required)")
