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
