# The in-broker representation of an application message, compiled.
#
# One is built for every inbound PUBLISH, so its cost is per message: as a
# Python class with __slots__ it took ~280 ns to build (a Python __init__
# frame) and a subtype dealloc to free; built here from the fast path
# (ingestd._inbound) it is one allocation and nine field stores. Python code
# reads the fields as attributes, as before.
#
# Not tracked by the cyclic GC (no_gc): a Message refers to strings, bytes,
# numbers and its properties dict, never to anything that could refer back
# to it, so it cannot be part of a cycle. Untracked, the hundreds of thousands
# alive in ingest batches neither trigger collections nor get traversed by them.

cimport cython

import time

cdef object _now = time.time


@cython.final
@cython.freelist(64)
@cython.no_gc
cdef class Message:
    """One application message as the broker routes it.

    Built once per inbound PUBLISH (or will) and shared, read-only, by every
    delivery and every ingest route it reaches. ``expires_at`` is an absolute
    ``time.monotonic()`` deadline from the MQTT 5 Message Expiry Interval, or
    None. ``received_at`` is wall-clock ``time.time()`` at receipt.
    """

    def __init__(self, str topic not None, bytes payload not None, int qos=0, bint retain=False,
                 dict properties=None, str client_id="", username=None, received_at=None,
                 expires_at=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties if properties is not None else {}
        self.client_id = client_id
        self.username = username
        self.received_at = _now() if received_at is None else received_at
        self.expires_at = expires_at

    def remaining_expiry(self, double now):
        """Seconds left of the Message Expiry Interval (None: never expires)."""
        if self.expires_at is None:
            return None
        return max(0, int(self.expires_at - now + 0.999))

    def expired(self, double now):
        return self.expires_at is not None and now >= self.expires_at

    def __repr__(self):
        return (
            f"Message({self.topic!r}, {len(self.payload)} B, qos={self.qos}, retain={self.retain})"
        )

    def __reduce__(self):
        return (Message, (self.topic, self.payload, self.qos, self.retain, self.properties,
                          self.client_id, self.username, self.received_at, self.expires_at))


cdef Message new_message(str topic, bytes payload, int qos, bint retain, dict properties,
                         str client_id, object username, object received_at,
                         object expires_at):
    cdef Message m = Message.__new__(Message)
    m.topic = topic
    m.payload = payload
    m.qos = qos
    m.retain = retain
    m.properties = properties
    m.client_id = client_id
    m.username = username
    m.received_at = received_at
    m.expires_at = expires_at
    return m
