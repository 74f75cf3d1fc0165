"""policies/alert_rules.py: expressions, Threshold, RateOfChange, EwmaAnomaly, BurnRate and
LatencyBurnRate over a SeriesStore filled on a synthetic clock."""

from __future__ import annotations

import math
import random
import re

import pytest

from steadyserve.observe.timeseries import SeriesStore, labels_of
from steadyserve.policies.alert_lifecycle import AlertBook
from steadyserve.policies.alert_rules import (
    BurnRate,
    BurnWindow,
    Evaluation,
    EwmaAnomaly,
    EwmaState,
    LatencyBurnRate,
    RateOfChange,
    Threshold,
    bucket_quantile,
    evaluate_all,
    gauge,
    histogram_quantile,
    least_squares_slope,
    matches,
    rate,
    ratio,
)

T0 = 60 * 16_667.0
ANN = {"summary": "something is wrong with {deployment}", "runbook": "https://runbooks/x"}
REQ = "steadyserve_requests_total"
DUR = "steadyserve_request_duration_seconds"


def by_labels(evaluations: list[Evaluation]) -> dict[tuple[tuple[str, str], ...], Evaluation]:
    return {labels_of(e.labels): e for e in evaluations}


# label filters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "match", "want"),
    [
        ({"code": "5xx"}, None, True),
        ({"code": "5xx"}, {"code": "5xx"}, True),
        ({"code": "2xx"}, {"code": "5xx"}, False),
        ({"code": "503"}, {"code": re.compile(r"5..")}, True),
        ({"code": "5031"}, {"code": re.compile(r"5..")}, False),  # full match
        ({}, {"code": ""}, True),  # a missing label reads as ""
        ({"a": "1", "b": "2"}, {"a": "1", "b": "3"}, False),
    ],
)
def test_label_filters(labels, match, want):
    assert matches(labels, match) is want
    assert matches(labels_of(labels), match) is want


# expressions ---------------------------------------------------------------------------------


def requests_store() -> SeriesStore:
    """Two deployments at 1 request/s for 10 min; a fails 10 %, b never; c has no traffic."""
    store = SeriesStore()
    for i in range(601):
        t = T0 + i
        store.record(REQ, {"deployment": "a", "code": "2xx", "handler": "x"}, i * 0.9, t)
        store.record(REQ, {"deployment": "a", "code": "5xx", "handler": "x"}, i * 0.1, t)
        store.record(REQ, {"deployment": "b", "code": "2xx", "handler": "x"}, i * 0.5, t)
        store.record(REQ, {"deployment": "b", "code": "2xx", "handler": "y"}, i * 0.5, t)
        store.record(REQ, {"deployment": "c", "code": "2xx", "handler": "x"}, 7.0, t)
    return store


def test_ratio_per_deployment_leaves_out_groups_without_traffic():
    expr = ratio(REQ, REQ, 300.0, numerator_filter={"code": "5xx"})
    got = expr(requests_store(), T0 + 600)
    assert got == pytest.approx({(("deployment", "a"),): 0.1, (("deployment", "b"),): 0.0})
    assert "5xx" in expr.text


@pytest.mark.parametrize(
    ("by", "want"),
    [
        (("deployment",), {(("deployment", "a"),): 1.0, (("deployment", "b"),): 1.0,
                           (("deployment", "c"),): 0.0}),
        ((), {(): 2.0}),
    ],
)
def test_rate_sums_by_labels(by, want):
    assert rate(REQ, 60.0, by=by)(requests_store(), T0 + 600) == pytest.approx(want)


def test_rate_without_by_keeps_every_series():
    got = rate(REQ, 60.0, match={"deployment": "b"})(requests_store(), T0 + 600)
    assert got == pytest.approx({
        labels_of({"deployment": "b", "code": "2xx", "handler": "x"}): 0.5,
        labels_of({"deployment": "b", "code": "2xx", "handler": "y"}): 0.5,
    })


