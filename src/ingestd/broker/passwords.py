"""Password file: one ``username:HASH`` line per user.

HASH is one of:

* ``$pbkdf2-sha256$<iterations>$<salt b64>$<hash b64>``: written by ``ingestd passwd``;
* ``$7$<iterations>$<salt b64>$<hash b64>``: PBKDF2-HMAC-SHA512, written by
  Mosquitto 2.0's ``mosquitto_passwd``;
* ``$6$<salt b64>$<hash b64>``: SHA-512 of password + salt, written by older
  ``mosquitto_passwd`` (``-H sha512``).

So a file from ``mosquitto_passwd`` works unchanged. Read at start-up and on
SIGHUP (a bad file on reload keeps the old one). PBKDF2 and SHA-512 from
hashlib (no extra dependency); comparison in constant time. Verifying costs a
PBKDF2 run (~50 ms at 100,000 iterations): the broker runs it in a thread
(:class:`ingestd.broker.auth.Auth`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable

from ingestd.errors import ConfigError

_SCHEME = "$pbkdf2-sha256$"
_MOSQ_PBKDF2 = "$7$"
_MOSQ_SHA512 = "$6$"
_ITERATIONS = 100_000


def hash_password(password: str, iterations: int = _ITERATIONS) -> str:
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"{_SCHEME}{iterations}${b64(salt).decode()}${b64(digest).decode()}"


def valid_username(username: str) -> bool:
    """A user name a password file line can carry: not empty, no ':' nor line break."""
    return bool(username) and not any(c in username for c in ":\n\r")


def verify_password(stored: str, password: bytes) -> bool:
    """Whether ``password`` matches the stored hash (any supported scheme)."""
    try:
        if stored.startswith(_SCHEME):
            _, _, iterations, salt, digest = stored.split("$")
            expected = base64.b64decode(digest)
            got = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(salt), int(iterations))
        elif stored.startswith(_MOSQ_PBKDF2):
            _, _, iterations, salt, digest = stored.split("$")
            expected = base64.b64decode(digest)
            got = hashlib.pbkdf2_hmac(
                "sha512", password, base64.b64decode(salt), int(iterations), len(expected)
            )
        elif stored.startswith(_MOSQ_SHA512):
            _, _, salt, digest = stored.split("$")
            expected = base64.b64decode(digest)
            got = hashlib.sha512(password + base64.b64decode(salt)).digest()
        else:
            return False
    except (ValueError, TypeError, binascii.Error):
        return False
    return hmac.compare_digest(expected, got)


def hash_kind(stored: str) -> tuple[str, int]:
    """A stored hash's scheme and cost (what checking a password against it costs)."""
    if stored.startswith(_MOSQ_SHA512):
        return (_MOSQ_SHA512, 0)
    parts = stored.split("$")
    try:
        return (f"${parts[1]}$", int(parts[2]))
    except (IndexError, ValueError):
        return (_SCHEME, _ITERATIONS)


def common_kind(hashes: Iterable[str]) -> tuple[str, int]:
    """The most common :func:`hash_kind` of ``hashes`` (ours at 100,000 when there are none)."""
    kinds: dict[tuple[str, int], int] = {}
    for stored in hashes:
        kind = hash_kind(stored)
        kinds[kind] = kinds.get(kind, 0) + 1
    return max(kinds, key=kinds.__getitem__) if kinds else (_SCHEME, _ITERATIONS)


def dummy_of_kind(kind: tuple[str, int]) -> str:
    """A hash of a throw-away password of that scheme and cost (costs one hash to make)."""
    scheme, iterations = kind
    salt = os.urandom(12)
    b64 = base64.b64encode
    if scheme == _MOSQ_SHA512:
        digest = hashlib.sha512(os.urandom(16) + salt).digest()
        return f"{_MOSQ_SHA512}{b64(salt).decode()}${b64(digest).decode()}"
    if scheme == _MOSQ_PBKDF2:
        digest = hashlib.pbkdf2_hmac("sha512", os.urandom(16), salt, iterations)
        return f"{_MOSQ_PBKDF2}{iterations}${b64(salt).decode()}${b64(digest).decode()}"
    return hash_password(os.urandom(16).hex(), iterations)


def dummy_like(users: dict[str, str]) -> str:
    """A hash of a throw-away password in the file's most common scheme and cost.

    An unknown user is checked against it, so it costs what a known user's
    wrong password costs (a file of ``$7$`` lines at 101 iterations must not
    make unknown users the slow ones).
    """
    return dummy_of_kind(common_kind(users.values()))


def well_formed(stored: str) -> bool:
    """Whether ``stored`` looks like a hash of a supported scheme (never a clear password)."""
    if stored.startswith(_SCHEME) or stored.startswith(_MOSQ_PBKDF2):
        parts = stored.split("$")
        return len(parts) == 5 and parts[2].isdigit() and int(parts[2]) > 0
    if stored.startswith(_MOSQ_SHA512):
        return stored.count("$") == 3
    return False


def load_password_file(path: str) -> dict[str, str]:
    """Read a password file; a malformed line raises ConfigError naming file and line."""
    users: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read password file: {why}", path=path) from exc
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not well_formed(stored):
            raise ConfigError(
                "expected 'user:$pbkdf2-sha256$...' (`ingestd passwd`) or 'user:$7$...' /"
                " 'user:$6$...' (`mosquitto_passwd`)",
                path=path,
                key=f"line {n}",
            )
        users[user] = stored
    return users
