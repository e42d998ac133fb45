"""Credentials in a PostgreSQL table (``mqtt.credentials_table``), for fleets a backend provisions.

The table (created by ``ingestd db init``, and by ``serve`` when missing):

* ``username`` text, primary key (not empty, no ``:``);
* ``password_hash`` text: a hash the password file accepts (``$pbkdf2-sha256$``,
  ``$7$``, ``$6$``), checked by a CHECK constraint, so a clear password cannot
  be stored by mistake;
* ``client_id`` text, NULL: when set, the only client id this user may connect with;
* ``topic_prefix`` text, NULL: the user's tenant; it becomes a readwrite ACL
  entry on ``PREFIX/#`` in the user's section (docs/security.md);
* ``enabled`` boolean; ``created_at``, ``updated_at`` (kept by a trigger);
* ``api_token_hash`` text, NULL: the SHA-256 (hex) of the user's HTTP API bearer
  token (``ingestd user token``); added to an older table by ``ALTER TABLE``.

A trigger NOTIFYs the channel ``ingestd_credentials`` with the user name of
every inserted, updated or deleted row (an empty payload after TRUNCATE, or for
a name too long for a notification: reload everything).

:class:`CredentialWatcher` keeps the broker's in-memory snapshot: it LISTENs
on its own connection, loads the whole table once connected, then reloads the
rows named by notifications, and the whole table every
``mqtt.credentials_refresh_interval`` seconds as a safety net (a notification
sent while it was not listening is lost; every reconnect reloads everything).
When the database is unreachable it retries with backoff and the snapshot in
force is kept; before the first snapshot, logins from the table are refused
(``Auth``). The snapshot also indexes the API tokens by hash
(:meth:`TableSnapshot.token_user`). The functions at the end are what
``ingestd user ...`` runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg

from ingestd.broker.passwords import common_kind, dummy_of_kind, valid_username, well_formed
from ingestd.db import quote_ident, redact_dsn
from ingestd.errors import DatabaseError

log = logging.getLogger("ingestd.broker")

#: The LISTEN/NOTIFY channel the table's trigger notifies.
CHANNEL = "ingestd_credentials"
# Rows named by notifications past which one full reload is cheaper than a lookup.
_MAX_PENDING_NAMES = 1000
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0
_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class Credential(NamedTuple):
    """One user's credential: from the password file (``source="file"``) or the table.

    A tuple, so comparing two snapshots of a large table costs tuple comparisons."""

    password_hash: str
    client_id: str | None = None
    prefix: str | None = None
    enabled: bool = True
    source: str = "table"
    token_hash: str | None = None  # SHA-256 hex of the user's API token (table only)


def new_api_token() -> str:
    """A fresh API token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def api_token_hash(token: str) -> str:
    """What the table stores of an API token: its SHA-256, hex.

    A fast hash is right here, unlike for passwords: a token is 256 random bits, so
    there is nothing to guess from a leaked hash and no need for a slow, salted KDF
    (which would also cost a thread and milliseconds on every API request).
    """
    return hashlib.sha256(token.encode()).hexdigest()


def prefix_problem(prefix: str) -> str | None:
    """None if ``prefix`` can be a tenant topic prefix, else why not."""
    if not prefix:
        return "must not be empty"
    if "+" in prefix or "#" in prefix:
        return "must be literal topic levels (no '+' or '#'; 'a/b' grants 'a/b/#')"
    if prefix.startswith("$"):
        return "must not start with '$'"
    if prefix.endswith("/") or "\0" in prefix:
        return "must not end with '/' or contain NUL"
    return None


def normalize_prefix(prefix: str) -> str:
    """``org_7/devices/#`` and ``org_7/devices`` are the same prefix; stored without ``/#``."""
    return prefix[:-2] if prefix.endswith("/#") else prefix


def prefix_grant(prefix: str) -> str:
    """The ACL filter a prefix grants readwrite."""
    return f"{prefix}/#"


