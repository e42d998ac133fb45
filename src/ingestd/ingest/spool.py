"""The local spool: batches kept on disk while PostgreSQL is unreachable.

Layout (``<data_dir>/spool``)::

    0000000000000001.seg   entries, appended; a new segment every SEGMENT_BYTES
    0000000000000002.seg
    cursor                 "<segment> <offset>": the first entry not yet replayed

An entry is ``<u32 length><u32 crc32><body>`` (little endian); the body is a
batch encoded by :mod:`ingestd.ingest.batcher` (msgpack). ``append`` returns
only after ``fsync``, which is what lets an after-commit acknowledgement rely
on it. Replay reads entries in order from the cursor; after each entry is
committed to PostgreSQL the cursor is rewritten atomically (temp file, fsync,
rename) and fully replayed segments are deleted.

Crash safety: a torn entry at the end of the last segment (the process died
mid-write, so it was never acknowledged) is cut off when the spool is opened.
An entry committed to PostgreSQL whose cursor update did not reach the disk
is replayed again after a crash: replay is at-least-once (see docs/ingest.md).

File I/O runs in the default executor so an fsync never stalls the event loop;
an asyncio.Lock serializes appends and cursor moves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ingestd.ingest.spool")

SEGMENT_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct("<II")
_SUFFIX = ".seg"


class SpoolFull(Exception):
    """Appending would pass ``spool_max_bytes``."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where an entry starts, and where the next one does."""

    segment: int
    offset: int
    next_segment: int
    next_offset: int


