"""The OpenAPI 3.1 document of /api (served at ``GET /api/openapi.json``).

It describes exactly the routes :meth:`ingestd.http.api.Api.routes` registers;
tests/test_api.py checks both directions.
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
    "401": _error("Missing or invalid bearer token (when tokens are configured)"),
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
                            },
                        }
                    },
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
