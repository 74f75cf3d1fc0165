"""Retry budget (Finagle / Linkerd): retries may add at most `ratio` of the requests seen in
the last `window_s`, plus a small floor so that low traffic can still retry. During an
outage this caps upstream attempts near (1 + ratio) × client requests: no retry storm."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class RetryBudget:
    ratio: float = 0.2
    window_s: float = 10.0
    min_per_s: float = 3.0
    buckets: int = 10
    _requests: list[int] = field(default_factory=list, repr=False)
    _retries: list[int] = field(default_factory=list, repr=False)
    _epoch: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._requests = [0] * self.buckets
        self._retries = [0] * self.buckets
        self._epoch = [-1] * self.buckets

    def _slot(self, now: float) -> int:
        epoch = math.floor(now / (self.window_s / self.buckets))
        i = epoch % self.buckets
        if self._epoch[i] != epoch:  # a bucket from an older window: reuse it
            self._epoch[i] = epoch
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def _live(self, now: float) -> tuple[int, int]:
        current = math.floor(now / (self.window_s / self.buckets))
        req = ret = 0
        for i in range(self.buckets):
            if current - self.buckets < self._epoch[i] <= current:
                req += self._requests[i]
                ret += self._retries[i]
        return req, ret

    def record_request(self, now: float) -> None:
        self._requests[self._slot(now)] += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if there is one left."""
        requests, retries = self._live(now)
        if retries + 1 > self.ratio * requests + self.min_per_s * self.window_s:
            return False
        self._retries[self._slot(now)] += 1
        return True

    def usage(self, now: float) -> tuple[int, int]:
        """(requests, retries) in the current window."""
        return self._live(now)


def retry_backoff_s(attempt: int, rand01: float, base_s: float = 0.005, cap_s: float = 0.05) -> float:
    """Short jittered pause before retry `attempt` (1-based): full jitter under a doubling cap."""
    ceiling: float = min(cap_s, base_s * 2.0 ** min(max(0, attempt - 1), 64))
    return ceiling * rand01
