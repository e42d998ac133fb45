"""Password file: ``username:$pbkdf2-sha256$<iterations>$<salt b64>$<hash b64>`` per line.

Written by ``ingestd passwd``; read once at start-up. PBKDF2 from hashlib
(no extra dependency); comparison in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from ingestd.errors import ConfigError

_SCHEME = "$pbkdf2-sha256$"
_ITERATIONS = 100_000


def hash_password(password: str, iterations: int = _ITERATIONS) -> str:
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"{_SCHEME}{iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(stored: str, password: bytes) -> bool:
    try:
        _, _, iterations, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, got)


def load_password_file(path: str) -> dict[str, str]:
    """Read a password file; a malformed line fails start-up naming file and line."""
    users: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read password file: {exc.strerror}", path=path) from exc
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not stored.startswith(_SCHEME) or stored.count("$") != 4:
            raise ConfigError(
                "expected 'user:$pbkdf2-sha256$...' (write it with `ingestd passwd`)",
                path=path,
                key=f"line {n}",
            )
        users[user] = stored
    return users
