"""policies.canary: sticky assignment, the statistical tests (checked against scipy and a
published example), the look schedule's error budget, and judge's decision table."""

from __future__ import annotations

import random

import pytest
from scipy import stats

from steadyserve.policies.canary import (
    ArmStats,
    CanaryRules,
    assign,
    fisher_greater,
    judge,
    look_alpha,
    mann_whitney,
    newcombe,
)

RULES = CanaryRules(steps=(10.0, 50.0), min_samples=100, min_step_s=0.0, alpha=0.05,
                    latency_margin=0.2, error_margin=0.01, quality_margin=0.02,
                    quality_min_labels=30, require_quality=False)


def test_assignment_is_sticky_as_the_share_grows_and_close_to_the_share() -> None:
    keys = [f"user-{i}" for i in range(20_000)]
    at5 = {k for k in keys if assign(k, "salt", 5)}
    at25 = {k for k in keys if assign(k, "salt", 25)}
    assert at5 <= at25  # nobody who had the candidate loses it when the share grows
    assert 0.04 < len(at5) / len(keys) < 0.06 and 0.23 < len(at25) / len(keys) < 0.27
    assert not any(assign(k, "salt", 0) for k in keys[:1000])
    assert all(assign(k, "salt", 100) for k in keys[:1000])
    other = {k for k in keys if assign(k, "another salt", 5)}
    assert len(other & at5) < len(at5) / 2  # a new canary draws a new sample of users


@pytest.mark.parametrize("seed, shift, ties", [(1, 0.0, False), (2, 0.3, False),
                                               (3, -0.2, False), (4, 0.1, True),
                                               (5, 0.0, True)])
def test_mann_whitney_agrees_with_scipy(seed: int, shift: float, ties: bool) -> None:
    rng = random.Random(seed)
    x = [rng.lognormvariate(shift, 0.5) for _ in range(80)]
    y = [rng.lognormvariate(0.0, 0.5) for _ in range(120)]
    if ties:  # latencies rounded to the millisecond tie often
        x, y = [round(v, 1) for v in x], [round(v, 1) for v in y]
    got = mann_whitney(x, y)
    for alternative, p in (("greater", got.p_greater), ("less", got.p_less)):
        want = stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic")
        assert got.u == pytest.approx(want.statistic)
        assert p == pytest.approx(want.pvalue, rel=1e-9, abs=1e-12)


def test_mann_whitney_of_identical_values_says_nothing() -> None:
    got = mann_whitney([1.0] * 10, [1.0] * 10)
    assert got.p_greater == 1.0 and got.p_less == 1.0 and got.effect == 0.5
    with pytest.raises(ValueError):
        mann_whitney([], [1.0])


def test_newcombe_matches_the_published_example() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873, table II, example (a): 56/70 − 48/80,
    # method 10: 0.0524 to 0.3339
    d, low, high = newcombe(56, 70, 48, 80, alpha=0.025)
    assert d == pytest.approx(0.2)
    assert low == pytest.approx(0.0524, abs=1e-4) and high == pytest.approx(0.3339, abs=1e-4)


@pytest.mark.parametrize("k1, n1, k2, n2", [(1, 100, 0, 900), (5, 500, 0, 4500),
                                            (0, 50, 3, 400), (30, 200, 10, 200),
                                            (7, 7, 0, 3), (0, 1, 0, 1), (120, 4000, 80, 4000)])
def test_fisher_agrees_with_scipy(k1: int, n1: int, k2: int, n2: int) -> None:
    want = stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="greater").pvalue
    assert fisher_greater(k1, n1, k2, n2) == pytest.approx(want, rel=1e-9, abs=1e-14)


def test_one_error_in_a_hundred_is_not_clearly_worse() -> None:
    # the z test says p ≈ 0.001; Fisher's exact test says 0.1
    assert fisher_greater(1, 100, 0, 900) == pytest.approx(0.1, abs=1e-3)
    verdict = judge(RULES, arm(900, seed=1), arm(100, errors=1, seed=2), looks=0,
                    last_look_n=0, step_age_s=10.0, last_step=False)
    assert verdict.action != "rollback", verdict