def test_gauge_skips_stale_series():
    store = SeriesStore()
    store.record("inflight", {"deployment": "a"}, 3.0, T0)
    store.record("inflight", {"deployment": "b"}, 5.0, T0 + 400)
    got = gauge("inflight", max_age_s=300.0)(store, T0 + 400)
    assert got == {(("deployment", "b"),): 5.0}


@pytest.mark.parametrize(
    ("q", "buckets", "want"),
    [
        pytest.param(0.5, [(0.1, 50), (0.5, 80), (1.0, 95), (math.inf, 100)], 0.1, id="p50-top-of-first"),
        pytest.param(0.25, [(0.1, 50), (0.5, 80), (1.0, 95), (math.inf, 100)], 0.05, id="p25-interpolated"),
        pytest.param(0.9, [(0.1, 50), (0.5, 80), (1.0, 95), (math.inf, 100)], 0.5 + 0.5 * 10 / 15,
                     id="p90-interpolated"),
        pytest.param(0.99, [(0.1, 50), (0.5, 80), (1.0, 95), (math.inf, 100)], 1.0, id="p99-in-inf-bucket"),
        pytest.param(0.5, [(math.inf, 10), (0.1, 10)], 0.05, id="unsorted"),
        pytest.param(0.5, [(0.1, 0), (math.inf, 0)], math.nan, id="no-observations"),
        pytest.param(0.5, [(0.1, 5), (1.0, 10)], math.nan, id="no-inf-bucket"),
        pytest.param(0.5, [(0.1, 6), (0.5, 5), (math.inf, 10)], 0.5 * 0.1 / 0.6, id="non-monotonic-fixed"),
    ],
)
def test_bucket_quantile(q, buckets, want):
    got = bucket_quantile(q, buckets)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def record_histogram(store, deployment, per_s_by_le, seconds, start=T0, handler="x"):
    """Cumulative `_bucket` counters (le labels) and `_count`, 1 sample/s."""
    for i in range(seconds + 1):
        for le, per_s in per_s_by_le.items():
            store.record(f"{DUR}_bucket", {"deployment": deployment, "handler": handler, "le": le},
                         per_s * i, start + i)
        store.record(f"{DUR}_count", {"deployment": deployment, "handler": handler},
                     per_s_by_le["+Inf"] * i, start + i)


def test_histogram_quantile_from_bucket_counters():
    store = SeriesStore()
    # 100 req/s: 50 under 0.1 s, 80 under 0.5 s, 95 under 1 s; two handlers sum per deployment
    record_histogram(store, "a", {"0.1": 25, "0.5": 40, "1.0": 47.5, "+Inf": 50}, 120, handler="x")
    record_histogram(store, "a", {"0.1": 25, "0.5": 40, "1.0": 47.5, "+Inf": 50}, 120, handler="y")
    got = histogram_quantile(0.9, f"{DUR}_bucket", 60.0)(store, T0 + 120)
    assert got == pytest.approx({(("deployment", "a"),): 0.5 + 0.5 * 10 / 15})
    with pytest.raises(ValueError):
        histogram_quantile(1.5, f"{DUR}_bucket", 60.0)


# Threshold and RateOfChange ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "threshold", "value", "active"),
    [(">", 5, 6, True), (">", 5, 5, False), (">=", 5, 5, True), ("<", 5, 4, True), ("<", 5, 5, False),
     ("<=", 5, 5, True), ("==", 5, 5, True), ("!=", 5, 5, False)],
)
def test_threshold_ops(op, threshold, value, active):
    store = SeriesStore()
    store.record("g", {"deployment": "a"}, value, T0)
    rule = Threshold(name="G", expr=gauge("g"), op=op, threshold=threshold, annotations=ANN)
    [ev] = rule.evaluate(store, T0)
    assert (ev.labels, ev.active, ev.value) == ({"deployment": "a"}, active, value)
    assert op in ev.description and "g" in ev.description


