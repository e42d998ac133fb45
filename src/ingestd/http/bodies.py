"""Request bodies of the JSON API -> Messages: every field validated, errors that name it.

``parse_publish`` reads ``POST /api/publish``; ``parse_webhook_message`` one
element of ``POST /api/ingest/webhook`` (EMQX rule engine, EMQX 4 web hook,
or the plain ``{topic, payload, qos}`` form). Both raise :class:`ApiError`
(400) naming the field; nothing here publishes. ``render_*`` turn stored
messages back into JSON for the listing routes.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from typing import Any

from ingestd._trie import validate_topic_name
from ingestd.broker.message import Message
from ingestd.http.app import ApiError
from ingestd.mqtt.constants import Prop

# The client id API publishes carry (a '$' id no MQTT client can take over).
API_CLIENT_ID = "$api"
# The client id of webhook messages whose body names none.
WEBHOOK_CLIENT_ID = "$webhook"

MAX_U32 = 0xFFFF_FFFF
DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000

_P_CONTENT_TYPE = int(Prop.CONTENT_TYPE)
_P_RESPONSE_TOPIC = int(Prop.RESPONSE_TOPIC)
_P_CORRELATION_DATA = int(Prop.CORRELATION_DATA)
_P_USER_PROPERTY = int(Prop.USER_PROPERTY)
_P_MESSAGE_EXPIRY = int(Prop.MESSAGE_EXPIRY_INTERVAL)
_P_PAYLOAD_FORMAT = int(Prop.PAYLOAD_FORMAT_INDICATOR)

PUBLISH_FIELDS = (
    "topic",
    "payload",
    "payload_base64",
    "payload_json",
    "qos",
    "retain",
    "properties",
)
PROPERTY_FIELDS = (
    "content_type",
    "response_topic",
    "correlation_data",
    "user_properties",
    "message_expiry",
)


def bad(message: str, code: str = "bad_request", **extra: Any) -> ApiError:
    return ApiError(400, code, message, **extra)


def busy(message: str, retry_after_s: int) -> ApiError:
    """503 ``busy``: a bound of the API is reached; the client may retry after a while."""
    return ApiError(503, "busy", message, headers={"Retry-After": str(retry_after_s)})


# -- field validation ----------------------------------------------------------


def _mqtt_string(value: Any, where: str) -> str:
    """A string MQTT can carry: UTF-8 encodable, no U+0000, at most 65,535 bytes."""
    if not isinstance(value, str):
        raise bad(f"{where}: expected a string, got {_kind(value)}")
    try:
        n = len(value.encode())
    except UnicodeEncodeError:
        raise bad(f"{where}: not encodable as UTF-8 (lone surrogate)") from None
    if "\x00" in value:
        raise bad(f"{where}: must not contain U+0000")
    if n > 65_535:
        raise bad(f"{where}: {n} bytes of UTF-8, more than 65,535")
    return value


def parse_topic(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise bad(f"{where}: expected a topic name string, got {_kind(value)}")
    if not validate_topic_name(value):
        raise bad(
            f"{where}: {value[:200]!r} is not a valid MQTT topic name (non-empty,"
            " no '+' or '#', no U+0000, at most 65,535 bytes of UTF-8)"
        )
    return value


def _qos(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value <= 2:
        raise bad(f"{where}: expected 0, 1 or 2, got {json.dumps(value)[:50]}")
    return value


def _bool(value: Any, where: str) -> bool:
    if type(value) is not bool:
        raise bad(f"{where}: expected true or false, got {json.dumps(value)[:50]}")
    return value


def _base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise bad(f"{where}: expected a base64 string, got {_kind(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where}: not valid base64 (RFC 4648, with padding)") from None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _only(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise bad(f"{where}unknown field {unknown[0]!r} (expected: {', '.join(allowed)})")


def _user_properties(value: Any, where: str) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [
            (_mqtt_string(k, f"{where} key"), _mqtt_string(v, f"{where}.{k}"))
            for k, v in value.items()
        ]
    if isinstance(value, list):
        out = []
        for i, kv in enumerate(value):
            if not isinstance(kv, list) or len(kv) != 2:
                raise bad(f"{where}[{i}]: expected a [key, value] pair of strings")
            out.append(
                (_mqtt_string(kv[0], f"{where}[{i}][0]"), _mqtt_string(kv[1], f"{where}[{i}][1]"))
            )
        return out
    raise bad(f"{where}: expected an object {{key: value}} or an array of [key, value] pairs")


def _expiry(value: Any, where: str) -> int:
    if type(value) is not int or not 1 <= value <= MAX_U32:
        raise bad(f"{where}: expected whole seconds from 1 to {MAX_U32}")
    return value


def parse_properties(value: Any, where: str = "properties") -> dict[int, Any]:
    """The MQTT 5 properties of an API publish (keys: PROPERTY_FIELDS)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{where}: expected an object, got {_kind(value)}")
    _only(value, PROPERTY_FIELDS, f"{where}: ")
    props: dict[int, Any] = {}
    if "content_type" in value:
        props[_P_CONTENT_TYPE] = _mqtt_string(value["content_type"], f"{where}.content_type")
    if "response_topic" in value:
        props[_P_RESPONSE_TOPIC] = parse_topic(value["response_topic"], f"{where}.response_topic")
    if "correlation_data" in value:
        data = _base64(value["correlation_data"], f"{where}.correlation_data")
        if len(data) > 65_535:
            raise bad(f"{where}.correlation_data: more than 65,535 bytes")
        props[_P_CORRELATION_DATA] = data
    if "user_properties" in value:
        pairs = _user_properties(value["user_properties"], f"{where}.user_properties")
        if pairs:
            props[_P_USER_PROPERTY] = pairs
    if "message_expiry" in value:
        props[_P_MESSAGE_EXPIRY] = _expiry(value["message_expiry"], f"{where}.message_expiry")
    return props


