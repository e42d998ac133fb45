"""The one exception hierarchy of ingestd.

Every error the engine raises on purpose derives from :class:`IngestdError`.
Protocol errors carry the MQTT 5 reason code the server sends before closing
the connection, and their message cites the normative statement they enforce
(for example ``[MQTT-3.1.2-3]``).
"""

from __future__ import annotations

from typing import Any


class IngestdError(Exception):
    """Base class of every error ingestd raises deliberately."""


class ProtocolError(IngestdError):
    """A peer broke the MQTT protocol; the connection must be closed.

    ``reason_code`` is the MQTT 5 reason code to put in the DISCONNECT (or
    CONNACK, before the session exists) sent before closing: 0x81 Malformed
    Packet, 0x82 Protocol Error, 0x95 Packet Too Large, 0x90 Topic Name
    Invalid, 0x84 Unsupported Protocol Version, ...
    """

    def __init__(self, message: str, reason_code: int = 0x81) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        # Raised by Decoder.feed: the complete packets that came before the
        # malformed one in the same feed (handled first, then the error).
        self.packets: list[Any] = []

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return (type(self), (str(self), self.reason_code))


class ConfigError(IngestdError):
    """The configuration is invalid. The message names the file, the key and the reason."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        where = ""
        if path:
            where = f"{path}: "
        if key:
            where += f"{key}: "
        super().__init__(where + message)
        self.path = path
        self.key = key
        self.reason = message


class DatabaseError(IngestdError):
    """PostgreSQL could not be reached or refused an operation."""
