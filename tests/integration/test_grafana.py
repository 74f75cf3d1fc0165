"""deploy/grafana and deploy/prometheus: every metric the Grafana dashboard queries is one the
gateway exports (read from a live gateway's /metrics and from the registries that declare
every family), every panel's query is valid PromQL (promtool), the Prometheus config is
valid and its rules are today's export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from steadyserve.observe.metrics import GatewayMetrics
from steadyserve.replica.metrics import ReplicaMetrics

from .conftest import HERE, STEADYSERVE
from .test_alerting import _promtool

REPO = HERE.parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "steadyserve-dashboard.json"
PROMETHEUS = REPO / "deploy" / "prometheus"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                             "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
            "unknown": ("",)}


def sample_names(families) -> set[str]:
    names = set()
    for f in families:
        names.update(f.name + s for s in SUFFIXES.get(f.type, ("",)))
        names.update(s.name for s in f.samples)
    return names


def queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_every_metric_of_the_dashboard_is_exported(serve) -> None:
    gw = serve([str(HERE / "services" / "echo.py") + ":Echo", "--replicas", "1"])
    with gw.client() as c:
        assert c.post("/v1/deployments/echo/upper", json={"texts": ["a"]}).status_code == 200
        text = c.get("/metrics").text
    exported = sample_names(text_string_to_metric_families(text))
    exported |= sample_names(GatewayMetrics().registry.collect())  # declared, maybe no samples
    exported |= sample_names(ReplicaMetrics().registry.collect())
    used = {m for q in queries() for m in re.findall(r"\bsteadyserve_[a-z0-9_]+", q)}
    assert len(used) >= 15
    assert sorted(used - exported) == []
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "steadyserve-overview" and dash["panels"]
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dash["panels"]
               for t in p["targets"])


def test_every_panel_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, q in enumerate(queries()):
        expr = q.replace("$__rate_interval", "5m").replace("$deployment", ".*")
        rules += [f"      - record: dashboard:panel_{i}", f"        expr: {json.dumps(expr)}"]
    (tmp_path / "dashboard.yml").write_text("\n".join(rules) + "\n")
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "dashboard.yml")],
                           capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_the_prometheus_config_is_valid_and_its_rules_are_todays(tmp_path: Path) -> None:
    promtool = _promtool()
    fresh = tmp_path / "rules.yml"
    subprocess.run([*STEADYSERVE, "export", "prometheus-rules", "--out", str(fresh)],
                   check=True, timeout=30, cwd=tmp_path)
    assert (PROMETHEUS / "steadyserve-rules.yml").read_text() == fresh.read_text(), \
        "deploy/prometheus/steadyserve-rules.yml is stale: re-export it"
    check = subprocess.run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")],
                           capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
