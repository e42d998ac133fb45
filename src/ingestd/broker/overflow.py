"""Session overflow: QoS 1/2 deliveries that do not fit a session's memory queue, on disk.

Theory of operation
-------------------
A session keeps at most ``mqtt.max_queued_messages`` / ``mqtt.max_queued_bytes``
undelivered QoS 1/2 deliveries in memory. Past that bound a delivery is not
dropped: it is appended to the session's :class:`OverflowQueue`, a chain of
segment files under ``<data_dir>/overflow/``. Once a session has anything on
disk, every later delivery of that session goes to disk too, so the order of
deliveries is kept; as the session's memory queue empties, its pump takes
deliveries back from the head of the disk queue (oldest first).

One :class:`OverflowStore` per broker holds the disk budget
(``mqtt.overflow_max_bytes``) shared by every session. An append that would
pass it is refused (``append`` returns False); the session then applies the
documented policy (drop and count ``overflow_full``). ``overflow_max_bytes = 0``
turns overflow off: the memory bound is then the last word, as before.

What this is, and is not: memory relief for a consumer slower than its
publishers. It is not a durability mechanism. The files are written without
fsync and are removed at start-up: a crash loses what only they held, as it
loses a clean session's memory queue; a persistent session's deliveries are
journaled in PostgreSQL (``persistence.session_journal``) whether they sit in
memory or on disk, and come back from there.

Bounds: disk, ``overflow_max_bytes`` over all sessions; memory per queue, one
write buffer (flushed at ``WRITE_BUFFER_BYTES``) and while draining one
segment being read (at most ``segment_bytes`` plus one record). File I/O is
plain buffered ``write``/``read`` on the event loop: appends land in the page
cache in microseconds, and a segment is read once per ``segment_bytes``.

Record format: ``<u32 little-endian length><msgpack body>``, the body an
array ``[topic, payload, message qos, message retain, delivery qos,
delivery retain, properties|nil, sub_ids|nil,
expires_at|nil, client_id, username|nil, received_at, journal_seq]``.
``expires_at`` is a ``time.monotonic()`` value, valid because files never
outlive the process.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import msgspec

from ingestd._message import Message

log = logging.getLogger("ingestd.broker.overflow")

WRITE_BUFFER_BYTES = 64 * 1024
SEGMENT_BYTES = 1024 * 1024
LOG_INTERVAL = 10.0  # seconds between two 'overflow full' warnings
_LEN = struct.Struct("<I")  # 4 bytes (take() relies on it)
_P_USER_PROPERTY = 0x26  # ingestd.mqtt.constants.Prop.USER_PROPERTY: a list of pairs

_encode_into = msgspec.msgpack.Encoder().encode_into
_NO_LEN = bytes(_LEN.size)
_decode = msgspec.msgpack.Decoder().decode

# One taken delivery: (message, qos, retain, subscription ids, journal seq).
Taken = tuple[Message, int, bool, "list[int] | None", int]


class OverflowStore:
    """The disk space of every session's overflow queue, bounded by one budget."""

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        segment_bytes: int = SEGMENT_BYTES,
        write_buffer_bytes: int = WRITE_BUFFER_BYTES,
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.write_buffer_bytes = write_buffer_bytes
        self.used_bytes = 0  # records appended and not yet taken, over all queues
        self.used_messages = 0  # how many records that is
        self.peak_bytes = 0  # the most used_bytes has been since start
        self.peak_messages = 0
        self.queues = 0  # queues holding at least one record
        self.refused = 0  # appends refused by the budget (logged, rate-limited)
        self._refused_logged = 0
        self._last_refusal_log = float("-inf")
        self._next_id = 0

    def start(self) -> None:
        """Remove files a previous process left (they are never valid after a restart)."""
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def refusal(self, client_id: str) -> None:
        """Count an append the budget refused; log at most once per LOG_INTERVAL."""
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= LOG_INTERVAL:
            log.warning(
                "session overflow full (%d of %d bytes in use): %d QoS 1/2 deliveries dropped"
                " as overflow_full since the last report, latest for %r",
                self.used_bytes,
                self.max_bytes,
                self.refused - self._refused_logged,
                client_id,
            )
            self._refused_logged = self.refused
            self._last_refusal_log = now

    def queue(self) -> OverflowQueue:
        """A new, empty queue (its directory is made on first append)."""
        self._next_id += 1
        return OverflowQueue(self, self.dir / f"q{self._next_id}")


