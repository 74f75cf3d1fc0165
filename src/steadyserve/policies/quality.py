"""Summaries of user feedback on a model's answers, with honest error bars.

The caller groups feedback by (deployment, model version) and calls these once per group;
nothing here knows about grouping, storage or time. Every function is pure: no I/O, no
clock, no randomness, and the same input always gives the same output.

Which statistics, and why:

* `mean_interval` — the mean of numeric scores (a 1–5 rating, a thumbs ±1) with a Student-t
  confidence interval, mean ± t(1 − α/2, n − 1) · s / √n. Feedback groups are often small, and
  the t quantile widens the interval to account for estimating the spread from the same few
  scores (the normal quantile would claim too much certainty). The t quantile is computed
  here, not looked up, so no scipy is needed and any confidence level works: bisection on
  the t CDF (the regularized incomplete beta function) up to 1000 degrees of freedom,
  Fisher's expansion around the normal quantile beyond; both agree with scipy to ~1e-10.
* `proportion_interval` — a share (thumbs-up rate, accuracy) with the Wilson score interval.
  The textbook Wald interval p ± z·√(p(1 − p)/n) collapses to zero width at 0 or n successes
  ("0 of 3 bad answers" would claim the true rate is exactly 0) and strays outside [0, 1]
  and undercovers for small n. Wilson's interval stays inside [0, 1], is never empty at the
  extremes, and keeps close to its nominal coverage even with a handful of answers.
* `label_metrics` — when feedback is a true label for a probabilistic classifier: accuracy
  (as a Wilson interval), precision and recall at a threshold, the Brier score (mean squared
  error of the probability: it judges the probabilities themselves, not only the decisions)
  and a reliability table (predicted probability against observed rate per equal-width bin)
  that shows whether "0.8" really means right 80 % of the time.
* `rate` — feedback items per recorded answer: how much of the traffic the numbers above
  rest on.

`to_json` turns any of the result dataclasses into plain nested dicts for an HTTP API.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass
from statistics import NormalDist
from typing import TypeAlias

__all__ = [
    "LabelMetrics",
    "MeanInterval",
    "ProportionInterval",
    "ReliabilityBin",
    "label_metrics",
    "mean_interval",
    "proportion_interval",
    "rate",
    "to_json",
]

Json: TypeAlias = "bool | int | float | str | list[Json] | dict[str, Json] | None"

JSON_DIGITS = 6  # floats in `to_json` output are rounded to this many decimal places


@dataclass(frozen=True, slots=True)
class MeanInterval:
    """Mean of `n` scores with its confidence interval (None where undefined)."""

    n: int
    mean: float | None  # None when n == 0
    low: float | None  # None when n < 2: one score says nothing about the spread
    high: float | None


@dataclass(frozen=True, slots=True)
class ProportionInterval:
    """`successes` out of `n`, the observed rate and its Wilson interval (None when n == 0)."""

    n: int
    successes: int
    rate: float | None
    low: float | None
    high: float | None


@dataclass(frozen=True, slots=True)
class ReliabilityBin:
    """Pairs whose probability lies in [low, high) (the last bin also takes 1.0)."""

    low: float
    high: float
    count: int
    mean_predicted: float
    observed_rate: float


@dataclass(frozen=True, slots=True)
class LabelMetrics:
    n: int
    accuracy: ProportionInterval
    precision: float | None  # None when nothing was predicted positive
    recall: float | None  # None when nothing was actually positive
    brier: float | None  # None when n == 0
    reliability: tuple[ReliabilityBin, ...]  # non-empty bins only, lowest first
    positives: int  # pairs whose true label is positive
    predicted_positives: int  # pairs whose probability is >= threshold


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")


def _normal_quantile(p: float) -> float:
    return NormalDist().inv_cdf(p)


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta (modified Lentz's method)."""
    tiny = 1e-300
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (tiny if abs(d) < tiny else d)
    result = d
    for m in range(1, 10_000):
        m2 = 2 * m
        # even step
        numerator = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2))
        d = 1.0 + numerator * d
        d = 1.0 / (tiny if abs(d) < tiny else d)
        c = 1.0 + numerator / c
        c = tiny if abs(c) < tiny else c
        result *= d * c
        # odd step
        numerator = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))
        d = 1.0 + numerator * d
        d = 1.0 / (tiny if abs(d) < tiny else d)
        c = 1.0 + numerator / c
        c = tiny if abs(c) < tiny else c
        step = d * c
        result *= step
        if abs(step - 1.0) < 1e-15:
            return result
    return result  # pragma: no cover - converges in O(√max(a, b)) steps


