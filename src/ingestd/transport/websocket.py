"""MQTT over WebSocket (RFC 6455, MQTT 5.0 section 6): a Protocol that unwraps frames.

:class:`WebSocketProtocol` is what the listener creates. It answers the HTTP
upgrade, then feeds the payload of every binary frame to an ordinary
:class:`~ingestd.transport.tcp.StreamConnection` (and so to its channel),
exactly as TCP does: frames and MQTT packets need not line up [MQTT-6.0.0-2],
so bytes go to the codec as they come. The stream writes through
:class:`_FramingTransport`, which wraps each write in one binary frame. Text
frames close the connection [MQTT-6.0.0-1]. Like the TCP transport it knows
nothing of MQTT beyond that: the channel comes from the factory it is given.

Bounds: the handshake may be at most 8 KiB; a frame may be at most the
broker's max_packet_size plus 64 KiB of slack, and is refused from its header.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from ingestd.transport.tcp import ByteCounter, ChannelLike, StreamConnection

log = logging.getLogger("ingestd.transport.ws")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HANDSHAKE = 8192
_SUBPROTOCOLS = ("mqtt", "mqttv3.1")

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked server-to-client frame with FIN set."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def unmask(data: bytes | bytearray, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` (one big-int operation, not a byte loop)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class _FramingTransport:
    """The transport a StreamConnection sees: writes become binary frames."""

    def __init__(self, outer: WebSocketProtocol, transport: asyncio.Transport) -> None:
        self._outer = outer
        self._t = transport

    def write(self, data: bytes) -> None:
        if not self._t.is_closing():
            self._t.write(frame(OP_BINARY, data))

    def close(self) -> None:
        if not self._t.is_closing():
            self._t.write(frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self._t.close()

    def abort(self) -> None:
        self._t.abort()

    def is_closing(self) -> bool:
        return self._t.is_closing()

    def pause_reading(self) -> None:
        self._t.pause_reading()

    def resume_reading(self) -> None:
        self._t.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._t.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._t.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._t.set_write_buffer_limits(high, low)


class WebSocketProtocol(asyncio.Protocol):
    """Server side of one WebSocket connection carrying MQTT."""

    def __init__(
        self,
        new_channel: Callable[[StreamConnection], ChannelLike],
        max_packet_size: int,
        max_outbound_bytes: int,
        stats: ByteCounter,
        transport_name: str = "ws",
    ) -> None:
        self.stream = StreamConnection(new_channel, max_outbound_bytes, stats, transport_name)
        self.max_frame = max_packet_size + 65536
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._open = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._buf += data
        if not self._open and not self._handshake():
            return
        self._frames()

    def _fail_http(self, status: str, why: str) -> None:
        assert self.transport is not None
        log.info("websocket handshake refused (%s): %s", status, why)
        body = why.encode()
        self.transport.write(
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        self.transport.close()
        self._closed = True

    def _handshake(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HANDSHAKE:
                self._fail_http("431 Request Header Fields Too Large", "handshake too large")
            return False
        head = bytes(self._buf[:end]).decode("latin-1")
        del self._buf[: end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or parts[0] != "GET":
            self._fail_http("400 Bad Request", "expected a GET upgrade request")
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        if "websocket" not in headers.get("upgrade", "").lower():
            self._fail_http("426 Upgrade Required", "MQTT over WebSocket only")
            return False
        key = headers.get("sec-websocket-key")
        if not key:
            self._fail_http("400 Bad Request", "missing Sec-WebSocket-Key")
            return False
        offered = [
            p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()
        ]
        chosen = next((p for p in offered if p in _SUBPROTOCOLS), None)
        if offered and chosen is None:
            self._fail_http("400 Bad Request", "subprotocol must be mqtt [MQTT-6.0.0-3]")
            return False
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n"
        )
        if chosen:
            response += f"Sec-WebSocket-Protocol: {chosen}\r\n"
        assert self.transport is not None
        self.transport.write((response + "\r\n").encode())
        self._open = True
        self.stream.connection_made(_FramingTransport(self, self.transport))  # type: ignore[arg-type]
        return True

    def _frames(self) -> None:
        buf = self._buf
        while len(buf) >= 2 and not self._closed:
            b0, b1 = buf[0], buf[1]
            opcode = b0 & 0x0F
            if b0 & 0x70:
                return self._protocol_close(1002, "reserved bits set")
            if not b1 & 0x80:
                return self._protocol_close(1002, "client frames must be masked")
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return None
                n = int.from_bytes(buf[2:4], "big")
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    return None
                n = int.from_bytes(buf[2:10], "big")
                pos = 10
            if n > self.max_frame:
                return self._protocol_close(1009, "frame too large")
            if len(buf) < pos + 4 + n:
                return None
            mask = bytes(buf[pos : pos + 4])
            payload = unmask(buf[pos + 4 : pos + 4 + n], mask)
            del buf[: pos + 4 + n]
            if opcode in (OP_BINARY, OP_CONT):
                if payload:
                    self.stream.data_received(payload)
            elif opcode == OP_PING:
                assert self.transport is not None
                self.transport.write(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self._closed = True
                assert self.transport is not None
                if not self.transport.is_closing():
                    self.transport.write(frame(OP_CLOSE, payload[:2]))
                    self.transport.close()
            elif opcode == OP_PONG:
                pass
            else:
                # Text frames (and unknown opcodes) end the connection [MQTT-6.0.0-1].
                return self._protocol_close(1003, "MQTT needs binary frames [MQTT-6.0.0-1]")
        return None

    def _protocol_close(self, code: int, why: str) -> None:
        log.info("closing websocket %s: %s", self.stream.peer, why)
        self._closed = True
        assert self.transport is not None
        self.transport.write(frame(OP_CLOSE, code.to_bytes(2, "big") + why.encode()[:120]))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._open:
            self.stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self.stream.pause_writing()

    def resume_writing(self) -> None:
        self.stream.resume_writing()
