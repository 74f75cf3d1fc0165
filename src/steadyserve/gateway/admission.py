"""Admission control per deployment: an adaptive concurrency limit (`policies.limit`) in
front of the replicas, and a bounded, two-class wait queue with CoDel (`policies.codel`).

    acquire(priority) ── under the limit, nobody waiting ──► go (the fast path: no await)
          │ otherwise
          ├─ batch, and the batch queue is at its share of queue_max ──► 503 at once
          ├─ queue full ──► an interactive request evicts the newest batch waiter, else 503
          ├─ its expected wait — the waiters ahead of it × round trip / limit (Little's
          │  law) — exceeds its allowance ──► 503 at once, not after waiting it out
          │  (unless it is first in line and its class calm: it waits its allowance)
          └─ wait ≤ its allowance ──► go or 503: its class's CoDel allowance; for an
             interactive request the calm one unless interactive traffic alone overloads
             (two or more interactive waiters ahead, and interactive arrivals at 90 % or
             more of what the replicas complete)
    release() hands the freed slot to an interactive waiter first, then to a batch one:
    the oldest while calm, the newest while that class is overloaded (adaptive LIFO).

The interactive class's CoDel target is half an unloaded round trip (the least seen lately,
capped by `interactive_queue_target_s`): once interactive traffic alone keeps a queue
standing, an admitted interactive request waits at most that long before it runs, so it
sees about twice its unloaded latency, and the rest are refused at once. While batch
traffic is what overloads, interactive waiters keep the calm allowance and are not shed.
A line of interactive waiters is not enough to tell: batched replicas free their slots a
whole batch at a time, so interactive traffic at 60 % of capacity lines up every batch
cycle (the mixed 3x-overload chaos test shed 2.6 % of it on a busy CI machine). Whether it
alone overloads is a rate: interactive arrivals against completions (or limit / round trip,
Little's law, when the replicas are not full), each over about the last second.
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
from ..policies.limit import AimdLimit, DecayingRate, WindowedMin

PRIORITIES = ("interactive", "batch")
MIN_INTERACTIVE_TARGET_S = 0.005  # below this a wait is scheduling noise, not a queue
SHORT_LINE = 2  # interactive waiters that are not yet a standing interactive queue
INTERACTIVE_OVERLOAD_SHARE = 0.9  # interactive arrivals / capacity that overloads by itself
RTT_EWMA_WEIGHT = 0.1


def parse_priority(value: str | None) -> str:
    if value is None or value == "":
        return "interactive"
    value = value.strip().lower()
    if value not in PRIORITIES:
        raise ClientError(f"X-Priority must be 'interactive' or 'batch', got {value[:40]!r}",
                          param="x-priority")
    return value


class Shed(Overloaded):
    """Refused by admission control; `reason` says which rule (a metric label):
    at_once (its expected wait exceeded its allowance), waited (the allowance ran out in the
    queue), queue_full, evicted (an interactive arrival took its place), shed_batch (an
    automatic response refuses batch traffic for a while)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message, retry_after_s=1)
        self.reason = reason


SHED_REASONS = ("at_once", "waited", "queue_full", "evicted", "shed_batch")


LATE_TIMER_S = 0.010  # an expiry timer this late means the gateway's own loop stalled


