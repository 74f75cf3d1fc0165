"""Feed the gateway's own metrics into the time-series store, once a second.

Rules and the status API then work without a Prometheus server: every sample of every
`steadyserve_*` family in the gateway registry becomes a point, counters as their cumulative
value. A value not known yet (an `OptionalGauge` before its first check) has no sample, so
no point, so a rule on it has nothing to fire on. Replicas' own metrics are not sampled:
they are merged into /metrics only when scraped. Also measures event-loop lag: a task
that sleeps 100 ms and records how late it woke up (a blocked loop is the gateway's worst
failure: everything queues behind it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from .timeseries import SeriesStore

log = logging.getLogger("steadyserve.sampler")

SKIP_SUFFIXES = ("_created",)  # prometheus_client's creation timestamps: not a series


def sample_registry(registry: CollectorRegistry | Any, store: SeriesStore, now: float,
                    prefix: str = "steadyserve_") -> int:
    """Record every sample of the registry's families whose name starts with `prefix`."""
    n = 0
    for family in registry.collect():
        if not family.name.startswith(prefix):
            continue
        for s in family.samples:
            if s.name.endswith(SKIP_SUFFIXES):
                continue
            store.record(s.name, s.labels, s.value, now)
            n += 1
    return n


class LoopLagMonitor:
    """How late the event loop runs a timer: the worst lag of the last period, in seconds."""

    def __init__(self, interval_s: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.worst_s = 0.0

    def take(self) -> float:
        worst, self.worst_s = self.worst_s, 0.0
        return worst

    async def run(self) -> None:
        while True:
            before = self.clock()
            await asyncio.sleep(self.interval_s)
            lag = self.clock() - before - self.interval_s
            self.worst_s = max(self.worst_s, lag)
