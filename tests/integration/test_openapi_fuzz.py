"""The gateway's own OpenAPI document, and schemathesis fuzzing a live gateway against it:
every route and every handler, with the admin key, bounded to a couple of minutes.
Pass criteria: no 5xx, no hang (a request timeout counts as a failure), every response
matching the document (status, content type, headers, body schema), and invalid input
refused with a 4xx."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import HERE


def sum_samples(metrics_text: str, name: str, **labels: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(metrics_text)
               for sample in family.samples
               if sample.name in (name, f"{name}_total")
               and all(sample.labels.get(k) == v for k, v in labels.items()))

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TYPED = str(HERE / "services" / "typed.py") + ":Typed"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,negative_data_rejection")


def schemathesis() -> list[str]:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("schemathesis is not installed: `make install` installs it (dev extra)")
    return [exe]


def test_schemathesis_finds_no_5xx_hang_or_undocumented_answer(serve, tmp_path: Path):
    (tmp_path / "steadyserve.toml").write_text(f"""
[deployments.typed]
service = "{TYPED}"
replicas = 1
max_replicas = 2

[deployments.risk]
service = "steadyserve.examples.risk.service:RiskScorer"
replicas = 1
max_replicas = 2
""")
    # a bad input's 4xx includes 413 (too many items, a body over the limit): schemathesis's
    # default list of "rejections" lacks it
    (tmp_path / "schemathesis.toml").write_text(
        "[checks.negative_data_rejection]\n"
        "expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 414, 415, 422, 428, "
        "429, 431]\n"
        # a 504 is allowed here only to be checked below: every one must be a client deadline
        # (a generated X-Request-Timeout-Ms of a few ms), never the gateway's own timeout
        "[checks.not_a_server_error]\n"
        'expected-statuses = ["2xx", "3xx", "4xx", 504]\n')
    gw = serve([], ready_timeout_s=120)
    headers = gw.admin_headers()
    assert headers, "the gateway wrote no admin key"
    doc = httpx.get(f"{gw.url}/openapi.json", timeout=10).json()
    assert doc["openapi"] == "3.1.0"
    assert "/v1/deployments/typed/order" in doc["paths"]
    assert "/v1/deployments/risk/score" in doc["paths"]

    proc = subprocess.run(
        [*schemathesis(), "run", f"{gw.url}/openapi.json", "--checks", CHECKS,
         "--header", f"Authorization:{headers['authorization']}",
         "--max-time", os.environ.get("FUZZ_MAX_TIME_S", "100"), "--request-timeout", "10", "--workers", "1",
         "--phases", "examples,coverage,fuzzing", "--seed", "20261202",
         "--suppress-health-check", "all", "--no-color",
         # rollouts change the world the rest of the run talks to (replicas: 0 pauses a
         # deployment, which then rightly answers 503): their inputs are checked against the
         # same schema in tests/component/test_openapi.py and by the rollout tests
         "--exclude-operation-id-regex", "^(post|delete)_rollout_"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    output = proc.stdout + proc.stderr
    (tmp_path / "schemathesis.log").write_text(output)
    summary = output[output.rfind("SUMMARY"):] if "SUMMARY" in output else output[-3000:]
    print(summary)
    failures = output[output.find("FAILURES"):output.find("WARNINGS")] if "FAILURES" in output \
        else ""
    assert proc.returncode == 0, (failures or output)[-6000:] + "\n" + summary[-2000:]
    # the gateway is still healthy after the fuzzing
    assert httpx.get(f"{gw.url}/readyz", timeout=5).status_code == 200
    # every 504 was a deadline the client set shorter than the handler needs, counted as the
    # client's (code="deadline"), and none held against a replica
    metrics = httpx.get(f"{gw.url}/metrics", headers=headers, timeout=10).text
    gateway_504 = sum_samples(metrics, "steadyserve_request_errors", error="504")
    deadlines = sum_samples(metrics, "steadyserve_requests", code="deadline")
    assert gateway_504 == deadlines, (gateway_504, deadlines)
    for outcome in ("timeout", "5xx"):
        assert sum_samples(metrics, "steadyserve_upstream_attempts", outcome=outcome) == 0, outcome
    assert sum_samples(metrics, "steadyserve_outlier_events", event="ejected") == 0
