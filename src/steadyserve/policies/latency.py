"""A sliding window of recent latencies with cheap quantiles (for hedging and per-try timeouts)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class LatencyWindow:
    size: int = 256
    refresh_every: int = 32  # recompute quantiles after this many new samples
    _samples: list[float] = field(default_factory=list)
    _next: int = 0
    _since_refresh: int = 0
    _sorted: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        if len(self._samples) < self.size:
            self._samples.append(seconds)
        else:
            self._samples[self._next] = seconds
            self._next = (self._next + 1) % self.size
        self._since_refresh += 1
        if self._since_refresh >= self.refresh_every or len(self._samples) <= self.refresh_every:
            self._sorted = sorted(self._samples)
            self._since_refresh = 0

    def quantile(self, q: float) -> float | None:
        """The q-quantile of the window, or None with fewer than 10 samples (not enough to judge)."""
        if len(self._sorted) < 10:
            return None
        index = min(len(self._sorted) - 1, int(q * len(self._sorted)))
        return self._sorted[index]
