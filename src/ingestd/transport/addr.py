"""Parsing of ``HOST:PORT`` listener addresses."""

from __future__ import annotations

import socket
from typing import Any


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``"0.0.0.0:1883"``, ``"[::1]:1883"``, ``"localhost:0"`` -> (host, port).

    Raises ValueError with a message fit for a config error.
    """
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']' after an IPv6 address")
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected ':PORT' after ']'")
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            host, port_s = value, ""
        elif ":" in host:
            raise ValueError(f"{value!r}: write IPv6 addresses as [ADDR]:PORT")
    if not port_s:
        if default_port is None:
            raise ValueError(f"{value!r}: expected HOST:PORT")
        return host or "0.0.0.0", default_port
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{value!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: port {port} out of range 0-65535")
    return host or "0.0.0.0", port


def bound_socket(
    family: int, kind: int, proto: int, addr: Any, *, reuse_port: bool = False
) -> socket.socket:
    """A socket bound to ``addr`` with the options asyncio's ``create_server`` sets
    (SO_REUSEADDR; IPV6_V6ONLY, so an IPv6 socket does not also take the IPv4
    addresses), and SO_REUSEPORT if asked. Closed again if binding fails."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock
