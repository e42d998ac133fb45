"""The OpenAPI 3.1 document of /api (served at ``GET /api/openapi.json``).

It describes exactly the routes :meth:`ingestd.http.api.Api.routes` registers;
tests/test_api.py checks both directions.

This file is over 600 lines because it is data: one declarative entry per route
and schema of the API (17 routes), kept in one place so the document reads as
the API does; splitting it by route would scatter the shared components.
"""

from __future__ import annotations

from typing import Any


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_STR = {"type": "string"}
_QOS = {"type": "integer", "enum": [0, 1, 2]}
_COMMON_ERRORS = {
    "401": _error(
        "Missing or invalid bearer token (when http.tokens or mqtt.credentials_table is configured)"
    ),
}
_BODY_ERRORS = {
    "400": _error("Malformed body; the message names the field (and index)"),
    "408": _error("Body not received in time"),
    "413": _error("Body too large"),
    "415": _error("Content-Type is not application/json"),
    "503": _error("Shutting down, or an after-commit route failed to store a message"),
}

_PROPERTIES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "content_type": _STR,
        "response_topic": _STR,
        "correlation_data": {"type": "string", "contentEncoding": "base64"},
        "user_properties": {
            "oneOf": [
                {"type": "object", "additionalProperties": _STR},
                {
                    "type": "array",
                    "items": {"type": "array", "items": _STR, "minItems": 2, "maxItems": 2},
                },
            ]
        },
        "message_expiry": {"type": "integer", "minimum": 1, "maximum": 4294967295},
    },
}

_PUBLISH = {
    "type": "object",
    "required": ["topic"],
    "additionalProperties": False,
    "properties": {
        "topic": _STR,
        "payload": {"type": "string", "description": "UTF-8 text"},
        "payload_base64": {"type": "string", "contentEncoding": "base64"},
        "payload_json": {"description": "any JSON value, sent as compact JSON text"},
        "qos": {**_QOS, "default": 0},
        "retain": {"type": "boolean", "default": False},
        "properties": _PROPERTIES,
    },
}

_WEBHOOK_MESSAGE = {
    "type": "object",
    "required": ["topic"],
    "description": (
        "EMQX 5 rule event (event=message.publish, clientid, username, flags.retain,"
        " pub_props), EMQX 4 web hook (action=message_publish, from_client_id,"
        " from_username) or plain {topic, payload, qos}; other fields are ignored"
    ),
    "properties": {
        "event": {"const": "message.publish"},
        "action": {"const": "message_publish"},
        "topic": _STR,
        "payload": _STR,
        "payload_encoding": {"enum": ["plain", "base64"], "default": "plain"},
        "qos": {**_QOS, "default": 1},
        "retain": {"type": "boolean"},
        "flags": {"type": "object", "properties": {"retain": {"type": "boolean"}}},
        "clientid": _STR,
        "client_id": _STR,
        "from_client_id": _STR,
        "username": _STR,
        "from_username": _STR,
        "pub_props": {"type": "object"},
    },
}

_RETAINED = {
    "type": "object",
    "properties": {
        "filter": _STR,
        "truncated": {"type": "boolean"},
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "topic": _STR,
                    "qos": _QOS,
                    "payload": _STR,
                    "payload_encoding": {"enum": ["plain", "base64"]},
                    "properties": {"type": "object"},
                },
            },
        },
    },
}

_SESSIONS = {
    "type": "object",
    "properties": {
        "truncated": {"type": "boolean"},
        "sessions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "client_id": _STR,
                    "online": {"type": "boolean"},
                    "subscriptions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"filter": _STR, "qos": _QOS},
                        },
                    },
                    "inflight": {"type": "integer"},
                    "queued": {"type": "integer"},
                    "expiry_interval": {"type": "integer"},
                },
            },
        },
    },
}

