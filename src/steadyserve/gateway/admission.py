"""Admission control per deployment: an adaptive concurrency limit (`policies.limit`) in
front of the replicas, and a bounded, two-class wait queue with CoDel (`policies.codel`).

    acquire(priority) ── under the limit, nobody waiting ──► go (the fast path: no await)
          │ otherwise
          ├─ batch, and the batch queue is at its share of queue_max ──► 503 at once
          ├─ queue full ──► an interactive request evicts the newest batch waiter, else 503
          └─ wait ≤ its class's CoDel allowance (5 ms overloaded, else 100 ms) ──► go or 503
    release() hands the freed slot to an interactive waiter first, then to a batch one:
    the oldest while calm, the newest while that class is overloaded (adaptive LIFO).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..config import ResilienceConfig
from ..errors import ClientError, Overloaded
from ..policies.codel import CoDel
from ..policies.limit import AimdLimit

PRIORITIES = ("interactive", "batch")


def parse_priority(value: str | None) -> str:
    if value is None or value == "":
        return "interactive"
    value = value.strip().lower()
    if value not in PRIORITIES:
        raise ClientError(f"X-Priority must be 'interactive' or 'batch', got {value[:40]!r}",
                          param="x-priority")
    return value


@dataclass(slots=True, eq=False)
class _Waiter:
    future: asyncio.Future[None]
    enqueued_at: float


class Admission:
    def __init__(self, cfg: ResilienceConfig, *, replicas: int, max_batch_size: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        initial = cfg.limit_initial or replicas * max(4, max_batch_size)
        self.limit = AimdLimit(
            limit=float(initial), min_limit=max(1, replicas), max_limit=cfg.limit_max,
            backoff=cfg.limit_backoff, tolerance=cfg.limit_tolerance,
            batch_tolerance=cfg.limit_batch_tolerance,
        )
        # one CoDel per class: interactive waiters, served first, barely wait; if they shared
        # the state they would keep resetting it while the batch queue stands
        self.codels = {
            "interactive": CoDel(target_s=cfg.interactive_queue_target_s,
                                 interval_s=cfg.queue_interval_s),
            "batch": CoDel(target_s=cfg.queue_target_s, interval_s=cfg.queue_interval_s,
                           calm_wait_s=min(cfg.queue_interval_s, cfg.batch_max_wait_s)),
        }
        self.inflight = 0
        self.shed_batch_until = 0.0  # an automatic response: refuse batch traffic until then
        self.queues: dict[str, deque[_Waiter]] = {p: deque() for p in PRIORITIES}
        self.shed = {p: 0 for p in PRIORITIES}

    def resize(self, replicas: int, max_batch_size: int) -> None:
        """Replica count or batch size changed (start, rollout): keep every replica busy."""
        self.limit.min_limit = max(1, replicas)
        if self.cfg.limit_initial is None and self.inflight == 0 and not self.queued:
            self.limit.limit = max(self.limit.limit, float(replicas * max(4, max_batch_size)))
        self.limit.limit = max(self.limit.limit, float(self.limit.min_limit))

    @property
    def queued(self) -> int:
        return len(self.queues["interactive"]) + len(self.queues["batch"])

    async def acquire(self, priority: str, deadline: float) -> None:
        if priority == "batch" and self.shed_batch_until and self.clock() < self.shed_batch_until:
            self._reject("batch")
        # floor, not ceiling: a limit of 3.9 admits 3 (a fourth would queue at a replica)
        if self.inflight + 1 <= self.limit.limit and not self.queued:
            self.inflight += 1
            return
        now = self.clock()
        if priority == "batch":
            batch_cap = int(self.cfg.queue_max * self.cfg.batch_queue_share)
            if len(self.queues["batch"]) >= batch_cap:
                self._reject("batch")
        if self.queued >= self.cfg.queue_max:
            if priority == "interactive" and self.queues["batch"]:
                evicted = self.queues["batch"].pop()
                if not evicted.future.done():
                    self.shed["batch"] += 1
                    evicted.future.set_exception(self._overloaded("batch"))
            else:
                self._reject(priority)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), now)
        self.queues[priority].append(waiter)
        codel = self.codels[priority]
        codel.on_enqueue()
        allowance = min(codel.max_wait_s(now), max(0.0, deadline - now))
        # a timer, not asyncio.wait_for: on 3.11 wait_for can swallow a cancellation that
        # races with the slot being handed over (cpython gh-86296)
        timer = loop.call_later(allowance, self._expire, priority, waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release()  # we were handed a slot but are going away: pass it on
            self._remove(priority, waiter)
            raise
        finally:
            timer.cancel()

    def _expire(self, priority: str, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._remove(priority, waiter)
            self.shed[priority] += 1
            now = self.clock()
            self.codels[priority].on_wait(now - waiter.enqueued_at, now)
            if not self.queues[priority]:
                self.codels[priority].on_empty(now)
            waiter.future.set_exception(self._overloaded(priority))

    def _remove(self, priority: str, waiter: _Waiter) -> None:
        try:
            self.queues[priority].remove(waiter)
        except ValueError:
            pass

    def _overloaded(self, priority: str) -> Overloaded:
        return Overloaded(f"overloaded: {priority} request shed by admission control "
                          f"(limit {self.limit.limit:.0f}, {self.queued} waiting)", retry_after_s=1)

    def _reject(self, priority: str) -> None:
        self.shed[priority] += 1
        raise self._overloaded(priority)

    def release(self) -> None:
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        while self.inflight + 1 <= self.limit.limit and self.queued:
            priority = "interactive" if self.queues["interactive"] else "batch"
            # overloaded: newest first (Facebook's adaptive LIFO) — the admitted barely wait,
            # the oldest run out their short allowance and get a fast 503
            queue = self.queues[priority]
            waiter = queue.pop() if self.codels[priority].overloaded else queue.popleft()
            if waiter.future.done():
                continue
            now = self.clock()
            self.codels[priority].on_wait(now - waiter.enqueued_at, now)
            self.inflight += 1
            waiter.future.set_result(None)
        for priority, queue in self.queues.items():
            if not queue:
                self.codels[priority].on_empty(self.clock())

    def on_sample(self, *, queue_s: float, service_s: float, batched: bool, rtt_s: float,
                  missed_batches: int = 0) -> None:
        self.limit.on_sample(queue_s=queue_s, service_s=service_s, batched=batched,
                             inflight=self.inflight, rtt_s=rtt_s, now=self.clock(),
                             missed_batches=missed_batches)
        self._wake()

    def on_failure(self, rtt_s: float) -> None:
        self.limit.on_failure(self.clock(), rtt_s)
