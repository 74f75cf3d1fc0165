"""Load balancing: pick one replica among candidates. Pure; rng and time are arguments.

Every balancer sees the same `Candidate` view and returns an index into the list given;
`pick` is never called with an empty list. Selection by name happens in `make_balancer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError
from .rls import Rls


class Load(Protocol):
    """What a balancer may look at: the gateway's live endpoints and test tables both fit."""

    @property
    def outstanding(self) -> int: ...
    @property
    def ewma_latency_s(self) -> float: ...  # peak-EWMA of observed latency; 0 when none yet


@dataclass(frozen=True, slots=True)
class Candidate:
    outstanding: int
    ewma_latency_s: float = 0.0


class Balancer(Protocol):
    def pick(self, candidates: Sequence[Load], rand: Callable[[], float],
             size: float = 0.0) -> int: ...


class RoundRobin:
    """Rotate through replicas; ignores load. Useful for identical, steady work."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Load], rand: Callable[[], float],
             size: float = 0.0) -> int:
        index = self._next % len(candidates)
        self._next = index + 1
        return index


def _two_distinct(n: int, rand: Callable[[], float]) -> tuple[int, int]:
    a = min(n - 1, int(rand() * n))
    b = min(n - 2, int(rand() * (n - 1)))
    if b >= a:
        b += 1
    return a, b


# With three replicas, two random choices miss the one idle replica a third of the time, and
# that request then waits a whole service time behind another (measured: +20 ms median on a
# 20 ms model at capacity). Scanning three costs nothing; the herd effect P2C avoids needs
# many replicas and many balancers to matter.
SCAN_ALL_BELOW = 4  # the gateway's power_of_two scans fewer replicas than this


def _least_outstanding(candidates: Sequence[Load], rand: Callable[[], float]) -> int:
    """Fewest outstanding requests; ties broken at random (never always the first)."""
    best = min(c.outstanding for c in candidates)
    tied = [i for i, c in enumerate(candidates) if c.outstanding == best]
    return tied[min(len(tied) - 1, int(rand() * len(tied)))]


class PowerOfTwo:
    """Power of two choices on outstanding requests (Mitzenmacher): sample two, keep the less busy."""

    def __init__(self, scan_all_below: int = 0) -> None:
        self.scan_all_below = scan_all_below

    def pick(self, candidates: Sequence[Load], rand: Callable[[], float],
             size: float = 0.0) -> int:
        n = len(candidates)
        if n == 1:
            return 0
        if n < self.scan_all_below:
            return _least_outstanding(candidates, rand)
        a, b = _two_distinct(n, rand)
        if candidates[b].outstanding < candidates[a].outstanding:
            return b
        return a


def peak_ewma_cost(c: Load, default_latency_s: float) -> float:
    """Finagle's peak-EWMA cost: latency estimate × (outstanding + 1)."""
    latency = c.ewma_latency_s if c.ewma_latency_s > 0 else default_latency_s
    return latency * (c.outstanding + 1)


class PeakEwma:
    """Two random choices compared by peak-EWMA cost (as Finagle and linkerd do)."""

    def __init__(self, default_latency_s: float = 0.01) -> None:
        self.default_latency_s = default_latency_s

    def pick(self, candidates: Sequence[Load], rand: Callable[[], float],
             size: float = 0.0) -> int:
        n = len(candidates)
        if n == 1:
            return 0
        a, b = _two_distinct(n, rand)
        cost_a = peak_ewma_cost(candidates[a], self.default_latency_s)
        cost_b = peak_ewma_cost(candidates[b], self.default_latency_s)
        return b if cost_b < cost_a else a


def update_peak_ewma(
    current_s: float, last_update: float, sample_s: float, now: float, decay_s: float = 10.0
) -> float:
    """Next peak-EWMA value: jump up to a slower sample at once, decay towards faster ones."""
    if current_s <= 0 or sample_s > current_s:
        return sample_s
    elapsed = max(0.0, now - last_update)
    weight = math.exp(-elapsed / decay_s)
    return current_s * weight + sample_s * (1 - weight)


LS_FEATURES = ("base_s", "per_kib_s", "per_outstanding_s")  # y ≈ θ · [1, KiB, outstanding]
LS_MIN_SAMPLES = 20  # before this many, a replica is costed by peak-EWMA
LS_SCAN_ALL_UP_TO = 8  # more replicas than this: two random choices, compared by prediction
LS_PROBE_EVERY = 50  # a replica not chosen in this many picks gets the next request


