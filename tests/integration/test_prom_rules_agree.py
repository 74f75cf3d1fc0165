"""`promtool test rules` agrees with the built-in evaluator.

Synthetic series (1 s apart, as the gateway samples) drive both: the built-in rules
(`default_rules`, every one with an exact PromQL form) through an AlertBook evaluated every
5 s, and Prometheus through the exported rules file. The promtool test file's
`exp_alerts` at every evaluation time are exactly what the built-in evaluator had firing
then, with labels and rendered annotations, so any difference in a threshold, a window, a
label set, a `for` or an annotation fails `promtool test rules`.

The series are shaped so both engines compute the same numbers: windows whose edges fall
between samples in one engine and on them in the other would differ by a sample, so each
transition lies 2 s off the 5 s evaluation grid; counters that matter from their first
sample exist at 0 beforehand (the gateway creates them at 0); the test stays under 30
minutes, where the built-in's minute-resolution tier serves every long window from the
start of the data, as Prometheus does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from steadyserve.config import AlertingConfig
from steadyserve.observe.default_rules import default_rules
from steadyserve.observe.prom_rules import prometheus_rules
from steadyserve.observe.timeseries import SeriesStore
from steadyserve.policies.alert_lifecycle import AlertBook
from steadyserve.policies.alert_rules import evaluate_all

from .conftest import unavailable

pytestmark = pytest.mark.integration

END_S = 1700  # under 1800: see the module docstring
EVAL_EVERY_S = 5
Value = Callable[[int], float | None]  # t (s) -> the sample at t, None: no sample


def counter(per_s: float, start: int = 0, stop: int | None = None, *, present_from: int | None = None,
            base: float = 0.0) -> Value:
    """`base` at `start`, then `per_s` more every second up to `stop`, then flat; no sample
    before `present_from` (default 0). Counters start at 0 with the data, as the gateway's do."""
    def value(t: int) -> float | None:
        if t < (present_from or 0):
            return None
        end = t if stop is None else min(t, stop)
        return base + per_s * max(0, end - start)

    return value


def steps(default: float | None, *changes: tuple[int, int, float | None]) -> Value:
    """A gauge at `default`, at `v` for start <= t < stop of each change."""
    def value(t: int) -> float | None:
        for start, stop, v in changes:
            if start <= t < stop:
                return v
        return default

    return value


REQ = "steadyserve_requests_total"
UP = "steadyserve_upstream_attempts_total"
SERIES: dict[tuple[str, tuple[tuple[str, str], ...]], Value] = {
    # ErrorBudgetBurn, deployment a: 10 ok/s; a 5xx burst of 10/s from 402 to 602 (the
    # gateway creates the 5xx series at 0 with the first request): the ticket fires at once,
    # the page once the hour's error ratio passes 14.4x the budget
    (REQ, (("code", "2xx"), ("deployment", "a"), ("handler", "h"))): counter(10.0),
    (REQ, (("code", "5xx"), ("deployment", "a"), ("handler", "h"))): counter(10.0, 402, 602),
    # deployment b: a third of its requests fail from the start, but it takes until 270 s
    # to reach slo_min_requests (100) in the long window: quiet before, then both severities
    (REQ, (("code", "2xx"), ("deployment", "b"), ("handler", "h"))): counter(0.25),
    (REQ, (("code", "5xx"), ("deployment", "b"), ("handler", "h"))): counter(0.125),
    # ReplicaErrors: a-0 answers only 5xx from 702 to 902 (that series appears with its first
    # errors; its ok series had traffic before the test); a-1 fails 30 % all along
    (UP, (("deployment", "a"), ("outcome", "ok"), ("replica", "a-0"))): steps(100.0),
    (UP, (("deployment", "a"), ("outcome", "5xx"), ("replica", "a-0"))):
        counter(5.0, 702, 902, present_from=703),
    (UP, (("deployment", "a"), ("outcome", "ok"), ("replica", "a-1"))): counter(7.0),
    (UP, (("deployment", "a"), ("outcome", "5xx"), ("replica", "a-1"))): counter(3.0),
    # ReplicaCrashLooping: restarts at 1002, 1012, 1022, 1032 (exactly 3 in 5 minutes does
    # not fire); the counter exists at 0 from the start
    ("steadyserve_replica_restarts_total", (("deployment", "a"),)):
        lambda t: float(sum(1 for r in (1002, 1012, 1022, 1032) if t >= r)),
    # DeploymentNotReady (for 30 s): a has none ready for 60 s, later for 20 s (never fires)
    ("steadyserve_replicas", (("deployment", "a"), ("state", "ready"))):
        steps(2.0, (1102, 1162, 0.0), (1202, 1222, 0.0)),
    ("steadyserve_replicas", (("deployment", "b"), ("state", "ready"))): steps(1.0),
    ("steadyserve_replicas", (("deployment", "a"), ("state", "starting"))): steps(0.0),
    # DatabaseDown (for 30 s): unknown (no sample) for the first 52 s, then up, down for 50 s
    ("steadyserve_database_up", ()): steps(1.0, (0, 52, None), (1302, 1352, 0.0)),
    # CacheL2Down (for 60 s): down for 80 s
    ("steadyserve_cache_l2_up", ()): steps(1.0, (1402, 1482, 0.0)),
    # EventLoopLag (for 60 s): 0.25 s for 80 s
    ("steadyserve_event_loop_lag_seconds", ()): steps(0.0, (1502, 1582, 0.25)),
}


