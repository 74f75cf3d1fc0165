"""Recording what served each answer (store.records), so feedback can be joined to the
deployment, model version, replica and cache outcome that produced it.

The request path only appends a small dict to a bounded queue (`RequestRecorder.record`,
sampled by `[feedback] record_sample_rate`; beyond `record_queue_max` waiting, records are
dropped and counted). The gateway process writes the queue every `record_flush_s` in a
thread (`RecordWriter`) and prunes by age and count once a minute; workers hand their
records to it with their one-second reports. A write the database refuses puts the records
back (still bounded). Request inputs are never recorded; the prediction a label is compared
with is read from the answer only for deployments that name it (`feedback_prediction`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from ..config import FeedbackConfig
from ..store import DatabaseUnavailable
from ..store.records import RECORD_FIELDS

log = logging.getLogger("steadyserve.records")

PRUNE_EVERY_S = 60.0
TEXT_FIELDS = ("request_id", "deployment", "handler", "version", "replica", "cache", "arm")


def prediction_at(body: bytes, path: str) -> float | None:
    """The number at `path` ("0.score": the first item's `score`) of a JSON answer, or None
    when there is none (an error, another shape, not a finite number)."""
    try:
        node: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    for step in path.split("."):
        if isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        elif isinstance(node, dict) and step in node:
            node = node[step]
        else:
            return None
    if isinstance(node, bool) or not isinstance(node, int | float) or not math.isfinite(node):
        return None
    return float(node)


class RequestRecorder:
    def __init__(self, cfg: FeedbackConfig, predictions: Mapping[str, str | None],
                 rng: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        self.predictions = dict(predictions)  # deployment → path of its prediction
        self.rng = rng
        self.queue: deque[dict[str, Any]] = deque()
        self.dropped = 0

    def record(self, *, request_id: str, deployment: str, handler: str, version: str | None,
               replica: str, cache: str, status: int, seconds: float, key_id: str | None,
               body: bytes, now: float, cache_keys: tuple[str, ...] = (),
               arm: str = "") -> None:
        if self.cfg.record_sample_rate < 1 and self.rng() >= self.cfg.record_sample_rate:
            return
        if len(self.queue) >= self.cfg.record_queue_max:
            self.dropped += 1
            return
        path = self.predictions.get(deployment)
        self.queue.append({
            "request_id": request_id, "deployment": deployment, "handler": handler,
            "version": version or "", "replica": replica, "cache": cache, "status": status,
            "latency_ms": round(seconds * 1000, 3), "key_id": key_id,
            "prediction": prediction_at(body, path) if path and status < 300 else None,
            "cache_keys": orjson.dumps(cache_keys).decode() if cache_keys else None,
            "created_at": now, "arm": arm})

    def queued(self, request_id: str) -> dict[str, Any] | None:
        """A record still waiting for its write (feedback right after the answer)."""
        return next((r for r in reversed(self.queue) if r["request_id"] == request_id), None)

    def take(self, limit: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while self.queue and len(out) < limit:
            out.append(self.queue.popleft())
        return out

    def put_back(self, rows: list[dict[str, Any]]) -> None:
        """Records a write could not store, first in line again (what does not fit is
        dropped and counted)."""
        room = self.cfg.record_queue_max - len(self.queue)
        keep = rows[:max(0, room)]
        self.dropped += len(rows) - len(keep)
        self.queue.extendleft(reversed(keep))

    def merge(self, rows: Any) -> None:
        """A worker's records, checked: dicts of the recorded fields only."""
        if not isinstance(rows, list):
            return
        for row in rows[:self.cfg.record_queue_max]:
            if isinstance(row, dict) and set(row) == set(RECORD_FIELDS) \
                    and all(isinstance(row[k], str) for k in TEXT_FIELDS) \
                    and isinstance(row["status"], int) \
                    and isinstance(row["latency_ms"], int | float) \
                    and isinstance(row["created_at"], int | float) \
                    and (row["key_id"] is None or isinstance(row["key_id"], str)) \
                    and (row["cache_keys"] is None or isinstance(row["cache_keys"], str)) \
                    and (row["prediction"] is None or isinstance(row["prediction"], int | float)):
                if len(self.queue) >= self.cfg.record_queue_max:
                    self.dropped += 1
                else:
                    self.queue.append(row)


class RecordWriter:
    """The gateway process's loop: the recorder's queue into the database."""

    def __init__(self, recorder: RequestRecorder, store: Any,
                 wall: Callable[[], float] = time.time) -> None:
        self.recorder = recorder
        self.store = store
        self.wall = wall
        self._pruned_at = -math.inf
        self._down = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.recorder.cfg.record_flush_s)
            try:
                await self.flush()
            except Exception:  # never let the loop die: records would pile up, then drop
                log.exception("storing request records failed; continuing")

    async def flush(self) -> None:
        cfg = self.recorder.cfg
        if self.recorder.dropped:
            log.warning("dropped %d request records (queue full: [feedback] record_queue_max)",
                        self.recorder.dropped)
            self.recorder.dropped = 0
        rows = self.recorder.take(cfg.record_queue_max)
        now = self.wall()
        try:
            if rows:
                await asyncio.to_thread(self.store.add, rows)
            if now - self._pruned_at >= PRUNE_EVERY_S:
                await asyncio.to_thread(self.store.prune, now - cfg.record_retention_s,
                                        cfg.max_records)
                self._pruned_at = now
            if self._down:
                log.info("request records stored again: the database is back")
            self._down = False
        except DatabaseUnavailable as exc:
            self.recorder.put_back(rows)
            if not self._down:
                log.error("cannot store request records, keeping them in memory: %s", exc)
            self._down = True
