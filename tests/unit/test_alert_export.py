"""One declaration per rule: expressions and rules render their own PromQL, annotations
their own Prometheus template, and the exported rules file is generated from
`default_rules(cfg)` alone. (That the PromQL agrees with the built-in evaluator is
tests/integration/test_prom_rules_agree.py, through promtool.)"""

from __future__ import annotations

import json
import math
import re

import pytest

from steadyserve.config import AlertingConfig
from steadyserve.observe.default_rules import default_rules
from steadyserve.observe.prom_rules import prometheus_rules
from steadyserve.policies.alert_rules import (
    BurnRate,
    BurnWindow,
    EwmaAnomaly,
    LatencyBurnRate,
    PromAlert,
    RateOfChange,
    Threshold,
    gauge,
    histogram_quantile,
    prom_duration,
    prom_number,
    prom_template,
    rate,
    ratio,
    render,
)

ANN = {"summary": "{deployment} is slow ({value:.2f} s)", "runbook": "look at {deployment}"}
REQ = "steadyserve_requests_total"


@pytest.mark.parametrize(
    ("seconds", "want"),
    [(300, "5m"), (3600, "1h"), (86_400, "1d"), (3 * 86_400, "3d"), (90, "90s"), (60, "1m"),
     (7200, "2h"), (1.5, "1500ms"), (0.25, "250ms"), (5400, "90m")],
)
def test_prom_duration(seconds, want):
    assert prom_duration(seconds) == want


@pytest.mark.parametrize("seconds", [0, -5, math.inf, math.nan, 1e-4])
def test_prom_duration_refuses_what_promql_cannot_say(seconds):
    with pytest.raises(ValueError):
        prom_duration(seconds)


@pytest.mark.parametrize(
    ("x", "want"),
    [(1.0, "1"), (0.5, "0.5"), (14.4, "14.4"), (3.5 / 300, "0.011666666666666667"),
     (1 - 0.999, "0.0010000000000000009"), (math.inf, "+Inf"), (100, "100")],
)
def test_prom_number_parses_back_to_the_same_double(x, want):
    assert prom_number(x) == want
    assert float(want.replace("Inf", "inf")) == x


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        (gauge("up_total"), "up_total"),
        (gauge("steadyserve_replicas", {"state": "ready"}), 'steadyserve_replicas{state="ready"}'),
        (gauge("x", {"code": re.compile("5..")}), 'x{code=~"5.."}'),
        (gauge("x", {"path": 'a"b'}), 'x{path="a\\"b"}'),
        (rate("r_total", 300, by=("deployment",)), "sum by (deployment) (rate(r_total[5m]))"),
        (rate("r_total", 60), "rate(r_total[1m])"),
        (ratio("e_total", "e_total", 60, numerator_filter={"outcome": "5xx"}, by=("d", "r")),
         '(sum by (d, r) (rate(e_total{outcome="5xx"}[1m])) or 0 * sum by (d, r) '
         "(rate(e_total[1m]))) / sum by (d, r) (rate(e_total[1m]))"),
        (histogram_quantile(0.99, "lat_bucket", 300),
         "histogram_quantile(0.99, sum by (deployment, le) (rate(lat_bucket[5m])))"),
    ],
)
def test_expressions_render_their_promql(expr, want):
    assert expr.promql == want


@pytest.mark.parametrize(
    ("template", "want"),
    [
        ("{deployment} has no replica", "{{ $labels.deployment }} has no replica"),
        ("lags {value}", 'lags {{ printf "%.4g" $value }}'),
        ("lags {value:.3f} s", 'lags {{ printf "%.3f" $value }} s'),
        ("burns {value:.1f}x on {deployment}",
         'burns {{ printf "%.1f" $value }}x on {{ $labels.deployment }}'),
        ("no fields", "no fields"),
    ],
)
def test_prom_template(template, want):
    assert prom_template(template) == want


@pytest.mark.parametrize("template", ["{value:.0%}", "{value:>8}", "{value:,}", "{deployment:>5}"])
def test_a_template_go_cannot_render_the_same_is_refused(template):
    with pytest.raises(ValueError):
        prom_template(template)
    with pytest.raises(ValueError, match="annotation summary"):
        Threshold(name="X", expr=gauge("x"), threshold=1, annotations={"summary": template, "runbook": "r"})