def _message(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    props: dict[int, Any],
    client_id: str,
    username: str | None,
) -> Message:
    expiry = props.get(_P_MESSAGE_EXPIRY)
    expires_at = None if expiry is None else time.monotonic() + expiry
    return Message(topic, payload, qos, retain, props, client_id, username, None, expires_at)


def parse_publish(
    obj: Any,
    *,
    topic: str | None = None,
    default_qos: int = 0,
    extra: tuple[str, ...] = (),
    username: str | None = None,
) -> Message:
    """The Message of a ``POST /api/publish`` body; raises ApiError(400) naming the field.

    With ``topic`` (a device command or RPC request) the body names no topic and its
    QoS defaults to ``default_qos``; ``extra``: further fields the caller reads itself.
    """
    if not isinstance(obj, dict):
        raise bad(f"body: expected a JSON object, got {_kind(obj)}")
    if topic is None:
        _only(obj, PUBLISH_FIELDS + extra, "body: ")
        topic = parse_topic(obj.get("topic"), "topic")
    else:
        _only(obj, PUBLISH_FIELDS[1:] + extra, "body: ")
    given = [k for k in ("payload", "payload_base64", "payload_json") if k in obj]
    if len(given) > 1:
        raise bad(f"give at most one of payload, payload_base64, payload_json (got {given})")
    payload = b""
    if "payload" in obj:
        payload = _mqtt_payload_text(obj["payload"], "payload")
    elif "payload_base64" in obj:
        payload = _base64(obj["payload_base64"], "payload_base64")
    elif "payload_json" in obj:
        payload = json_bytes(obj["payload_json"])
    qos = _qos(obj.get("qos", default_qos), "qos")
    retain = _bool(obj.get("retain", False), "retain")
    props = parse_properties(obj.get("properties"))
    return _message(topic, payload, qos, retain, props, API_CLIENT_ID, username)


