"""Alerting end to end: errors injected into a real deployment fire an alert, one webhook
notification arrives, the automatic restart happens and is recorded, and the history
survives a gateway restart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import HERE, STEADYSERVE, free_port, start

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def config(tmp_path, webhook: str) -> str:
    return f"""
data_dir = "{tmp_path / 'state'}"
[alerting]
evaluation_interval_s = 0.5
fast_window_s = 5
fast_for_s = 1
webhook_urls = ["{webhook}"]
[deployments.flaky]
service = "{HERE / 'services' / 'echo.py'}:Flaky"
replicas = 2
"""


def test_errors_fire_an_alert_notify_once_restart_the_replica_and_survive_a_restart(
        tmp_path, receiver):
    (tmp_path / "steadyserve.toml").write_text(config(tmp_path, receiver.url))
    gw = start([], tmp_path)
    try:
        gw.wait_ready(60)
        deadline = time.monotonic() + 40
        restarted = None
        with gw.client(timeout=5) as c:
            while time.monotonic() < deadline:
                r = c.post("/v1/deployments/flaky/work", json={"x": "y"})
                assert r.status_code == 200, r.text  # retries spare the clients
                alerts = c.get("/v1/alerts").json()
                done = [a for a in alerts["actions"] if a["outcome"] == "done"]
                if done and receiver.bodies:
                    restarted = done[0]
                    break
                time.sleep(0.05)
            assert restarted is not None, f"{alerts}\n{gw.log.read_text()[-3000:]}"
            assert restarted["action"] == "restart_replica"
            assert restarted["target"] == "flaky-0" and restarted["rule"] == "ReplicaErrors"
            firing = [a for a in alerts["alerts"] if a["state"] == "firing"]
            assert [a["rule"] for a in firing] == ["ReplicaErrors"]
            time.sleep(2.0)  # no second notification for the same firing group
        assert len(receiver.bodies) == 1
        note = receiver.bodies[0]
        assert note["status"] == "firing"
        assert note["alerts"][0]["labels"]["alertname"] == "ReplicaErrors"
        assert note["alerts"][0]["labels"]["replica"] == "flaky-0"
        assert "runbook" in note["alerts"][0]["annotations"]
        slot = httpx.get(f"{gw.url}/v1/deployments/flaky", timeout=5).json()["replicas"][0]
        assert slot["id"] == "flaky-0"
    finally:
        assert gw.stop() == []

    gw = start([], tmp_path)  # the same data_dir: alert history and actions are in SQLite
    try:
        gw.wait_ready(60)
        body = httpx.get(f"{gw.url}/v1/alerts", timeout=5).json()
        assert any(t["to_state"] == "firing" and t["rule"] == "ReplicaErrors"
                   for t in body["history"]), body
        assert any(a["action"] == "restart_replica" and a["outcome"] == "done"
                   for a in body["actions"]), body
        out = subprocess.run([*STEADYSERVE, "alerts", "--url", gw.url], capture_output=True,
                             timeout=30, check=True)
        assert b"restart_replica flaky-0: done" in out.stdout
        out = subprocess.run([*STEADYSERVE, "silence", "--match", "alertname=ReplicaErrors",
                              "--for", "10m", "--url", gw.url], capture_output=True, timeout=30)
        assert out.returncode == 0 and out.stdout.startswith(b"silence ")
        silences = httpx.get(f"{gw.url}/v1/alerts", timeout=5).json()["silences"]
        assert silences and silences[0]["matchers"] == {"alertname": "ReplicaErrors"}
    finally:
        assert gw.stop() == []


def test_silence_api_validates_input(serve):
    gw = serve([str(HERE / "services" / "echo.py") + ":Echo"])
    with gw.client() as c:
        for bad in ({}, {"matchers": {}, "duration_s": 60}, {"matchers": {"a": 1}, "duration_s": 60},
                    {"matchers": {"a": "b"}, "duration_s": -1},
                    {"matchers": {"a": "b"}, "duration_s": True}):
            r = c.post("/v1/silences", json=bad)
            assert r.status_code == 400, (bad, r.text)
        r = c.post("/v1/silences", json={"matchers": {"a": "b"}, "duration_s": 60})
        assert r.status_code == 201
        silence_id = r.json()["id"]
        assert c.delete(f"/v1/silences/{silence_id}").status_code == 200
        assert c.delete(f"/v1/silences/{silence_id}").status_code == 404
        assert c.get(f"/v1/silences/{silence_id}").status_code == 405


def _promtool() -> str | None:
    path = shutil.which("promtool")
    if path is None and os.environ.get("CI") == "true":
        pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
    if path is None:
        pytest.skip("promtool not installed (CI installs it)")
    return path


def test_exported_rules_pass_promtool(tmp_path):
    promtool = _promtool()
    out = tmp_path / "rules.yml"
    subprocess.run([*STEADYSERVE, "export", "prometheus-rules", "--out", str(out)], check=True,
                   timeout=30, cwd=tmp_path)
    check = subprocess.run([promtool, "check", "rules", str(out)], capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert b"SUCCESS" in check.stdout


def test_metrics_parse_and_pass_promtool(serve):
    gw = serve([str(HERE / "services" / "echo.py") + ":Echo", "--replicas", "2"])
    with gw.client() as c:
        c.post("/v1/deployments/echo/upper", json={"texts": ["a"]})
        text = c.get("/metrics").text
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"steadyserve_requests", "steadyserve_event_loop_lag_seconds",
            "steadyserve_admission_limit", "steadyserve_replica_batch_size"} <= families
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=60)
    problems = check.stdout.decode() + check.stderr.decode()
    assert check.returncode == 0, problems