@pytest.mark.parametrize(
    ("template", "value", "want"),
    [("{value}", 0.123456, "0.1235"), ("{value:.2f}", 0.5, "0.50"), ("{value:.1f}x", 21.479, "21.5x"),
     ("{value:.3f} s", 0.25, "0.250 s"), ("{value:.2e}", 12345.0, "1.23e+04"),
     ("{deployment} {value:.0f}", 3.0, "a 3")],
)
def test_render_formats_the_value_as_the_go_template_does(template, value, want):
    assert render(template, {"deployment": "a"}, value) == want


def test_rules_render_their_alerts():
    threshold = Threshold(name="Slow", expr=gauge("lat", {"d": "a"}), op=">=", threshold=0.5, for_s=90,
                          severity="page", labels={"team": "ml"}, annotations=ANN)
    assert threshold.prometheus() == (
        PromAlert('lat{d="a"} >= 0.5', 90, {"severity": "page", "team": "ml"}),)
    slope = RateOfChange(name="Filling", expr=gauge("disk"), window_s=600, threshold_per_s=-0.25,
                         op="<", annotations=ANN)
    assert slope.prometheus()[0].expr == "deriv(disk[10m]) < -0.25"
    ewma = EwmaAnomaly(name="Odd", expr=gauge("lat"), annotations=ANN)
    assert ewma.prometheus() == ()  # no stand-in declared: not exported
    stand_in = EwmaAnomaly(name="Odd", expr=gauge("lat"), annotations=ANN, standin_promql="lat > 1",
                           standin_for_s=60)
    assert stand_in.prometheus() == (PromAlert("lat > 1", 60, {"severity": "ticket"}, exact=False),)


def test_burn_rate_renders_one_alert_per_severity_from_its_windows():
    rule = BurnRate(name="Burn", errors_counter=REQ, total_counter=REQ, error_filter={"code": "5xx"},
                    slo_target=0.99, min_requests=20, annotations=ANN,
                    windows=(BurnWindow("page", 3600, 300, 14.4), BurnWindow("page", 21_600, 1800, 6),
                             BurnWindow("ticket", 86_400, 7200, 3)))
    page, ticket = rule.prometheus()
    assert (page.labels, ticket.labels) == ({"severity": "page"}, {"severity": "ticket"})
    ratio_1h = rule.ratio(3600).promql
    assert page.expr.startswith(f"(({ratio_1h}) / 0.010000000000000009 > 14.4 and ")
    assert page.expr.count(" or (") == 1  # the second pair
    assert "sum by (deployment) (increase(steadyserve_requests_total[1h])) >= 20" in page.expr
    assert "[1d]" in ticket.expr and "[1h]" not in ticket.expr
    without_minimum = BurnRate(name="Burn", errors_counter=REQ, total_counter=REQ, annotations=ANN)
    assert all("increase(" not in a.expr for a in without_minimum.prometheus())


def test_latency_burn_rate_renders_bad_as_count_minus_the_threshold_bucket():
    rule = LatencyBurnRate(name="Slow", bucket_counter="d_bucket", count_counter="d_count",
                           threshold_s=0.25, windows=(BurnWindow("page", 300, 60, 10),), annotations=ANN)
    [alert] = rule.prometheus()
    assert ('(sum by (deployment) (rate(d_count[5m])) - sum by (deployment) '
            '(rate(d_bucket{le="0.25"}[5m]))) / sum by (deployment) (rate(d_count[5m]))') in alert.expr


def test_the_exported_file_is_generated_from_the_default_rules():
    cfg = AlertingConfig(fast_window_s=30, fast_for_s=20, slo_target=0.99, slo_min_requests=7)
    text = prometheus_rules(cfg)
    exported = 0
    for rule in default_rules(cfg):
        for alert in rule.prometheus():
            exported += 1
            assert f"expr: {json.dumps(alert.expr)}" in text
            assert text.count(f'- alert: "{rule.name}"') == len(rule.prometheus())
        for template in rule.annotations.values():
            assert json.dumps(prom_template(template)) in text
    assert text.count("- alert: ") == exported == 9  # ErrorBudgetBurn has page and ticket
    # the configuration flows through the rule objects, nowhere else
    assert "[30s]" in text and 'for: "20s"' in text and ">= 7" in text
    assert "/ 0.010000000000000009 > 14.4" in text
    stand_ins = [r.name for r in default_rules(cfg) if any(not a.exact for a in r.prometheus())]
    assert stand_ins == ["LatencyAnomaly"]
    assert "# LatencyAnomaly: a stand-in" in text