class LeastSquares:
    """Smallest predicted completion time, for replicas that differ (a GPU and a CPU, a
    throttled node). Per replica an online least-squares fit (`policies.rls`, forgetting
    0.99: about the last 100 answers) of the gateway-observed latency against the request's
    size (KiB of body: inputs, tokens and bytes all scale it) and the requests already
    outstanding there; a new request goes where base + per_kib × size + per_outstanding ×
    outstanding is least. P2C on outstanding counts requests, not their cost, and peak-EWMA
    multiplies one latency by the queue: neither sees that a replica is slower per request
    *and* per queued request, or that a large request favours the fast one more.

    Coefficients are clamped at 0 when predicting (a noisy fit must not make a busy
    replica look cheaper); a replica with fewer than LS_MIN_SAMPLES answers is costed by
    peak-EWMA. A fit is only as fresh as the replica's last answer: one never chosen (it
    was slow once) would never be seen to recover, so a replica passed over for
    LS_PROBE_EVERY picks gets the next request — at most 2 % of traffic each."""

    def __init__(self, default_latency_s: float = 0.01, forgetting: float = 0.99) -> None:
        self.default_latency_s = default_latency_s
        self.forgetting = forgetting
        self.fits: dict[str, Rls] = {}
        self.picks = 0
        self.last_picked: dict[str, int] = {}

    def cost(self, c: Load, size: float) -> float:
        fit = self.fits.get(getattr(c, "replica_id", ""))
        if fit is None or fit.samples < LS_MIN_SAMPLES:
            return peak_ewma_cost(c, self.default_latency_s)
        base, per_kib, per_outstanding = fit.theta
        return max(1e-6, base + max(0.0, per_kib) * size + max(0.0, per_outstanding) * c.outstanding)

    def pick(self, candidates: Sequence[Load], rand: Callable[[], float],
             size: float = 0.0) -> int:
        n = len(candidates)
        if n == 1:
            return 0
        self.picks += 1
        index = self._choose(candidates, rand, size)
        ids = [getattr(c, "replica_id", "") for c in candidates]
        for rid in ids:  # a replica seen for the first time starts its count now
            self.last_picked.setdefault(rid, self.picks)
        stale = min(range(n), key=lambda i: self.last_picked[ids[i]])
        if self.picks - self.last_picked[ids[stale]] >= LS_PROBE_EVERY:
            index = stale
        self.last_picked[ids[index]] = self.picks
        return index

    def _choose(self, candidates: Sequence[Load], rand: Callable[[], float], size: float) -> int:
        n = len(candidates)
        if n > LS_SCAN_ALL_UP_TO:
            a, b = _two_distinct(n, rand)
            return b if self.cost(candidates[b], size) < self.cost(candidates[a], size) else a
        costs = [self.cost(c, size) for c in candidates]
        best = min(costs)
        tied = [i for i, cost in enumerate(costs) if cost <= best * (1 + 1e-9)]
        return tied[min(len(tied) - 1, int(rand() * len(tied)))]

    def observe(self, replica_id: str, size: float, outstanding: int, latency_s: float) -> None:
        """One answer: `outstanding` is what the replica held when the request was sent."""
        fit = self.fits.get(replica_id)
        if fit is None:
            fit = self.fits[replica_id] = Rls(len(LS_FEATURES), forgetting=self.forgetting)
        fit.update((1.0, size, float(outstanding)), latency_s)

    def retain(self, replica_ids: set[str]) -> None:
        """Forget the fits of replicas that left (a rollout retires ids for good)."""
        for rid in [r for r in self.fits if r not in replica_ids]:
            del self.fits[rid]
        for rid in [r for r in self.last_picked if r not in replica_ids]:
            del self.last_picked[rid]

    def coefficients(self) -> dict[str, dict[str, float]]:
        return {rid: {**dict(zip(LS_FEATURES, fit.theta, strict=True)), "samples": fit.samples}
                for rid, fit in self.fits.items()}


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "power_of_two": lambda: PowerOfTwo(scan_all_below=SCAN_ALL_BELOW),
    "round_robin": RoundRobin,
    "peak_ewma": PeakEwma,
    "least_squares": LeastSquares,
}


def make_balancer(name: str) -> Balancer:
    try:
        return BALANCERS[name]()
    except KeyError:
        known = ", ".join(sorted(BALANCERS))
        raise ConfigError(f"unknown balancer {name!r}; choose one of: {known}") from None
