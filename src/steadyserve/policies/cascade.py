"""Cascade inference paths, pure: the cost/quality curve of a router's thresholds, and the
operating point to serve.

A cascade answers each request with a cheap model and escalates it to an expensive one when a
router says the cheap answer is likely wrong: escalate when `router_score >= threshold`. From
labelled examples (the router's score, whether each path's answer was right, each path's
cost) `cost_quality_curve` computes, for every candidate threshold, the share escalated, the
mean cost per request and the quality of the final answers; `choose_threshold` picks the one
to serve. Nothing here knows about models, clocks or storage: the same arrays always give the
same curve.

Costs. A request the cascade keeps on the cheap path costs `cost_cheap + router_cost`; an
escalated one `cost_cheap + router_cost + cost_expensive` (the cheap answer and the router's
score come first). The curve's two ends are the paths alone, with no router: cheap-only
(threshold +inf, cost `cost_cheap`) and expensive-only (threshold −inf, cost
`cost_expensive`). A cascade that escalates nearly everything therefore costs more than
expensive-only, and the curve shows it.

Quality, per point (`QUALITY_METRICS`):

* `accuracy` — the share of final answers that are right (`cheap_correct` /
  `expensive_correct`, whatever "right" means to the caller: for a risk score, the decision
  at the decline cutoff matches the label). Always available.
* `auc` — the ROC AUC of the final probability (the cheap path's where it answered, the
  expensive path's where it was escalated): how well the scores rank positives above
  negatives, which is what a score thresholded downstream at several cutoffs needs. With a
  rare positive class, accuracy stays close to 1 − the positive rate for any model and
  moves little, while AUC separates models clearly. Needs the probabilities and the labels;
  None when they were not given or the labels hold one class only.
* `brier` — the mean squared error of the final probability (lower is better): whether the
  probabilities themselves can be trusted. Same inputs as AUC.

The rule of `choose_threshold(curve, max_quality_loss, metric)`: target = the expensive-only
quality − `max_quality_loss` (+ for Brier, where lower is better). The first matching row
wins:

    condition                                                  choice
    no examples, or the metric is undefined for expensive-     expensive-only, met=False: nothing
      only (no probabilities given, one class only)              shows the cheap path is enough
    some point reaches the target (within 1e-12, float         the cheapest such point; at equal
      sums)                                                      cost the better quality, then
                                                                 the fewer escalations
    no point reaches it (a negative max_quality_loss asks      expensive-only, met=False: escalate
      to beat expensive-only, and no cascade does)               everything, said in `reason`

With max_quality_loss >= 0 expensive-only itself always reaches the target, so a choice
always exists; the cheap path is chosen only when the labelled examples show it is good
enough, never by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "QUALITY_METRICS",
    "Choice",
    "Curve",
    "CurvePoint",
    "choose_threshold",
    "cost_quality_curve",
    "roc_auc",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Metric = Literal["accuracy", "auc", "brier"]

QUALITY_METRICS: Final[tuple[Metric, ...]] = ("accuracy", "auc", "brier")
DEFAULT_STEPS: Final = 100  # default candidates: escalation shares 0 %, 1 %, …, 100 %
TOLERANCE: Final = 1e-12  # quality compared to the target within float summation error

CHEAP_ONLY: Final = math.inf  # never escalate: the cheap path alone, no router
EXPENSIVE_ONLY: Final = -math.inf  # skip the cheap path and the router: the expensive path alone


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """One operating point: escalate when the router's score >= `threshold`."""

    threshold: float  # +inf: cheap-only; −inf: expensive-only; else a cascade
    escalated: float  # share of requests answered by the expensive path, 0..1
    cost: float  # mean cost per request, in the unit of the costs given
    accuracy: float | None  # None without examples
    auc: float | None  # None without probabilities, or with one class only
    brier: float | None  # None without probabilities

    @property
    def kind(self) -> str:
        """"cheap-only", "expensive-only" or "cascade"."""
        if self.threshold == CHEAP_ONLY:
            return "cheap-only"
        if self.threshold == EXPENSIVE_ONLY:
            return "expensive-only"
        return "cascade"

    def quality(self, metric: Metric) -> float | None:
        """The point's value of `metric` (None where undefined)."""
        value: float | None = getattr(self, metric)
        return value