_TIME = {"type": ["string", "null"], "format": "date-time"}
_DEVICE = {
    "type": "object",
    "properties": {
        "client_id": _STR,
        "online": {"type": "boolean"},
        "username": {"type": ["string", "null"]},
        "peer": {"type": ["string", "null"]},
        "protocol": {"enum": ["3.1", "3.1.1", "5.0", None]},
        "protocol_version": {"type": ["integer", "null"]},
        "connected_at": _TIME,
        "last_seen": _TIME,
        "disconnect_reason": {"type": ["string", "null"]},
        "state": {
            "type": "object",
            "description": "device-state table -> its rows whose device column is this client id",
            "additionalProperties": {"type": "array", "items": {"type": "object"}},
        },
    },
}
_DEVICE_DETAIL = {
    "allOf": [
        _DEVICE,
        {
            "type": "object",
            "properties": {
                "session": {
                    "type": ["object", "null"],
                    "properties": {
                        "expiry_interval": {"type": "integer"},
                        "clean_start": {"type": ["boolean", "null"]},
                        "keepalive": {"type": ["integer", "null"]},
                        "transport": {"type": ["string", "null"]},
                    },
                },
                "subscriptions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "filter": _STR,
                            "qos": _QOS,
                            "no_local": {"type": "boolean"},
                            "retain_as_published": {"type": "boolean"},
                            "retain_handling": {"enum": [0, 1, 2]},
                            "subscription_identifier": {"type": ["integer", "null"]},
                        },
                    },
                },
                "queued": {
                    "type": ["object", "null"],
                    "properties": {
                        "inflight": {"type": "integer"},
                        "memory": {"type": "integer"},
                        "overflow": {"type": "integer"},
                    },
                },
                "will": {
                    "type": ["object", "null"],
                    "properties": {
                        "topic": _STR,
                        "qos": _QOS,
                        "retain": {"type": "boolean"},
                        "delay": {"type": "integer"},
                        "bytes": {"type": "integer"},
                        "truncated": {"type": "boolean"},
                        "payload": _STR,
                        "payload_encoding": {"enum": ["plain", "base64"]},
                    },
                },
            },
        },
    ]
}
_STATS = {
    "type": "object",
    "properties": {
        "time": {"type": "number", "description": "server time, Unix seconds"},
        "broker": {
            "type": "object",
            "properties": {
                k: {"type": "integer"}
                for k in (
                    "connections",
                    "sessions",
                    "messages_received",
                    "messages_delivered",
                    "bytes_received",
                    "bytes_sent",
                    "dropped",
                    "retained",
                    "subscriptions",
                )
            },
        },
        "ingest": {
            "type": ["object", "null"],
            "properties": {
                "messages": {"type": "integer"},
                "rows": {"type": "integer"},
                "rows_by_table": {"type": "object", "additionalProperties": {"type": "integer"}},
                "pending_rows": {"type": "integer"},
                "saturated": {"type": "boolean"},
                "spool_bytes": {"type": "integer"},
                "dead_letters": {"type": "integer"},
                "database_errors": {"type": "integer"},
                "database": {"type": "boolean"},
            },
        },
        "routes": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": _STR,
                    "topic": _STR,
                    "table": _STR,
                    "kind": {"enum": ["append", "latest"]},
                    "device_state": {"type": ["string", "null"]},
                    "table_rows": {"type": "integer"},
                    "dead_letters": {"type": "integer"},
                },
            },
        },
    },
}

_LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 100000, "default": 1000},
}
_OK = {"type": "object", "properties": {"ok": {"const": True}}}


_CLIENT_ID = {"name": "client_id", "in": "path", "required": True, "schema": _STR}
_PUBLISH_FIELDS: dict[str, Any] = _PUBLISH["properties"]  # type: ignore[assignment]
_COMMAND = {
    "type": "object",
    "additionalProperties": False,
    "properties": {k: v for k, v in _PUBLISH_FIELDS.items() if k != "topic"},
}
_RPC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{k: v for k, v in _PUBLISH_FIELDS.items() if k != "topic"},
        "timeout_ms": {
            "type": "integer",
            "minimum": 1,
            "description": "default http.rpc_timeout_default_ms, at most http.rpc_timeout_max_ms",
        },
    },
}
_COMMAND_RESULT = {
    "type": "object",
    "properties": {
        "ok": {"const": True},
        "client_id": _STR,
        "command": _STR,
        "scheme": _STR,
        "topic": _STR,
        "qos": _QOS,
        "retain": {"type": "boolean"},
        "delivery": {
            "enum": [
                "delivered",
                "queued",
                "not_subscribed",
                "no_session",
                "dropped",
                "not_permitted",
            ]
        },
    },
}
_MESSAGE = {
    "type": "object",
    "properties": {
        "topic": _STR,
        "payload": {"description": "JSON value, text or base64 (payload_encoding)"},
        "payload_encoding": {"enum": ["json", "plain", "base64"]},
        "qos": _QOS,
        "retain": {"type": "boolean"},
        "properties": {"type": "object"},
    },
}
_RPC_RESULT = {
    "type": "object",
    "properties": {
        "ok": {"const": True},
        "client_id": _STR,
        "request_id": _STR,
        "request_topic": _STR,
        "reply_topic": _STR,
        "elapsed_ms": {"type": "number"},
        "reply": _MESSAGE,
    },
}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


