"""Progressive delivery, pure: which arm a request goes to, and what the evidence says.

A canary runs a baseline (the deployment) and a candidate (another deployment: another
service class, weights file or config) side by side. The candidate's share of traffic rises
through the plan's steps (e.g. 5 → 25 → 50 %); passing the last step promotes it to 100 %.

Assignment (`assign`) is sticky: a hash of the request's sticky key (a session or user
header) and the canary's salt, in [0, 10 000), goes to the candidate when it is under the
step's share × 100. Raising the share only adds keys to the candidate: a user who had it
keeps it. A request with no sticky key hashes its request id (random per request).

At each step, `judge` compares the two arms on what they served during the step:

    metric     data                      tests (one-sided, level a per test)
    errors     5xx and timeouts / all    worse: Fisher's exact test (the z test calls 1 error
                                         in 100 against 0 in 900 significant: p ≈ 0.001; it
                                         is p = 0.1); within the margin: Newcombe's interval
                                         for p_cand − p_base (Wilson scores, good with few
                                         events)
    latency    seconds per request       Mann–Whitney U (as Kayenta does: no normality, robust
                                         to the long tail) of the candidate against the
                                         baseline scaled by (1 + latency_margin)
    quality    labels from feedback      as errors, on wrong answers: acc_base − acc_cand
               (correct / labelled)

    per metric                                        verdict
    errors, quality: Fisher p < a and the observed    worse
      difference > the margin
    errors, quality: Newcombe's high end < margin     pass (not worse by more than margin)
    latency: candidate > baseline × (1 + m), p < a    worse
    latency: candidate < baseline × (1 + m), p < a    pass
    otherwise                                         inconclusive

    over the step (first matching row)                             action
    an alert fires on the candidate                                rollback
    an arm has fewer than min_samples requests                     wait (not enough data)
    the candidate's sample grew < 50 % since the last look         wait (next look at n)
    a metric is worse                                              rollback
    a required metric is inconclusive or has too few labels        wait (inconclusive)
    the step is younger than min_step_s                            wait
    all pass, a step follows                                       advance
    all pass, the last step                                        promote

Repeated looks (a sequential test): looking after every request would inflate false alarms
(each look is another chance for noise to cross the line). Looks are taken only when the
candidate's sample has grown by half since the last (n, 1.5 n, 2.25 n, …: a handful per step)
and look k (from 0) spends alpha / ((k + 1)(k + 2)) of the error budget, which sums to
alpha over any number of looks (a union bound: conservative, never optimistic). Within a
look the budget is split evenly over the metrics tested (Bonferroni). "Not enough data" is
never a verdict: it waits, and says what it waits for.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from .quality import proportion_interval

BUCKETS = 10_000
LOOK_GROWTH = 1.5
ACTIONS = ("wait", "advance", "promote", "rollback")
VERDICTS = ("pass", "worse", "inconclusive", "no data")
_NORMAL = NormalDist()


# --- assignment -------------------------------------------------------------------------------
def bucket(key: str, salt: str) -> int:
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def assign(key: str, salt: str, percent: float) -> bool:
    """Whether the request with this sticky key goes to the candidate at `percent` %."""
    return bucket(key, salt) < round(percent * BUCKETS / 100)


# --- tests ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MannWhitney:
    u: float  # U of the first sample
    p_greater: float  # one-sided p: the first sample tends to be greater
    p_less: float  # one-sided p: the first sample tends to be smaller
    effect: float  # P(x > y) + P(x = y) / 2: 0.5 when neither tends to be greater


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> MannWhitney:
    """Mann–Whitney U with the normal approximation, tie correction and continuity
    correction (what scipy.stats.mannwhitneyu(method="asymptotic") computes; the unit tests
    compare the two). Written here because the gateway's core does not depend on scipy."""
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples must be non-empty")
    data = np.concatenate([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])
    order = np.argsort(data, kind="mergesort")
    ranks = np.empty(len(data))
    sorted_data = data[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_data, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    r1 = float(ranks[:n1].sum())
    u1 = r1 - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    mu = n1 * n2 / 2.0
    tie_term = float((counts ** 3 - counts).sum())
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    effect = u1 / (n1 * n2)
    if var <= 0:  # every value equal: no evidence either way
        return MannWhitney(u=u1, p_greater=1.0, p_less=1.0, effect=effect)
    sd = math.sqrt(var)
    p_greater = 1.0 - _NORMAL.cdf((u1 - mu - 0.5) / sd)
    p_less = _NORMAL.cdf((u1 - mu + 0.5) / sd)
    return MannWhitney(u=u1, p_greater=min(1.0, p_greater), p_less=min(1.0, p_less),
                       effect=effect)


def newcombe(k1: int, n1: int, k2: int, n2: int, alpha: float) -> tuple[float, float, float]:
    """(difference, low, high): p1 − p2 = k1/n1 − k2/n2 with Newcombe's hybrid score
    interval (method 10), each end at one-sided level `alpha`."""
    confidence = 1 - 2 * alpha
    a = proportion_interval(k1, n1, confidence)
    b = proportion_interval(k2, n2, confidence)
    assert a.rate is not None and a.low is not None and a.high is not None
    assert b.rate is not None and b.low is not None and b.high is not None
    d = a.rate - b.rate
    low = d - math.sqrt((a.rate - a.low) ** 2 + (b.high - b.rate) ** 2)
    high = d + math.sqrt((a.high - a.rate) ** 2 + (b.rate - b.low) ** 2)
    return d, low, high


def fisher_greater(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided p of Fisher's exact test that the first rate (k1/n1) is greater than the
    second: P(X >= k1) for X hypergeometric (k1 + k2 events among n1 + n2, n1 drawn). Exact
    where the z test is not (few events), summed from k1 up by the terms' ratio until they
    stop counting."""
    total, events = n1 + n2, k1 + k2
    top = min(n1, events)
    if k1 > top:
        return 0.0
    lg = math.lgamma
    log_term = (lg(events + 1) - lg(k1 + 1) - lg(events - k1 + 1)
                + lg(total - events + 1) - lg(n1 - k1 + 1) - lg(total - events - n1 + k1 + 1)
                - lg(total + 1) + lg(n1 + 1) + lg(total - n1 + 1))
    term = math.exp(log_term)
    p = term
    x = k1
    while x < top:
        term *= (events - x) * (n1 - x) / ((x + 1) * (total - events - n1 + x + 1))
        p += term
        x += 1
        if term < p * 1e-15:
            break
    return min(1.0, p)


def look_alpha(alpha: float, look: int) -> float:
    """The error budget of look `look` (0, 1, …): alpha / ((k + 1)(k + 2)), summing to alpha."""
    return alpha / ((look + 1) * (look + 2))


# --- evidence ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ArmStats:
    """What one arm served during the current step."""

    n: int = 0  # requests answered
    errors: int = 0  # of them 5xx or timed out
    latencies: tuple[float, ...] = ()  # seconds, a bounded sample of the answered ones
    labelled: int = 0  # feedback labels received for its answers
    correct: int = 0  # of them the answer agreed with


@dataclass(frozen=True, slots=True)
class CanaryRules:
    """The plan's thresholds (config.CanaryConfig carries them)."""

    steps: tuple[float, ...]
    min_samples: int
    min_step_s: float
    alpha: float
    latency_margin: float
    error_margin: float
    quality_margin: float
    quality_min_labels: int
    require_quality: bool


@dataclass(frozen=True, slots=True)
class Check:
    metric: str
    verdict: str  # one of VERDICTS
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "verdict": self.verdict, **self.detail}


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # one of ACTIONS
    reason: str
    checks: tuple[Check, ...] = ()
    look: int | None = None  # the look this verdict took (None: no look)

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "look": self.look,
                "checks": [c.to_json() for c in self.checks]}