def json_bytes(value: Any) -> bytes:
    """Compact JSON text of ``value`` (as payload_json is sent)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _mqtt_payload_text(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise bad(f"{where}: expected a string, got {_kind(value)}")
    try:
        return value.encode()
    except UnicodeEncodeError:
        raise bad(f"{where}: not encodable as UTF-8 (lone surrogate)") from None


# EMQX 5 rule-engine ``pub_props`` names -> (property id, validator).
_EMQX_PROPS: dict[str, tuple[int, Callable[[Any, str], Any]]] = {
    "Content-Type": (_P_CONTENT_TYPE, _mqtt_string),
    "Response-Topic": (_P_RESPONSE_TOPIC, parse_topic),
    "Message-Expiry-Interval": (_P_MESSAGE_EXPIRY, _expiry),
}


def parse_webhook_message(obj: Any, where: str) -> Message:
    """One webhook message: EMQX 5 rule event, EMQX 4 web hook, or plain ``{topic, payload}``.

    EMQX 5 (rule engine, HTTP action with the default body ``${.}``):
    ``{"event": "message.publish", "topic", "payload", "qos", "clientid",
    "username", "flags": {"retain"}, "pub_props": {"User-Property": {...}, ...}}``;
    EMQX 4 (``emqx_web_hook``): ``{"action": "message_publish", "from_client_id",
    "from_username", "topic", "qos", "retain", "payload"}``. Any form may say
    ``"payload_encoding": "base64"`` (default ``"plain"``). Other fields are ignored.
    """
    if not isinstance(obj, dict):
        raise bad(f"{where}expected a JSON object, got {_kind(obj)}")
    event = obj.get("event")
    if event is not None and event != "message.publish":
        raise bad(f"{where}event: only 'message.publish' is ingested, got {json.dumps(event)}")
    action = obj.get("action")
    if action is not None and action != "message_publish":
        raise bad(f"{where}action: only 'message_publish' is ingested, got {json.dumps(action)}")
    topic = parse_topic(obj.get("topic"), f"{where}topic")
    encoding = obj.get("payload_encoding", "plain")
    if encoding not in ("plain", "base64"):
        raise bad(
            f"{where}payload_encoding: expected 'plain' or 'base64', got {json.dumps(encoding)[:50]}"
        )
    raw = obj.get("payload", "")
    if encoding == "base64":
        payload = _base64(raw, f"{where}payload")
    else:
        payload = _mqtt_payload_text(raw, f"{where}payload")
    qos = _qos(obj.get("qos", 1), f"{where}qos")
    if "retain" in obj:
        retain = _bool(obj["retain"], f"{where}retain")
    else:
        flags = obj.get("flags")
        if flags is not None and not isinstance(flags, dict):
            raise bad(f"{where}flags: expected an object, got {_kind(flags)}")
        retain = _bool((flags or {}).get("retain", False), f"{where}flags.retain")
    client_id = WEBHOOK_CLIENT_ID
    for key in ("clientid", "client_id", "from_client_id"):
        if obj.get(key) is not None:
            client_id = _mqtt_string(obj[key], f"{where}{key}")
            break
    username = None
    for key in ("username", "from_username"):
        if obj.get(key) is not None:
            username = _mqtt_string(obj[key], f"{where}{key}")
            break
    props: dict[int, Any] = {}
    pub_props = obj.get("pub_props")
    if pub_props is not None:
        if not isinstance(pub_props, dict):
            raise bad(f"{where}pub_props: expected an object, got {_kind(pub_props)}")
        for name, (pid, check) in _EMQX_PROPS.items():
            if name in pub_props:
                props[pid] = check(pub_props[name], f"{where}pub_props.{name}")
        if "User-Property" in pub_props:
            pairs = _user_properties(pub_props["User-Property"], f"{where}pub_props.User-Property")
            if pairs:
                props[_P_USER_PROPERTY] = pairs
    return _message(topic, payload, qos, retain, props, client_id, username)


# -- rendering ----------------------------------------------------------------


def render_payload(payload: bytes) -> dict[str, str]:
    try:
        return {"payload": payload.decode(), "payload_encoding": "plain"}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(payload).decode(), "payload_encoding": "base64"}


def render_properties(m: Message, now: float) -> dict[str, Any]:
    p = m.properties or {}
    out: dict[str, Any] = {}
    if _P_PAYLOAD_FORMAT in p:
        out["payload_format_indicator"] = p[_P_PAYLOAD_FORMAT]
    if _P_CONTENT_TYPE in p:
        out["content_type"] = p[_P_CONTENT_TYPE]
    if _P_RESPONSE_TOPIC in p:
        out["response_topic"] = p[_P_RESPONSE_TOPIC]
    if _P_CORRELATION_DATA in p:
        out["correlation_data"] = base64.b64encode(p[_P_CORRELATION_DATA]).decode()
    if p.get(_P_USER_PROPERTY):
        out["user_properties"] = [[k, v] for k, v in p[_P_USER_PROPERTY]]
    if m.expires_at is not None:
        out["message_expiry"] = m.remaining_expiry(now)
    return out


def render_message(m: Message, now: float) -> dict[str, Any]:
    """A routed message as JSON (stream events, RPC replies): the payload as JSON when it
    is JSON text, else as text, else base64 (``payload_encoding`` says which)."""
    payload: dict[str, Any]
    try:
        payload = {
            "payload": json.loads(m.payload, parse_constant=_not_json),
            "payload_encoding": "json",
        }
    except ValueError:  # UnicodeDecodeError is a ValueError
        payload = render_payload(m.payload)
    return {
        "topic": m.topic,
        **payload,
        "qos": m.qos,
        "retain": m.retain,
        "properties": render_properties(m, now),
    }


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