class Spool:
    """An append-only, fsync'd, size-bounded queue of byte strings on disk."""

    def __init__(
        self, directory: str | Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES
    ) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = asyncio.Lock()
        # segment number -> bytes of complete entries in it
        self._segments: dict[int, int] = {}
        self._cursor = (0, 0)
        self.corrupt_entries = 0
        self.entries_appended = 0
        self._opened = False

    # -- state -------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes of entries not yet replayed."""
        seg, off = self._cursor
        return sum(n for s, n in self._segments.items() if s >= seg) - (
            off if seg in self._segments else 0
        )

    @property
    def empty(self) -> bool:
        return self.size_bytes <= 0

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:016d}{_SUFFIX}"

    # -- open --------------------------------------------------------------

    def open(self) -> None:
        """Scan the directory, cut a torn tail, load the cursor. Blocking (call once at start)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        segs = sorted(
            int(p.name[: -len(_SUFFIX)])
            for p in self.dir.glob(f"*{_SUFFIX}")
            if p.name[:-4].isdigit()
        )
        self._segments = {s: self._path(s).stat().st_size for s in segs}
        if segs:
            last = segs[-1]
            good = self._scan_valid_length(self._path(last))
            if good != self._segments[last]:
                log.warning(
                    "spool: cutting a torn entry at the end of %s (%d bytes)",
                    self._path(last),
                    self._segments[last] - good,
                )
                with open(self._path(last), "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
                self._segments[last] = good
        cur = self.dir / "cursor"
        if cur.exists():
            try:
                seg_s, off_s = cur.read_text().split()
                self._cursor = (int(seg_s), int(off_s))
            except ValueError:
                log.error("spool: unreadable cursor file %s; replaying from the first segment", cur)
                self._cursor = (segs[0] if segs else 0, 0)
        else:
            self._cursor = (segs[0] if segs else 0, 0)
        # Segments wholly before the cursor were replayed; a crash kept them.
        for s in [s for s in self._segments if s < self._cursor[0]]:
            self._path(s).unlink(missing_ok=True)
            del self._segments[s]
        if self._segments and self._cursor[0] not in self._segments:
            self._cursor = (min(self._segments), 0)
        self._opened = True
        if not self.empty:
            log.warning("spool: %d bytes from a previous run wait for replay", self.size_bytes)

    @staticmethod
    def _scan_valid_length(path: Path) -> int:
        good = 0
        with open(path, "rb") as f:
            data = f.read()
        while good + _HEADER.size <= len(data):
            n, crc = _HEADER.unpack_from(data, good)
            end = good + _HEADER.size + n
            if end > len(data) or zlib.crc32(data[good + _HEADER.size : end]) != crc:
                break
            good = end
        return good

    # -- append ------------------------------------------------------------

    async def append(self, body: bytes) -> None:
        """Append one entry and fsync it. Raises SpoolFull past ``max_bytes``, OSError on I/O errors."""
        entry = _HEADER.pack(len(body), zlib.crc32(body)) + body
        async with self._lock:
            if self.size_bytes + len(entry) > self.max_bytes:
                raise SpoolFull(f"spool full ({self.size_bytes} of {self.max_bytes} bytes)")
            seg = max(self._segments) if self._segments else max(1, self._cursor[0])
            new = seg not in self._segments or (
                self._segments[seg] + len(entry) > self.segment_bytes and self._segments[seg] > 0
            )
            if new and seg in self._segments:
                seg += 1
            await asyncio.get_running_loop().run_in_executor(None, self._write, seg, entry, new)
            self._segments[seg] = self._segments.get(seg, 0) + len(entry)
            if not self._segments or self._cursor[0] not in self._segments:
                self._cursor = (min(self._segments), 0)
            self.entries_appended += 1

    def _write(self, seg: int, entry: bytes, new: bool) -> None:
        fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            view = memoryview(entry)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.dir)

    # -- replay ------------------------------------------------------------

    async def peek(self) -> tuple[Position, bytes] | None:
        """The first entry not yet replayed, or None when the spool is empty."""
        async with self._lock:
            while True:
                seg, off = self._cursor
                size = self._segments.get(seg)
                if size is None:
                    return None
                if off >= size:
                    later = [s for s in self._segments if s > seg]
                    if not later:
                        return None
                    # This segment is done: move on and drop it.
                    await self._move_cursor(min(later), 0)
                    continue
                got = await asyncio.get_running_loop().run_in_executor(
                    None, self._read, seg, off, size
                )
                if got is None:
                    self.corrupt_entries += 1
                    log.error(
                        "spool: corrupt entry in %s at %d; skipping the rest of the segment",
                        self._path(seg),
                        off,
                    )
                    self._segments[seg] = off
                    continue
                body, nxt = got
                return Position(seg, off, seg, nxt), body

    def _read(self, seg: int, off: int, size: int) -> tuple[bytes, int] | None:
        with open(self._path(seg), "rb") as f:
            f.seek(off)
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                return None
            n, crc = _HEADER.unpack(head)
            if off + _HEADER.size + n > size:
                return None
            body = f.read(n)
        if len(body) != n or zlib.crc32(body) != crc:
            return None
        return body, off + _HEADER.size + n

    async def consume(self, pos: Position) -> None:
        """Mark the entry at ``pos`` replayed (cursor fsync'd); drop finished segments."""
        async with self._lock:
            if self._cursor != (pos.segment, pos.offset):
                return
            await self._move_cursor(pos.next_segment, pos.next_offset)

    async def _move_cursor(self, seg: int, off: int) -> None:
        loop = asyncio.get_running_loop()
        old_seg = self._cursor[0]
        self._cursor = (seg, off)
        last = max(self._segments) if self._segments else seg
        if seg == last and off >= self._segments.get(seg, 0):
            # Everything replayed: remove all files; the next append starts a new segment.
            done = list(self._segments)
            self._segments.clear()
            self._cursor = (last + 1, 0)
            await loop.run_in_executor(None, self._remove, done, self._cursor)
            return
        await loop.run_in_executor(None, self._write_cursor, seg, off)
        if seg != old_seg:
            dead = [s for s in self._segments if s < seg]
            for s in dead:
                del self._segments[s]
            await loop.run_in_executor(None, self._remove, dead, None)

    def _write_cursor(self, seg: int, off: int) -> None:
        tmp = self.dir / "cursor.tmp"
        with open(tmp, "w") as f:
            f.write(f"{seg} {off}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "cursor")
        _fsync_dir(self.dir)

    def _remove(self, segs: list[int], cursor: tuple[int, int] | None) -> None:
        if cursor is not None:
            # Write the cursor first: a crash between the two leaves segments the
            # cursor says are replayed, which open() deletes.
            self._write_cursor(*cursor)
        for s in segs:
            self._path(s).unlink(missing_ok=True)
        _fsync_dir(self.dir)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
