"""Auth: who may connect, and who may read and write which topic (one place).

Authentication (:meth:`Auth.authenticate`, a coroutine): ``mqtt.allow_anonymous``,
the ``mqtt.password_file`` (``ingestd passwd`` or ``mosquitto_passwd``
lines, :mod:`ingestd.broker.passwords`) and the ``mqtt.credentials_table``
snapshot (:mod:`ingestd.broker.credentials`; a user name in the file is checked
against the file only). A table user may be pinned to one client id and may
carry a tenant prefix (a readwrite grant on ``PREFIX/#``). The password hash is checked in a
thread, at most ``mqtt.auth_max_concurrent`` at once, so a PBKDF2 run never
blocks the event loop; an unknown user costs the same hash as a wrong
password (no timing oracle). Failures are counted (``BrokerStats.auth_failures``)
and limited per peer address (``mqtt.auth_failure_limit`` failures within
``auth_failure_window`` seconds refuse that address for ``auth_failure_cooldown``).

Authorisation: ``mqtt.acl_file`` (Mosquitto syntax, :mod:`ingestd.broker.acl`)
and the table's prefixes; with either configured, what they do not grant is denied.
:meth:`client_acl` gives a connection its :class:`ClientAcl` (None when no ACL
is configured: every check is then one ``is None`` test); the channel keeps it
and hands it to its session, the router and the compiled fast path.
:meth:`may_publish`, :meth:`may_read` and :meth:`may_subscribe` are the
decisions. :meth:`reload` (SIGHUP) re-reads both files, keeping the old ones
when a new one is bad; :meth:`in_force` says whether the credential a client
logged in with still is (the broker disconnects it when not).
:meth:`api_token_user` finds the table user an HTTP API token belongs to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import NamedTuple

from ingestd.broker.acl import WRITE, AclFile, ClientAcl, dollar_mask
from ingestd.broker.credentials import Credential, TableSnapshot, api_token_hash, prefix_grant
from ingestd.broker.hooks import BrokerStats
from ingestd.broker.passwords import dummy_like, load_password_file, verify_password
from ingestd.config import MqttConfig
from ingestd.errors import ConfigError
from ingestd.mqtt.constants import Reason

log = logging.getLogger("ingestd.broker")

_SHARE = "$share/"
# Peer addresses whose failures are remembered at once (bounded memory under a scan).
_MAX_TRACKED_PEERS = 65_536


def peer_address(peer: str) -> str:
    """The address part of a ``host:port`` / ``[v6]:port`` peer string."""
    host, sep, _port = peer.rpartition(":")
    return host if sep else peer


def check_files(config: MqttConfig) -> None:
    """Read ``password_file`` and ``acl_file`` as start-up would (``ingestd config check``);
    ConfigError naming the file, the line and the reason."""
    if config.password_file:
        load_password_file(config.password_file)
    if config.acl_file:
        AclFile.load(config.acl_file)


def may_write_dollar(topic: str) -> bool:
    """May a client publish to ``topic``, which starts with ``$``, as far as
    ``acl__check_dollar`` goes? Applied with or without an acl_file: no client
    writes ``$SYS`` (but the bridge state topic) or ``$share``."""
    return bool(dollar_mask(topic) & WRITE)


class _DenyAll(ClientAcl):
    """A ClientAcl with no rules: every decision is deny."""

    __slots__ = ()


def is_deny_all(acl: ClientAcl | None) -> bool:
    """Whether ``acl`` is :meth:`Auth.deny_all`'s."""
    return type(acl) is _DenyAll


def revoked_acl(client_id: str) -> ClientAcl:
    """What a client whose credential was revoked reads and writes: nothing (ACL or not)."""
    return _DenyAll(None, client_id, None, None)


class Verdict(NamedTuple):
    """A CONNECT's authentication: 0 or the v5 CONNACK reason code, why (for the log and the
    Reason String), and the credential it logged in with (None: no password was checked)."""

    reason: int
    why: str = ""
    credential: Credential | None = None


_UNAVAILABLE = Credential("", enabled=False, source="unavailable")