@dataclass(slots=True, eq=False)
class _Waiter:
    future: asyncio.Future[None]
    enqueued_at: float
    extended: bool = False  # no (more) stall grace: given once, or its class is overloaded


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
            latency_tolerance=cfg.limit_latency_tolerance,
        )
        self.rtt_floor = WindowedMin()  # the unloaded round trip, lately
        self.rtt_s: float | None = None  # EWMA of round trips: expected waits
        # one CoDel per class: interactive waiters, served first, barely wait; if they shared
        # the state they would keep resetting it while the batch queue stands
        self.codels = {
            "interactive": CoDel(target_s=cfg.interactive_queue_target_s,
                                 interval_s=cfg.queue_interval_s),
            "batch": CoDel(target_s=cfg.queue_target_s, interval_s=cfg.queue_interval_s,
                           calm_wait_s=min(cfg.queue_interval_s, cfg.batch_max_wait_s)),
        }
        self.inflight = 0
        # ∫ (inflight + queued) dt: the autoscaler's demand is its mean over each sample
        # interval, exact however short the requests (an instant count aliases with
        # periodic traffic)
        self._area = 0.0
        self._area_at = clock()
        self._ongoing = 0
        self.shed_batch_until = 0.0  # an automatic response: refuse batch traffic until then
        # the autoscaler is starting replicas for this demand: until they are ready (or this
        # time), interactive waiters wait for them instead of being shed for capacity that is
        # seconds away (Knative's activator buffers the same way while it panics)
        self.scaling_up_until = 0.0
        self.queues: dict[str, deque[_Waiter]] = {p: deque() for p in PRIORITIES}
        self.shed = {p: 0 for p in PRIORITIES}
        self.interactive_arrivals = DecayingRate()
        self.completions = DecayingRate()

    def resize(self, replicas: int, max_batch_size: int) -> None:
        """Replica count or batch size changed (start, rollout): keep every replica busy."""
        self.limit.min_limit = max(1, replicas)
        if self.cfg.limit_initial is None and self.inflight == 0 and not self.queued:
            self.limit.limit = max(self.limit.limit, float(replicas * max(4, max_batch_size)))
        self.limit.limit = max(self.limit.limit, float(self.limit.min_limit))

    @property
    def queued(self) -> int:
        return len(self.queues["interactive"]) + len(self.queues["batch"])

    async def acquire(self, priority: str, deadline: float, *, held: bool = False) -> None:
        """A slot, or Shed. `held`: the request already waited for a first replica (scale
        from zero); bounded by hold_max_requests, it was demand the deployment was scaled
        for, so it waits for a slot until its deadline instead of CoDel's allowance."""
        if priority == "batch":
            if self.shed_batch_until and self.clock() < self.shed_batch_until:
                self._reject("batch", "shed_batch")
        else:
            self.interactive_arrivals.add(self.clock())
        # floor, not ceiling: a limit of 3.9 admits 3 (a fourth would queue at a replica)
        if self.inflight + 1 <= self.limit.limit and not self.queued:
            self.inflight += 1
            self._account()
            return
        now = self.clock()
        if priority == "batch":
            batch_cap = int(self.cfg.queue_max * self.cfg.batch_queue_share)
            if len(self.queues["batch"]) >= batch_cap:
                self._reject("batch", "queue_full")
        if self.queued >= self.cfg.queue_max:
            if priority == "interactive" and self.queues["batch"]:
                evicted = self.queues["batch"].pop()
                if not evicted.future.done():
                    self.shed["batch"] += 1
                    evicted.future.set_exception(self._overloaded("batch", "evicted"))
            else:
                self._reject(priority, "queue_full")
        codel = self.codels[priority]
        remaining = max(0.0, deadline - now)
        patient = held or (priority == "interactive" and now < self.scaling_up_until)
        if patient:
            allowance, calm = remaining if held else min(remaining, self.scaling_up_until - now), True
        elif priority == "interactive" and not self._interactive_overloads(now):
            # the slots are held by batch traffic, or the machine is slow for a moment: the
            # calm allowance, whatever CoDel says. Interactive traffic is shed only when it
            # alone overloads, and a starved CPU sheds nobody at light load
            allowance = min(self.cfg.queue_interval_s, remaining)
            calm = True
        else:
            allowance = min(codel.max_wait_s(now), remaining)
            calm = not codel.overloaded
        expected = self._expected_wait_s(priority)
        # first in line while its class is calm: the next slot is its own, so it waits its
        # allowance even when the estimate says longer. The estimate is the round trip's
        # EWMA, which a moment's slowness (a killed replica's retries, a busy CPU) inflates
        # well past what the next slot takes: refusing at once on it shed a lone request at
        # light load (1 of ~1,900 in the killed-embedder pipeline test).
        first = calm and not self.queues["interactive"] and (
            priority == "interactive" or not self.queues["batch"])
        if expected > allowance and not patient and not first:
            # it would time out in the queue: say so now. The queue may stay empty meanwhile,
            # yet the demand is there: CoDel must not read the silence as overload ending
            codel.on_enqueue()
            self._reject(priority, "at_once")
        loop = asyncio.get_running_loop()
        # an overloaded class sheds on its own clock: no stall grace for its waiters
        waiter = _Waiter(loop.create_future(), now, extended=not calm)
        self.queues[priority].append(waiter)
        self._account()
        codel.on_enqueue()
        # a timer, not asyncio.wait_for: on 3.11 wait_for can swallow a cancellation that
        # races with the slot being handed over (cpython gh-86296)
        timer = loop.call_later(allowance, self._expire, priority, waiter, now + allowance)
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

    def _interactive_overloads(self, now: float) -> bool:
        """A standing interactive queue (two or more waiting) fed at 90 % or more of what
        the replicas get through: completions, or limit / round trip while slots are idle."""
        if len(self.queues["interactive"]) < SHORT_LINE or self.rtt_s is None:
            return False
        capacity = max(self.completions.rate(now), self.limit.limit / max(self.rtt_s, 1e-6))
        return self.interactive_arrivals.rate(now) >= INTERACTIVE_OVERLOAD_SHARE * capacity

    def _slot_interval_s(self) -> float:
        """How often a slot frees up: round trip / limit (0 before anything is measured)."""
        return 0.0 if self.rtt_s is None else self.rtt_s / max(1.0, self.limit.limit)

    def _expected_wait_s(self, priority: str) -> float:
        """How long a new waiter of this class would wait for a slot: slots free up at about
        limit / round trip per second (Little's law), and those ahead of it go first."""
        if self.rtt_s is None:
            return 0.0  # nothing measured yet: let it queue
        ahead = len(self.queues["interactive"])
        if priority == "batch":
            ahead += len(self.queues["batch"])
        return (ahead + 1) * self._slot_interval_s()

    def _expire(self, priority: str, waiter: _Waiter, due: float) -> None:
        late = self.clock() - due
        if late > LATE_TIMER_S and not waiter.extended and not waiter.future.done():
            # the gateway itself did not run (a starved CPU stalled its loop): replies that
            # came in meanwhile are read after this timer and will free slots. Give a calm
            # waiter the time the stall took back, once, before calling the wait the queue's
            # fault (an overloaded class's short allowance is its shedding: it keeps it)
            waiter.extended = True
            extra = min(late, self.cfg.queue_interval_s)
            asyncio.get_running_loop().call_later(
                extra, self._expire, priority, waiter, self.clock() + extra)
            return
        if not waiter.future.done():
            self._remove(priority, waiter)
            self.shed[priority] += 1
            now = self.clock()
            self.codels[priority].on_wait(now - waiter.enqueued_at, now)
            if not self.queues[priority]:
                self.codels[priority].on_empty(now)
            waiter.future.set_exception(self._overloaded(priority, "waited"))

    def _remove(self, priority: str, waiter: _Waiter) -> None:
        try:
            self.queues[priority].remove(waiter)
        except ValueError:
            pass
        else:
            self._account()

    def _account(self, now: float | None = None) -> None:
        """Add the time since the last change at the old count, then note the new one."""
        if now is None:
            now = self.clock()
        self._area += self._ongoing * (now - self._area_at)
        self._area_at = now
        self._ongoing = self.inflight + self.queued

    def ongoing_area(self) -> float:
        """∫ (in flight + queued) dt since this Admission was made, up to now."""
        self._account()
        return self._area

    def _overloaded(self, priority: str, reason: str) -> Shed:
        return Shed(f"overloaded: {priority} request shed by admission control "
                    f"(limit {self.limit.limit:.0f}, {self.queued} waiting)", reason=reason)

    def _reject(self, priority: str, reason: str) -> None:
        self.shed[priority] += 1
        raise self._overloaded(priority, reason)

    def release(self) -> None:
        self.inflight -= 1
        now = self.clock()
        self.completions.add(now)
        self._wake()
        self._account(now)

    def _wake(self) -> None:
        while self.inflight + 1 <= self.limit.limit and self.queued:
            priority = "interactive" if self.queues["interactive"] else "batch"
            # overloaded: newest first (Facebook's adaptive LIFO) — the admitted barely wait,
            # the oldest run out their short allowance and get a fast 503
            queue = self.queues[priority]
            # (a short line is served in order: its waiters kept the calm allowance, and
            # newest-first would starve the oldest until that ran out)
            lifo = self.codels[priority].overloaded and len(queue) > SHORT_LINE
            waiter = queue.pop() if lifo else queue.popleft()
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
                  missed_batches: int = 0, handler: str = "", priority: str = "interactive",
                  batch_items: int = 1) -> None:
        now = self.clock()
        self.rtt_s = rtt_s if self.rtt_s is None else \
            self.rtt_s + RTT_EWMA_WEIGHT * (rtt_s - self.rtt_s)
        self.rtt_floor.add(rtt_s, now)
        floor = self.rtt_floor.value
        if floor is not None:
            # a standing interactive queue is one whose waits reach half an unloaded round
            # trip; then a waiter gets that long: about twice its unloaded latency in all
            self.codels["interactive"].target_s = min(
                self.cfg.interactive_queue_target_s, max(MIN_INTERACTIVE_TARGET_S, floor / 2))
        self.limit.on_sample(queue_s=queue_s, service_s=service_s, batched=batched,
                             inflight=self.inflight, rtt_s=rtt_s, now=now,
                             missed_batches=missed_batches, handler=handler,
                             interactive=priority == "interactive", batch_items=batch_items)
        self._wake()

    def on_failure(self, rtt_s: float) -> None:
        self.limit.on_failure(self.clock(), rtt_s)
