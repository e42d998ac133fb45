"""PgBrokerStore: retained messages and persistent sessions in PostgreSQL.

Implements :class:`ingestd.broker.hooks.BrokerStore`. The broker's hooks only
record the latest change per key in memory (write-behind, coalescing: a topic
retained a thousand times between two flushes is written once); a background
task writes the changes every ``flush_interval`` in one transaction. At
shutdown ``save_sessions`` writes every persistent session with its
undelivered QoS 1/2 messages, and ``load`` brings them back at start-up.

What survives what:
- graceful stop (SIGTERM/SIGINT): retained messages, sessions with their
  subscriptions and undelivered QoS 1/2 messages;
- a crash (SIGKILL, power loss): retained messages and session
  subscriptions written by the last flush (at most ``flush_interval`` old);
  messages queued for offline sessions since the last graceful stop are not.

Values are stored as msgpack (msgspec): MQTT 5 property dicts have int keys
and bytes values, which JSON cannot carry losslessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec

from ingestd.broker.hooks import StoredSession
from ingestd.broker.message import Message
from ingestd.protocol import Prop

log = logging.getLogger("ingestd.store")

_USER_PROPERTY = int(Prop.USER_PROPERTY)

DDL = """
CREATE TABLE IF NOT EXISTS ingestd_retained (
    topic text PRIMARY KEY,
    message bytea NOT NULL,
    expires_at double precision,
    stored_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ingestd_sessions (
    client_id text PRIMARY KEY,
    state bytea NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
);
"""

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def _props_in(props: Any) -> dict[int, Any]:
    """Restore a property dict from msgpack (keys are ints; user properties are tuples)."""
    out = {int(k): v for k, v in props.items()}
    if _USER_PROPERTY in out:
        out[_USER_PROPERTY] = [tuple(kv) for kv in out[_USER_PROPERTY]]
    return out


def encode_retained(
    message: Message, now_wall: float, now_mono: float
) -> tuple[bytes, float | None]:
    expires = None
    if message.expires_at is not None:
        expires = now_wall + (message.expires_at - now_mono)
    body = _enc.encode(
        [message.payload, message.qos, message.properties, message.client_id, message.username]
    )
    return body, expires


def decode_retained(
    topic: str, body: bytes, expires: float | None, now_wall: float, now_mono: float
) -> Message:
    payload, qos, props, client_id, username = _dec.decode(body)
    return Message(
        topic,
        payload,
        qos,
        True,
        _props_in(props),
        client_id,
        username,
        expires_at=None if expires is None else now_mono + (expires - now_wall),
    )


def encode_session(s: StoredSession) -> bytes:
    return _enc.encode(
        [s.expiry_interval, s.subscriptions, s.disconnected_at, [list(p) for p in s.pending]]
    )


def decode_session(client_id: str, body: bytes) -> StoredSession:
    expiry, subs, disconnected_at, pending = _dec.decode(body)
    return StoredSession(
        client_id=client_id,
        expiry_interval=expiry,
        subscriptions={f: tuple(o) for f, o in subs.items()},
        disconnected_at=disconnected_at,
        pending=[(t, p, q, r, _props_in(pr), ids) for t, p, q, r, pr, ids in pending],
    )


class PgBrokerStore:
    """BrokerStore over an asyncpg pool; see the module docstring."""

    def __init__(self, pool: Any, flush_interval: float = 0.1) -> None:
        self.pool = pool
        self.flush_interval = flush_interval
        # Pending changes: latest value per key, None = delete.
        self._retained: dict[str, Message | None] = {}
        self._sessions: dict[str, StoredSession | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self.flush_errors = 0

    async def start(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(DDL)
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- hooks (sync, hot path: record only) ---------------------------------

    def retained_set(self, message: Message) -> None:
        self._retained[message.topic] = message
        self._wake.set()

    def retained_delete(self, topic: str) -> None:
        self._retained[topic] = None
        self._wake.set()

    def session_saved(self, session: StoredSession) -> None:
        self._sessions[session.client_id] = session
        self._wake.set()

    def session_deleted(self, client_id: str) -> None:
        self._sessions[client_id] = None
        self._wake.set()

    # -- background writer ---------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                # Keep the changes for the next attempt (the database may be restarting).
                self.flush_errors += 1
                log.warning("broker store: flush failed (%s); will retry", exc)
                self._wake.set()
            await asyncio.sleep(self.flush_interval)

    async def flush(self) -> None:
        """Write every pending change in one transaction."""
        if not self._retained and not self._sessions:
            return
        retained, self._retained = self._retained, {}
        sessions, self._sessions = self._sessions, {}
        now_wall, now_mono = time.time(), time.monotonic()
        upserts = []
        deletes = []
        for topic, msg in retained.items():
            if msg is None:
                deletes.append(topic)
            else:
                body, expires = encode_retained(msg, now_wall, now_mono)
                upserts.append((topic, body, expires))
        s_upserts = [(cid, encode_session(s)) for cid, s in sessions.items() if s is not None]
        s_deletes = [cid for cid, s in sessions.items() if s is None]
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if deletes:
                    await conn.execute(
                        "DELETE FROM ingestd_retained WHERE topic = ANY($1)", deletes
                    )
                if upserts:
                    await conn.executemany(
                        "INSERT INTO ingestd_retained (topic, message, expires_at) VALUES ($1, $2, $3)"
                        " ON CONFLICT (topic) DO UPDATE SET message = EXCLUDED.message,"
                        " expires_at = EXCLUDED.expires_at, stored_at = now()",
                        upserts,
                    )
                if s_deletes:
                    await conn.execute(
                        "DELETE FROM ingestd_sessions WHERE client_id = ANY($1)", s_deletes
                    )
                if s_upserts:
                    await conn.executemany(
                        "INSERT INTO ingestd_sessions (client_id, state) VALUES ($1, $2)"
                        " ON CONFLICT (client_id) DO UPDATE SET state = EXCLUDED.state,"
                        " stored_at = now()",
                        s_upserts,
                    )
        except BaseException:
            # Put back what was not written, unless a newer change replaced it meanwhile.
            for k, v in retained.items():
                self._retained.setdefault(k, v)
            for k, s in sessions.items():
                self._sessions.setdefault(k, s)
            raise

    # -- start-up and shutdown -------------------------------------------------

    async def load(self) -> tuple[list[Message], list[StoredSession]]:
        now_wall, now_mono = time.time(), time.monotonic()
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT topic, message, expires_at FROM ingestd_retained"
                " WHERE expires_at IS NULL OR expires_at > $1",
                now_wall,
            )
            srows = await conn.fetch("SELECT client_id, state FROM ingestd_sessions")
        retained = [
            decode_retained(r["topic"], r["message"], r["expires_at"], now_wall, now_mono)
            for r in rows
        ]
        sessions = [decode_session(r["client_id"], r["state"]) for r in srows]
        log.info(
            "broker store: loaded %d retained messages, %d sessions", len(retained), len(sessions)
        )
        return retained, sessions

    async def save_sessions(self, sessions: list[StoredSession]) -> None:
        for s in sessions:
            self._sessions[s.client_id] = s
        await self.flush()

    async def stop(self) -> None:
        """App calls stop() on its plugins at shutdown."""
        await self.close()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.flush()
        except Exception as exc:
            log.warning("broker store: final flush failed: %s", exc)
