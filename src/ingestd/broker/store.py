"""PgBrokerStore: retained messages and persistent sessions in PostgreSQL.

Implements :class:`ingestd.broker.hooks.BrokerStore`. The broker's hooks only
record the latest change per key in memory (write-behind, coalescing: a topic
retained a thousand times between two flushes is written once); a background
task writes the changes every ``flush_interval`` in one transaction. At
shutdown ``save_sessions`` writes every persistent session with its
undelivered QoS 1/2 messages, and ``load`` brings them back at start-up.

What survives what:
- graceful stop (SIGTERM/SIGINT): retained messages, sessions with their
  subscriptions, and every undelivered QoS 1/2 message of a persistent
  session (the delivery journal, flushed at stop);
- a crash (SIGKILL, power loss): the same as written by the last flush, at
  most ``flush_interval`` old: a message delivered to a persistent session
  (online or offline) less than that before the crash can be lost (unless
  ``persistence.ack_after_journal`` held its publisher's acknowledgement until
  that flush: see ``durable_future``), and one that completed less than that
  before it can be delivered again.

The delivery journal (``ingestd_session_queue``): a persistent session's
QoS 1/2 delivery is put when the session accepts it and deleted when it
completes (see ``ingestd.broker.session``); a put and its delete within one
flush interval cancel out, so a subscriber that keeps up costs no writes.
A session that ends takes its rows with it.

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
from ingestd.broker.session import Delivery
from ingestd.mqtt.constants import Prop

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
CREATE TABLE IF NOT EXISTS ingestd_session_queue (
    client_id text NOT NULL,
    seq bigint NOT NULL,
    delivery bytea NOT NULL,
    PRIMARY KEY (client_id, seq)
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


def _wall_expiry(message: Message, now_wall: float, now_mono: float) -> float | None:
    """A message's monotonic expiry deadline as wall-clock time (what survives a restart)."""
    if message.expires_at is None:
        return None
    return now_wall + (message.expires_at - now_mono)


def _mono_expiry(expires: float | None, now_wall: float, now_mono: float) -> float | None:
    """The inverse of :func:`_wall_expiry` in this process."""
    return None if expires is None else now_mono + (expires - now_wall)


def encode_retained(
    message: Message, now_wall: float, now_mono: float
) -> tuple[bytes, float | None]:
    expires = _wall_expiry(message, now_wall, now_mono)
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
        expires_at=_mono_expiry(expires, now_wall, now_mono),
    )


def encode_session(s: StoredSession) -> bytes:
    state = [s.expiry_interval, s.subscriptions, s.disconnected_at, [list(p) for p in s.pending]]
    if s.user_known:
        state.append([s.username])  # the ACL of an offline session is decided on it
    return _enc.encode(state)


def decode_session(client_id: str, body: bytes) -> StoredSession:
    state = _dec.decode(body)
    expiry, subs, disconnected_at, pending = state[:4]
    # Rows written before user names were kept have four fields: the user is unknown.
    user = state[4] if len(state) > 4 else None
    return StoredSession(
        username=user[0] if user else None,
        user_known=user is not None,
        client_id=client_id,
        expiry_interval=expiry,
        subscriptions={f: tuple(o) for f, o in subs.items()},
        disconnected_at=disconnected_at,
        pending=[(t, p, q, r, _props_in(pr), ids) for t, p, q, r, pr, ids in pending],
    )


def encode_delivery(d: Delivery, now_wall: float, now_mono: float) -> bytes:
    m = d.message
    expires = _wall_expiry(m, now_wall, now_mono)
    return _enc.encode(
        [
            m.topic,
            m.payload,
            m.qos,
            m.retain,
            m.properties,
            m.client_id,
            m.username,
            expires,
            d.qos,
            d.retain,
            d.sub_ids,
        ]
    )


def decode_delivery(
    seq: int, body: bytes, now_wall: float, now_mono: float
) -> tuple[int, Message, int, bool, list[int] | None]:
    topic, payload, qos, retain, props, cid, user, expires, dqos, dretain, ids = _dec.decode(body)
    expires_at = _mono_expiry(expires, now_wall, now_mono)
    message = Message(topic, payload, qos, retain, _props_in(props), cid, user, None, expires_at)
    return seq, message, dqos, dretain, ids


