"""Recursive least squares with a forgetting factor: an online linear fit y ≈ θ·x that
weighs a sample `forgetting`^age, so a replica that slows down (throttled, a noisy
neighbour, a new model version) is re-learnt within about 1 / (1 - forgetting) samples.

Hand-written: three features and one update per response, where numpy's per-call overhead
(~1 µs per tiny array op, a dozen ops) would cost more than the arithmetic. Pure: no clock.

Covariance wind-up, RLS's known failure with forgetting: a direction the samples never
excite (every request the same size) has its covariance divided by `forgetting` at each
update and grows without bound, and then one odd sample throws θ far off. The trace is
capped; past it P is reset to its prior, keeping θ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class Rls:
    n: int
    forgetting: float = 0.99
    prior: float = 10.0  # P starts at prior × I: how far θ may move on the first samples
    max_trace: float = 1e4
    theta: list[float] = field(default_factory=list)
    p: list[list[float]] = field(default_factory=list)
    samples: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.forgetting <= 1:
            raise ValueError("forgetting must be in (0, 1]")
        if not self.theta:
            self.theta = [0.0] * self.n
        if not self.p:
            self._reset_p()

    def _reset_p(self) -> None:
        self.p = [[self.prior if i == j else 0.0 for j in range(self.n)] for i in range(self.n)]

    def predict(self, x: Sequence[float]) -> float:
        return sum(t * v for t, v in zip(self.theta, x, strict=True))

    def update(self, x: Sequence[float], y: float) -> None:
        n, p, lam = self.n, self.p, self.forgetting
        px = [sum(p[i][j] * x[j] for j in range(n)) for i in range(n)]
        denom = lam + sum(x[i] * px[i] for i in range(n))
        gain = [v / denom for v in px]
        error = y - self.predict(x)
        for i in range(n):
            self.theta[i] += gain[i] * error
        for i in range(n):
            row = p[i]
            for j in range(n):
                row[j] = (row[j] - gain[i] * px[j]) / lam
        for i in range(n):  # keep P symmetric against rounding drift
            for j in range(i + 1, n):
                p[i][j] = p[j][i] = (p[i][j] + p[j][i]) / 2
        if sum(p[i][i] for i in range(n)) > self.max_trace:
            self._reset_p()
        self.samples += 1
