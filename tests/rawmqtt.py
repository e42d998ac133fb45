"""Hand-built MQTT bytes for raw-socket tests (never produced by ingestd's codec)."""

from __future__ import annotations

import socket

from codec_helpers import vbi

WAIT = 10.0


def s(text: str | bytes) -> bytes:
    """A length-prefixed MQTT string."""
    b = text.encode() if isinstance(text, str) else text
    return len(b).to_bytes(2, "big") + b


# The codec tests' hand encoder of a Variable Byte Integer (not the codec under test).
varint = vbi


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect_v5(
    client_id: str = "raw", keepalive: int = 60, props: bytes = b"", flags: int = 0x02
) -> bytes:
    body = (
        s("MQTT")
        + bytes([5, flags])
        + keepalive.to_bytes(2, "big")
        + varint(len(props))
        + props
        + s(client_id)
    )
    return packet(0x10, body)


def connect_v4(client_id: str = "raw", keepalive: int = 60, flags: int = 0x02) -> bytes:
    return packet(0x10, s("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + s(client_id))


def publish(
    topic: str | bytes, payload: bytes, qos: int = 0, pid: int = 0, v5: bool = True
) -> bytes:
    body = s(topic) + (pid.to_bytes(2, "big") if qos else b"") + (b"\x00" if v5 else b"") + payload
    return packet(0x30 | (qos << 1), body)


def split_packets(data: bytes) -> list[tuple[int, bytes]]:
    """(first byte, body) of each packet in ``data``."""
    out = []
    i = 0
    while i < len(data):
        first = data[i]
        i += 1
        mult, length = 1, 0
        while True:
            b = data[i]
            i += 1
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        out.append((first, data[i : i + length]))
        i += length
    return out


class Raw:
    """A raw TCP client for feeding bytes the codec must reject."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until_closed(self) -> list[tuple[int, bytes]]:
        chunks = [self.buf]
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        self.sock.close()
        return split_packets(b"".join(chunks))

    def read_packet(self) -> tuple[int, bytes]:
        while True:
            try:
                pkts = split_packets(self.buf)
                if pkts:
                    first, body = pkts[0]
                    consumed = 1 + len(varint(len(body))) + len(body)
                    self.buf = self.buf[consumed:]
                    return first, body
            except IndexError:
                pass
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