def _regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of the Beta(a, b) distribution at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - front * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def _student_t_tail_mass(t: float, df: int, central: bool) -> float:
    """For t >= 0 and T ~ Student-t(df): P(0 < T < t) if `central`, else P(T > t).

    Each form is computed directly (not as 0.5 minus the other), so it keeps its relative
    precision where it is small: the central mass near the median, the tail far out.
    """
    if central:
        return 0.5 * _regularized_incomplete_beta(0.5, df / 2.0, t * t / (df + t * t))
    return 0.5 * _regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


_CORNISH_FISHER_MIN_DF = 1000  # above this the expansion is good to ~1e-11 and lgamma loses digits


def _student_t_cornish_fisher(p: float, df: int) -> float:
    """Fisher's expansion of the t quantile in powers of 1/df around the normal quantile."""
    z = _normal_quantile(p)
    g1 = (z**3 + z) / 4.0
    g2 = (5.0 * z**5 + 16.0 * z**3 + 3.0 * z) / 96.0
    g3 = (3.0 * z**7 + 19.0 * z**5 + 17.0 * z**3 - 15.0 * z) / 384.0
    g4 = (79.0 * z**9 + 776.0 * z**7 + 1482.0 * z**5 - 1920.0 * z**3 - 945.0 * z) / 92160.0
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def _student_t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (0 < p < 1, df >= 1).

    Closed forms for df 1 and 2, Fisher's expansion above 1000 degrees of freedom, and in
    between bisection on the exact CDF (monotone, so it cannot fail to converge). Agrees
    with scipy.stats.t.ppf to about 1e-10 relative.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be strictly between 0 and 1, got {p!r}")
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df!r}")
    if p < 0.5:
        return -_student_t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    tail = 1.0 - p
    if df == 1:  # Cauchy
        return 1.0 / math.tan(math.pi * tail)
    if df == 2:
        return (1.0 - 2.0 * tail) / math.sqrt(2.0 * tail * (1.0 - tail))
    if df > _CORNISH_FISHER_MIN_DF:
        return _student_t_cornish_fisher(p, df)
    central = tail >= 0.25  # which mass to match: the one that is small stays precise
    target = p - 0.5 if central else tail

    def beyond(t: float) -> bool:
        """Whether the quantile lies above t."""
        mass = _student_t_tail_mass(t, df, central)
        return mass < target if central else mass > target

    low = 0.0
    high = max(1.0, _normal_quantile(p))  # t's quantile is above the normal's
    while beyond(high):
        low, high = high, high * 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if middle in (low, high) or high - low <= 1e-14 * high:
            break
        if beyond(middle):
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def mean_interval(scores: Sequence[float], confidence: float = 0.95) -> MeanInterval:
    """Mean of `scores` with a Student-t interval at `confidence`.

    n = 0: every field but `n` is None. n = 1: the mean, but no interval. Scores must be
    finite (ValueError naming the index).
    """
    _check_confidence(confidence)
    values = [float(s) for s in scores]
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"scores[{index}]: {value!r} is not a finite number")
    n = len(values)
    if n == 0:
        return MeanInterval(n=0, mean=None, low=None, high=None)
    mean = math.fsum(values) / n
    if n == 1:
        return MeanInterval(n=1, mean=mean, low=None, high=None)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    margin = _student_t_quantile((1.0 + confidence) / 2.0, n - 1) * math.sqrt(variance / n)
    return MeanInterval(n=n, mean=mean, low=mean - margin, high=mean + margin)


