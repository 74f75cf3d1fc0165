"""Adaptive concurrency limit per deployment: AIMD on the replicas' own queueing signal.

Why AIMD on queue delay rather than Gradient2 on latency: with dynamic batching, latency
rises with load by design (bigger batches), so a latency gradient would shrink the limit
exactly when batching pays off. Replicas report, per response, how long the request queued
before compute (`queue_s`) and how long compute took (`service_s`). A replica is overloaded
when requests queue longer than `tolerance` service times (non-batched: waiting behind more
than half a request by default), or, for batched handlers, when a request had to sit out a
whole batch it could not join (the replica counts these exactly: `missed_batches`). Then the limit shrinks by
`backoff`, at most once per round trip; while the limit is binding and replicas are not
overloaded it grows by one per round trip (1/limit per response) — TCP's AIMD. `min_limit`
keeps every replica busy.

Interactive traffic on batched handlers also bounds latency: a batch grows with the limit,
and on a CPU a batch of 32 takes 20x as long as a batch of one for 1.6x the throughput. An
interactive sample whose time at the replica (queue + compute) exceeds `latency_tolerance` x
the handler's unloaded time is overload too. The unloaded time is an average over samples
that ran alone and barely waited (batch of one, queue under a tenth of compute): typical
inputs, not the shortest one, and refreshed whenever the limit drives batches back down. So
the batch size settles where latency stays within that factor — large on a GPU, where
batches are nearly free, small on a CPU — and a request may still wait out the batch
computing when it arrived. Batch-class traffic alone is not held to it: throughput first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class WindowedMin:
    """The least sample of the last `window_s` to 1.5 × `window_s` (two buckets, rotated
    every half window): an old minimum ages out, so a slower model version is learnt."""

    window_s: float = 30.0
    current: float = math.inf
    previous: float = math.inf
    bucket_start: float | None = None

    def add(self, value: float, now: float) -> None:
        if self.bucket_start is None:
            self.bucket_start = now
        elif now - self.bucket_start >= self.window_s / 2:
            stale = now - self.bucket_start >= self.window_s
            self.previous = math.inf if stale else self.current
            self.current = math.inf
            self.bucket_start = now
        self.current = min(self.current, value)

    @property
    def value(self) -> float | None:
        least = min(self.current, self.previous)
        return None if least == math.inf else least


@dataclass(slots=True)
class DecayingRate:
    """Events per second, weighted over about the last `tau_s` (an exponentially decayed
    count: at a steady r per second it holds r × tau_s). Time is passed in."""

    tau_s: float = 1.0
    count: float = 0.0
    at: float | None = None

    def _decay(self, now: float) -> None:
        if self.at is not None and now > self.at:
            self.count *= math.exp(-(now - self.at) / self.tau_s)
        if self.at is None or now > self.at:
            self.at = now

    def add(self, now: float, n: float = 1.0) -> None:
        self._decay(now)
        self.count += n

    def rate(self, now: float) -> float:
        self._decay(now)
        return self.count / self.tau_s


UNLOADED_WEIGHT = 0.05  # EWMA weight of one unloaded sample: about the last 20
UNLOADED_QUEUE_SHARE = 0.1  # a sample that queued longer than this share of compute is loaded


def unloaded_time(previous: float | None, *, queue_s: float, service_s: float,
                  batch_items: int) -> float | None:
    """The handler's typical time at a replica when nothing else is there, updated with one
    sample if that sample ran alone and barely waited."""
    if batch_items != 1 or queue_s > UNLOADED_QUEUE_SHARE * service_s:
        return previous
    sample = queue_s + service_s
    return sample if previous is None else previous + UNLOADED_WEIGHT * (sample - previous)


@dataclass(kw_only=True, slots=True)
class AimdLimit:
    limit: float
    min_limit: int = 1
    max_limit: int = 10_000
    backoff: float = 0.9
    tolerance: float = 1.0
    batch_tolerance: int = 0
    latency_tolerance: float = 1.5  # interactive, batched: replica time ≤ this × unloaded (0: off)
    slack_s: float = 0.002
    last_decrease_at: float = 0.0
    unloaded: dict[str, float] = field(default_factory=dict)  # per handler: unloaded_time

    def overloaded(self, queue_s: float, service_s: float, batched: bool,
                   missed_batches: int = 0, baseline_s: float | None = None) -> bool:
        if batched:
            # a batched request normally waits out the batch computing when it arrived;
            # having to wait out more (the next batch was full without it) is overload
            if missed_batches > self.batch_tolerance:
                return True
            return baseline_s is not None and self.latency_tolerance > 0 and \
                queue_s + service_s > self.latency_tolerance * baseline_s + self.slack_s
        return queue_s > self.tolerance * service_s + self.slack_s

    def on_sample(
        self, *, queue_s: float, service_s: float, batched: bool, inflight: int, rtt_s: float,
        now: float, missed_batches: int = 0, handler: str = "", interactive: bool = False,
        batch_items: int = 1,
    ) -> float:
        """Update from one response; returns the new limit."""
        baseline = None
        if batched:
            baseline = unloaded_time(self.unloaded.get(handler), queue_s=queue_s,
                                     service_s=service_s, batch_items=batch_items)
            if baseline is not None:
                self.unloaded[handler] = baseline
        if self.overloaded(queue_s, service_s, batched, missed_batches,
                           baseline if interactive else None):
            if now - self.last_decrease_at >= rtt_s:
                self.limit = max(float(self.min_limit), self.limit * self.backoff)
                self.last_decrease_at = now
        elif inflight + 1 >= self.limit:  # the limit was binding: probe for more
            # +1 per limit's worth of responses, i.e. +1 per round trip, like TCP's
            # congestion avoidance: growth and the once-per-RTT decrease then balance
            self.limit = min(float(self.max_limit), self.limit + 1 / self.limit)
        return self.limit

    def on_failure(self, now: float, rtt_s: float) -> float:
        """A timeout or dropped connection: treat as congestion."""
        if now - self.last_decrease_at >= rtt_s:
            self.limit = max(float(self.min_limit), self.limit * self.backoff)
            self.last_decrease_at = now
        return self.limit