@pytest.mark.parametrize(
    "kwargs",
    [
        {"annotations": {"summary": "s"}},  # no runbook
        {"annotations": {"runbook": "r"}},  # no summary
        {"annotations": ANN, "severity": "critical"},
        {"annotations": ANN, "op": "=>"},
        {"annotations": ANN, "name": ""},
    ],
)
def test_rules_are_checked_on_construction(kwargs):
    args = {"name": "G", "expr": gauge("g"), "threshold": 1.0} | kwargs
    with pytest.raises(ValueError):
        Threshold(**args)


@pytest.mark.parametrize(
    ("points", "slope"),
    [([(0, 1), (1, 3), (2, 5)], 2.0), ([(0, 5), (10, 5)], 0.0), ([(0, 1)], None), ([(3, 1), (3, 2)], None),
     ([(0, 0), (1, 2), (2, 1), (3, 3)], 0.8)],
)
def test_least_squares_slope(points, slope):
    got = least_squares_slope(points)
    assert got == pytest.approx(slope) if slope is not None else got is None


def test_rate_of_change_on_a_rising_gauge():
    store = SeriesStore()
    for i in range(120):
        store.record("queue_depth", {"deployment": "a"}, 0.5 * i, T0 + i)  # rising 0.5/s
        store.record("queue_depth", {"deployment": "b"}, 10.0 + (i % 2), T0 + i)  # flat, noisy
    store.record("queue_depth", {"deployment": "c"}, 1.0, T0 + 119)  # one point: no slope
    rule = RateOfChange(name="QueueGrowing", expr=gauge("queue_depth"), window_s=60.0, threshold_per_s=0.1,
                        annotations=ANN)
    got = {e.labels["deployment"]: e for e in rule.evaluate(store, T0 + 119)}
    assert set(got) == {"a", "b"}
    assert got["a"].active and got["a"].value == pytest.approx(0.5)
    assert not got["b"].active and abs(got["b"].value) < 0.01


# EwmaAnomaly ---------------------------------------------------------------------------------


def ewma(**kw) -> EwmaAnomaly:
    return EwmaAnomaly(name="LatencyAnomaly", expr=gauge("p50"), annotations=ANN, **kw)


def feed(rule: EwmaAnomaly, values, start=T0, step_s=10.0, state=None):
    state = state or EwmaState()
    flags = []
    for i, v in enumerate(values):
        state, anomalous, _ = rule.evaluate_step(state, v, start + i * step_s)
        flags.append(anomalous)
    return state, flags