def table_ddl(table: str) -> list[str]:
    """The table, its trigger function and its triggers (``ingestd db init --print``)."""
    t = quote_ident(table)
    func = quote_ident(table + "_notify")
    # Only the last part names the function's schema-local name; keep the schema.
    return [
        f"""CREATE TABLE IF NOT EXISTS {t} (
    username text PRIMARY KEY CHECK (username <> '' AND strpos(username, ':') = 0),
    password_hash text NOT NULL
        CHECK (password_hash ~ '^[$](pbkdf2-sha256|7|6)[$]'),
    client_id text,
    topic_prefix text CHECK (topic_prefix IS NULL OR (topic_prefix <> ''
        AND topic_prefix !~ '[+#]' AND left(topic_prefix, 1) <> '$'
        AND right(topic_prefix, 1) <> '/')),
    enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
)""",
        # Its own statement, so a table created before API tokens existed gets it too.
        f"""ALTER TABLE {t} ADD COLUMN IF NOT EXISTS api_token_hash text UNIQUE
    CHECK (api_token_hash ~ '^[0-9a-f]{{64}}$')""",
        f"""CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_WHEN = 'BEFORE' THEN
        NEW.updated_at := now();
        RETURN NEW;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify(TG_ARGV[0], '');
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify(TG_ARGV[0],
            CASE WHEN octet_length(OLD.username) < 7900 THEN OLD.username ELSE '' END);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.username <> OLD.username) THEN
        PERFORM pg_notify(TG_ARGV[0],
            CASE WHEN octet_length(NEW.username) < 7900 THEN NEW.username ELSE '' END);
    END IF;
    RETURN NULL;
END
$fn$""",
        *(
            f"CREATE TRIGGER {name} {when} ON {t} FOR EACH {each} "
            f"EXECUTE FUNCTION {func}('{CHANNEL}')"
            for name, when, each in _TRIGGERS
        ),
    ]


_TRIGGERS = (
    ("ingestd_touch", "BEFORE UPDATE", "ROW"),
    ("ingestd_notify", "AFTER INSERT OR UPDATE OR DELETE", "ROW"),
    ("ingestd_truncate", "AFTER TRUNCATE", "STATEMENT"),
)


async def ensure_table(conn: Any, table: str) -> list[str]:
    """Create the table, its function and triggers where missing; returns the statements run.

    An existing table is only checked (its columns are read once) and given the
    ``api_token_hash`` column when it lacks it; a trigger that exists is left
    alone, so a role that may only read an up-to-date table can run it.
    """
    t = quote_ident(table)
    stmts = table_ddl(table)
    executed: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", table)
        oid = await conn.fetchval("SELECT to_regclass($1)::oid", t)
        if oid is None:
            for stmt in stmts:
                await conn.execute(stmt)
            return stmts
        column = await conn.fetchval(
            "SELECT 1 FROM pg_attribute WHERE attrelid = $1 AND attname = 'api_token_hash'"
            " AND NOT attisdropped",
            oid,
        )
        if column is None:  # a table from before API tokens: add the column
            await conn.execute(stmts[1])
            executed.append(stmts[1])
        have = {
            r["tgname"]
            for r in await conn.fetch("SELECT tgname FROM pg_trigger WHERE tgrelid = $1", oid)
        }
        missing = [
            s for (name, _w, _e), s in zip(_TRIGGERS, stmts[3:], strict=True) if name not in have
        ]
        if missing:
            for stmt in [stmts[2], *missing]:
                await conn.execute(stmt)
                executed.append(stmt)
    try:
        await conn.fetch(f"SELECT {_COLUMNS} FROM {t} LIMIT 0")
    except asyncpg.PostgresError as e:
        raise DatabaseError(f"table {table} does not fit mqtt.credentials_table: {e}") from e
    return executed


_COLUMNS = "username, password_hash, client_id, topic_prefix, enabled, api_token_hash"


def _credential(row: Any) -> Credential | None:
    """A row as a Credential; None (logged) for a row that cannot be used."""
    name, stored, prefix = row["username"], row["password_hash"], row["topic_prefix"]
    if not well_formed(stored or ""):
        log.warning("credentials table: user %r has no usable password hash; refused", name)
        return None
    if prefix is not None and prefix_problem(prefix) is not None:
        log.warning("credentials table: user %r has an invalid topic_prefix; refused", name)
        return None
    return Credential(
        stored, row["client_id"], prefix, bool(row["enabled"]), token_hash=row["api_token_hash"]
    )


def _snapshot(rows: Iterable[Any]) -> dict[str, Credential]:
    users: dict[str, Credential] = {}
    for row in rows:
        cred = _credential(row)
        if cred is not None:
            users[row["username"]] = cred
    return users


def _rebuild(
    rows: list[Any], before: dict[str, Credential] | None
) -> tuple[dict[str, Credential], set[str], tuple[str, int]]:
    """A full load's snapshot, the user names that differ from ``before``, and the most
    common hash kind. Runs in a thread: for a large table it is most of a reload's work,
    and the event loop keeps serving clients meanwhile (``before`` is only read)."""
    users = _snapshot(rows)
    kind = common_kind(c.password_hash for c in users.values())
    if before is None:
        return users, set(users), kind
    changed = {n for n, c in users.items() if before.get(n) != c}
    changed.update(n for n in before if n not in users)
    return users, changed, kind


