# Type stub of the compiled ingestd._message (ext/ingestd/_message.pyx).

class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict
    client_id: str
    username: str | None
    received_at: float
    expires_at: float | None

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
    ) -> None: ...
    def remaining_expiry(self, now: float) -> int | None: ...
    def expired(self, now: float) -> bool: ...
