"""Log files every process keeps next to its stderr, and reading them back (`GET /v1/logs`,
`steadyserve logs`).

Each process — the gateway, its workers, every local replica — appends JSON lines to
`<log_dir>/<process>.jsonl`: rotated at `log_file_bytes` with `log_file_backups` older
copies, and the directory pruned to `log_dir_max_bytes` (oldest files first, never those of a
process that is running). Files rather than pipes into the gateway: a replica's last words
before it crashes, and the gateway's own, survive the gateway's restart, and a gateway slow to
read can never block a replica's write. Reading is bounded: one query scans at most
`log_scan_bytes` from the newest end of the files and returns at most its `limit` lines.

Replicas run with the Ray backend write on the node that runs them; `steadyserve logs` sees
the local ones.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

SUFFIX = ".jsonl"
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
REOPEN_CHECK_S = 1.0
FLUSH_EVERY_S = 0.25  # lines below WARNING reach the file within this
BUFFER_BYTES = 64 * 1024
MAX_FILTER_CHARS = 128
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def file_name(process: str) -> str:
    """`<process>.jsonl`, with anything but letters, digits, `.`, `_` and `-` replaced."""
    return _SAFE_NAME.sub("_", process)[:120] + SUFFIX


class LogFile(logging.Handler):
    """A rotating JSON-lines file, written through a buffer: a line at WARNING or above is
    flushed at once (a replica's last words before a crash reach the disk), the others within
    `FLUSH_EVERY_S` by a small daemon thread. RotatingFileHandler flushed every line and
    sought the end of the file before each: the file then cost 12 % of the gateway's echo
    throughput (4,228 against 4,792 req/s, wrk -c64, alternating). Buffered, a line costs
    ~2 µs in process (12.0 against 10.3 µs for the access line with stderr only) and the
    file 5.5 % of echo throughput at saturation (4,794 against 5,074 req/s, medians of three
    alternating runs on this 2-core machine); `[observability] log_files = false` saves it.

    The path is reopened when the file was removed (pruned, or deleted by an operator), so
    lines after that go to a new file, not into an unlinked inode (a stat at most once a
    second). Rotation keeps `backups` older copies: path.1 … path.N."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        super().__init__()
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: BinaryIO | None = None
        self._size = 0
        self._dirty = False
        self._checked = 0.0
        self._closed = False
        threading.Thread(target=self._flusher, name="steadyserve-log-flush", daemon=True).start()

    def _open(self) -> BinaryIO:
        f = open(self.path, "ab", buffering=BUFFER_BYTES)  # kept open
        self._size = f.tell()
        self._file = f
        return f

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            line = (self.format(record) + "\n").encode("utf-8", errors="replace")
            f = self._file
            now = time.monotonic()
            if f is not None and now - self._checked >= REOPEN_CHECK_S:
                self._checked = now
                if not os.path.exists(self.path):
                    f.close()
                    f = None
            if f is None:
                f = self._open()
            if self._size and self._size + len(line) > self.max_bytes:
                f = self._rotate(f)
            f.write(line)
            self._size += len(line)
            if record.levelno >= logging.WARNING:
                f.flush()
                self._dirty = False
            else:
                self._dirty = True
        except Exception:
            self.handleError(record)

    def _rotate(self, f: BinaryIO) -> BinaryIO:
        f.close()
        self._file = None
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{n}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.truncate(self.path, 0)
        return self._open()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            if self._file is not None and self._dirty:
                self._file.flush()
                self._dirty = False

    def _flusher(self) -> None:
        while not self._closed:
            time.sleep(FLUSH_EVERY_S)
            try:
                self.flush()
            except Exception:  # a full disk: the next line's write says so
                pass

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None
        super().close()


@dataclass(frozen=True, slots=True)
class LogQuery:
    """Which lines to return. `level` is the lowest level shown; `since` a time stamp (lines
    at or after it); the other filters match their field exactly. A line of the gateway that
    names only a replica (`echo-2`, `echo-r3-1`) belongs to that replica's deployment."""

    deployment: str | None = None
    replica: str | None = None
    level: str | None = None
    request_id: str | None = None
    since: float | None = None
    limit: int = 200

    def matches(self, rec: dict[str, Any]) -> bool:
        if self.since is not None and not _number(rec.get("ts")) >= self.since:
            return False
        if self.level is not None and \
                LEVELS.get(str(rec.get("level", "")).lower(), 0) < LEVELS[self.level]:
            return False
        if self.request_id is not None and rec.get("request_id") != self.request_id:
            return False
        replica = rec.get("replica")
        if self.replica is not None and replica != self.replica:
            return False
        if self.deployment is not None:
            named = rec.get("deployment")
            if named is None and isinstance(replica, str):
                named = deployment_of(replica)
            if named != self.deployment:
                return False
        return True


_REPLICA_ID = re.compile(r"(.+?)(?:-r\d+)?-\d+")


def deployment_of(replica_id: str) -> str | None:
    """The deployment a replica id names: `echo-2` → echo, `echo-r3-1` → echo."""
    m = _REPLICA_ID.fullmatch(replica_id)
    return m.group(1) if m else None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else float("-inf")


def _tail(path: Path, budget: int) -> tuple[bytes, int]:
    """The last `budget` bytes of a file, cut to whole lines; (data, bytes read)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - budget)
            f.seek(start)
            data = f.read(size - start)
    except OSError:  # rotated or pruned between listing and opening
        return b"", 0
    if start > 0:
        cut = data.find(b"\n")
        data = data[cut + 1:] if cut >= 0 else b""
    return data, size - start


def _files(log_dir: Path) -> list[tuple[float, Path]]:
    """(mtime, path) of the log files, newest first."""
    out = []
    try:
        entries = list(os.scandir(log_dir))
    except OSError:
        return []
    for entry in entries:
        if SUFFIX in entry.name and entry.is_file(follow_symlinks=False):
            try:
                out.append((entry.stat().st_mtime, Path(entry.path)))
            except OSError:
                continue
    out.sort(reverse=True)
    return out


def read(log_dir: Path, query: LogQuery, scan_bytes: int) -> list[dict[str, Any]]:
    """Matching lines, oldest first: the newest `query.limit` of them, or with `since` the
    first `query.limit` at or after it (a follow pages forward). Reads at most `scan_bytes`
    (newest files first; each file from its end)."""
    found: list[tuple[float, int, int, dict[str, Any]]] = []
    left = scan_bytes
    for newer, (mtime, path) in enumerate(_files(log_dir)):
        if left <= 0:
            break
        if query.since is not None and mtime < query.since:
            continue  # nothing in it is new enough
        data, used = _tail(path, left)
        left -= used
        for at, line in enumerate(data.splitlines()):
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            if isinstance(rec, dict) and query.matches(rec):
                # by time; within a millisecond, older files first, then file order
                found.append((_number(rec.get("ts")), -newer, at, rec))
    found.sort(key=lambda f: f[:3])
    lines = [f[3] for f in found]
    if query.since is not None:  # paging forward (a follow): the oldest after `since`
        return lines[:query.limit]
    return lines[-query.limit:]


LAST_WORDS_BYTES = 64 * 1024


def last_error(path: Path, since: float, budget: int = LAST_WORDS_BYTES) -> str | None:
    """The message (and exception) of the newest error line in one process's file written at
    or after `since` (its start: an earlier run of the same replica id does not count), or
    None."""
    data, _ = _tail(path, budget)
    for line in reversed(data.splitlines()):
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line cut by the crash
        if not isinstance(rec, dict):
            continue
        if _number(rec.get("ts")) < since:
            return None  # older lines only from here on
        if LEVELS.get(str(rec.get("level", "")).lower(), 0) >= LEVELS["error"]:
            said = str(rec.get("msg", ""))
            exc = str(rec.get("exc") or "").strip().splitlines()
            if exc:  # the exception itself: a traceback's last line
                said += f" ({exc[-1]})"
            return said[:300]
    return None


def prune(log_dir: Path, max_bytes: int, running: Iterable[str]) -> list[Path]:
    """Delete the oldest files until the directory holds at most `max_bytes`; the current file
    of a running process (`running`: process names) is kept whatever its age."""
    keep = {file_name(p) for p in running}
    files = sorted(_files(log_dir))  # oldest first
    sizes = {}
    for _, path in files:
        try:
            sizes[path] = path.stat().st_size
        except OSError:
            sizes[path] = 0
    total = sum(sizes.values())
    removed = []
    for _, path in files:
        if total <= max_bytes:
            break
        if path.name in keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= sizes[path]
        removed.append(path)
    return removed