@dataclass(slots=True)
class TableSnapshot:
    """What the broker knows of the table: the users, and the hash an unknown user costs."""

    users: dict[str, Credential]
    dummy: str
    loaded_at: float  # time.time() of the last successful (full or partial) load
    # api_token_hash -> user name; built by __post_init__, kept by update().
    tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = {c.token_hash: n for n, c in self.users.items() if c.token_hash}

    def update(self, name: str, cred: Credential | None) -> None:
        """Put ``cred`` (None: remove) as ``name``'s credential, keeping the token index."""
        old = self.users.pop(name, None)
        if old is not None and old.token_hash and self.tokens.get(old.token_hash) == name:
            del self.tokens[old.token_hash]
        if cred is not None:
            self.users[name] = cred
            if cred.token_hash:
                self.tokens[cred.token_hash] = name

    def token_user(self, token_hash: str) -> str | None:
        """The enabled user whose API token hashes to ``token_hash``, else None.

        A dict lookup, not a constant-time comparison: what the presented token
        could leak through timing is at most a prefix of its SHA-256 in the
        dict's hash table, which says nothing usable about any 256-bit random
        token (finding a token with a chosen hash prefix does not help find one
        with the whole hash). The row is checked again here, so a stale index
        entry never lets a disabled, revoked or deleted user's token in.
        """
        name = self.tokens.get(token_hash)
        if name is None:
            return None
        cred = self.users.get(name)
        if cred is None or not cred.enabled or cred.token_hash != token_hash:
            return None
        return name


class CredentialWatcher:
    """Keeps the snapshot of ``table`` up to date (LISTEN/NOTIFY plus a periodic full reload).

    ``on_change(snapshot, changed_user_names)`` runs on the loop after every load
    that changed something (and after the first one).
    """

    def __init__(
        self,
        dsn: str,
        table: str,
        refresh_interval: float,
        on_change: Callable[[TableSnapshot, set[str]], None],
        connect_timeout: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.table = table
        self.refresh_interval = refresh_interval
        self.on_change = on_change
        self.connect_timeout = connect_timeout
        self.snapshot: TableSnapshot | None = None
        self.connected = False
        self._kind: tuple[str, int] | None = None
        self._pending: set[str] = set()
        self._reload_all = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._conn: Any = None

    async def start(self) -> None:
        """Connect and load once (bounded by the connect timeout), then keep watching.

        A failure is logged, not raised: the watcher keeps retrying, and until a
        snapshot exists the table's users are refused.
        """
        first = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._run(first))
        try:
            await asyncio.wait_for(asyncio.shield(first), self.connect_timeout + 5.0)
        except TimeoutError:
            pass

    async def stop(self) -> None:
        """Stop watching and close the connection.

        The flag ends the loop even if a cancellation is lost (``asyncio.wait_for``
        on Python 3.11 can swallow one that arrives as its awaitable completes, as
        inside ``asyncpg.connect``), so cancelling is repeated until the task ends.
        """
        self._stopping = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if task is not None and not task.cancelled() and task.exception() is not None:
            log.error("credentials watcher failed: %s", task.exception())
        await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None:
            # Nothing to flush on this connection (it only reads and listens): close the
            # socket at once, never wait on a server that may be gone.
            conn.terminate()

    def _lost_listener(self, lost: asyncio.Event) -> Callable[[Any], None]:
        def on_lost(_conn: Any) -> None:
            lost.set()
            self._wake.set()

        return on_lost

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if not payload or len(self._pending) >= _MAX_PENDING_NAMES:
            self._reload_all = True
        else:
            self._pending.add(payload)
        self._wake.set()

    async def _run(self, first: asyncio.Future[None]) -> None:
        backoff = _BACKOFF_MIN
        failures = 0
        while not self._stopping:
            lost = asyncio.Event()
            try:
                conn = self._conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
                conn.add_termination_listener(self._lost_listener(lost))
                created = await ensure_table(conn, self.table)
                if created:
                    log.info("credentials table %s: created what was missing", self.table)
                await conn.add_listener(CHANNEL, self._notified)
                self._pending.clear()
                self._reload_all = False
                await self._load_all(conn)  # after LISTEN: nothing changed since is missed
                self.connected = True
                if failures:
                    log.info("credentials table %s reachable again", self.table)
                failures = 0
                backoff = _BACKOFF_MIN
                if not first.done():
                    first.set_result(None)
                await self._watch(conn, lost)
            except asyncio.CancelledError:
                raise
            except (*_DB_ERRORS, DatabaseError) as e:
                failures += 1
                self._log_down(e, failures)
            except Exception:
                failures += 1
                log.exception("credentials table %s: unexpected error; retrying", self.table)
            finally:
                await self._close()
            if not first.done():
                first.set_result(None)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX, max(self.refresh_interval, _BACKOFF_MIN))

    def _log_down(self, e: BaseException, failures: int) -> None:
        if failures > 1 and failures % 20:
            return  # one line per 20 attempts while it stays down
        snap = self.snapshot
        keep = (
            f"keeping the snapshot of {len(snap.users)} users loaded"
            f" {time.time() - snap.loaded_at:.0f} s ago"
            if snap is not None
            else "no snapshot yet: its users are refused (CONNACK 0x88 / 3)"
        )
        log.error(
            "credentials table %s at %s unreachable (%s): %s; retrying",
            self.table,
            redact_dsn(self.dsn),
            e,
            keep,
        )

    async def _watch(self, conn: Any, lost: asyncio.Event) -> None:
        """Serve notifications and periodic reloads until the connection is lost."""
        next_full = time.monotonic() + self.refresh_interval
        while not lost.is_set() and not self._stopping:
            timeout = next_full - time.monotonic()
            if timeout > 0 and not (self._pending or self._reload_all):
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass
            if lost.is_set():
                raise DatabaseError("connection lost")
            if self._reload_all or time.monotonic() >= next_full:
                self._reload_all = False
                self._pending.clear()
                await self._load_all(conn)
                next_full = time.monotonic() + self.refresh_interval
            elif self._pending:
                names, self._pending = self._pending, set()
                await self._load_some(conn, names)

    async def _load_all(self, conn: Any) -> None:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM {quote_ident(self.table)}")
        old = self.snapshot
        users, changed, kind = await asyncio.to_thread(
            _rebuild, rows, None if old is None else old.users
        )
        if old is None or kind != self._kind:
            dummy = await asyncio.to_thread(dummy_of_kind, kind)
            self._kind = kind
        else:
            dummy = old.dummy
        self.snapshot = snap = TableSnapshot(users, dummy, time.time())
        if old is None:
            log.info("credentials table %s loaded: %d users", self.table, len(users))
        if old is None or changed:
            self.on_change(snap, changed)

    async def _load_some(self, conn: Any, names: set[str]) -> None:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM {quote_ident(self.table)} WHERE username = ANY($1::text[])",
            list(names),
        )
        snap = self.snapshot
        assert snap is not None
        found = _snapshot(rows)
        changed: set[str] = set()
        for name in names:
            new = found.get(name)
            if snap.users.get(name) != new:
                changed.add(name)
                snap.update(name, new)
        snap.loaded_at = time.time()
        if changed:
            self.on_change(snap, changed)


