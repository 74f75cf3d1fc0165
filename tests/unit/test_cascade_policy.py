"""policies/cascade.py: the cost/quality curve of a router's thresholds, and the choice. Pure."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from steadyserve.policies.cascade import (
    CHEAP_ONLY,
    EXPENSIVE_ONLY,
    Curve,
    CurvePoint,
    choose_threshold,
    cost_quality_curve,
    roc_auc,
)

# Four requests, the router's most suspicious first. The cheap path gets the first two wrong,
# the expensive path the last one; cheap costs 1, expensive 10, the router 0.
SCORE = [0.9, 0.6, 0.3, 0.1]
CHEAP_OK = [False, False, True, True]
EXPENSIVE_OK = [True, True, True, False]


def table() -> Curve:
    return cost_quality_curve(SCORE, CHEAP_OK, EXPENSIVE_OK, 1.0, 10.0, steps=4)


def test_the_curve_of_the_table() -> None:
    rows = [(p.threshold, p.escalated, p.cost, p.accuracy, p.kind) for p in table().points]
    assert rows == [
        (CHEAP_ONLY, 0.0, 1.0, 0.5, "cheap-only"),
        (0.9, 0.25, 3.5, 0.75, "cascade"),  # escalates the first: right now
        (0.6, 0.5, 6.0, 1.0, "cascade"),  # the first two: all right
        (0.3, 0.75, 8.5, 1.0, "cascade"),
        (0.1, 1.0, 11.0, 0.75, "cascade"),  # everything, and dearer than expensive-only
        (EXPENSIVE_ONLY, 1.0, 10.0, 0.75, "expensive-only"),
    ]
    assert all(p.auc is None and p.brier is None for p in table().points)  # no probabilities


@pytest.mark.parametrize(
    ("max_loss", "threshold", "met"),
    [
        pytest.param(0.0, 0.9, True, id="as-good-as-expensive: the cheapest cascade at 0.75"),
        pytest.param(0.25, CHEAP_ONLY, True, id="loose: cheap-only is within 0.25"),
        pytest.param(0.3, CHEAP_ONLY, True, id="looser-still: cheap-only"),
        pytest.param(-0.25, 0.6, True, id="beat-expensive: the cheapest point at 1.0"),
        pytest.param(-0.5, EXPENSIVE_ONLY, False, id="nobody-reaches-1.25: escalate everything"),
    ],
)
def test_choose_threshold(max_loss: float, threshold: float, met: bool) -> None:
    choice = choose_threshold(table(), max_loss)
    assert (choice.point.threshold, choice.met, choice.metric) == (threshold, met, "accuracy")
    assert choice.target == pytest.approx(0.75 - max_loss)
    if not met:
        assert "escalate everything" in choice.reason and "expensive-only" in choice.reason


def test_no_examples_escalates_everything_and_says_why() -> None:
    curve = cost_quality_curve([], [], [], 1.0, 10.0)
    assert curve.n == 0 and curve.cascade == ()
    assert curve.cheap_only == CurvePoint(CHEAP_ONLY, 0.0, 0.0, None, None, None)
    choice = choose_threshold(curve, 0.01)
    assert choice.point.kind == "expensive-only" and not choice.met and choice.target is None
    assert "no labelled examples" in choice.reason


def test_a_cheap_path_always_right_is_chosen_alone() -> None:
    curve = cost_quality_curve([0.2, 0.7, 0.4], [True] * 3, [True, False, True], 1.0, 10.0)
    choice = choose_threshold(curve, 0.0)
    assert choice.point.kind == "cheap-only" and choice.met and choice.point.accuracy == 1.0


def test_everything_right_everywhere_is_cheap_only() -> None:
    curve = cost_quality_curve([0.5] * 5, [True] * 5, [True] * 5, 2.0, 3.0)
    assert choose_threshold(curve, 0.0).point.threshold == CHEAP_ONLY


def test_equal_router_scores_make_one_cascade_point() -> None:
    curve = cost_quality_curve([0.5] * 5, [False] * 5, [True] * 5, 1.0, 10.0)
    assert [(p.threshold, p.escalated) for p in curve.cascade] == [(0.5, 1.0)]
    assert choose_threshold(curve, 0.0).point.kind == "expensive-only"  # 10 < 11


@pytest.mark.parametrize(
    ("costs", "expected"),
    [
        # all free: every point costs 0; the best accuracy wins, then the fewest escalations
        pytest.param((0.0, 0.0, 0.0), 0.6, id="free: best quality, then fewest escalations"),
        # a router dearer than the expensive path: the cascade never pays
        pytest.param((1.0, 10.0, 20.0), EXPENSIVE_ONLY, id="dear-router"),
        # the router's cost counts on every request of the cascade
        pytest.param((1.0, 10.0, 1.0), 0.9, id="router-adds-to-every-request"),
    ],
)
def test_costs_and_ties(costs: tuple[float, float, float], expected: float) -> None:
    cheap, expensive, router = costs
    curve = cost_quality_curve(SCORE, CHEAP_OK, EXPENSIVE_OK, cheap, expensive, router_cost=router,
                               steps=4)
    assert choose_threshold(curve, 0.0).point.threshold == expected


def test_per_example_costs() -> None:
    # the escalated request is the one whose expensive answer costs 100
    curve = cost_quality_curve(SCORE, CHEAP_OK, EXPENSIVE_OK, [1, 1, 1, 1], [100, 0, 0, 0],
                               thresholds=[0.9])
    assert [p.cost for p in curve.points] == [1.0, 26.0, 25.0]


def test_explicit_thresholds_are_sorted_and_deduplicated() -> None:
    curve = cost_quality_curve(SCORE, CHEAP_OK, EXPENSIVE_OK, 1.0, 10.0, thresholds=[0.0, 0.5, 0.5, 2.0])
    assert [(p.threshold, p.escalated) for p in curve.cascade] == [(2.0, 0.0), (0.5, 0.5), (0.0, 1.0)]


def test_default_thresholds_step_through_escalation_shares() -> None:
    score = np.linspace(0.0, 1.0, 1000)
    curve = cost_quality_curve(score, np.ones(1000), np.ones(1000), 1.0, 2.0, steps=10)
    assert [p.escalated for p in curve.cascade] == pytest.approx([k / 10 for k in range(1, 11)])


# --- AUC and Brier ---------------------------------------------------------------------------------


def brute_auc(p: list[float], y: list[bool]) -> float:
    labelled = list(zip(p, y, strict=True))
    pairs = [(a, b) for (a, ya), (b, yb) in itertools.product(labelled, labelled) if ya and not yb]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


@pytest.mark.parametrize(
    ("p", "y"),
    [
        pytest.param([0.1, 0.4, 0.35, 0.8], [False, False, True, True], id="textbook-0.75"),
        pytest.param([0.5, 0.5, 0.5, 0.5], [True, False, True, False], id="all-tied-0.5"),
        pytest.param([0.2, 0.2, 0.9, 0.1, 0.9], [True, False, True, False, False], id="some-ties"),
        pytest.param([0.9, 0.1], [False, True], id="reversed-0"),
    ],
)
def test_roc_auc_is_mann_whitney_with_ties(p: list[float], y: list[bool]) -> None:
    assert roc_auc(p, y) == pytest.approx(brute_auc(p, y))


def test_roc_auc_of_one_class_is_undefined() -> None:
    assert roc_auc([0.1, 0.9], [True, True]) is None
    assert roc_auc([], []) is None


def test_auc_and_brier_of_the_final_probability() -> None:
    cheap_p = [0.2, 0.9, 0.8, 0.1]  # wrong on the first two (labels 1, 0)
    expensive_p = [0.9, 0.1, 0.7, 0.6]
    label = [True, False, True, False]
    curve = cost_quality_curve(SCORE, CHEAP_OK, EXPENSIVE_OK, 1.0, 10.0, cheap_probability=cheap_p,
                               expensive_probability=expensive_p, label=label, steps=4)
    by_threshold = {p.threshold: p for p in curve.points}
    two = by_threshold[0.6]  # the first two escalated: final [0.9, 0.1, 0.8, 0.1]
    assert two.auc == 1.0
    assert two.brier == pytest.approx((0.01 + 0.01 + 0.04 + 0.01) / 4)
    assert curve.cheap_only.auc == roc_auc(cheap_p, label)
    assert curve.expensive_only.brier == pytest.approx(np.mean((np.array(expensive_p) - label) ** 2))
    # Brier is an error: the target is expensive-only's plus the loss, and lower wins
    choice = choose_threshold(curve, 0.0, "brier")
    assert choice.target == pytest.approx(curve.expensive_only.brier)
    assert choice.point.threshold == 0.6 and choice.met
    assert choose_threshold(curve, 0.0, "auc").point.threshold == 0.6


def test_a_metric_without_its_inputs_escalates_everything() -> None:
    choice = choose_threshold(table(), 0.1, "auc")  # no probabilities given
    assert choice.point.kind == "expensive-only" and not choice.met and "undefined" in choice.reason
    one_class = cost_quality_curve([0.1, 0.2], [True, True], [True, True], 1.0, 2.0,
                                   cheap_probability=[0.1, 0.2], expensive_probability=[0.1, 0.1],
                                   label=[False, False])
    assert one_class.expensive_only.auc is None and one_class.expensive_only.brier is not None
    assert not choose_threshold(one_class, 0.1, "auc").met
    assert choose_threshold(one_class, 0.1, "brier").point.kind == "cheap-only"


# --- refused inputs -----------------------------------------------------------------------------------

GOOD: dict[str, Any] = {"router_score": SCORE, "cheap_correct": CHEAP_OK,
                        "expensive_correct": EXPENSIVE_OK, "cost_cheap": 1.0, "cost_expensive": 10.0}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        pytest.param({"cheap_correct": [True]}, "cheap_correct has 1 values", id="short"),
        pytest.param({"router_score": [[0.1]]}, "one-dimensional", id="2d"),
        pytest.param({"router_score": [0.9, math.nan, 0.3, 0.1]}, "finite", id="nan-score"),
        pytest.param({"cost_cheap": -1.0}, "cost_cheap", id="negative-cost"),
        pytest.param({"cost_expensive": [1.0, 2.0]}, "cost_expensive has 2", id="costs-short"),
        pytest.param({"router_cost": math.inf}, "router_cost", id="infinite-router-cost"),
        pytest.param({"label": [True] * 4}, "go together", id="label-alone"),
        pytest.param({"cheap_probability": [0.1] * 4, "expensive_probability": [1.5] * 4,
                      "label": [True] * 4}, "expensive_probability", id="probability-over-1"),
        pytest.param({"thresholds": [math.inf]}, "finite", id="infinite-threshold"),
        pytest.param({"steps": 0}, "steps", id="no-steps"),
    ],
)
def test_bad_inputs_are_refused(change: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        cost_quality_curve(**{**GOOD, **change})


def test_bad_choice_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="metric"):
        choose_threshold(table(), 0.0, "f1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        choose_threshold(table(), math.nan)