@dataclass(frozen=True, slots=True)
class Curve:
    """Cheap-only, the cascade's points (escalation rising), expensive-only; over `n` examples."""

    n: int
    cheap_only: CurvePoint
    cascade: tuple[CurvePoint, ...]
    expensive_only: CurvePoint

    @property
    def points(self) -> tuple[CurvePoint, ...]:
        """Every point, cheap-only first and expensive-only last."""
        return (self.cheap_only, *self.cascade, self.expensive_only)


@dataclass(frozen=True, slots=True)
class Choice:
    """The point to serve, the quality it had to reach, and why it was chosen."""

    point: CurvePoint
    metric: Metric
    target: float | None  # None when it could not be computed
    met: bool  # False: nothing reached the target (or there was nothing to judge); expensive-only
    reason: str


def _shape(name: str, a: npt.NDArray[np.generic], n: int | None) -> None:
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} values for {n} examples")


def _floats(name: str, values: npt.ArrayLike, n: int | None) -> FloatArray:
    a = np.asarray(values, dtype=np.float64)
    _shape(name, a, n)
    return a


def _bools(name: str, values: npt.ArrayLike, n: int) -> BoolArray:
    a = np.asarray(values, dtype=np.bool_)
    _shape(name, a, n)
    return a


def _cost(name: str, value: float | npt.ArrayLike, n: int) -> FloatArray:
    """A scalar cost or one per example, as n finite values >= 0."""
    given = np.asarray(value, dtype=np.float64)
    a = np.full(n, float(given)) if given.ndim == 0 else _floats(name, given, n)
    if not (np.isfinite(a) & (a >= 0)).all():
        raise ValueError(f"{name} must be finite and >= 0")
    return a


def _probability(name: str, values: npt.ArrayLike, n: int) -> FloatArray:
    a = _floats(name, values, n)
    if not ((a >= 0) & (a <= 1)).all():  # NaN fails too
        raise ValueError(f"{name} must hold probabilities in [0, 1]")
    return a


