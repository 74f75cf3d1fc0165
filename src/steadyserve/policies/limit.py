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
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class AimdLimit:
    limit: float
    min_limit: int = 1
    max_limit: int = 10_000
    backoff: float = 0.9
    tolerance: float = 1.0
    batch_tolerance: int = 0
    slack_s: float = 0.002
    last_decrease_at: float = 0.0

    def overloaded(self, queue_s: float, service_s: float, batched: bool,
                   missed_batches: int = 0) -> bool:
        if batched:
            # a batched request normally waits out the batch computing when it arrived;
            # having to wait out more (the next batch was full without it) is overload
            return missed_batches > self.batch_tolerance
        return queue_s > self.tolerance * service_s + self.slack_s

    def on_sample(
        self, *, queue_s: float, service_s: float, batched: bool, inflight: int, rtt_s: float,
        now: float, missed_batches: int = 0,
    ) -> float:
        """Update from one response; returns the new limit."""
        if self.overloaded(queue_s, service_s, batched, missed_batches):
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