PATHS: dict[str, dict[str, Any]] = {
    "/api/publish": {
        "post": {
            "summary": "Publish one message as the broker (client id $api)",
            "description": "Answers after routing; QoS 1/2 after every after-commit route committed it.",
            "requestBody": _body(_PUBLISH),
            "responses": {"200": _json(_OK), **_BODY_ERRORS, **_COMMON_ERRORS},
        }
    },
    "/api/ingest/webhook": {
        "post": {
            "summary": "Ingest messages POSTed by another broker (EMQX) or a script",
            "description": "One object or an array; validated whole, then published; "
            "2xx after the after-commit rows of its QoS 1/2 messages are committed.",
            "requestBody": _body(
                {"oneOf": [_WEBHOOK_MESSAGE, {"type": "array", "items": _WEBHOOK_MESSAGE}]}
            ),
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"ok": {"const": True}, "accepted": {"type": "integer"}},
                    }
                ),
                **_BODY_ERRORS,
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/retained": {
        "get": {
            "summary": "Retained messages matching a topic filter",
            "parameters": [
                {"name": "filter", "in": "query", "schema": {"type": "string", "default": "#"}},
                _LIMIT,
            ],
            "responses": {
                "200": _json(_RETAINED),
                "400": _error("Invalid filter or limit"),
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/retained/{topic}": {
        "delete": {
            "summary": "Delete the retained message of a topic (an empty retained publish)",
            "parameters": [
                {"name": "topic", "in": "path", "required": True, "schema": _STR},
            ],
            "responses": {
                "200": _json(_OK),
                "400": _error("Invalid topic name"),
                "404": _error("No retained message on that topic"),
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/sessions": {
        "get": {
            "summary": "Sessions, online and offline",
            "parameters": [
                {"name": "prefix", "in": "query", "schema": {"type": "string", "default": ""}},
                _LIMIT,
            ],
            "responses": {"200": _json(_SESSIONS), **_COMMON_ERRORS},
        }
    },
    "/api/sessions/{client_id}": {
        "delete": {
            "summary": "Disconnect a client (MQTT 5: DISCONNECT 0x98 administrative action)",
            "parameters": [
                {"name": "client_id", "in": "path", "required": True, "schema": _STR},
            ],
            "responses": {
                "200": _json(_OK),
                "404": _error("No such session"),
                "409": _error("The session is offline"),
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/devices": {
        "get": {
            "summary": "Devices: presence, live connection and device-state rows, by client id",
            "description": "Ordered by client id (byte order); pass `next` back as `cursor`."
            " A page may hold fewer than `limit` devices when `online` is given.",
            "parameters": [
                {"name": "online", "in": "query", "schema": {"type": "boolean"}},
                {"name": "username", "in": "query", "schema": _STR},
                {"name": "client_id_prefix", "in": "query", "schema": _STR},
                {"name": "cursor", "in": "query", "schema": _STR},
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "devices": {"type": "array", "items": _DEVICE},
                            "next": {"type": ["string", "null"]},
                        },
                    }
                ),
                "400": _error("A malformed or unknown query parameter"),
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/devices/{client_id}": {
        "get": {
            "summary": "One device: presence, session, subscriptions, queue, will, state",
            "parameters": [
                {"name": "client_id", "in": "path", "required": True, "schema": _STR},
            ],
            "responses": {
                "200": _json(_DEVICE_DETAIL),
                "404": _error("No presence row and no session for that client id"),
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/stats": {
        "get": {
            "summary": "Broker and ingest counters (the /metrics sources) as JSON",
            "responses": {"200": _json(_STATS), **_COMMON_ERRORS},
        }
    },
    "/api/dead-letters": {
        "get": {
            "summary": "The newest dead letters (messages that did not fit their route)",
            "parameters": [
                {"name": "route", "in": "query", "schema": _STR},
                {
                    "name": "since",
                    "in": "query",
                    "schema": {"type": "string", "format": "date-time"},
                },
                {
                    "name": "until",
                    "in": "query",
                    "schema": {"type": "string", "format": "date-time"},
                },
                {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 100}},
            ],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "dead_letters": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "received_at": {"type": "string", "format": "date-time"},
                                        "route": _STR,
                                        "topic": _STR,
                                        "client_id": _STR,
                                        "error": _STR,
                                        "payload": _STR,
                                        "payload_encoding": {"enum": ["plain", "base64"]},
                                    },
                                },
                            }
                        },
                    }
                ),
                "400": _error("A malformed filter"),
                "503": _error("No database (--no-db)"),
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/dead-letters/replay": {
        "post": {
            "summary": "Feed the oldest matching dead letters to their routes again, then delete them",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "route": _STR,
                                "since": {"type": "string", "format": "date-time"},
                                "until": {"type": "string", "format": "date-time"},
                                "limit": {"type": "integer", "minimum": 1, "default": 1000},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "ok": {"type": "boolean"},
                            "replayed": {"type": "integer"},
                            "by_route": {
                                "type": "object",
                                "additionalProperties": {"type": "integer"},
                            },
                            "unknown_routes": {"type": "array", "items": _STR},
                        },
                    }
                ),
                "504": _error("Not committed in time; nothing deleted"),
                **_BODY_ERRORS,
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/devices/{client_id}/commands/{name}": {
        "post": {
            "summary": "Send a command to a device on the topic its device scheme makes",
            "description": "The topic comes from the first [[devices.schemes]] entry that can"
            " fill command_topic (variables from the client id, or learned from the last"
            " topic the client published that matched the scheme); then published as"
            " /api/publish does. `delivery` says what became of it for the device's session.",
            "parameters": [
                _CLIENT_ID,
                {"name": "name", "in": "path", "required": True, "schema": _STR},
            ],
            "requestBody": _body(_COMMAND),
            "responses": {
                "200": _json(_COMMAND_RESULT),
                "403": _error("The token's user may not publish to the command topic"),
                "404": _error(
                    "Unknown device: no session, no scheme fills the topic from the client id"
                ),
                "409": _error("Known device whose variables are not learned yet"),
                "422": _error("A variable's value cannot go in a topic (e.g. it holds '/')"),
                **_BODY_ERRORS,
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/devices/{client_id}/rpc": {
        "post": {
            "summary": "Request/response with a device: publish the request, wait for its reply",
            "description": "MQTT 5 devices get a Response Topic under http.rpc_response_prefix"
            " and Correlation Data; MQTT 3.1.1 devices get the request id in the JSON payload's"
            " rpc_correlation_field and answer on the scheme's rpc_response_topic.",
            "parameters": [_CLIENT_ID],
            "requestBody": _body(_RPC),
            "responses": {
                "200": _json(_RPC_RESULT),
                "403": _error("The token's user may not publish to the request topic"),
                "404": _error("Unknown device"),
                "409": _error("The device is offline, or its variables are not learned yet"),
                "422": _error("MQTT 3.1.1 device without rpc_response_topic, or a bad variable"),
                "503": _error("http.rpc_max_pending requests already wait, or shutting down"),
                "504": _error("No reply within timeout_ms"),
                **_BODY_ERRORS,
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/stream": {
        "get": {
            "summary": "Matching messages as server-sent events (text/event-stream)",
            "description": "`event: message` per message (data: topic, payload, payload_encoding"
            " json/plain/base64, qos, retain, properties); `event: dropped` (data: dropped,"
            " total_dropped) when this client was too slow and messages were dropped for it;"
            " a `: keepalive` comment every 15 s.",
            "parameters": [
                {
                    "name": "filter",
                    "in": "query",
                    "description": "MQTT topic filter; repeat for several (at most 16)",
                    "schema": {"type": "array", "items": _STR, "default": ["#"]},
                    "style": "form",
                    "explode": True,
                }
            ],
            "responses": {
                "200": {
                    "description": "The stream",
                    "content": {"text/event-stream": {"schema": _STR}},
                },
                "400": _error("Invalid filter"),
                "403": _error("The token's user may read no topic of a filter"),
                "503": _error("http.stream_max_clients streams are open, or shutting down"),
                **_COMMON_ERRORS,
            },
        }
    },
    "/api/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}), **_COMMON_ERRORS},
        }
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "ingestd API", "version": "0.1.0"},
        "paths": PATHS,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": _STR,
                                "message": _STR,
                                "index": {"type": "integer"},
                                "variable": _STR,
                                "request_id": _STR,
                            },
                        }
                    },
                }
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of http.tokens, or a credentials-table user's"
                    " (`ingestd user token USER`)",
                }
            },
        },
        "security": [{"bearer": []}, {}],
    }