def lognormal(rng, median, sigma, n):
    return [median * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def test_ewma_never_fires_during_warm_up():
    rule = ewma(warmup_samples=30)
    _, flags = feed(rule, [0.02] * 10 + [50.0] + [0.02] * 19)
    assert not any(flags)


def test_ewma_fires_on_a_latency_step_until_the_new_level_is_accepted():
    rng = random.Random(0)
    rule = ewma(adapt_after_s=600.0)
    state, flags = feed(rule, lognormal(rng, 0.020, 0.1, 300))
    assert sum(flags) == 0
    # the median triples; a sample every 10 s: accepted after 600 s = 60 samples
    after, step_flags = feed(rule, lognormal(rng, 0.060, 0.1, 100), start=T0 + 3_000, state=state)
    assert all(step_flags[:60])  # every sample of the first 10 minutes fires
    assert not any(step_flags[61:])  # accepted: the new level is the baseline
    assert math.exp(after.mean) == pytest.approx(0.060, rel=0.1)


def test_ewma_anomalies_do_not_move_the_baseline():
    rng = random.Random(1)
    rule = ewma(adapt_after_s=None)
    state, _ = feed(rule, lognormal(rng, 0.020, 0.1, 200))
    mean = state.mean
    state, flags = feed(rule, [0.2] * 500, start=T0 + 2_000, state=state)
    assert all(flags) and state.mean == mean  # never adapts: fires until it resolves
    _, flags = feed(rule, lognormal(rng, 0.020, 0.1, 20), start=T0 + 7_000, state=state)
    assert sum(flags) <= 1


@pytest.mark.parametrize(
    ("log", "sigma"),
    [pytest.param(True, 0.1, id="lognormal-narrow"), pytest.param(True, 0.5, id="lognormal-wide"),
     pytest.param(False, 0.2, id="gaussian")],
)
def test_ewma_false_positive_rate_on_stationary_noise(log, sigma):
    rng = random.Random(0)
    mean = 0.020
    if log:  # lognormal with mean 20 ms
        median = mean / math.exp(sigma**2 / 2)
        values = lognormal(rng, median, sigma, 10_000)
    else:
        values = [rng.gauss(mean, mean * sigma) for _ in range(10_000)]
    rule = ewma(log=log, min_std=0.01 if log else 1e-6)
    _, flags = feed(rule, values)
    assert sum(flags) / len(flags) < 0.005


def test_ewma_direction():
    rng = random.Random(2)
    up = ewma(direction="up")
    state, _ = feed(up, lognormal(rng, 0.020, 0.1, 100))
    _, drop = feed(up, [0.002] * 5, start=T0 + 2_000, state=state)
    _, rise = feed(up, [0.2] * 5, start=T0 + 2_000, state=state)
    assert not any(drop) and all(rise)


def test_ewma_evaluate_keeps_one_state_per_label_set_and_feeds_once_per_now():
    store = SeriesStore()
    rule = ewma(warmup_samples=5)
    for i in range(10):
        store.record("p50", {"deployment": "a"}, 0.020, T0 + i)
        store.record("p50", {"deployment": "b"}, 0.020, T0 + i)
        rule.evaluate(store, T0 + i)
        rule.evaluate(store, T0 + i)  # the same instant again: not a second sample
    assert {s.n for s in rule.states.values()} == {10}
    store.record("p50", {"deployment": "a"}, 0.5, T0 + 10)
    store.record("p50", {"deployment": "b"}, 0.020, T0 + 10)
    got = {e.labels["deployment"]: e for e in rule.evaluate(store, T0 + 10)}
    assert got["a"].active and not got["b"].active
    assert "baseline" in got["a"].description
    # label sets not seen for forget_after_s are forgotten
    rule.evaluate(SeriesStore(), T0 + 10 + rule.forget_after_s + 1)
    assert rule.states == {}


# BurnRate ------------------------------------------------------------------------------------


def burn_rule(**kw) -> BurnRate:
    return BurnRate(name="ErrorBudgetBurn", errors_counter=REQ, total_counter=REQ,
                    error_filter={"code": "5xx"}, annotations=ANN, **kw)


def run_requests(store: SeriesStore, counts: dict[str, float], start: float, end: float, failing,
                 step_s: float = 1.0) -> None:
    """1 request/s to deployment a from `start` to `end`, sampled every `step_s`; `failing(t)`
    says if they got a 5xx. The 5xx series appears only with the first error, as
    prometheus_client does."""
    t = start
    while t < end:
        code = "5xx" if failing(t) else "2xx"
        counts[code] = counts.get(code, 0.0) + step_s
        for c, v in counts.items():
            store.record(REQ, {"deployment": "a", "code": c}, v, t)
        t += step_s


def test_error_burst_pages_within_a_minute_and_resolves_within_five_after():
    store, counts = SeriesStore(), {}
    rule = burn_rule()
    book = AlertBook([rule])
    burst_at, burst_s = T0 + 7 * 3_600.0, 90.0
    # seven hours of clean traffic (past the 6 h page window), sampled every 10 s, then 1 s
    run_requests(store, counts, T0, burst_at - 900, lambda t: False, step_s=10.0)
    run_requests(store, counts, burst_at - 900, burst_at, lambda t: False)
    paged_at = resolved_at = None
    page_note = resolved_note = None
    t = burst_at
    while t < burst_at + burst_s + 400:
        run_requests(store, counts, t, t + 1, lambda t: t < burst_at + burst_s)
        result = book.step(evaluate_all([rule], store, t), t)
        for tr in result.transitions:
            if tr.labels.get("severity") == "page":
                if tr.to_state == "firing" and paged_at is None:
                    paged_at = t
                if tr.to_state == "resolved":
                    resolved_at = t
        for n in result.notifications:
            if any(a.severity == "page" for a in n.firing) and page_note is None:
                page_note = n
            if any(a.severity == "page" for a in n.resolved):
                resolved_note = n
        t += 1.0
    assert paged_at is not None and paged_at - burst_at <= 60.0
    assert page_note is not None and page_note.at == paged_at and page_note.severity == "page"
    assert page_note.firing[0].annotations["summary"] == "something is wrong with a"
    assert "1h" in page_note.firing[0].description and "FIRED" in page_note.firing[0].description
    assert resolved_at is not None and resolved_at - (burst_at + burst_s) <= 300.0
    assert resolved_note is not None and resolved_note.at == resolved_at


def test_steady_double_burn_for_three_days_tickets_but_never_pages():
    # 0.2 % errors against a 99.9 % SLO is a burn rate of 2; simulated at the coarse tier's
    # granularity (one sample a minute), 1 request/s, errors drawn per request
    rng = random.Random(0)
    store = SeriesStore()
    rule = burn_rule()
    total = errors = 0.0
    pages = []
    for minute in range(3 * 24 * 60 + 60):
        t = T0 + 60.0 * minute
        total += 60
        errors += sum(rng.random() < 0.002 for _ in range(60))
        store.record(REQ, {"deployment": "a", "code": "2xx"}, total - errors, t)
        store.record(REQ, {"deployment": "a", "code": "5xx"}, errors, t)
        if minute % 60 == 0:
            evs = {e.labels["severity"]: e for e in rule.evaluate(store, t)}
            pages.append(evs["page"].active if evs else False)
    assert not any(pages)
    evs = {e.labels["severity"]: e for e in rule.evaluate(store, t)}
    assert evs["ticket"].active and not evs["page"].active
    assert evs["ticket"].labels == {"deployment": "a", "severity": "ticket"}
    assert evs["ticket"].value == pytest.approx(2.0, rel=0.25)
    assert "3d" in evs["ticket"].description and "6h" in evs["ticket"].description


def test_burn_rate_without_traffic_emits_nothing():
    store = SeriesStore()
    store.record(REQ, {"deployment": "a", "code": "2xx"}, 5.0, T0)
    store.record(REQ, {"deployment": "a", "code": "2xx"}, 5.0, T0 + 60)
    assert burn_rule().evaluate(store, T0 + 60) == []


def test_burn_rate_custom_windows():
    store, counts = SeriesStore(), {}
    run_requests(store, counts, T0, T0 + 100, lambda t: int(t) % 10 == 0)  # 10 % errors
    rule = burn_rule(slo_target=0.99, windows=(BurnWindow("info", 60.0, 10.0, 5.0),))
    [ev] = rule.evaluate(store, T0 + 99)
    assert ev.labels == {"deployment": "a", "severity": "info"}
    assert ev.active and ev.value == pytest.approx(10.0)


def test_latency_burn_rate_counts_requests_slower_than_the_threshold():
    store = SeriesStore()
    # 10 req/s; 90 % faster than 0.25 s; 99 % SLO: 10 % bad is a burn of 10
    record_histogram(store, "a", {"0.1": 5, "0.25": 9, "0.5": 9.9, "+Inf": 10}, 400)
    record_histogram(store, "b", {"0.1": 9.99, "0.25": 10, "0.5": 10, "+Inf": 10}, 400)
    windows = (BurnWindow("page", 300.0, 60.0, 5.0),)
    rule = LatencyBurnRate(name="SlowRequests", bucket_counter=f"{DUR}_bucket", count_counter=f"{DUR}_count",
                           threshold_s=0.25, slo_target=0.99, windows=windows, annotations=ANN)
    got = {e.labels["deployment"]: e for e in rule.evaluate(store, T0 + 400)}
    assert got["a"].active and got["a"].value == pytest.approx(10.0)
    assert not got["b"].active and got["b"].value == pytest.approx(0.0)
    # a threshold between bounds uses the bound below: more requests count as bad
    between = LatencyBurnRate(name="SlowRequests", bucket_counter=f"{DUR}_bucket",
                              count_counter=f"{DUR}_count", threshold_s=0.3, slo_target=0.99,
                              windows=windows, annotations=ANN)
    assert {e.labels["deployment"]: e.value for e in between.evaluate(store, T0 + 400)}["a"] == \
        pytest.approx(10.0)


@pytest.mark.parametrize("slo", [0.0, 1.0, 1.5])
def test_burn_rate_rejects_impossible_slo(slo):
    with pytest.raises(ValueError):
        burn_rule(slo_target=slo)


# minimum request count and the value of a burn -----------------------------------------------


def even_traffic(total: float, errors: float, seconds: int = 100) -> SeriesStore:
    """`total` requests to deployment a, `errors` of them 5xx, spread evenly over `seconds`."""
    store = SeriesStore()
    for i in range(seconds + 1):
        store.record(REQ, {"deployment": "a", "code": "2xx"}, (total - errors) * i / seconds, T0 + i)
        store.record(REQ, {"deployment": "a", "code": "5xx"}, errors * i / seconds, T0 + i)
    return store


@pytest.mark.parametrize(
    ("total", "errors", "min_requests", "want_active", "want_note"),
    [
        pytest.param(99, 50, 100, False, True, id="under-the-minimum-stays-quiet"),
        pytest.param(100, 50, 100, True, False, id="at-the-minimum-fires"),
        pytest.param(99, 50, 0, True, False, id="no-minimum"),
        pytest.param(5, 5, 100, False, True, id="every-request-failed-but-only-five"),
        pytest.param(100_000, 10, 100, False, False, id="enough-requests-under-the-factor"),
    ],
)
def test_burn_rate_needs_min_requests_in_the_long_window(total, errors, min_requests, want_active,
                                                         want_note):
    store = even_traffic(total, errors)
    rule = burn_rule(windows=(BurnWindow("page", 300.0, 60.0, 14.4),), min_requests=min_requests)
    [ev] = rule.evaluate(store, T0 + 100)
    assert ev.active is want_active
    assert ("requests in 5m" in ev.description) is want_note, ev.description


def test_the_minimum_applies_per_pair_to_its_own_long_window():
    # 150 requests, half failing, in the last 100 s: the 60 s pair's long window holds 90
    store = even_traffic(150, 75)
    windows = (BurnWindow("page", 60.0, 30.0, 14.4), BurnWindow("ticket", 300.0, 60.0, 3.0))
    got = {e.labels["severity"]: e.active for e in
           burn_rule(windows=windows, min_requests=100).evaluate(store, T0 + 100)}
    assert got == {"page": False, "ticket": True}


def test_burn_value_is_the_long_window_burn_of_the_first_pair_that_fires():
    # clean traffic for 500 s, then 100 s at 50 % errors: the short window burns harder
    store, counts = SeriesStore(), {}
    run_requests(store, counts, T0, T0 + 600, lambda t: t >= T0 + 500)
    windows = (BurnWindow("page", 600.0, 60.0, 1000.0),  # 600 s: burn ~83, does not fire
               BurnWindow("page", 300.0, 60.0, 50.0),  # fires: the value is its 300 s burn
               BurnWindow("page", 120.0, 60.0, 10.0))  # fires too, but comes second
    [ev] = burn_rule(slo_target=0.999, windows=windows).evaluate(store, T0 + 599)
    assert ev.active
    assert ev.value == pytest.approx(100 / 300 / 0.001, rel=0.02)
    quiet = burn_rule(windows=(BurnWindow("page", 600.0, 60.0, 5000.0),))
    [ev] = quiet.evaluate(store, T0 + 599)  # inactive: the burn sustained over both windows
    assert not ev.active and ev.value == pytest.approx(100 / 600 / 0.001, rel=0.02)


def test_burn_rate_rejects_a_negative_minimum():
    with pytest.raises(ValueError, match="min_requests"):
        burn_rule(min_requests=-1)
