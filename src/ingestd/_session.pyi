# Type stub of the compiled ingestd._session (ext/ingestd/_session.pyx).

from asyncio import TimerHandle
from collections import deque
from typing import Any

from ingestd._message import Message
from ingestd.broker.acl import ClientAcl
from ingestd.broker.hooks import BrokerStats
from ingestd.broker.overflow import OverflowQueue, OverflowStore
from ingestd.broker.session import DeliveryJournal, Outbound, WillSpec

REFILL_BATCH: int
DELIVERY_OVERHEAD: int
NO_ENTRIES: dict[Any, Any]

class SubOptions:
    qos: int
    no_local: bool
    retain_as_published: bool
    retain_handling: int
    sub_id: int

    def __init__(
        self,
        qos: int,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        sub_id: int = 0,
    ) -> None: ...

class Delivery:
    QUEUED: int
    PUBLISH_SENT: int
    PUBREL_SENT: int
    message: Message
    qos: int
    retain: bool
    sub_ids: list[int] | None
    packet_id: int
    state: int
    seq: int

    def __init__(
        self, message: Message, qos: int, retain: bool, sub_ids: list[int] | None
    ) -> None: ...

class QueuePool:
    max_bytes: int
    used: int
    peak: int

    def __init__(self, max_bytes: int) -> None: ...

class Session:
    client_id: str
    stats: BrokerStats
    username: str | None
    user_known: bool
    acl: ClientAcl | None
    connection: Outbound | None
    subscriptions: dict[str, SubOptions]
    inflight: dict[int, Delivery]
    queue: deque[Delivery] | None
    queued_bytes: int
    max_queued_messages: int
    max_queued_bytes: int
    overflow_store: OverflowStore | None
    overflow: OverflowQueue | None
    pool: QueuePool | None
    pooled: int
    inbound_qos2: set[int] | None
    next_packet_id: int
    send_window: int
    expiry_interval: int
    expiry_handle: TimerHandle | None
    will: WillSpec | None
    will_handle: TimerHandle | None
    journal: DeliveryJournal | None
    device_vars: dict[int, dict[str, str]] | None

    def __init__(
        self,
        client_id: str,
        stats: BrokerStats,
        max_queued_messages: int,
        max_queued_bytes: int,
        overflow_store: OverflowStore | None = None,
        pool: QueuePool | None = None,
    ) -> None: ...
    def deliver(
        self,
        message: Message,
        qos: int,
        retain: bool,
        sub_ids: list[int] | None,
        seq: int = 0,
    ) -> bool: ...
    def pump(self) -> None: ...
    def take_overflow(self) -> None: ...
    def resend_inflight(self) -> None: ...
    def on_puback(self, packet_id: int) -> bool: ...
    def acked(self, journaled: list[Delivery] | None) -> None: ...
    def on_pubrec(self, packet_id: int, reason_code: int) -> bool: ...
    def on_pubcomp(self, packet_id: int) -> bool: ...
    def clear_pending(self) -> None: ...
    def qos2_ids(self) -> set[int]: ...
    def own_subscriptions(self) -> dict[str, SubOptions]: ...
    def cancel_timers(self) -> None: ...
