"""Real processes: rolling updates under load, wedged replicas restarted, poison inputs."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import httpx
import pytest

from .conftest import ECHO, HERE, STEADYSERVE

pytestmark = [pytest.mark.integration]


class Load:
    """A few client threads calling one route until stopped; records every failure."""

    def __init__(self, url: str, path: str, body: dict, threads: int = 3) -> None:
        self.errors: list[str] = []
        self.done = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(url, path, body))
                         for _ in range(threads)]

    def _run(self, url: str, path: str, body: dict) -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(path, json=body)
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                self.done += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def test_rolling_update_under_load_has_no_client_error(serve, tmp_path):
    (tmp_path / "steadyserve.toml").write_text(f"""
[deployments.echo]
service = "{ECHO}"
replicas = 2
rollout_env = ["ROLLED"]
""")
    gw = serve([])
    old_pids = {r["pid"] for r in gw.status("echo")["replicas"]}
    with Load(gw.url, "/v1/deployments/echo/slow", {"seconds": 0.005}) as load:
        time.sleep(0.5)
        out = subprocess.run(  # posts the target (202), then follows it to "done"
            [*STEADYSERVE, "rollout", "echo", "--env", "ROLLED=1", "--url", gw.url],
            capture_output=True, timeout=120, cwd=tmp_path)  # where its admin key is
        time.sleep(0.5)
    assert out.returncode == 0, out.stderr.decode()
    assert b"revision 1 of echo is serving" in out.stdout
    assert b"revision 1 rolling: target revision 1, 0/2 ready" in out.stdout  # progress lines
    assert load.errors == [], load.errors[:5]
    assert load.done > 50
    replicas = gw.status("echo")["replicas"]
    assert [r["id"] for r in replicas] == ["echo-r1-0", "echo-r1-1"]
    assert all(r["state"] == "ready" and r["revision"] == 1 for r in replicas)
    assert not ({r["pid"] for r in replicas} & old_pids)
    assert not any(_alive(p) for p in old_pids)


def test_a_broken_rollout_fails_and_the_old_replicas_keep_serving(serve, tmp_path):
    (tmp_path / "steadyserve.toml").write_text(f"""
[deployments.echo]
service = "{ECHO}"
services = ["{HERE / 'nope.py'}:Echo"]
replicas = 1
""")
    gw = serve([])
    out = subprocess.run(
        [*STEADYSERVE, "rollout", "echo", "--service", str(HERE / "nope.py") + ":Echo",
         "--url", gw.url], capture_output=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1, out.stdout.decode()
    assert b"rollout of revision 1 failed: new replica echo-r1-0 restarted 2 times" in out.stderr
    with gw.client() as c:
        assert c.post("/v1/deployments/echo/echo", json={"text": "x"}).status_code == 200
        r = c.get("/v1/admin/deployments/echo/rollout", headers=gw.admin_headers())
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["target"]["revision"]) == ("failed", 0)
    assert [r["id"] for r in gw.status("echo")["replicas"]] == ["echo-0"]


def test_a_rollout_failing_at_step_1_converges_back_with_no_failed_request(serve, tmp_path):
    (tmp_path / "steadyserve.toml").write_text(f"""
[supervisor]
ready_timeout_s = 6
drain_timeout_s = 2

[deployments.echo]
service = "{HERE / 'services' / 'rollout_echo.py'}:Echo"
replicas = 2
rollout_env = ["BREAK_AFTER_FIRST"]
""")
    gw = serve([])
    path = "/v1/admin/deployments/echo/rollout"
    with Load(gw.url, "/v1/deployments/echo/slow", {"seconds": 0.005}) as load, \
            gw.client(timeout=10) as c:
        r = c.post(path, json={"env": {"BREAK_AFTER_FIRST": "1"}}, headers=gw.admin_headers())
        assert r.status_code == 202, r.text
        assert (r.json()["revision"], r.json()["state"]) == (1, "rolling")
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = c.get(path, headers=gw.admin_headers())
            assert r.status_code == 200, r.text
            got = r.json()
            ids = sorted(x["id"] for x in got["replicas"])
            seen.append(",".join(ids))
            if got["state"] == "failed" and got["progress"]["converged"]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no convergence: {got}")
        time.sleep(0.5)
    # step 1 was reached: the first new replica served while an old one was gone
    assert any("echo-r1-0" in ids and "echo-r1-1" in ids and "echo-0" not in ids
               for ids in seen), seen
    assert "echo-r1-1 not ready after 6s" in got["reason"]
    assert (got["target"]["revision"], got["good_revision"]) == (0, 0)
    assert load.errors == [], load.errors[:5]
    assert load.done > 50
    replicas = gw.status("echo")["replicas"]
    assert sorted(x["id"] for x in replicas) == ["echo-0", "echo-1"]
    assert all(x["state"] == "ready" and x["revision"] == 0 for x in replicas)
    with gw.client() as c:
        answers = {c.post("/v1/deployments/echo/slow", json={"seconds": 0}).json()["broken_build"]
                   for _ in range(10)}
    assert answers == {""}  # only the good revision serves


def test_a_wedged_model_thread_is_detected_and_the_replica_restarted(serve, tmp_path):
    (tmp_path / "steadyserve.toml").write_text(f"""
[supervisor]
deep_health_interval_s = 0.3
deep_health_timeout_s = 0.5
unhealthy_after = 2
restart_unhealthy_after_s = 1.5

[deployments.wedge]
service = "{HERE / 'services' / 'echo.py'}:Wedge"
replicas = 2
""")
    gw = serve([])
    victim = gw.status("wedge")["replicas"][0]
    # block that replica's model thread: /readyz still answers, the deep check does not
    with httpx.Client(timeout=2) as c:
        try:
            c.post(f"http://{victim['address']}/invoke/block",
                   content=b"\x81\xa4args\x80", headers={"content-type": "application/msgpack"})
        except httpx.ReadTimeout:
            pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        replica = gw.status("wedge")["replicas"][0]
        if replica["pid"] != victim["pid"] and replica["state"] == "ready":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"wedged replica not restarted: {gw.status('wedge')}")
    assert replica["restarts"] == 1
    assert "killing replica" in gw.log.read_text()
    with gw.client() as c:  # meanwhile and after, the deployment serves
        assert c.post("/v1/deployments/wedge/echo", json={"text": "x"}).status_code == 200


def test_deadline_and_priority_headers_are_validated(serve):
    gw = serve([ECHO, "--replicas", "1"])
    with gw.client() as c:
        path = "/v1/deployments/echo/slow"
        r = c.post(path, json={"seconds": 0.5}, headers={"x-request-timeout-ms": "100"})
        assert r.status_code == 504
        assert r.elapsed.total_seconds() < 0.45
        for bad in ("abc", "-5", "0", "1e9x"):
            r = c.post(path, json={"seconds": 0}, headers={"x-request-timeout-ms": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "x-request-timeout-ms"
        r = c.post(path, json={"seconds": 0}, headers={"x-request-timeout-ms": "99999999999"})
        assert r.status_code == 200  # clamped to the gateway's ceiling, not refused
        r = c.post(path, json={"seconds": 0}, headers={"x-priority": "urgent"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-priority"
        assert c.post(path, json={"seconds": 0}, headers={"x-priority": "batch"}).status_code == 200


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