def _r(x: float, digits: int = 6) -> float:
    return round(x, digits)


def _quantile(values: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=float), q))


def check_errors(base: ArmStats, cand: ArmStats, margin: float, a: float) -> Check:
    d, low, high = newcombe(cand.errors, cand.n, base.errors, base.n, a)
    p = fisher_greater(cand.errors, cand.n, base.errors, base.n)
    detail = {"baseline": _r(base.errors / base.n), "candidate": _r(cand.errors / cand.n),
              "difference": _r(d), "interval": [_r(low), _r(high)], "margin": margin,
              "p_worse": _r(p, 8), "level": _r(a, 8)}
    if p < a and d > margin:
        return Check("errors", "worse", detail)
    if high < margin:
        return Check("errors", "pass", detail)
    return Check("errors", "inconclusive", detail)


def check_latency(base: ArmStats, cand: ArmStats, margin: float, a: float) -> Check:
    if not base.latencies or not cand.latencies:
        return Check("latency", "no data", {"reason": "no answered request timed in an arm"})
    scaled = [v * (1 + margin) for v in base.latencies]
    mw = mann_whitney(cand.latencies, scaled)
    b50, b95 = _quantile(base.latencies, 0.5), _quantile(base.latencies, 0.95)
    c50, c95 = _quantile(cand.latencies, 0.5), _quantile(cand.latencies, 0.95)
    detail = {"baseline_p50_ms": _r(b50 * 1000, 3), "baseline_p95_ms": _r(b95 * 1000, 3),
              "candidate_p50_ms": _r(c50 * 1000, 3), "candidate_p95_ms": _r(c95 * 1000, 3),
              "p95_ratio": _r(c95 / b95, 4) if b95 > 0 else None, "margin": margin,
              "p_slower": _r(mw.p_greater, 8), "p_within": _r(mw.p_less, 8),
              "level": _r(a, 8)}
    if mw.p_greater < a:
        return Check("latency", "worse", detail)
    if mw.p_less < a:
        return Check("latency", "pass", detail)
    return Check("latency", "inconclusive", detail)