def proportion_interval(successes: int, n: int, confidence: float = 0.95) -> ProportionInterval:
    """`successes` of `n` with its Wilson score interval at `confidence`.

    center = (p̂ + z²/2n) / (1 + z²/n), half width = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²).
    """
    _check_confidence(confidence)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes!r}")
    if n == 0:
        return ProportionInterval(n=0, successes=0, rate=None, low=None, high=None)
    p = successes / n
    z = _normal_quantile((1.0 + confidence) / 2.0)
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p + z2 / (2.0 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return ProportionInterval(n=n, successes=successes, rate=p, low=low, high=high)


def _bin_index(probability: float, bins: int) -> int:
    """The bin [i/bins, (i+1)/bins) holding `probability`, agreeing with those float edges."""
    index = min(int(probability * bins), bins - 1)
    if index < bins - 1 and probability >= (index + 1) / bins:
        index += 1
    elif index > 0 and probability < index / bins:
        index -= 1
    return index


def label_metrics(
    pairs: Sequence[tuple[float, bool]], threshold: float = 0.5, bins: int = 10
) -> LabelMetrics:
    """Accuracy, precision, recall, Brier score and reliability of probabilistic predictions.

    Each pair is (predicted probability of the positive class, true label). A pair is
    predicted positive when its probability is >= `threshold`. Probabilities outside [0, 1]
    or NaN raise ValueError naming the index.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    checked: list[tuple[float, bool]] = []
    for index, (probability, label) in enumerate(pairs):
        p = float(probability)
        if not 0.0 <= p <= 1.0:  # also rejects NaN
            raise ValueError(f"pairs[{index}]: probability {probability!r} is not in [0, 1]")
        if label not in (True, False):
            raise ValueError(f"pairs[{index}]: label {label!r} is not a boolean")
        checked.append((p, bool(label)))

    n = len(checked)
    positives = sum(1 for _, label in checked if label)
    predicted_positives = sum(1 for p, _ in checked if p >= threshold)
    true_positives = sum(1 for p, label in checked if label and p >= threshold)
    correct = sum(1 for p, label in checked if (p >= threshold) == label)

    counts = [0] * bins
    predicted_sums = [0.0] * bins
    observed = [0] * bins
    for p, label in checked:
        i = _bin_index(p, bins)
        counts[i] += 1
        predicted_sums[i] += p
        observed[i] += label
    reliability = tuple(
        ReliabilityBin(
            low=i / bins,
            high=(i + 1) / bins,
            count=counts[i],
            mean_predicted=predicted_sums[i] / counts[i],
            observed_rate=observed[i] / counts[i],
        )
        for i in range(bins)
        if counts[i]
    )

    return LabelMetrics(
        n=n,
        accuracy=proportion_interval(correct, n),
        precision=true_positives / predicted_positives if predicted_positives else None,
        recall=true_positives / positives if positives else None,
        brier=math.fsum((p - label) ** 2 for p, label in checked) / n if n else None,
        reliability=reliability,
        positives=positives,
        predicted_positives=predicted_positives,
    )


def rate(feedback_items: int, answers: int) -> float | None:
    """Feedback items per recorded answer (None when there were no answers).

    Not capped at 1: one answer may collect more than one feedback item.
    """
    if feedback_items < 0 or answers < 0:
        raise ValueError(f"counts must be >= 0, got feedback_items={feedback_items}, answers={answers}")
    if answers == 0:
        return None
    return feedback_items / answers


def to_json(obj: object) -> Json:
    """Plain nested dicts, lists and scalars for an HTTP API; floats rounded to 6 digits.

    Dataclasses become dicts (field order kept), tuples and lists become lists, and a
    non-finite float becomes None (JSON has no NaN or infinity). Anything else: TypeError.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return round(obj, JSON_DIGITS) if math.isfinite(obj) else None
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_json(item) for item in obj]
    if isinstance(obj, dict):
        return {str(key): to_json(value) for key, value in obj.items()}
    raise TypeError(f"to_json cannot convert {type(obj).__name__}")
