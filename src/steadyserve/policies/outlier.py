"""Outlier ejection (Envoy's consecutive-5xx detector), as a pure state machine per replica.

    in rotation ──5 consecutive failures──► ejected (30 s × consecutive ejections, ≤ 300 s)
        ▲                                        │ time passes
        │ probe succeeds: slow start             ▼
        └──────────────────────────────── probing (one live request)
                                                 │ probe fails: ejected again, longer
A failure is a connect error, a reset, a 5xx or a per-try timeout. Never more than
`max_ejection_share` of a deployment's replicas are ejected, and never the last one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_share: float = 0.5
    slow_start_s: float = 10.0

    def may_eject(self, total: int, ejected: int) -> bool:
        """Ejecting one more keeps the share within bounds and at least one replica serving."""
        allowed = max(1, math.floor(total * self.max_ejection_share))
        return ejected + 1 <= allowed and total - ejected - 1 >= 1


@dataclass(frozen=True, slots=True)
class HostHealth:
    consecutive_failures: int = 0
    ejections: int = 0  # consecutive ejections: multiplies the ejection time
    ejected_until: float = 0.0  # > 0 while ejected (or waiting for its probe)
    probing: bool = False  # one live request is testing it
    returned_at: float = 0.0  # start of slow start

    def ejected(self, now: float) -> bool:
        """Out of rotation: ejected and not yet due for a probe, or its probe is running."""
        return self.ejected_until > 0 and (now < self.ejected_until or self.probing)

    def due_for_probe(self, now: float) -> bool:
        return self.ejected_until > 0 and now >= self.ejected_until and not self.probing


def start_probe(h: HostHealth) -> HostHealth:
    return replace(h, probing=True)


def record(
    h: HostHealth, ok: bool, now: float, policy: OutlierPolicy, may_eject: bool
) -> tuple[HostHealth, str | None]:
    """Next state after one attempt's outcome, and the event: 'ejected' | 'returned' | None."""
    if ok:
        if h.ejected_until > 0:  # the probe (or a straggler) succeeded: back, in slow start
            return HostHealth(ejections=h.ejections, returned_at=now), "returned"
        if h.consecutive_failures or (h.ejections and now - h.returned_at >= policy.base_ejection_s):
            # healthy long enough after a return: forget past ejections, as Envoy decays them
            ejections = h.ejections if now - h.returned_at < policy.base_ejection_s else 0
            return replace(h, consecutive_failures=0, ejections=ejections), None
        return h, None
    if h.ejected_until > 0:
        if h.probing:  # the probe failed: eject again, for longer
            return _eject(h, now, policy), "ejected"
        return h, None
    failures = h.consecutive_failures + 1
    if failures >= policy.consecutive_failures and may_eject:
        return _eject(h, now, policy), "ejected"
    return replace(h, consecutive_failures=failures), None


def _eject(h: HostHealth, now: float, policy: OutlierPolicy) -> HostHealth:
    ejections = h.ejections + 1
    duration = min(policy.max_ejection_s, policy.base_ejection_s * ejections)
    return HostHealth(ejections=ejections, ejected_until=now + duration)


def slow_start_weight(h: HostHealth, now: float, policy: OutlierPolicy) -> float:
    """Share of its normal traffic a returned replica may take: ramps 0.1 → 1 over the window."""
    if h.returned_at <= 0 or policy.slow_start_s <= 0:
        return 1.0
    ramp = (now - h.returned_at) / policy.slow_start_s
    return 1.0 if ramp >= 1 else max(0.1, ramp)
