"""policies/quality.py: feedback summaries (t and Wilson intervals, label metrics, rates, JSON)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from steadyserve.policies.quality import (
    LabelMetrics,
    MeanInterval,
    ProportionInterval,
    ReliabilityBin,
    _student_t_quantile,
    label_metrics,
    mean_interval,
    proportion_interval,
    rate,
    to_json,
)

# --- the Student-t quantile ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        # two-sided 95 % (p = 0.975), from any printed t table
        pytest.param(0.975, 1, 12.706, id="975-df1"),
        pytest.param(0.975, 2, 4.303, id="975-df2"),
        pytest.param(0.975, 3, 3.182, id="975-df3"),
        pytest.param(0.975, 4, 2.776, id="975-df4"),
        pytest.param(0.975, 5, 2.571, id="975-df5"),
        pytest.param(0.975, 10, 2.228, id="975-df10"),
        pytest.param(0.975, 30, 2.042, id="975-df30"),
        pytest.param(0.975, 60, 2.000, id="975-df60"),
        pytest.param(0.975, 120, 1.980, id="975-df120"),
        pytest.param(0.975, 10**6, 1.960, id="975-large-df-is-normal"),
        # other levels
        pytest.param(0.95, 10, 1.812, id="95-df10"),
        pytest.param(0.90, 20, 1.325, id="90-df20"),
        pytest.param(0.995, 5, 4.032, id="995-df5"),
        pytest.param(0.995, 1, 63.657, id="995-df1"),
        pytest.param(0.9995, 3, 12.924, id="9995-df3"),
        pytest.param(0.995, 2000, 2.578, id="995-df2000-fisher-expansion"),
        # symmetry and the median
        pytest.param(0.025, 5, -2.571, id="lower-tail-is-negative"),
        pytest.param(0.5, 7, 0.0, id="median-is-zero"),
    ],
)
def test_t_quantile_matches_tables(p, df, expected):
    assert _student_t_quantile(p, df) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 29, 31, 100, 999, 1000, 1001, 5000, 10**7])
@pytest.mark.parametrize("p", [0.55, 0.75, 0.9, 0.975, 0.995, 1 - 1e-9, 0.01])
def test_t_quantile_agrees_with_scipy(p, df):
    stats = pytest.importorskip("scipy.stats")
    assert _student_t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-9)


@pytest.mark.parametrize(
    ("p", "df"),
    [
        pytest.param(0.0, 5, id="p0"),
        pytest.param(1.0, 5, id="p1"),
        pytest.param(math.nan, 5, id="p-nan"),
        pytest.param(0.9, 0, id="df0"),
    ],
)
def test_t_quantile_rejects_bad_arguments(p, df):
    with pytest.raises(ValueError):
        _student_t_quantile(p, df)


# --- mean_interval -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "confidence", "expected"),
    [
        pytest.param([], 0.95, MeanInterval(0, None, None, None), id="empty"),
        pytest.param([4.0], 0.95, MeanInterval(1, 4.0, None, None), id="one-score-no-interval"),
        # s = √2.5 = 1.5811, se = s/√5 = 0.7071, t(0.975, 4) = 2.7764: 3 ± 1.9632
        pytest.param([1, 2, 3, 4, 5], 0.95, MeanInterval(5, 3.0, 1.0368, 4.9632), id="one-to-five-95"),
        # t(0.95, 4) = 2.1318: 3 ± 1.5074
        pytest.param([1, 2, 3, 4, 5], 0.90, MeanInterval(5, 3.0, 1.4926, 4.5074), id="one-to-five-90"),
        # s = √2, se = 1, t(0.975, 1) = 12.706: two scores say very little
        pytest.param([2, 4], 0.95, MeanInterval(2, 3.0, -9.7062, 15.7062), id="two-scores-wide"),
        pytest.param([5, 5, 5], 0.95, MeanInterval(3, 5.0, 5.0, 5.0), id="no-spread"),
        # thumbs as ±1: mean 0.5, squared deviations 3·0.25 + 2.25 = 3, s = √(3/3) = 1,
        # se = 1/√4 = 0.5, t(0.975, 3) = 3.1824: 0.5 ± 1.5912
        pytest.param([1, 1, 1, -1], 0.95, MeanInterval(4, 0.5, -1.0912, 2.0912), id="thumbs"),
    ],
)
def test_mean_interval(scores, confidence, expected):
    got = mean_interval(scores, confidence)
    assert got.n == expected.n
    for name in ("mean", "low", "high"):
        want = getattr(expected, name)
        if want is None:
            assert getattr(got, name) is None, name
        else:
            assert getattr(got, name) == pytest.approx(want, abs=1e-4), name


@pytest.mark.parametrize(
    ("scores", "confidence", "match"),
    [
        pytest.param([1, 2, math.nan], 0.95, r"scores\[2\]", id="nan-score"),
        pytest.param([math.inf], 0.95, r"scores\[0\]", id="inf-score"),
        pytest.param([1, 2], 0.0, "confidence", id="confidence-0"),
        pytest.param([1, 2], 1.0, "confidence", id="confidence-1"),
        pytest.param([1, 2], 95, "confidence", id="confidence-as-percent"),
    ],
)
def test_mean_interval_rejects(scores, confidence, match):
    with pytest.raises(ValueError, match=match):
        mean_interval(scores, confidence)


# --- proportion_interval (Wilson) ----------------------------------------------------------

# Wilson: z = 1.95996 at 95 %, z² = 3.84146.
#   8/10:  center = (0.8 + z²/20) / (1 + z²/10) = 0.99207 / 1.38415 = 0.71674
#          half   = z / 1.38415 · √(0.8·0.2/10 + z²/400) = 1.41600 · 0.16001 = 0.22658
#   0/n:   low = 0, high = (z²/n) / (1 + z²/n);  n/n mirrors it.
#   90 %:  z = 1.64485, z²/10 = 0.27055, center 0.73612, half 0.19533.


@pytest.mark.parametrize(
    ("successes", "n", "confidence", "low", "high"),
    [
        pytest.param(8, 10, 0.95, 0.4902, 0.9433, id="8-of-10"),
        pytest.param(5, 10, 0.95, 0.2366, 0.7634, id="5-of-10-symmetric"),
        pytest.param(0, 10, 0.95, 0.0, 0.2775, id="0-of-10-not-degenerate"),
        pytest.param(10, 10, 0.95, 0.7225, 1.0, id="10-of-10-not-degenerate"),
        pytest.param(0, 1, 0.95, 0.0, 0.7935, id="0-of-1"),
        pytest.param(1, 1, 0.95, 0.2065, 1.0, id="1-of-1"),
        pytest.param(8, 10, 0.90, 0.5408, 0.9314, id="8-of-10-90pct"),
        pytest.param(80, 100, 0.95, 0.7112, 0.8666, id="80-of-100-narrower"),
    ],
)
def test_proportion_interval_wilson(successes, n, confidence, low, high):
    got = proportion_interval(successes, n, confidence)
    assert (got.n, got.successes) == (n, successes)
    assert got.rate == pytest.approx(successes / n)
    assert got.low == pytest.approx(low, abs=1e-4)
    assert got.high == pytest.approx(high, abs=1e-4)
    assert 0.0 <= got.low <= got.rate <= got.high <= 1.0


def test_proportion_interval_extremes_are_exact_bounds():
    assert proportion_interval(0, 7).low == 0.0
    assert proportion_interval(7, 7).high == 1.0


@pytest.mark.parametrize(("successes", "n"), [(0, 3), (1, 3), (2, 9), (37, 50)])
def test_proportion_interval_mirrors(successes, n):
    a = proportion_interval(successes, n)
    b = proportion_interval(n - successes, n)
    assert a.low == pytest.approx(1.0 - b.high)
    assert a.high == pytest.approx(1.0 - b.low)


def test_proportion_interval_empty():
    assert proportion_interval(0, 0) == ProportionInterval(n=0, successes=0, rate=None, low=None, high=None)


@pytest.mark.parametrize(
    ("successes", "n", "confidence"),
    [
        pytest.param(-1, 10, 0.95, id="negative-successes"),
        pytest.param(11, 10, 0.95, id="more-successes-than-n"),
        pytest.param(1, 0, 0.95, id="successes-with-n0"),
        pytest.param(0, -1, 0.95, id="negative-n"),
        pytest.param(1, 2, 0.0, id="confidence-0"),
        pytest.param(1, 2, math.nan, id="confidence-nan"),
    ],
)
def test_proportion_interval_rejects(successes, n, confidence):
    with pytest.raises(ValueError):
        proportion_interval(successes, n, confidence)


# --- label_metrics -------------------------------------------------------------------------

# Worked example, threshold 0.5, 5 bins ([0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1]):
#   p     label  predicted  correct  (p - y)²
#   0.95  T      T          yes      0.0025
#   0.85  T      T          yes      0.0225
#   0.80  F      T          no       0.64
#   0.60  T      T          yes      0.16
#   0.40  F      F          yes      0.16
#   0.30  T      F          no       0.49
#   0.10  F      F          yes      0.01
#   0.00  F      F          yes      0.0
# positives 4, predicted 4, true positives 3 → precision 3/4, recall 3/4; accuracy 6/8;
# Brier 1.485 / 8 = 0.185625.
EXAMPLE = [
    (0.95, True),
    (0.85, True),
    (0.8, False),
    (0.6, True),
    (0.4, False),
    (0.3, True),
    (0.1, False),
    (0.0, False),
]


def test_label_metrics_worked_example():
    m = label_metrics(EXAMPLE, threshold=0.5, bins=5)
    assert m.n == 8
    assert (m.positives, m.predicted_positives) == (4, 4)
    assert (m.accuracy.successes, m.accuracy.n) == (6, 8)
    assert m.accuracy.rate == pytest.approx(0.75)
    assert m.precision == pytest.approx(0.75)
    assert m.recall == pytest.approx(0.75)
    assert m.brier == pytest.approx(0.185625)
    got = [(b.low, b.high, b.count, b.mean_predicted, b.observed_rate) for b in m.reliability]
    want = [
        (0.0, 0.2, 2, 0.05, 0.0),
        (0.2, 0.4, 1, 0.3, 1.0),
        (0.4, 0.6, 1, 0.4, 0.0),
        (0.6, 0.8, 1, 0.6, 1.0),
        (0.8, 1.0, 3, (0.8 + 0.85 + 0.95) / 3, 2 / 3),
    ]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w)


@pytest.mark.parametrize(
    ("pairs", "threshold", "precision", "recall", "brier", "accuracy"),
    [
        # Brier = ((0.9 - 1)² + (0.2 - 0)²) / 2 = (0.01 + 0.04) / 2 = 0.025
        pytest.param([(0.9, True), (0.2, False)], 0.5, 1.0, 1.0, 0.025, 1.0, id="two-right"),
        pytest.param([(0.1, False), (0.3, False)], 0.5, None, None, 0.05, 1.0, id="no-positives-at-all"),
        # nothing predicted positive: precision undefined, recall 0 of 1
        pytest.param([(0.2, True), (0.1, False)], 0.5, None, 0.0, 0.325, 0.5, id="none-predicted"),
        # no actual positives: recall undefined, precision 0 of 1
        pytest.param([(0.7, False), (0.1, False)], 0.5, 0.0, None, 0.25, 0.5, id="none-actual"),
        # exactly at the threshold counts as predicted positive
        pytest.param([(0.5, True)], 0.5, 1.0, 1.0, 0.25, 1.0, id="at-threshold-is-positive"),
        pytest.param([(0.5, True)], 0.6, None, 0.0, 0.25, 0.0, id="below-higher-threshold"),
        pytest.param([(1.0, True), (0.0, False)], 0.5, 1.0, 1.0, 0.0, 1.0, id="perfect-brier-zero"),
        pytest.param([(0.0, True), (1.0, False)], 0.5, 0.0, 0.0, 1.0, 0.0, id="worst-brier-one"),
    ],
)
def test_label_metrics_table(pairs, threshold, precision, recall, brier, accuracy):
    m = label_metrics(pairs, threshold=threshold)
    for name, want in (("precision", precision), ("recall", recall)):
        if want is None:
            assert getattr(m, name) is None, name
        else:
            assert getattr(m, name) == pytest.approx(want), name
    assert m.brier == pytest.approx(brier)
    assert m.accuracy.rate == pytest.approx(accuracy)


def test_label_metrics_empty():
    m = label_metrics([])
    assert m == LabelMetrics(
        n=0,
        accuracy=ProportionInterval(n=0, successes=0, rate=None, low=None, high=None),
        precision=None,
        recall=None,
        brier=None,
        reliability=(),
        positives=0,
        predicted_positives=0,
    )


@pytest.mark.parametrize(
    ("probability", "bins", "low", "high"),
    [
        pytest.param(1.0, 10, 0.9, 1.0, id="one-falls-in-last-bin"),
        pytest.param(0.0, 10, 0.0, 0.1, id="zero-in-first-bin"),
        pytest.param(0.3, 10, 0.3, 0.4, id="edge-belongs-to-upper-bin"),
        pytest.param(0.7, 10, 0.7, 0.8, id="edge-0.7"),
        # 0.8999999999999999 · 10 rounds to 9.0, but it is below the edge 9/10
        pytest.param(0.8999999999999999, 10, 0.8, 0.9, id="just-below-edge-float-rounding"),
        pytest.param(5 / 6, 6, 5 / 6, 1.0, id="edge-5/6"),
        pytest.param(0.5, 1, 0.0, 1.0, id="single-bin"),
        pytest.param(1.0, 1, 0.0, 1.0, id="single-bin-one"),
    ],
)
def test_reliability_bin_edges(probability, bins, low, high):
    (only,) = label_metrics([(probability, True)], bins=bins).reliability
    assert only == ReliabilityBin(low=low, high=high, count=1, mean_predicted=probability, observed_rate=1.0)
    assert only.low <= probability
    assert probability < only.high or probability == only.high == 1.0


def test_reliability_skips_empty_bins_and_counts_all_pairs():
    pairs = [(i / 20, i % 3 == 0) for i in range(21)]
    m = label_metrics(pairs, bins=4)
    assert [b.low for b in m.reliability] == [0.0, 0.25, 0.5, 0.75]
    assert sum(b.count for b in m.reliability) == 21
    sparse = label_metrics([(0.05, False), (0.95, True)], bins=10).reliability
    assert [(b.low, b.count) for b in sparse] == [(0.0, 1), (0.9, 1)]


@pytest.mark.parametrize(
    ("pairs", "kwargs", "match"),
    [
        pytest.param([(0.5, True), (1.5, False)], {}, r"pairs\[1\]", id="above-one"),
        pytest.param([(-0.01, True)], {}, r"pairs\[0\]", id="below-zero"),
        pytest.param([(0.2, True), (0.3, True), (math.nan, True)], {}, r"pairs\[2\]", id="nan"),
        pytest.param([(math.inf, True)], {}, r"pairs\[0\]", id="inf"),
        pytest.param([(0.5, 2)], {}, r"pairs\[0\].*label", id="label-not-boolean"),
        pytest.param([(0.5, True)], {"threshold": 1.5}, "threshold", id="threshold-above-one"),
        pytest.param([(0.5, True)], {"threshold": math.nan}, "threshold", id="threshold-nan"),
        pytest.param([(0.5, True)], {"bins": 0}, "bins", id="zero-bins"),
    ],
)
def test_label_metrics_rejects(pairs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        label_metrics(pairs, **kwargs)


# --- rate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feedback_items", "answers", "expected"),
    [
        pytest.param(3, 10, 0.3, id="some"),
        pytest.param(0, 10, 0.0, id="none-given"),
        pytest.param(0, 0, None, id="no-answers"),
        pytest.param(5, 0, None, id="feedback-but-no-answers"),
        pytest.param(12, 10, 1.2, id="more-than-one-per-answer"),
    ],
)
def test_rate(feedback_items, answers, expected):
    got = rate(feedback_items, answers)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize(("feedback_items", "answers"), [(-1, 10), (1, -1)])
def test_rate_rejects_negative_counts(feedback_items, answers):
    with pytest.raises(ValueError):
        rate(feedback_items, answers)


# --- to_json and the result types ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="none"),
        pytest.param(True, True, id="bool-stays-bool"),
        pytest.param(7, 7, id="int"),
        pytest.param(1 / 3, 0.333333, id="float-rounded"),
        pytest.param(2 / 3, 0.666667, id="float-rounded-up"),
        pytest.param(math.nan, None, id="nan-to-null"),
        pytest.param((1.0, (2, 0.1234567)), [1.0, [2, 0.123457]], id="nested-tuples"),
        # 3 ± 2.7764451 · 0.7071068 = 3 ± 1.9632432
        pytest.param(
            mean_interval([1, 2, 3, 4, 5]),
            {"n": 5, "mean": 3.0, "low": 1.036757, "high": 4.963243},
            id="mean-interval",
        ),
        pytest.param(
            proportion_interval(0, 0),
            {"n": 0, "successes": 0, "rate": None, "low": None, "high": None},
            id="empty-proportion",
        ),
    ],
)
def test_to_json(value, expected):
    assert to_json(value) == expected


def test_to_json_nests_label_metrics():
    doc = to_json(label_metrics(EXAMPLE, bins=5))
    assert isinstance(doc, dict)
    assert list(doc) == [
        "n",
        "accuracy",
        "precision",
        "recall",
        "brier",
        "reliability",
        "positives",
        "predicted_positives",
    ]
    assert doc["accuracy"]["successes"] == 6
    assert doc["brier"] == 0.185625
    assert doc["reliability"][-1] == {
        "low": 0.8,
        "high": 1.0,
        "count": 3,
        "mean_predicted": 0.866667,
        "observed_rate": 0.666667,
    }
    assert json.loads(json.dumps(doc)) == doc  # plain JSON all the way down


@pytest.mark.parametrize("value", [object(), {1, 2}, MeanInterval, b"bytes"])
def test_to_json_rejects_unknown_types(value):
    with pytest.raises(TypeError):
        to_json(value)


@pytest.mark.parametrize(
    "result",
    [
        mean_interval([1, 2]),
        proportion_interval(1, 2),
        label_metrics([(0.5, True)]),
        ReliabilityBin(0.0, 0.1, 1, 0.05, 0.0),
    ],
    ids=lambda r: type(r).__name__,
)
def test_results_are_frozen_with_slots(result):
    assert not hasattr(result, "__dict__")
    first = dataclasses.fields(result)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, first, 99)
