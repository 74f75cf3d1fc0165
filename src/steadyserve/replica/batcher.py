"""Dynamic batching for one handler: the asyncio shell around `policies.batching.decide`.

Each request adds its items; one loop task forms batches and runs them on the runner, so
the next batch gathers while the current one computes. Items whose caller has gone away
(cancelled) or whose deadline has passed are dropped before compute. A batch that raises,
or returns other than one result per item, fails every caller in it with the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import HandlerFailed, Overloaded, ReplicaTimeout, ReplicaUnavailable, SteadyError
from ..policies.batching import Idle, RunNow, WaitUntil, decide
from ..tasks import cancel_and_wait
from .runner import Runner

log = logging.getLogger("steadyserve.replica.batcher")


@dataclass(slots=True)
class _Entry:
    item: Any
    future: asyncio.Future[Any]
    enqueued_at: float
    deadline: float | None
    key: str | None = None
    seq: int = 0  # batches started when it arrived (the one computing included)
    started_at: float = 0.0
    missed: int = 0  # whole batches it sat out before its own
    batch_items: int = 0  # the size of the batch it ran in


@dataclass(frozen=True, slots=True)
class Timing:
    queue_s: float  # longest wait of the request's items before their batch started
    service_s: float  # compute time of the (last) batch that held them
    missed_batches: int = 0  # most whole batches one of its items sat out (overload signal)
    batch_items: int = 1  # the largest batch its items ran in (1: computed alone)


@dataclass(slots=True)
class BatchStats:
    batches: int = 0
    items: int = 0
    dropped_expired: int = 0


class Batcher:
    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        runner: Runner,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int = 8192,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._fn = fn
        self._runner = runner
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._clock = clock
        self._on_batch = on_batch
        self._queue: deque[_Entry] = deque()
        self._last_service_s = 0.0
        self._started = 0  # batches started so far
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for entry in self._queue:
            if not entry.future.done():
                # the replica's doing, not the request's: retried elsewhere
                entry.future.set_exception(ReplicaUnavailable("replica is shutting down"))
        self._queue.clear()

    async def submit(self, items: list[Any], deadline: float | None = None) -> list[Any]:
        """Queue a request's items and wait for their results (in order)."""
        return (await self.submit_timed(items, deadline))[0]

    async def submit_timed(
        self, items: list[Any], deadline: float | None = None, key: str | None = None
    ) -> tuple[list[Any], Timing]:
        if len(self._queue) + len(items) > self._max_queue:
            raise Overloaded(f"replica batch queue is full ({len(self._queue)} items waiting)",
                             retry_after_s=1)
        loop = asyncio.get_running_loop()
        now = self._clock()
        entries = [_Entry(i, loop.create_future(), now, deadline, key, self._started)
                   for i in items]
        self._queue.extend(entries)
        self._wakeup.set()
        try:
            results = await asyncio.gather(*(e.future for e in entries), return_exceptions=True)
        except asyncio.CancelledError:
            for e in entries:  # the caller went away: its items are skipped, never computed
                e.future.cancel()
            raise
        for r in results:
            if isinstance(r, BaseException):
                raise r
        queue_s = max(e.started_at - e.enqueued_at for e in entries)
        missed = max(e.missed for e in entries)
        return results, Timing(max(0.0, queue_s), self._last_service_s, missed,
                               max(e.batch_items for e in entries))

    async def _loop(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # never die silently: log, then keep batching
                log.exception("batcher step failed")
                await asyncio.sleep(0.01)

    async def _step(self) -> None:
        self._drop_dead_head()
        decision = decide(
            queued=len(self._queue),
            oldest_enqueued_at=self._queue[0].enqueued_at if self._queue else None,
            busy=False,
            now=self._clock(),
            max_batch_size=self._max_batch_size,
            max_wait_s=self._max_wait_s,
        )
        if isinstance(decision, Idle):
            self._wakeup.clear()
            await self._wakeup.wait()
        elif isinstance(decision, WaitUntil):
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), max(0.0, decision.deadline - self._clock()))
            except TimeoutError:
                pass
        elif isinstance(decision, RunNow):
            batch = self._take(decision.size)
            if batch:
                await self._run(batch)

    def _drop_dead_head(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _take(self, size: int) -> list[_Entry]:
        batch: list[_Entry] = []
        now = self._clock()
        while self._queue and len(batch) < size:
            entry = self._queue.popleft()
            if entry.future.done():
                continue  # cancelled by its caller: never computed
            if entry.deadline is not None and now >= entry.deadline:
                self.stats.dropped_expired += 1
                entry.future.set_exception(ReplicaTimeout("deadline passed while queued"))
                continue
            batch.append(entry)
        return batch

    async def _run(self, batch: list[_Entry]) -> None:
        started = self._clock()
        self._started += 1
        for e in batch:
            e.started_at = started
            e.missed = max(0, self._started - e.seq - 1)
            e.batch_items = len(batch)
        try:
            keys = sorted({e.key for e in batch if e.key})
            results = await self._runner.run(self._fn, [e.item for e in batch], keys=keys)
            if not isinstance(results, Sequence) or isinstance(results, (str, bytes)):
                raise HandlerFailed(
                    f"batched handler must return a list, got {type(results).__name__}"
                )
            if len(results) != len(batch):
                raise HandlerFailed(
                    f"batched handler returned {len(results)} results for {len(batch)} inputs"
                )
        except Exception as exc:
            error = exc if isinstance(exc, SteadyError) else HandlerFailed(
                f"handler raised {type(exc).__name__}: {exc}"
            )
            if not isinstance(exc, SteadyError):
                log.error("batch of %d failed", len(batch), exc_info=exc)
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(error)
            return
        finally:
            self._last_service_s = self._clock() - started
            self.stats.batches += 1
            self.stats.items += len(batch)
            if self._on_batch is not None:
                self._on_batch(len(batch), self._last_service_s)
        for e, r in zip(batch, results, strict=True):
            if not e.future.done():
                e.future.set_result(r)