def check_quality(base: ArmStats, cand: ArmStats, rules: CanaryRules, a: float) -> Check:
    need = max(1, rules.quality_min_labels)
    if base.labelled < need or cand.labelled < need:
        return Check("quality", "no data", {
            "reason": f"labels: baseline {base.labelled}/{need}, candidate {cand.labelled}/{need}",
            "required": rules.require_quality})
    d, low, high = newcombe(base.correct, base.labelled, cand.correct, cand.labelled, a)
    p = fisher_greater(cand.labelled - cand.correct, cand.labelled,
                       base.labelled - base.correct, base.labelled)  # more wrong answers
    detail = {"baseline_accuracy": _r(base.correct / base.labelled),
              "candidate_accuracy": _r(cand.correct / cand.labelled),
              "labels": [base.labelled, cand.labelled], "difference": _r(d),
              "interval": [_r(low), _r(high)], "margin": rules.quality_margin,
              "p_worse": _r(p, 8), "level": _r(a, 8)}
    if p < a and d > rules.quality_margin:
        return Check("quality", "worse", detail)
    if high < rules.quality_margin:
        return Check("quality", "pass", detail)
    return Check("quality", "inconclusive", detail)


def judge(rules: CanaryRules, base: ArmStats, cand: ArmStats, *, looks: int, last_look_n: int,
          step_age_s: float, last_step: bool, alert: str | None = None) -> Verdict:
    """What to do now at this step (the module's tables). `looks` were taken so far at this
    step, the last of them at `last_look_n` candidate requests."""
    if alert is not None:
        return Verdict("rollback", f"alert firing on the candidate: {alert}")
    need = rules.min_samples
    if base.n < need or cand.n < need:
        return Verdict("wait", f"not enough data: candidate {cand.n}/{need}, baseline "
                               f"{base.n}/{need} requests at this step")
    if looks > 0 and cand.n < math.ceil(last_look_n * LOOK_GROWTH):
        return Verdict("wait", f"inconclusive at look {looks - 1}; next look at "
                               f"{math.ceil(last_look_n * LOOK_GROWTH)} candidate requests "
                               f"(now {cand.n})")
    a_look = look_alpha(rules.alpha, looks)
    with_labels = min(base.labelled, cand.labelled) >= max(1, rules.quality_min_labels)
    tested = 2 + (1 if with_labels else 0)
    a = a_look / tested
    checks = [check_errors(base, cand, rules.error_margin, a),
              check_latency(base, cand, rules.latency_margin, a),
              check_quality(base, cand, rules, a)]
    worse = [c for c in checks if c.verdict == "worse"]
    if worse:
        return Verdict("rollback", "candidate worse on " + ", ".join(
            _describe(c) for c in worse), tuple(checks), looks)
    waiting = [c for c in checks if c.verdict == "inconclusive"
               or (c.verdict == "no data" and (c.metric != "quality" or rules.require_quality))]
    if waiting:
        return Verdict("wait", "inconclusive: " + ", ".join(_describe(c) for c in waiting),
                       tuple(checks), looks)
    if step_age_s < rules.min_step_s:
        return Verdict("wait", f"every check passes; the step is {step_age_s:.0f}s old, "
                               f"holds at least {rules.min_step_s:g}s", tuple(checks), looks)
    if last_step:
        return Verdict("promote", "every check passes at the last step", tuple(checks), looks)
    return Verdict("advance", "every check passes", tuple(checks), looks)


def _describe(c: Check) -> str:
    d = c.detail
    if c.verdict == "no data":
        return f"{c.metric} ({d.get('reason', 'no data')})"
    if c.metric == "latency":
        return (f"latency (p95 {d['candidate_p95_ms']:g} ms vs {d['baseline_p95_ms']:g} ms, "
                f"p_slower={d['p_slower']:.3g}, p_within={d['p_within']:.3g}, "
                f"level {d['level']:.3g})")
    if c.metric == "errors":
        return (f"errors ({d['candidate']:.2%} vs {d['baseline']:.2%}, difference in "
                f"[{d['interval'][0]:.4f}, {d['interval'][1]:.4f}], margin {d['margin']:g})")
    return (f"quality (accuracy {d['candidate_accuracy']:.2%} vs {d['baseline_accuracy']:.2%}, "
            f"drop in [{d['interval'][0]:.4f}, {d['interval'][1]:.4f}], "
            f"margin {d['margin']:g})")
