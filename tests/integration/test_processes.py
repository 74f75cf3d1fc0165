"""Real processes: a gateway and its replica processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ECHO, HERE, STEADYSERVE, start

pytestmark = [pytest.mark.integration]


def test_two_replicas_serve_and_share_the_load(serve):
    gw = serve([ECHO, "--replicas", "2"])
    with gw.client() as c:
        pids = {c.post("/v1/deployments/echo/echo", json={"text": "hi"}).json()["pid"]
                for _ in range(40)}
        assert pids == set(gw.replica_pids())
        assert c.post("/v1/deployments/echo/upper", json={"texts": ["a", "b"]}).json() == ["A", "B"]
        r = c.post("/v1/deployments/echo/echo", json={"text": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "text"
        metrics = c.get("/metrics").text
    families = {f.name for f in text_string_to_metric_families(metrics)}
    assert {"steadyserve_requests", "steadyserve_replicas", "steadyserve_replica_batch_size",
            "steadyserve_replica_queue_depth"} <= families
    status = gw.status("echo")
    assert [r["state"] for r in status["replicas"]] == ["ready", "ready"]


def test_kill_9_a_replica_under_load_loses_no_request_and_it_comes_back(serve):
    gw = serve([ECHO, "--replicas", "2"])
    errors: list[str] = []
    done = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal done
        with gw.client(timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/deployments/echo/slow", json={"seconds": 0.01})
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                done += 1

    # below capacity (1.5 concurrent on 2 replicas): this test is about crashes, not overload
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = gw.status("echo")["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    back = None
    while time.monotonic() < deadline:
        replica = gw.status("echo")["replicas"][0]
        if replica["state"] == "ready" and replica["pid"] != victim["pid"]:
            back = replica
            break
        time.sleep(0.1)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(15)
    assert back is not None, "the killed replica was not restarted and ready within 20 s"
    assert back["restarts"] == 1 and back["last_exit_code"] == -signal.SIGKILL
    assert errors == [], errors[:5]
    assert done > 50
    with gw.client() as c:  # and the restarted replica serves again
        pids = {c.post("/v1/deployments/echo/echo", json={"text": "x"}).json()["pid"]
                for _ in range(30)}
    assert back["pid"] in pids


def test_sigterm_drains_in_flight_requests_and_leaves_no_child(serve):
    gw = serve([ECHO, "--replicas", "2"])
    result: dict[str, object] = {}

    def slow_call() -> None:
        with gw.client() as c:
            result["response"] = c.post("/v1/deployments/echo/slow", json={"seconds": 1.0})

    t = threading.Thread(target=slow_call)
    t.start()
    time.sleep(0.3)
    children = gw.replica_pids()
    assert len(children) == 2
    leftover = gw.stop(signal.SIGTERM)
    t.join(10)
    assert leftover == []
    # uvicorn re-raises the captured SIGTERM after a clean shutdown, as a service manager expects
    assert gw.proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in gw.log.read_text()
    response = result["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200


def test_ctrl_c_stops_everything(serve):
    gw = serve([ECHO, "--replicas", "2"])
    assert gw.stop(signal.SIGINT) == []


def test_replicas_die_with_a_gateway_killed_by_sigkill(serve):
    gw = serve([ECHO, "--replicas", "2"])
    children = gw.replica_pids()
    gw.proc.kill()
    gw.proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_exists(p) for p in children):
        time.sleep(0.05)
    assert not any(_exists(p) for p in children)


def _exists(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_toml_file_declares_several_deployments(serve, tmp_path):
    (tmp_path / "steadyserve.toml").write_text(f"""
[gateway]
max_body_bytes = 4096

[deployments.echo]
service = "{ECHO}"
replicas = 1

[deployments.other]
service = "{HERE / 'services' / 'echo.py'}:Other"
replicas = 1
balancer = "round_robin"
""")
    gw = serve([])
    with gw.client() as c:
        assert c.post("/v1/deployments/other/ping", json={}).json() == "pong"
        assert c.post("/v1/deployments/echo/echo", json={"text": "x"}).status_code == 200
        assert c.post("/v1/deployments/echo/echo", json={"text": "x" * 5000}).status_code == 413
        assert sorted(m["id"] for m in c.get("/v1/models").json()["data"]) == ["echo", "other"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nofile.py:Echo"], "service file not found"),
        ([ECHO.replace(":Echo", ":Missing")], "is not a steadyserve.Service subclass"),
        (["--config", "missing.toml"], "config file not found"),
        ([ECHO, "--replicas", "0"], "replicas must be >= 1"),
    ],
    ids=["no-file", "no-class", "no-config", "zero-replicas"],
)
def test_bad_configuration_exits_with_a_clear_message(tmp_path, args, message):
    if "missing.toml" not in args and "--replicas" not in args:
        # a bad service is found by the replica; the gateway keeps restarting it with backoff
        running = start(args, tmp_path)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and message not in running.log.read_text():
                time.sleep(0.2)
            assert message in running.log.read_text()
            r = httpx.get(f"{running.url}/readyz", timeout=2)
            assert r.status_code == 503
        finally:
            assert running.stop() == []
        return
    proc = subprocess.run([*STEADYSERVE, "run", *args], cwd=tmp_path, capture_output=True,
                          timeout=30, env={**os.environ})
    assert proc.returncode == 3
    assert message in proc.stderr.decode()


def test_help_and_version():
    out = subprocess.run([*STEADYSERVE, "run", "--help"], capture_output=True, timeout=30, check=True)
    assert b"--replicas" in out.stdout and b"steadyserve.toml" in out.stdout
    out = subprocess.run([sys.executable, "-m", "steadyserve.cli.main", "--version"],
                         capture_output=True, timeout=30, check=True)
    assert out.stdout.startswith(b"steadyserve ")
