"""CoDel for a class of the gateway's wait queue (as Facebook's "CoDel for requests").

Calm: a queued request may wait up to `interval_s` (bursts are absorbed). Once waits have
stood at or above `target_s` for a whole interval, the queue is a standing queue —
overload — and waiters get only `target_s` before a fast rejection, so latency stays flat
instead of growing for everyone. Overload ends when the queue has stayed empty for an
interval: a short wait cannot end it, because in overload every admitted wait is short by
construction (that is what made the plain sojourn rule flap between the two modes).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class CoDel:
    target_s: float = 0.005
    interval_s: float = 0.1
    calm_wait_s: float | None = None  # longest wait while calm (default: interval_s)
    first_above_at: float | None = None
    overloaded: bool = False
    empty_since: float | None = None

    def on_wait(self, waited_s: float, now: float) -> None:
        """A waiter left the queue (admitted or expired) after `waited_s`."""
        if waited_s < self.target_s:
            if not self.overloaded:
                self.first_above_at = None
            return
        if self.first_above_at is None:
            self.first_above_at = now
        elif now - self.first_above_at >= self.interval_s:
            self.overloaded = True

    def on_enqueue(self) -> None:
        self.empty_since = None

    def on_empty(self, now: float) -> None:
        """The queue is empty now; a calm stretch of an interval ends overload."""
        if self.empty_since is None:
            self.empty_since = now
        elif now - self.empty_since >= self.interval_s:
            self.overloaded = False
            self.first_above_at = None

    def max_wait_s(self, now: float) -> float:
        if self.overloaded and self.empty_since is not None \
                and now - self.empty_since >= self.interval_s:
            self.overloaded = False
            self.first_above_at = None
        if self.overloaded:
            return self.target_s
        return self.interval_s if self.calm_wait_s is None else self.calm_wait_s