def builtin_firing(cfg: AlertingConfig) -> tuple[list[str], dict[int, dict[str, list[dict]]]]:
    """The exactly exported rules' names, and per evaluation time, per rule, what the
    built-in evaluator has firing (labels without alertname, rendered annotations)."""
    rules = [r for r in default_rules(cfg) if all(p.exact for p in r.prometheus())]
    names = [r.name for r in rules]
    store, book = SeriesStore(), AlertBook(rules)
    firing: dict[int, dict[str, list[dict]]] = {}
    for t in range(END_S + 1):
        for (name, labels), value in SERIES.items():
            v = value(t)
            if v is not None:
                store.record(name, labels, v, float(t))
        if t % EVAL_EVERY_S:
            continue
        book.step(evaluate_all(rules, store, float(t)), float(t))
        now = firing[t] = {n: [] for n in names}
        for a in book.alerts("firing"):
            now[a.rule].append({
                "exp_labels": {k: v for k, v in a.labels.items() if k != "alertname"},
                "exp_annotations": dict(a.annotations)})
    return names, firing


def promtool_tests(names: list[str], firing: dict[int, dict[str, list[dict]]]) -> dict:
    def values(value: Value) -> str:
        return " ".join("_" if (v := value(t)) is None else repr(v) for t in range(END_S + 1))

    def selector(name: str, labels: tuple[tuple[str, str], ...]) -> str:
        return name + "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in labels) + "}"

    return {
        "rule_files": ["rules.yml"],
        "evaluation_interval": f"{EVAL_EVERY_S}s",
        "tests": [{
            "interval": "1s",
            "input_series": [{"series": selector(n, labels), "values": values(v)}
                             for (n, labels), v in SERIES.items()],
            "alert_rule_test": [{"eval_time": f"{t}s", "alertname": name, "exp_alerts": alerts[name]}
                                for t, alerts in sorted(firing.items()) for name in names],
        }],
    }


def test_promtool_fires_what_the_builtin_evaluator_fires(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool (CI installs Debian's prometheus package)",
                    FileNotFoundError("promtool"))
    cfg = AlertingConfig()
    names, firing = builtin_firing(cfg)
    # the scenario exercises every rule: each fires at some time, and none fires all along
    fired = {name for alerts in firing.values() for name, got in alerts.items() if got}
    assert fired == set(names) == {"ReplicaCrashLooping", "DeploymentNotReady", "ReplicaErrors",
                                   "ErrorBudgetBurn", "DatabaseDown", "CacheL2Down",
                                   "EventLoopLag"}
    assert not any(firing[0].values())
    burn = {(a["exp_labels"]["deployment"], a["exp_labels"]["severity"])
            for alerts in firing.values() for a in alerts["ErrorBudgetBurn"]}
    assert burn == {("a", "page"), ("a", "ticket"), ("b", "page"), ("b", "ticket")}
    assert not firing[265]["ErrorBudgetBurn"] and firing[270]["ErrorBudgetBurn"]  # min requests
    assert [a["exp_labels"]["replica"] for a in firing[800]["ReplicaErrors"]] == ["a-0"]

    (tmp_path / "rules.yml").write_text(prometheus_rules(cfg))
    (tmp_path / "tests.yml").write_text(json.dumps(promtool_tests(names, firing)))
    run = subprocess.run([promtool, "test", "rules", "tests.yml"], cwd=tmp_path,
                         capture_output=True, timeout=120)
    output = run.stdout.decode() + run.stderr.decode()
    assert run.returncode == 0, output[-6000:]
    assert "SUCCESS" in output