def _resolve(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class PgBrokerStore:
    """BrokerStore over an asyncpg pool; see the module docstring."""

    def __init__(self, pool: Any, flush_interval: float = 0.1) -> None:
        self.pool = pool
        self.flush_interval = flush_interval
        # Pending changes: latest value per key, None = delete.
        self._retained: dict[str, Message | None] = {}
        self._sessions: dict[str, StoredSession | None] = {}
        # Delivery journal changes: (client id, seq) -> the delivery to insert, or None
        # to delete; clients whose rows all go (their session ended) before any insert.
        self._journal: dict[tuple[str, int], Delivery | None] = {}
        self._journal_clear: set[str] = set()
        self._seq = 0  # the last journal key handed out (load() starts past the stored ones)
        self._task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # an acknowledgement waits on the journal
        self._closing = False
        self.flush_errors = 0
        # Resolved when the changes recorded so far are committed (durable_future).
        self._durable: asyncio.Future[None] | None = None

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
        self.journal_drop(client_id)

    def journal_drop(self, client_id: str) -> None:
        """Forget every journaled delivery of ``client_id`` (written or not)."""
        for key in [k for k in self._journal if k[0] == client_id]:
            del self._journal[key]
        self._journal_clear.add(client_id)
        self._wake.set()

    def durable_future(self) -> asyncio.Future[None]:
        """A future resolved once every change recorded so far is committed.

        Shared by everything recorded until the next flush starts; it never fails
        (a failed flush keeps the changes and retries), so an acknowledgement held
        on it waits out a database outage.
        """
        fut = self._durable
        if fut is None:
            fut = self._durable = asyncio.get_running_loop().create_future()
            self._wake.set()
            self._urgent.set()
        return fut

    def put(self, client_id: str, d: Delivery) -> None:
        self._seq += 1
        d.seq = self._seq
        self._journal[(client_id, d.seq)] = d
        self._wake.set()

    def done(self, client_id: str, d: Delivery) -> None:
        key = (client_id, d.seq)
        if self._journal.get(key) is not None:
            del self._journal[key]  # never written: nothing to delete
        else:
            self._journal[key] = None
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
                continue
            # Write behind: changes wait for the interval, unless an acknowledgement
            # waits on them (durable_future): then they go at once (group commit:
            # what arrives during one flush goes in the next).
            if self._durable is None:
                self._urgent.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.flush_interval)

    async def flush(self) -> None:
        """Write every pending change in one transaction.

        One flush at a time (the background writer, save_sessions and close may
        overlap): two transactions in flight could commit out of order, letting an
        older value of a key, or a session's clear, land after a newer write.
        """
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        durable, self._durable = self._durable, None
        if not (self._retained or self._sessions or self._journal or self._journal_clear):
            _resolve(durable)  # nothing left to write (e.g. a put and its done cancelled)
            return
        retained, self._retained = self._retained, {}
        sessions, self._sessions = self._sessions, {}
        journal, self._journal = self._journal, {}
        clears, self._journal_clear = self._journal_clear, set()
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
        j_put = [
            (cid, seq, encode_delivery(d, now_wall, now_mono))
            for (cid, seq), d in journal.items()
            if d is not None
        ]
        j_del = [(cid, seq) for (cid, seq), d in journal.items() if d is None]
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
                # Ended sessions first: a new session of the same client id may have
                # journaled deliveries in this very flush.
                if clears:
                    await conn.execute(
                        "DELETE FROM ingestd_session_queue WHERE client_id = ANY($1)", list(clears)
                    )
                if j_del:
                    await conn.execute(
                        "DELETE FROM ingestd_session_queue q"
                        " USING unnest($1::text[], $2::bigint[]) AS d(client_id, seq)"
                        " WHERE q.client_id = d.client_id AND q.seq = d.seq",
                        [c for c, _ in j_del],
                        [n for _, n in j_del],
                    )
                if j_put:
                    await conn.execute(
                        "INSERT INTO ingestd_session_queue (client_id, seq, delivery)"
                        " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])"
                        " ON CONFLICT DO NOTHING",
                        [c for c, _, _ in j_put],
                        [n for _, n, _ in j_put],
                        [b for _, _, b in j_put],
                    )
        except BaseException:
            # Put back what was not written, unless a newer change replaced it meanwhile.
            for k, v in retained.items():
                self._retained.setdefault(k, v)
            for k, s in sessions.items():
                self._sessions.setdefault(k, s)
            for jk, d in journal.items():
                # A newer change to the same key (a done after this put) wins; so does a
                # session that ended meanwhile (its clear covers the key).
                if jk not in self._journal and jk[0] not in self._journal_clear:
                    self._journal[jk] = d
            self._journal_clear |= clears
            # Waiters wait for the next flush, which holds what this one did not write.
            if durable is not None:
                if self._durable is None:
                    self._durable = durable
                else:
                    self._durable.add_done_callback(lambda _f: _resolve(durable))
            raise
        _resolve(durable)

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
            jrows = await conn.fetch(
                "SELECT client_id, seq, delivery FROM ingestd_session_queue ORDER BY client_id, seq"
            )
        retained = [
            decode_retained(r["topic"], r["message"], r["expires_at"], now_wall, now_mono)
            for r in rows
        ]
        sessions = [decode_session(r["client_id"], r["state"]) for r in srows]
        by_client = {s.client_id: s for s in sessions}
        for r in jrows:
            cid, seq = r["client_id"], r["seq"]
            self._seq = max(self._seq, seq)
            stored = by_client.get(cid)
            if stored is None:
                self._journal_clear.add(cid)  # no session row: left over, removed next flush
                continue
            stored.journal.append(decode_delivery(seq, r["delivery"], now_wall, now_mono))
        if self._journal_clear:
            self._wake.set()
        log.info(
            "broker store: loaded %d retained messages, %d sessions, %d journaled deliveries",
            len(retained),
            len(sessions),
            len(jrows),
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
