"""Per-key usage: inference requests, server errors and refusals by API key and deployment.

Every gateway process counts in memory (`UsageMeter.record`, a dict update on the request
path); workers hand their counts to the gateway process with their reports, and the gateway
process adds them to the database every `[auth] usage_flush_s` (`UsageFlusher`), one row per
key, deployment and UTC day, so usage outlives restarts and sums over every gateway sharing
the database. A flush that fails keeps its counts for the next one; the meter holds at most
`max_entries` (key, deployment) pairs between flushes and counts what does not fit under
the key "-" (so totals stay right while the detail is lost, and the loss is logged).

A reader (`UsageFlusher.read`) sees the database and the counts not yet in it under the
flusher's lock: between a flush taking the counts and its write committing they are in
neither, and a reader in that window missed them (or, reading the counts before the take and
the database after the commit, counted them twice). A reader holds the lock for its one
database read, which the database's connect and statement timeouts bound; readers are the
dashboard (at most every 10 s) and the admin usage route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..store import DatabaseUnavailable

log = logging.getLogger("steadyserve.usage")

T = TypeVar("T")

OVERFLOW_KEY = "-"
Counts = list[float]  # [requests, errors (5xx), rejected (4xx), last seen (epoch s)]


class UsageMeter:
    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self.counts: dict[tuple[str, str], Counts] = {}
        self.overflowed = 0

    def record(self, key_id: str, deployment: str, status: int, now: float) -> None:
        entry = self.counts.get((key_id, deployment))
        if entry is None:
            if len(self.counts) >= self.max_entries:
                self.overflowed += 1
                key_id = OVERFLOW_KEY
                entry = self.counts.get((key_id, deployment))
            if entry is None:
                entry = self.counts[(key_id, deployment)] = [0, 0, 0, 0.0]
        entry[0] += 1
        if status >= 500:
            entry[1] += 1
        elif status >= 400:
            entry[2] += 1
        entry[3] = now

    def take(self) -> dict[tuple[str, str], Counts]:
        """The counts since the last take; the meter starts again from zero."""
        taken, self.counts = self.counts, {}
        return taken

    def merge(self, counts: dict[tuple[str, str], Counts]) -> None:
        """Add counts taken elsewhere (a worker's, or a flush that failed)."""
        for (key_id, deployment), (req, err, rej, seen) in counts.items():
            if (key_id, deployment) not in self.counts and len(self.counts) >= self.max_entries:
                key_id = OVERFLOW_KEY
            entry = self.counts.setdefault((key_id, deployment), [0, 0, 0, 0.0])
            entry[0] += req
            entry[1] += err
            entry[2] += rej
            entry[3] = max(entry[3], seen)


def to_wire(counts: dict[tuple[str, str], Counts]) -> list[list[Any]]:
    """As a worker sends them: [[key id, deployment, requests, errors, rejected, seen], …]."""
    return [[k, d, *c] for (k, d), c in counts.items()]


def from_wire(rows: Any, max_rows: int) -> dict[tuple[str, str], Counts]:
    """A worker's report, checked: rows of the shape `to_wire` writes, at most `max_rows`;
    anything else is left out."""
    out: dict[tuple[str, str], Counts] = {}
    if not isinstance(rows, list):
        return out
    for row in rows[:max_rows]:
        if isinstance(row, list) and len(row) == 6 and all(isinstance(x, str) for x in row[:2]) \
                and all(isinstance(x, int | float) and x >= 0 for x in row[2:]):
            out[(row[0], row[1])] = [float(x) for x in row[2:]]
    return out


class UsageFlusher:
    """The gateway process's loop: every `interval_s`, the meter's counts into the database
    (in a thread), and rows older than `retention_days` pruned once an hour."""

    def __init__(self, meter: UsageMeter, store: Any, interval_s: float, retention_days: int,
                 wall: Callable[[], float] = time.time) -> None:
        self.meter = meter
        self.store = store
        self.interval_s = interval_s
        self.retention_days = retention_days
        self.wall = wall
        self._pruned_at = 0.0
        self._down = False
        self._lock = asyncio.Lock()  # a flush against a reader (see the module's docstring)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception:  # never let the loop die: usage would stop being counted
                log.exception("storing key usage failed; continuing")

    async def read(self, fn: Callable[[dict[tuple[str, str], Counts]], T]) -> T:
        """`fn(pending)` in a thread, where `pending` is a copy of the counts not yet stored,
        with no flush between the copy and `fn`'s database read."""
        async with self._lock:
            pending = {k: list(v) for k, v in self.meter.counts.items()}
            return await asyncio.to_thread(fn, pending)

    async def flush(self) -> None:
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        counts = self.meter.take()
        if self.meter.overflowed:
            log.warning("key usage: %d requests counted without their key (over %d keys × "
                        "deployments between flushes)", self.meter.overflowed,
                        self.meter.max_entries)
            self.meter.overflowed = 0
        now = self.wall()
        try:
            if counts:
                await asyncio.to_thread(self.store.add, counts, now)
            if now - self._pruned_at >= 3600:
                await asyncio.to_thread(self.store.prune, now - self.retention_days * 86_400)
                self._pruned_at = now
            if self._down:
                log.info("key usage stored again: the database is back")
            self._down = False
        except DatabaseUnavailable as exc:
            self.meter.merge(counts)  # kept for the next flush
            if not self._down:
                log.error("cannot store key usage, keeping it in memory: %s", exc)
            self._down = True
