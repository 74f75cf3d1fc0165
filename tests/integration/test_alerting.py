"""Alerting end to end: errors injected into a real deployment fire an alert, one webhook
notification arrives, the automatic restart happens and is recorded, and the history
survives a gateway restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
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
        body = httpx.get(f"{gw.url}/v1/alerts", timeout=5, headers=gw.admin_headers()).json()
        assert any(t["to_state"] == "firing" and t["rule"] == "ReplicaErrors"
                   for t in body["history"]), body
        assert any(a["action"] == "restart_replica" and a["outcome"] == "done"
                   for a in body["actions"]), body
        # run beside steadyserve.toml, as an operator would: the CLI finds the local admin key
        out = subprocess.run([*STEADYSERVE, "alerts", "--url", gw.url], capture_output=True,
                             timeout=30, check=True, cwd=tmp_path)
        assert b"restart_replica flaky-0: done" in out.stdout
        out = subprocess.run([*STEADYSERVE, "silence", "--match", "alertname=ReplicaErrors",
                              "--for", "10m", "--url", gw.url], capture_output=True, timeout=30,
                             cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.startswith(b"silence "), out.stderr
        silences = httpx.get(f"{gw.url}/v1/alerts", timeout=5,
                             headers=gw.admin_headers()).json()["silences"]
        assert silences and silences[0]["matchers"] == {"alertname": "ReplicaErrors"}
    finally:
        assert gw.stop() == []


def test_silence_api_validates_input(serve):
    gw = serve([str(HERE / "services" / "echo.py") + ":Echo"])
    with gw.client(headers=gw.admin_headers()) as c:
        for bad, param in (({}, "matchers"), ({"matchers": {}, "duration_s": 60}, "matchers"),
                           ({"matchers": {"": ""}, "duration_s": 60}, "matchers"),
                           ({"matchers": {"a": 1}, "duration_s": 60}, "matchers"),
                           ({"matchers": {"a": "b"}, "duration_s": -1}, "duration_s"),
                           ({"matchers": {"a": "b"}, "duration_s": 1e-9}, "duration_s"),
                           ({"matchers": {"a": "b"}, "duration_s": True}, "duration_s")):
            r = c.post("/v1/silences", json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["param"] == param
        r = c.post("/v1/silences", json={"matchers": {"a": "b"}, "duration_s": 60,
                                         "comment": "x" * 5000})
        assert r.status_code == 413, r.text
        r = c.post("/v1/silences", json={"matchers": {"a": "b"}, "duration_s": 60})
        assert r.status_code == 201
        silence_id = r.json()["id"]
        assert c.delete(f"/v1/silences/{silence_id}").status_code == 200
        assert c.delete(f"/v1/silences/{silence_id}").status_code == 404
        assert c.get(f"/v1/silences/{silence_id}").status_code == 405


def test_a_fresh_start_polled_on_readyz_raises_no_alert_nor_after_a_restart(tmp_path):
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[alerting]
evaluation_interval_s = 0.5
[deployments.echo]
service = "{HERE / 'services' / 'echo.py'}:Echo"
replicas = 2
""")
    for run in ("first", "restarted"):
        gw = start([], tmp_path)
        try:
            not_ready = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # a load balancer's probe, from the first moment
                try:
                    status = httpx.get(f"{gw.url}/readyz", timeout=1).status_code
                except httpx.HTTPError:
                    status = None
                not_ready += status == 503
                if status == 200:
                    break
                time.sleep(0.02)
            gw.wait_ready(60)
            for _ in range(100):  # three more seconds of probes: six evaluations
                assert httpx.get(f"{gw.url}/readyz", timeout=1).status_code == 200
                time.sleep(0.03)
            with gw.client(headers=gw.admin_headers()) as c:
                alerts = c.get("/v1/alerts").json()
                text = c.get("/metrics").text
            assert alerts["alerts"] == [], (run, not_ready, alerts["alerts"])
            # while the replicas start, DeploymentNotReady is honestly pending (for 30 s): nothing
            # else moves, nothing fires
            moves = {(t["rule"], t["to_state"]) for t in alerts["history"]}
            assert moves <= {("DeploymentNotReady", "pending"), ("DeploymentNotReady", "inactive")}, \
                (run, alerts["history"])
            assert "steadyserve_requests_total{" not in text and 'deployment="-"' not in text
            assert "steadyserve_database_up 1.0" in text
        finally:
            assert gw.stop() == []


def test_series_count_stays_constant_while_a_replica_is_killed_again_and_again(tmp_path):
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[alerting]
actions = {{ReplicaCrashLooping = []}}
[deployments.echo]
service = "{HERE / 'services' / 'echo.py'}:Echo"
replicas = 2
""")
    gw = start([], tmp_path)
    counts = []
    try:
        gw.wait_ready(60)
        with gw.client(headers=gw.admin_headers()) as c:
            for kill in range(4):  # the first round also creates what any restart adds once
                for _ in range(40):  # both replicas serve (and show their per-handler series)
                    assert c.post("/v1/deployments/echo/upper", json={"texts": ["a"]}).status_code == 200
                text = c.get("/metrics").text
                if kill:
                    counts.append(sum(len(f.samples) for f in text_string_to_metric_families(text)))
                assert "127.0.0.1:" not in text
                victim = gw.status("echo")["replicas"][0]
                os.kill(victim["pid"], signal.SIGKILL)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    replica = gw.status("echo")["replicas"][0]
                    if replica["state"] == "ready" and replica["pid"] != victim["pid"]:
                        break
                    time.sleep(0.1)
                else:
                    raise AssertionError(f"replica not back:\n{gw.log.read_text()[-3000:]}")
                gw.wait_ready(30)
    finally:
        assert gw.stop() == []
    assert counts == [counts[0]] * 3, counts


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
