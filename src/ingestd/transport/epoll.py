"""Plain-TCP listeners on the compiled epoll transport (ext/ingestd/_epoll.pyx).

``serve`` binds the listening sockets of one ``HOST:PORT`` as
``loop.create_server`` would (every address the host resolves to, SO_REUSEADDR,
IPV6_V6ONLY, optionally SO_REUSEPORT, backlog 4096), or takes a socket a parent
process bound (``ingestd.workers``), and returns the :class:`~ingestd._epoll.Hub`
that accepts from them. The hub stands where an ``asyncio.Server`` would:
``sockets``, ``close()``, ``await wait_closed()``.

Each accepted socket is a :class:`~ingestd._epoll.Conn`, the port its channel
writes through (the same Port as :class:`ingestd.transport.tcp.StreamConnection`:
``send``, ``write_now``, ``writable``, ``pause_reading``/``resume_reading``,
``close``); the channel factory gets it once the socket is accepted. TLS and
WebSocket listeners keep the asyncio transports (transport/tcp.py,
transport/websocket.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from ingestd._epoll import Hub
from ingestd.transport.addr import bound_socket
from ingestd.transport.tcp import ByteCounter, ChannelLike

BACKLOG = 4096


def bind(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening, non-blocking sockets for every address ``host`` resolves to.

    Raises OSError (the first bind failure) after closing what was opened."""
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _name, addr in infos:
            key = (family, addr)
            if key in seen:
                continue
            seen.add(key)
            sock = bound_socket(family, kind, proto, addr, reuse_port=reuse_port)
            socks.append(sock)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def serve(
    new_channel: Callable[[Any], ChannelLike],
    max_outbound_bytes: int,
    stats: ByteCounter,
    transport_name: str,
    host: str,
    port: int,
    *,
    sock: socket.socket | None = None,
    reuse_port: bool = False,
) -> Hub:
    """Accept MQTT-over-TCP connections on ``host:port`` (or ``sock``) through one hub."""
    socks = [sock] if sock is not None else bind(host, port, reuse_port=reuse_port)
    if sock is not None:
        sock.setblocking(False)
    hub = Hub(asyncio.get_running_loop(), new_channel, max_outbound_bytes, stats, transport_name)
    try:
        for s in socks:
            hub.listen(s)
    except BaseException:
        hub.close()
        raise
    return hub