class OverflowQueue:
    """One session's deliveries on disk, in order. Not thread-safe; one event loop."""

    __slots__ = (
        "_buf",
        "_read",
        "_read_pos",
        "_read_seg",
        "_seg_bytes",
        "_view",
        "_write_seg",
        "bytes",
        "count",
        "dir",
        "store",
    )

    def __init__(self, store: OverflowStore, directory: Path) -> None:
        self.store = store
        self.dir = directory
        self.count = 0  # records on disk or in the write buffer, not yet taken
        self.bytes = 0  # their size, as counted against the store's budget
        self._buf = bytearray()  # records appended, not yet written to _write_seg
        self._write_seg = 0  # the segment appends go to
        self._seg_bytes = 0  # bytes already written to _write_seg
        self._read_seg = 0  # the segment being read (always < _write_seg while reading)
        self._read: bytes = b""  # its content, loaded whole
        self._view = memoryview(self._read)  # records are decoded from it without a copy
        self._read_pos = 0

    def __len__(self) -> int:
        return self.count

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:08d}.seg"

    def append(
        self,
        message: Message,
        qos: int,
        retain: bool,
        sub_ids: list[int] | None,
        seq: int = 0,
    ) -> bool:
        """Add one delivery at the tail; False (nothing written) if the budget is spent."""
        m = message
        buf = self._buf
        start = len(buf)
        buf += _NO_LEN  # the length, filled in below
        _encode_into(
            (
                m.topic,
                m.payload,
                m.qos,
                m.retain,
                qos,
                retain,
                m.properties or None,
                sub_ids,
                m.expires_at,
                m.client_id,
                m.username,
                m.received_at,
                seq,
            ),
            buf,
            -1,  # appended in place: no intermediate bytes
        )
        size = len(buf) - start
        store = self.store
        if store.used_bytes + size > store.max_bytes:
            del buf[start:]
            return False
        _LEN.pack_into(buf, start, size - _LEN.size)
        if not self.count:
            store.queues += 1
        store.used_bytes += size
        store.used_messages += 1
        if store.used_bytes > store.peak_bytes:
            store.peak_bytes = store.used_bytes
        if store.used_messages > store.peak_messages:
            store.peak_messages = store.used_messages
        self.bytes += size
        self.count += 1
        if len(buf) >= store.write_buffer_bytes:
            self._flush()
        return True

    def _flush(self) -> None:
        """Write the buffer to the tail segment; start a new segment when it is full."""
        if not self._buf:
            return
        if self._seg_bytes == 0:  # a new segment file
            self.dir.mkdir(parents=True, exist_ok=True)
        with open(self._path(self._write_seg), "ab") as f:
            f.write(self._buf)
        self._seg_bytes += len(self._buf)
        self._buf = bytearray()
        if self._seg_bytes >= self.store.segment_bytes:
            self._write_seg += 1
            self._seg_bytes = 0

    def take(self, limit: int) -> list[Taken]:
        """Remove and return up to ``limit`` deliveries from the head, oldest first."""
        out: list[Taken] = []
        add = out.append
        unpack_from = _LEN.unpack_from
        decode = _decode
        store = self.store
        while len(out) < limit and self.count:
            if self._read_pos >= len(self._read) and not self._load_next():
                break
            # The records of the segment being read, in one tight loop; counts once after.
            data = self._read
            view = self._view
            first = pos = self._read_pos
            end = len(data)
            want = min(limit - len(out), self.count)
            k = 0
            while k < want and pos < end:
                (n,) = unpack_from(data, pos)
                start = pos + 4
                pos = start + n
                rec: Any = decode(view[start:pos])
                if rec[6] is None:  # no properties: nothing to convert back
                    add(
                        (
                            Message(rec[0], rec[1], rec[2], rec[3], {}, rec[9], rec[10],
                                    rec[11], rec[8]),
                            rec[4], rec[5], rec[7], rec[12],
                        )
                    )  # fmt: skip
                else:
                    add(_delivery(rec))
                k += 1
            self._read_pos = pos
            freed = pos - first
            self.count -= k
            self.bytes -= freed
            store.used_bytes -= freed
            store.used_messages -= k
        if not self.count:
            if out:
                store.queues -= 1
            self._reset()
        return out

    def _load_next(self) -> bool:
        """Make the next segment the one being read (sealing the tail if it is that one)."""
        if self._read:
            # Fully read: its file goes, the next one is read.
            _unlink(self._path(self._read_seg))
            self._read_seg += 1
            self._read = b""
            self._view = memoryview(self._read)
            self._read_pos = 0
        if self._read_seg == self._write_seg:
            # Reading the tail: write out what is buffered and seal it, so a segment being
            # read never grows (appends continue in the next one).
            self._flush()  # may roll over to the next segment by itself
            if self._read_seg == self._write_seg:
                if self._seg_bytes == 0:
                    return False
                self._write_seg += 1
                self._seg_bytes = 0
        try:
            with open(self._path(self._read_seg), "rb") as f:
                self._read = f.read()
            self._view = memoryview(self._read)
        except FileNotFoundError:  # pragma: no cover - removed under us
            log.error("overflow segment %s vanished; %d deliveries lost", self.dir, self.count)
            self.discard()
            return False
        self._read_pos = 0
        return bool(self._read)

    def _reset(self) -> None:
        """Empty: remove every file; the next append starts from segment 0 again."""
        if self._read or self._seg_bytes or self._write_seg:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._buf = bytearray()
        self._read = b""
        self._view = memoryview(self._read)
        self._read_pos = 0
        self._read_seg = self._write_seg = self._seg_bytes = 0

    def discard(self) -> None:
        """Forget everything queued (the session ended) and remove its files."""
        if self.count:
            self.store.used_bytes -= self.bytes
            self.store.used_messages -= self.count
            self.store.queues -= 1
        self.count = 0
        self.bytes = 0
        self._reset()

    def __del__(self) -> None:
        # A queue dropped without discard() (e.g. at shutdown) must not leak budget.
        if self.count:
            self.discard()


def _delivery(rec: list[Any]) -> Taken:
    (topic, payload, mqos, mretain, qos, retain, props, sub_ids, expires_at, client_id, username,
     rx, seq) = rec  # fmt: skip
    if props:
        props = {int(k): v for k, v in props.items()}
        pairs = props.get(_P_USER_PROPERTY)
        if pairs is not None:
            props[_P_USER_PROPERTY] = [tuple(p) for p in pairs]
    message = Message(
        topic, payload, mqos, mretain, props or {}, client_id, username, rx, expires_at
    )
    return message, qos, retain, sub_ids, seq


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
