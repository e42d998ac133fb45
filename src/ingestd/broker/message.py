"""The in-broker representation of an application message."""

from __future__ import annotations

import time


class Message:
    """One application message as the broker routes it.

    Built once per inbound PUBLISH (or will) and shared, read-only, by every
    delivery and every ingest route it reaches. ``expires_at`` is an absolute
    ``time.monotonic()`` deadline from the MQTT 5 Message Expiry Interval, or
    None. ``received_at`` is wall-clock ``time.time()`` at receipt.
    """

    __slots__ = (
        "client_id",
        "expires_at",
        "payload",
        "properties",
        "qos",
        "received_at",
        "retain",
        "topic",
        "username",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: dict | None = None,
        client_id: str = "",
        username: str | None = None,
        received_at: float | None = None,
        expires_at: float | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties if properties is not None else {}
        self.client_id = client_id
        self.username = username
        self.received_at = time.time() if received_at is None else received_at
        self.expires_at = expires_at

    def remaining_expiry(self, now: float) -> int | None:
        """Seconds left of the Message Expiry Interval (None: never expires)."""
        if self.expires_at is None:
            return None
        return max(0, int(self.expires_at - now + 0.999))

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def __repr__(self) -> str:
        return (
            f"Message({self.topic!r}, {len(self.payload)} B, qos={self.qos}, retain={self.retain})"
        )
