"""A local, bounded, append-only spool for records the gateway accepted while the database was down.

Layout of the spool directory (created 0700):

* ``data``: one frame per record, ``<crc32 as 8 hex> <seq> <json>\\n``. The CRC covers
  ``<seq> <json>``; ``seq`` is the record's position, counting up from 1 and never reused for the
  life of the directory. orjson never writes a raw newline, so a frame is exactly one line.
* ``cursor``: the highest acknowledged position, as decimal text. Replaced atomically (temp file,
  fsync, ``os.replace``, fsync of the directory), so it is always the old or the new value.

Positions are sequence numbers, not byte offsets: compaction moves frames, never renumbers them,
so a position a consumer got from `pending` stays valid across compactions and restarts, and the
cursor never has to be rewritten in step with the data file. That is what makes every crash
order below safe.

Writing: `append` writes one frame at the end of ``data`` and fsyncs before it returns, under a
lock (appends from many threads are serialised). A failed write or fsync cuts the file back to
where it was and raises, so a record is accepted exactly when `append` returns.

Reading: `pending` is a peek; it returns the same records, oldest first, until they are acked.
`ack(p)` persists the cursor first, then forgets records up to ``p``. Once acked, a record is
never returned again, in this process or after a restart. Across a crash the delivery is
at-least-once only in one place: the consumer stored a record elsewhere and died before `ack`
persisted the cursor; the record comes back on restart and the database deduplicates it by the
record's id.

Opening (recovery): leftover ``*.tmp`` files are deleted, the cursor is read, and ``data`` is
scanned from the start. Frames with ``seq <= cursor`` are acknowledged and ignored. Bad lines
(CRC mismatch, no newline, out-of-order seq) after the last good frame are a torn tail from a
crash mid-write: the file is truncated to the last good frame, with a warning. Bad lines with a
good frame after them are disk damage: each is skipped with an error log; never a crash. The
next position is ``max(cursor, last seq in data) + 1``.

Compaction, after an ack:

* Everything acknowledged: truncate ``data`` to 0 and fsync. The cursor keeps its value (it is
  the position of the last record, so nothing is renumbered). A crash before the truncation
  leaves frames that all have ``seq <= cursor``: recovery ignores them and the next ack that
  empties the spool truncates again.
* Acknowledged prefix over ``max_bytes / 2``: copy the unacknowledged frames to ``data.tmp``,
  fsync it, ``os.replace`` it over ``data``, fsync the directory. A crash before the replace
  leaves the old ``data`` intact (``data.tmp`` is deleted on open); a crash after it leaves either
  the old or the new file under the name, and both hold every unacknowledged frame with the same
  positions. The cursor was persisted before compaction started, and recovery filters by
  position, so either file yields exactly the unacknowledged records.

The bound: `max_bytes` counts the unacknowledged frames on disk (`size_bytes`); `append` raises
`SpoolFull` rather than exceed it. With the acknowledged prefix compacted past half of the bound,
``data`` stays under about 1.5 x `max_bytes` (plus any damaged lines, which the next compaction
drops). One `Spool` per directory at a time: two processes appending to one spool would
interleave positions.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("steadyserve.spool")

_DATA = "data"
_CURSOR = "cursor"
_TMP = ".tmp"
_COPY_CHUNK = 1 << 20


class SpoolFull(Exception):
    """The spool holds max_bytes of unacknowledged records already."""


def _frame(seq: int, record: dict[str, Any]) -> bytes:
    body = b"%d " % seq + orjson.dumps(record)
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def _parse(line: bytes) -> tuple[int, bytes] | None:
    """(seq, json) of a well-formed frame, None for a torn or corrupt line."""
    if len(line) < 13 or line[-1:] != b"\n" or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        seq, _, payload = body.partition(b" ")
        return int(seq), payload
    except ValueError:
        return None


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable FIFO of JSON-able dicts in a directory; see the module docstring."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self._dir = Path(path)
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._closed = False
        if not self._dir.exists():
            self._dir.mkdir(mode=0o700, parents=True)
            self._dir.chmod(0o700)  # mkdir's mode is filtered by the umask
            _fsync_dir(self._dir.parent)
        for leftover in (_DATA + _TMP, _CURSOR + _TMP):
            (self._dir / leftover).unlink(missing_ok=True)
        self._acked = self._read_cursor()
        data = self._dir / _DATA
        created = not data.exists()
        self._fd = os.open(data, os.O_RDWR | os.O_CREAT, 0o600)
        if created:
            _fsync_dir(self._dir)
        # unacknowledged frames: (seq, byte offset in data, length), oldest first
        self._index: deque[tuple[int, int, int]] = deque()
        self._size = 0
        self._end = 0
        self._next_seq = 1
        try:
            self._recover(data)
        except BaseException:
            os.close(self._fd)
            raise

    # -- public API ---------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` and fsync it; it is durable when this returns. SpoolFull past the bound."""
        with self._lock:
            self._check_open()
            seq = self._next_seq
            frame = _frame(seq, record)
            if self._size + len(frame) > self._max_bytes:
                raise SpoolFull(
                    f"spool {self._dir} holds {self._size} of {self._max_bytes} bytes; "
                    f"a {len(frame)}-byte record does not fit"
                )
            offset = self._end
            try:
                _write_all(self._fd, frame, offset)
                os.fsync(self._fd)
            except BaseException:
                # the frame may be partly on disk (or in the page cache): cut it off, so the
                # caller's failure means the record is not in the spool
                try:
                    os.ftruncate(self._fd, offset)
                except OSError:
                    log.exception("spool %s: cannot cut back a failed append", self._dir)
                raise
            self._index.append((seq, offset, len(frame)))
            self._end = offset + len(frame)
            self._size += len(frame)
            self._next_seq = seq + 1

    def pending(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to `limit` unacknowledged (position, record), oldest first. Does not consume them."""
        with self._lock:
            self._check_open()
            entries = list(islice(self._index, max(limit, 0)))
            if not entries:
                return []
            start = entries[0][1]
            span = os.pread(self._fd, entries[-1][1] + entries[-1][2] - start, start)
        out: list[tuple[int, dict[str, Any]]] = []
        for seq, offset, length in entries:
            parsed = _parse(span[offset - start : offset - start + length])
            if parsed is None or parsed[0] != seq:  # the disk changed under us since it was scanned
                log.error("spool %s: record %d is damaged on disk, skipping it", self._dir, seq)
                continue
            out.append((seq, orjson.loads(parsed[1])))
        return out

    def ack(self, position: int) -> None:
        """Everything up to and including `position` is stored elsewhere: never return it again."""
        with self._lock:
            self._check_open()
            if position <= self._acked:
                return
            if position >= self._next_seq:
                raise ValueError(f"position {position} was never appended (last is {self._next_seq - 1})")
            self._write_cursor(position)
            self._acked = position
            while self._index and self._index[0][0] <= position:
                self._size -= self._index.popleft()[2]
            if not self._index:
                self._truncate()
            elif self._index[0][1] > self._max_bytes // 2:
                self._compact()

    @property
    def count(self) -> int:
        """Records not yet acknowledged."""
        return len(self._index)

    @property
    def size_bytes(self) -> int:
        """Bytes of unacknowledged frames on disk (what `max_bytes` bounds)."""
        return self._size

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"spool {self._dir} is closed")

    def _read_cursor(self) -> int:
        try:
            text = (self._dir / _CURSOR).read_text()
        except FileNotFoundError:
            return 0
        try:
            return int(text.strip())
        except ValueError:
            # only os.replace ever writes it, so this is disk damage: replay everything rather
            # than lose anything (the database deduplicates)
            log.error("spool %s: cursor file is damaged (%r); replaying from the start", self._dir, text)
            return 0

    def _write_cursor(self, position: int) -> None:
        tmp = self._dir / (_CURSOR + _TMP)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, b"%d\n" % position, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._dir / _CURSOR)
        _fsync_dir(self._dir)

    def _recover(self, data: Path) -> None:
        offset = good_end = last_seq = 0
        bad: list[tuple[int, int]] = []  # (offset, length) of bad lines since the last good frame
        with data.open("rb") as f:
            for line in f:
                parsed = _parse(line)
                if parsed is None or parsed[0] <= last_seq:
                    bad.append((offset, len(line)))
                else:
                    for at, length in bad:
                        log.error(
                            "spool %s: damaged line (%d bytes at offset %d) skipped", self._dir, length, at
                        )
                    bad.clear()
                    last_seq = parsed[0]
                    if last_seq > self._acked:
                        self._index.append((last_seq, offset, len(line)))
                        self._size += len(line)
                    good_end = offset + len(line)
                offset += len(line)
        if bad:
            log.warning(
                "spool %s: dropping a torn or corrupt tail of %d bytes at offset %d",
                self._dir,
                offset - good_end,
                good_end,
            )
            os.ftruncate(self._fd, good_end)
            os.fsync(self._fd)
        self._end = good_end
        self._next_seq = max(self._acked, last_seq) + 1

    def _truncate(self) -> None:
        try:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
        except OSError:
            log.exception("spool %s: cannot truncate after the last ack; will retry", self._dir)
            return
        self._end = 0

    def _compact(self) -> None:
        """Move the unacknowledged frames to a new data file (crash-safe: module docstring)."""
        tmp = self._dir / (_DATA + _TMP)
        index: deque[tuple[int, int, int]] = deque()
        end = 0
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:
            log.exception("spool %s: cannot compact; will retry", self._dir)
            return
        try:
            buf = bytearray()
            for seq, offset, length in self._index:
                index.append((seq, end + len(buf), length))
                buf += os.pread(self._fd, length, offset)
                if len(buf) >= _COPY_CHUNK:
                    _write_all(fd, buf, end)
                    end += len(buf)
                    buf.clear()
            _write_all(fd, buf, end)
            end += len(buf)
            os.fsync(fd)
            os.replace(tmp, self._dir / _DATA)
        except OSError:
            log.exception("spool %s: cannot compact; will retry", self._dir)
            os.close(fd)
            tmp.unlink(missing_ok=True)
            return
        os.close(self._fd)
        self._fd, self._index, self._end = fd, index, end
        try:
            _fsync_dir(self._dir)
        except OSError:
            log.exception("spool %s: cannot fsync the directory after compaction", self._dir)