# -- `ingestd user ...` -------------------------------------------------------


def username_problem(username: str) -> str | None:
    """None if ``username`` can be stored, else why not (as ``ingestd passwd``)."""
    return (
        None if valid_username(username) else "must be non-empty and contain no ':' or line break"
    )


async def add_user(
    conn: Any,
    table: str,
    username: str,
    password_hash: str,
    client_id: str | None,
    prefix: str | None,
) -> None:
    """INSERT a user; DatabaseError if the name exists."""
    try:
        await conn.execute(
            f"INSERT INTO {quote_ident(table)} (username, password_hash, client_id, topic_prefix)"
            " VALUES ($1, $2, $3, $4)",
            username,
            password_hash,
            client_id,
            prefix,
        )
    except asyncpg.UniqueViolationError:
        raise DatabaseError(f"user {username!r} already exists in {table}") from None


async def list_users(conn: Any, table: str) -> list[Any]:
    """Every user without its hashes (``has_token``: whether it has an API token), by name."""
    return list(
        await conn.fetch(
            "SELECT username, client_id, topic_prefix, enabled, created_at, updated_at,"
            " api_token_hash IS NOT NULL AS has_token"
            f" FROM {quote_ident(table)} ORDER BY username"
        )
    )


async def update_user(conn: Any, table: str, username: str, column: str, value: Any) -> None:
    """``UPDATE`` one column of one user; DatabaseError if there is no such user."""
    assert column in ("enabled", "password_hash", "api_token_hash")
    status = await conn.execute(
        f"UPDATE {quote_ident(table)} SET {column} = $2 WHERE username = $1", username, value
    )
    if status.endswith(" 0"):
        raise DatabaseError(f"no user {username!r} in {table}")


async def delete_user(conn: Any, table: str, username: str) -> None:
    status = await conn.execute(f"DELETE FROM {quote_ident(table)} WHERE username = $1", username)
    if status.endswith(" 0"):
        raise DatabaseError(f"no user {username!r} in {table}")
