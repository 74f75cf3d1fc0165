"""Restart backoff: exponential with full jitter, capped (AWS architecture blog's "full jitter")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 0.5
    cap_s: float = 30.0
    multiplier: float = 2.0

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay before restart number `attempt` (0-based)."""
        # clamp the exponent: a replica crash-looping for hours must not overflow the float
        exponent = min(max(0, attempt), 64)
        return min(self.cap_s, self.base_s * self.multiplier**exponent)

    def delay(self, attempt: int, rand01: float) -> float:
        """Delay in seconds; `rand01` in [0, 1) is the caller's randomness.

        Half fixed, half jittered, so restarts of many replicas spread out but never
        happen in a tight loop (a pure "full jitter" could pick ~0 every time).
        """
        ceiling = self.ceiling(attempt)
        return ceiling / 2 + (ceiling / 2) * rand01
