"""Sockets the load generator opens itself (where asyncio's own connect falls short)."""

from __future__ import annotations

import asyncio
import socket

# Linux's IP_BIND_ADDRESS_NO_PORT (not in the socket module): bind() fixes only the
# address and connect() picks the port. Without it bind() searches for a free port
# itself, in time growing with the ports in use: tens of thousands of connections from
# chosen source addresses then spent minutes in the kernel.
_IP_BIND_ADDRESS_NO_PORT = 24


async def connect_from(source: str, host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket bound to ``source`` and connected to ``host:port``."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass  # not Linux: bind() chooses the port, as before
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock
