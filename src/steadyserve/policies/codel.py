"""CoDel for the gateway's wait queue (as Facebook's "adaptive LIFO + CoDel" uses it).

While requests dequeue faster than `target_s`, a queued request may wait up to
`interval_s`. Once the queue has stood above target for a whole interval, it is a standing
queue — overload — and waiters get only `target_s` before a fast rejection, so the queue
drains instead of growing latency for everyone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class CoDel:
    target_s: float = 0.005
    interval_s: float = 0.1
    first_above_at: float | None = None
    overloaded: bool = False

    def on_dequeue(self, waited_s: float, now: float) -> None:
        if waited_s < self.target_s:
            self.first_above_at = None
            self.overloaded = False
        elif self.first_above_at is None:
            self.first_above_at = now
        elif now - self.first_above_at >= self.interval_s:
            self.overloaded = True

    def on_empty(self) -> None:
        """The queue drained: whatever stood is gone."""
        self.first_above_at = None
        self.overloaded = False

    def max_wait_s(self) -> float:
        return self.target_s if self.overloaded else self.interval_s