def test_the_looks_spend_at_most_alpha_however_many_there_are() -> None:
    assert look_alpha(0.05, 0) == pytest.approx(0.025)
    assert sum(look_alpha(0.05, k) for k in range(10_000)) < 0.05
    assert sum(look_alpha(0.05, k) for k in range(10_000)) > 0.0499


def arm(n: int, errors: int = 0, latency: float = 0.010, spread: float = 0.002,
        labelled: int = 0, correct: int = 0, seed: int = 0) -> ArmStats:
    rng = random.Random(seed)
    lat = tuple(latency + rng.uniform(-spread, spread) for _ in range(n - errors))
    return ArmStats(n=n, errors=errors, latencies=lat, labelled=labelled, correct=correct)


BASE = arm(2000, errors=2, seed=1)


@pytest.mark.parametrize("case, base, cand, kwargs, action, says", [
    ("an alert fires", BASE, arm(300, seed=2), {"alert": "HighErrorRate: 5 %"}, "rollback",
     "alert firing on the candidate"),
    ("too few candidate requests", BASE, arm(40, seed=2), {}, "wait",
     "not enough data: candidate 40/100"),
    ("between looks", BASE, arm(140, seed=2), {"looks": 1, "last_look_n": 100}, "wait",
     "next look at 150"),
    ("1.5x slower", BASE, arm(300, latency=0.015, seed=2), {}, "rollback", "latency"),
    ("+5 points of errors", BASE, arm(400, errors=20, seed=2), {}, "rollback", "errors"),
    ("as good: passes", BASE, arm(600, seed=2), {}, "advance", "every check passes"),
    ("as good at the last step", BASE, arm(600, seed=2), {"last_step": True}, "promote",
     "last step"),
    ("as good but the step is young", BASE, arm(600, seed=2), {"step_age_s": -1.0}, "wait",
     "holds at least"),
    ("a little slower: unclear", BASE, arm(150, latency=0.0121, seed=2), {}, "wait",
     "latency (p95"),
    ("worse labels", arm(2000, labelled=200, correct=190, seed=1),
     arm(600, labelled=200, correct=150, seed=2), {}, "rollback", "quality"),
    ("labels too few, not required", BASE, arm(600, labelled=5, correct=1, seed=2), {},
     "advance", "every check passes"),
])
def test_judge(case: str, base: ArmStats, cand: ArmStats, kwargs: dict, action: str,
               says: str) -> None:
    args = {"looks": 0, "last_look_n": 0, "step_age_s": 10.0, "last_step": False, **kwargs}
    rules = RULES
    if args["step_age_s"] < 0:  # a step younger than min_step_s
        args["step_age_s"], rules = 0.0, _with(min_step_s=60.0)
    verdict = judge(rules, base, cand, **args)
    assert verdict.action == action, (case, verdict)
    assert says in verdict.reason, (case, verdict.reason)


def _with(**changes: object) -> CanaryRules:
    from dataclasses import replace
    return replace(RULES, **changes)


def test_quality_required_waits_for_labels_and_says_so() -> None:
    verdict = judge(_with(require_quality=True), BASE, arm(600, seed=2), looks=0,
                    last_look_n=0, step_age_s=10.0, last_step=False)
    assert verdict.action == "wait" and "labels: baseline 0/30, candidate 0/30" in verdict.reason
    quality = next(c for c in verdict.checks if c.metric == "quality")
    assert quality.verdict == "no data"


def test_a_verdict_carries_its_evidence() -> None:
    verdict = judge(RULES, BASE, arm(300, latency=0.015, seed=2), looks=2, last_look_n=150,
                    step_age_s=10.0, last_step=False)
    assert verdict.look == 2
    latency = next(c for c in verdict.checks if c.metric == "latency").to_json()
    assert latency["verdict"] == "worse" and 1.3 < latency["p95_ratio"] < 1.7
    assert latency["level"] == pytest.approx(look_alpha(0.05, 2) / 2, abs=1e-8)  # two metrics tested
    errors = next(c for c in verdict.checks if c.metric == "errors").to_json()
    assert errors["baseline"] == 0.001 and errors["candidate"] == 0.0