class Auth:
    """The broker's authentication and authorisation decisions."""

    def __init__(self, config: MqttConfig, stats: BrokerStats | None = None) -> None:
        self.config = config
        self.stats = stats if stats is not None else BrokerStats()
        # user -> stored hash (None: no password file).
        self.passwords: dict[str, str] | None = (
            load_password_file(config.password_file) if config.password_file else None
        )
        self.acl: AclFile | None = AclFile.load(config.acl_file) if config.acl_file else None
        # mqtt.credentials_table: its snapshot (None until the first load succeeds).
        self.table_configured = bool(config.credentials_table)
        self.table: TableSnapshot | None = None
        if self.acl is None and self.table_configured:
            # The table's prefixes are an ACL source: default deny, as with a file.
            self.acl = AclFile([], source="mqtt.credentials_table")
        if self.acl is not None:
            for warning in self.acl.warnings:
                log.warning("%s", warning)
        # What an unknown user's password is checked against: the same work as a real one.
        self._dummy = dummy_like(self.passwords) if self.passwords is not None else ""
        self._semaphore: asyncio.Semaphore | None = None
        # peer address -> monotonic times of recent failures; address -> refused until.
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}

    # -- authentication -----------------------------------------------------

    def needs_password_check(self, username: str | None) -> bool:
        """Whether :meth:`authenticate` will hash a password (and so must be awaited)."""
        return (self.passwords is not None or self.table_configured) and username is not None

    def lookup(self, username: str) -> Credential | None:
        """The credential of ``username`` (the password file first, then the table);
        ``_UNAVAILABLE`` while the table has no snapshot yet."""
        if self.passwords is not None:
            stored = self.passwords.get(username)
            if stored is not None:
                return Credential(stored, source="file")
        if self.table_configured:
            table = self.table
            return _UNAVAILABLE if table is None else table.users.get(username)
        return None

    def in_force(self, username: str, client_id: str, credential: Credential) -> bool:
        """Whether a client that logged in with ``credential`` may still be connected: the
        same hash from the same source, enabled, and its client id still allowed."""
        cur = self.lookup(username)
        return (
            cur is not None
            and cur.enabled
            and cur.source == credential.source
            and cur.password_hash == credential.password_hash
            and (cur.client_id is None or cur.client_id == client_id)
        )

    def api_token_user(self, token: str) -> str | None:
        """The enabled table user whose HTTP API token ``token`` is (``ingestd user token``),
        else None (also before the table's first snapshot: see ``table``)."""
        table = self.table
        return None if table is None else table.token_user(api_token_hash(token))

    def set_table(self, snapshot: TableSnapshot) -> None:
        """The credentials table was (re)loaded."""
        self.table = snapshot

    def refused_peer(self, peer: str) -> bool:
        """Whether ``peer``'s address is cooling down after too many failed logins."""
        if not self._blocked:
            return False
        addr = peer_address(peer)
        until = self._blocked.get(addr)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._blocked[addr]
            return False
        return True

    def check_anonymous(self, username: str | None, peer: str) -> int | None:
        """The decision when no password is to be checked (None: a password must be)."""
        if self.needs_password_check(username):
            return None
        # No credential source (validate_config made sure allow_anonymous is then true),
        # or no user name.
        return 0 if self.config.allow_anonymous else self._failed(peer, Reason.NOT_AUTHORIZED)

    async def authenticate(
        self, username: str | None, password: bytes | None, peer: str, client_id: str = ""
    ) -> Verdict:
        """Verdict(0, credential=...) to accept a CONNECT, else its v5 CONNACK reason code."""
        quick = self.check_anonymous(username, peer)
        if quick is not None:
            return Verdict(quick, "" if not quick else "not authorized (no user name)")
        assert username is not None
        cred = self.lookup(username)
        if cred is _UNAVAILABLE:
            # Not a failed login (no rate limit): the database is down, the client retries.
            return Verdict(
                Reason.SERVER_UNAVAILABLE, "credentials not loaded yet (database unreachable)"
            )
        # An unknown user (or no password) costs the same hash as a wrong password; a
        # disabled one is checked against its own hash, and refused after.
        table = self.table
        if cred is not None and password is not None:
            target = cred.password_hash
        elif table is not None and (cred is None or cred.source == "table"):
            target = table.dummy
        else:
            target = self._dummy
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.config.auth_max_concurrent)
        async with self._semaphore:
            ok = await asyncio.to_thread(verify_password, target, password or b"")
        bad = Reason.BAD_USER_NAME_OR_PASSWORD
        if not ok or cred is None or password is None:
            return Verdict(self._failed(peer, bad), "bad user name or password")
        if not cred.enabled:
            return Verdict(self._failed(peer, bad), "user disabled")
        if cred.client_id is not None and cred.client_id != client_id:
            return Verdict(
                self._failed(peer, Reason.NOT_AUTHORIZED),
                "this user may not connect with this client id",
            )
        return Verdict(0, "", cred)

    def _failed(self, peer: str, reason: int) -> int:
        self.stats.auth_failures += 1
        limit = self.config.auth_failure_limit
        if limit:
            addr = peer_address(peer)
            now = time.monotonic()
            times = self._failures.get(addr)
            if times is None:
                if len(self._failures) >= _MAX_TRACKED_PEERS:
                    self._failures.clear()
                times = self._failures[addr] = deque(maxlen=limit)
            times.append(now)
            if len(times) >= limit and now - times[0] <= self.config.auth_failure_window:
                self._blocked[addr] = now + self.config.auth_failure_cooldown
                times.clear()
                log.warning(
                    "refusing CONNECTs from %s for %.0f s: %d failed logins within %.0f s",
                    addr,
                    self.config.auth_failure_cooldown,
                    limit,
                    self.config.auth_failure_window,
                )
        return reason

    def certificate_refused(self, peer: str) -> int:
        """A TLS client without the certificate its user name must come from: refused
        as a bad login (0x86; Mosquitto does the same), counted and rate-limited."""
        return self._failed(peer, Reason.BAD_USER_NAME_OR_PASSWORD)

    def rate_limited(self) -> None:
        """Count a CONNECT refused because its peer is cooling down."""
        self.stats.auth_failures += 1

    # -- authorisation -----------------------------------------------------

    def client_acl(self, username: str | None, client_id: str) -> ClientAcl | None:
        """The ACL of a client that connected as (``username``, ``client_id``); None: no ACL."""
        acl = self.acl
        if acl is None:
            return None
        if username and self.table is not None:
            cred = self.lookup(username)
            if cred is not None and cred.source == "table" and cred.enabled and cred.prefix:
                return acl.for_client(username, client_id, (prefix_grant(cred.prefix),))
        return acl.for_client(username, client_id)

    def session_acl(self, username: str | None, client_id: str) -> ClientAcl | None:
        """The ACL an offline session of (``username``, ``client_id``) reads under: nothing
        once that user could not log in again (removed, disabled, pinned elsewhere)."""
        if username is not None and self.needs_password_check(username):
            cred = self.lookup(username)
            if cred is None or (
                cred is not _UNAVAILABLE
                and (not cred.enabled or cred.client_id not in (None, client_id))
            ):
                return revoked_acl(client_id)
        return self.client_acl(username, client_id)

    def deny_all(self, client_id: str) -> ClientAcl | None:
        """An ACL that grants nothing (a session restored without its user name), or None."""
        return None if self.acl is None else _DenyAll(None, client_id, None, None)

    @staticmethod
    def may_publish(acl: ClientAcl | None, topic: str) -> bool:
        """May the client with ``acl`` publish to ``topic`` (PUBLISH and Will)?"""
        if acl is None:
            # No acl_file: anything but what acl__check_dollar refuses ($SYS, $share).
            return topic[:1] != "$" or may_write_dollar(topic)
        return acl.may_publish(topic)

    @staticmethod
    def may_read(acl: ClientAcl | None, topic: str) -> bool:
        """May a message on ``topic`` be delivered to the client with ``acl``?"""
        return acl is None or acl.may_read(topic)

    @staticmethod
    def may_subscribe(acl: ClientAcl | None, topic_filter: str) -> bool:
        """May the client subscribe to the (valid) ``topic_filter``?

        Refused only when no topic the filter (the inner filter of a
        ``$share/group/filter``) matches could be readable (see
        :meth:`ClientAcl.may_read_any`); what an allowed filter delivers is
        still checked per message.
        """
        if acl is None:
            return True
        if topic_filter.startswith(_SHARE):
            topic_filter = topic_filter.split("/", 2)[2]
        return acl.may_read_any(topic_filter)

    # -- reload --------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the password file and the ACL file (SIGHUP).

        A file that cannot be read or parsed is logged and the one in force is
        kept (each file on its own). True if both were reloaded. Callers make
        new :class:`ClientAcl` for every client afterwards (``Broker.reload_auth``).
        """
        ok = True
        cfg = self.config
        if cfg.password_file:
            try:
                passwords = load_password_file(cfg.password_file)
            except ConfigError as e:
                log.error("password file not reloaded, keeping the old one: %s", e)
                ok = False
            else:
                self.passwords = passwords
                self._dummy = dummy_like(passwords)
                log.info("password file reloaded: %d users", len(passwords))
        if cfg.acl_file:
            try:
                acl = AclFile.load(cfg.acl_file)
            except ConfigError as e:
                log.error("ACL file not reloaded, keeping the old one: %s", e)
                ok = False
            else:
                for warning in acl.warnings:
                    log.warning("%s", warning)
                self.acl = acl
                log.info("ACL file reloaded: %d entries", len(acl.entries))
        return ok
