"""Thin synchronous wrappers over paho-mqtt for the integration tests.

Absence is asserted without sleeping: ``barrier()`` publishes a marker on a
private topic the client subscribes to and waits for it. The broker handles
one connection's packets in order and delivers to a session in order, so once
the marker has arrived, anything published before it would have arrived too.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

WAIT = 10.0  # generous upper bound for any single expected event; not a speed assertion
_ids = itertools.count()
# Clients whose network thread runs: close_all() ends what a test left open.
_running: list[Client] = []


def close_all() -> None:
    """End every client's network thread and connection (test teardown): a test that
    ends without disconnecting must not leave a thread and descriptors behind.

    Without waiting: paho's thread may be in its reconnect sleep (1 s steps) once the
    test's server is gone, so joining it would cost up to a second per client; its
    own stop flag ends it by itself (a daemon thread), and disconnect() wakes it."""
    while _running:
        c = _running.pop().c
        c._thread_terminate = True  # what loop_stop() sets before it joins
        c.disconnect()


def props(packet_type: int = PacketTypes.PUBLISH, **kw: Any) -> Properties:
    p = Properties(packet_type)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


class Client:
    """One paho client with its own network thread and a queue of received messages."""

    def __init__(
        self,
        port: int,
        client_id: str | None = None,
        version: int = 5,
        clean_start: bool = True,
        session_expiry: int | None = None,
        keepalive: int = 60,
        will: tuple[str, bytes, int, bool] | None = None,
        will_props: Properties | None = None,
        connect_props: Properties | None = None,
        username: str | None = None,
        password: str | None = None,
        connect: bool = True,
    ) -> None:
        self.port = port
        self.version = version
        self.client_id = (
            f"t-{next(_ids)}-{uuid.uuid4().hex[:6]}" if client_id is None else client_id
        )
        proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=proto,
            clean_session=None if version == 5 else clean_start,
        )
        self.clean_start = clean_start
        self.keepalive = keepalive
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[tuple[Any, Any, Any]] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[Any]]] = queue.Queue()
        self.unsubacks: queue.Queue[tuple[int, list[Any]]] = queue.Queue()
        self._barrier_topic = f"barrier/{self.client_id}"
        self._barrier_seq = 0
        self.c.on_message = lambda c, u, m: self._on_message(m)
        self.c.on_connect = lambda c, u, flags, rc, p: self.connack.put((flags, rc, p))
        self.c.on_disconnect = lambda c, u, flags, rc, p: self.disconnects.put(rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put((mid, rcs))
        self.c.on_unsubscribe = lambda c, u, mid, rcs, p: self.unsubacks.put((mid, rcs))
        if will is not None:
            self.c.will_set(will[0], will[1], will[2], will[3], properties=will_props)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.session_expiry = session_expiry
        self.connect_props = connect_props
        self.barrier_seen = threading.Event()
        if connect:
            self.connect()

    def _on_message(self, m: mqtt.MQTTMessage) -> None:
        if m.topic == self._barrier_topic:
            self.barrier_seen.set()
            return
        self.messages.put(m)

    def connect(self, clean_start: bool | None = None, expect_rc: int = 0) -> Any:
        clean = self.clean_start if clean_start is None else clean_start
        kw: dict[str, Any] = {"keepalive": self.keepalive}
        if self.version == 5:
            p = self.connect_props or Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                p.SessionExpiryInterval = self.session_expiry
            kw["clean_start"] = clean
            kw["properties"] = p
        self.c.connect("127.0.0.1", self.port, **kw)
        self.c.loop_start()
        if self not in _running:
            _running.append(self)
        flags, rc, p = self.connack.get(timeout=WAIT)
        assert rc == expect_rc, f"CONNACK {rc} != {expect_rc}"
        self.session_present = flags.session_present
        self.connack_props = p
        if expect_rc == 0:
            self._subscribe_barrier()
        return rc

    def _subscribe_barrier(self) -> None:
        self.c.subscribe(self._barrier_topic, 0)
        self.subacks.get(timeout=WAIT)

    def subscribe(
        self, topic: str, qos: int = 0, sub_id: int | None = None, **opts: Any
    ) -> list[Any]:
        kw: dict[str, Any] = {}
        if self.version == 5:
            options = SubscribeOptions(qos=qos, **opts)
            if sub_id is not None:
                kw["properties"] = props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=sub_id)
            self.c.subscribe(topic, options=options, **kw)
        else:
            self.c.subscribe(topic, qos)
        _, rcs = self.subacks.get(timeout=WAIT)
        return rcs

    def unsubscribe(self, topic: str) -> list[Any]:
        self.c.unsubscribe(topic)
        _, rcs = self.unsubacks.get(timeout=WAIT)
        return rcs

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        info = self.c.publish(topic, payload, qos, retain, properties=properties)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"publish to {topic} not acknowledged"
        return info

    def expect(self, n: int = 1) -> list[mqtt.MQTTMessage]:
        return [self.messages.get(timeout=WAIT) for _ in range(n)]

    def barrier(self) -> None:
        """Wait until everything sent to this client before now has arrived."""
        self.barrier_seen.clear()
        self.c.publish(self._barrier_topic, b"", 0)
        assert self.barrier_seen.wait(WAIT), "barrier message did not come back"

    def expect_nothing(self) -> None:
        self.barrier()
        assert self.messages.empty(), f"unexpected: {self.messages.get_nowait().topic}"

    def disconnect(self, reason_code: int = 0, properties: Properties | None = None) -> None:
        if self.version == 5:
            from paho.mqtt.reasoncodes import ReasonCode

            rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code)
            self.c.disconnect(reasoncode=rc, properties=properties)
        else:
            self.c.disconnect()
        self.disconnects.get(timeout=WAIT)
        self.c.loop_stop()

    def drop(self) -> None:
        """Close the socket without DISCONNECT (as a device losing power)."""
        sock = self.c.socket()
        self.c.loop_stop()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def raw_connect(port: int, packet: bytes) -> socket.socket:
    """A plain socket that sent ``packet`` (a CONNECT built by hand in the test)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    s.sendall(packet)
    return s


def recv_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