def roc_auc(probability: npt.ArrayLike, label: npt.ArrayLike) -> float | None:
    """ROC AUC (Mann–Whitney U with average ranks for ties); None with one class only."""
    p = np.asarray(probability, dtype=np.float64)
    y = np.asarray(label, dtype=np.bool_)
    positives = int(y.sum())
    negatives = int(y.shape[0]) - positives
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(p, kind="mergesort")
    ranked = p[order]
    # average rank of each run of equal values (ranks from 1)
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], ranked.shape[0]]
    ranks = np.empty(p.shape[0], dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = float(ranks[y].sum()) - positives * (positives + 1) / 2.0
    return u / (positives * negatives)


def _default_thresholds(score: FloatArray, steps: int) -> list[float]:
    """Router scores that escalate the top 0 %, 1/steps, …, 100 % of the examples (ties may
    escalate a little more), distinct, highest first."""
    if score.shape[0] == 0:
        return []
    descending = np.sort(score)[::-1]
    n = descending.shape[0]
    picked: list[float] = []
    for k in range(1, steps + 1):
        m = max(1, math.ceil(k * n / steps))  # escalate at least the m highest
        value = float(descending[m - 1])
        if not picked or value < picked[-1]:
            picked.append(value)
    return picked


def cost_quality_curve(
    router_score: npt.ArrayLike,
    cheap_correct: npt.ArrayLike,
    expensive_correct: npt.ArrayLike,
    cost_cheap: float | npt.ArrayLike,
    cost_expensive: float | npt.ArrayLike,
    *,
    router_cost: float | npt.ArrayLike = 0.0,
    cheap_probability: npt.ArrayLike | None = None,
    expensive_probability: npt.ArrayLike | None = None,
    label: npt.ArrayLike | None = None,
    thresholds: Sequence[float] | None = None,
    steps: int = DEFAULT_STEPS,
) -> Curve:
    """The cost/quality curve of a cascade over labelled examples (one array entry each).

    `router_score`: the router's estimate that the cheap answer is wrong (finite; higher
    escalates first). `*_correct`: whether each path's answer was right. Costs: scalars or
    one per example, >= 0. `cheap_probability`, `expensive_probability` and `label`, all
    three or none, add AUC and Brier. `thresholds`: the cascade's candidates (finite);
    default: the scores that escalate 0, 1/steps, …, 100 % of the examples. Raises
    ValueError on arrays of different lengths or values out of range."""
    score = _floats("router_score", router_score, None)
    n = int(score.shape[0])
    if not np.isfinite(score).all():
        raise ValueError("router_score must be finite")
    cheap_ok = _bools("cheap_correct", cheap_correct, n)
    expensive_ok = _bools("expensive_correct", expensive_correct, n)
    c_cheap = _cost("cost_cheap", cost_cheap, n)
    c_expensive = _cost("cost_expensive", cost_expensive, n)
    c_router = _cost("router_cost", router_cost, n)
    given = [v is not None for v in (cheap_probability, expensive_probability, label)]
    if any(given) and not all(given):
        raise ValueError("cheap_probability, expensive_probability and label go together")
    probabilities: tuple[FloatArray, FloatArray, BoolArray] | None = None
    if cheap_probability is not None and expensive_probability is not None and label is not None:
        probabilities = (_probability("cheap_probability", cheap_probability, n),
                         _probability("expensive_probability", expensive_probability, n),
                         _bools("label", label, n))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if thresholds is None:
        candidates = _default_thresholds(score, steps)
    else:
        candidates = sorted({float(t) for t in thresholds}, reverse=True)
        if not all(math.isfinite(t) for t in candidates):
            raise ValueError("thresholds must be finite (cheap-only and expensive-only are "
                             "always on the curve)")

    def point(threshold: float, escalate: BoolArray, cost: FloatArray) -> CurvePoint:
        if n == 0:
            return CurvePoint(threshold, 0.0, 0.0, None, None, None)
        correct = np.where(escalate, expensive_ok, cheap_ok)
        auc_value = brier = None
        if probabilities is not None:
            cheap_p, expensive_p, y = probabilities
            final = np.where(escalate, expensive_p, cheap_p)
            auc_value = roc_auc(final, y)
            brier = float(np.mean((final - y) ** 2))
        return CurvePoint(threshold=threshold, escalated=float(escalate.mean()),
                          cost=float(cost.mean()), accuracy=float(correct.mean()),
                          auc=auc_value, brier=brier)

    none = np.zeros(n, dtype=np.bool_)
    cascade_base = c_cheap + c_router
    return Curve(
        n=n,
        cheap_only=point(CHEAP_ONLY, none, c_cheap),
        cascade=tuple(point(t, escalate, np.where(escalate, cascade_base + c_expensive, cascade_base))
                      for t in candidates for escalate in [score >= t]),
        expensive_only=point(EXPENSIVE_ONLY, ~none, c_expensive),
    )


def _better_or_equal(value: float, target: float, metric: Metric) -> bool:
    if metric == "brier":  # an error: lower is better
        return value <= target + TOLERANCE
    return value >= target - TOLERANCE


def choose_threshold(curve: Curve, max_quality_loss: float, metric: Metric = "accuracy") -> Choice:
    """The cheapest point whose quality is within `max_quality_loss` of expensive-only (the
    module docstring's table). `max_quality_loss` is in the metric's unit (accuracy or AUC
    points given up; Brier score added); a negative value asks to beat expensive-only."""
    if metric not in QUALITY_METRICS:
        raise ValueError(f"metric must be one of {QUALITY_METRICS}, got {metric!r}")
    if not math.isfinite(max_quality_loss):
        raise ValueError(f"max_quality_loss must be finite, got {max_quality_loss}")
    fallback = curve.expensive_only
    if curve.n == 0:
        return Choice(fallback, metric, None, False,
                      "no labelled examples: escalate everything (expensive-only)")
    reference = fallback.quality(metric)
    if reference is None:
        return Choice(fallback, metric, None, False,
                      f"{metric} is undefined on these examples (no probabilities, or one class "
                      "only): escalate everything (expensive-only)")
    target = reference + max_quality_loss if metric == "brier" else reference - max_quality_loss
    feasible = [p for p in curve.points
                if (q := p.quality(metric)) is not None and _better_or_equal(q, target, metric)]
    if not feasible:
        return Choice(fallback, metric, target, False,
                      f"no point reaches {metric} {target:.6g}: escalate everything "
                      "(expensive-only)")
    sign = 1.0 if metric == "brier" else -1.0  # sort key: better quality first

    def key(p: CurvePoint) -> tuple[float, float, float]:
        q = p.quality(metric)
        return (p.cost, sign * (q if q is not None else 0.0), p.escalated)

    best = min(feasible, key=key)
    return Choice(best, metric, target, True,
                  f"the cheapest point with {metric} within {max_quality_loss:g} of "
                  f"expensive-only ({reference:.6g}): {best.kind}")
