"""Two gateways sharing one PostgreSQL ([cluster]): one leads, the other follows; the leader
is SIGKILLed in the middle of a rollout while the follower serves load. The follower takes
the lease within its TTL, finishes the rollout, does not notify again the alert that was
already notified, and its clients see no error."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import HERE, Running, start
from .test_alerting import Receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE_TTL_S = 3.0
RENEW_S = 0.5


def config(data_dir: Path, pg_url: str, hook: str) -> str:
    return f"""
data_dir = "{data_dir}"
database_url = "{pg_url}"
[cluster]
enabled = true
lease_ttl_s = {LEASE_TTL_S}
renew_interval_s = {RENEW_S}
follow_interval_s = 0.5
[alerting]
evaluation_interval_s = 0.5
not_ready_for_s = 1
webhook_urls = ["{hook}"]
[deployments.echo]
service = "{HERE / 'services' / 'rollout_echo.py'}:Echo"
replicas = 1
rollout_env = ["TAG"]
[deployments.down]
service = "{HERE / 'services' / 'echo.py'}:Broken"
replicas = 1
"""


def gateway(tmp_path: Path, name: str, pg_url: str, hook: str) -> Running:
    home = tmp_path / name
    home.mkdir()
    (home / "steadyserve.toml").write_text(config(home / "state", pg_url, hook))
    return start([], home)


def wait_for(what: str, check, timeout_s: float, gw: Running) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if gw.proc.poll() is not None:
            raise AssertionError(f"gateway exited:\n{gw.log.read_text()[-4000:]}")
        try:
            if check():
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s}s\n{gw.log.read_text()[-4000:]}")


def cluster(gw: Running) -> dict:
    return httpx.get(f"{gw.url}/v1/cluster", timeout=2).json()


def echo_ready(gw: Running) -> bool:
    return httpx.get(f"{gw.url}/v1/deployments/echo", timeout=2).json()["ready_replicas"] >= 1


def new_notifications(receiver: Receiver, rule: str) -> list[dict]:
    """Webhook bodies that tell `rule` firing. Grouped by alertname and deployment, and with
    group_interval_s (5 min) and repeat_interval_s (4 h) far away, a second one within the
    test can only be a gateway telling it again."""
    return [b for b in receiver.bodies if any(
        a["labels"].get("alertname") == rule and a["status"] == "firing" for a in b["alerts"])]


def test_the_leader_dies_mid_rollout_the_follower_takes_over_with_no_client_error(
        tmp_path: Path, pg_url: str) -> None:
    receiver = Receiver()
    a = gateway(tmp_path, "a", pg_url, receiver.url)
    b: Running | None = None
    try:
        wait_for("a ready", lambda: echo_ready(a), 60, a)
        wait_for("a leads", lambda: cluster(a)["leading"], 10, a)
        b = gateway(tmp_path, "b", pg_url, receiver.url)
        wait_for("b ready", lambda: echo_ready(b), 60, b)
        follower = cluster(b)
        assert not follower["leading"] and follower["leader"] == cluster(a)["gateway_id"]
        # a follower refuses the leader's duties and says who leads
        refused = httpx.post(f"{b.url}/v1/admin/deployments/echo/rollout",
                             json={"env": {"TAG": "x"}}, headers=b.admin_headers(), timeout=5)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "not_leader"
        assert follower["leader"] in refused.json()["error"]["message"]

        # `down` never starts: the leader pages once
        wait_for("DeploymentNotReady notified",
                 lambda: new_notifications(receiver, "DeploymentNotReady"), 60, a)

        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=b.url, timeout=10) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/v1/deployments/echo/slow", json={"seconds": 0.01})
                        statuses.append(r.status_code)
                    except httpx.HTTPError as exc:
                        statuses.append(-1)
                        print("client error:", exc)
                    time.sleep(0.01)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            time.sleep(1.0)
            started = httpx.post(f"{a.url}/v1/admin/deployments/echo/rollout",
                                 json={"env": {"TAG": "v2"}}, headers=a.admin_headers(),
                                 timeout=5)
            assert started.status_code == 202, started.text
            assert started.json()["state"] == "rolling"
            a.proc.send_signal(signal.SIGKILL)  # mid-rollout, no chance to hand over
            killed_at = time.monotonic()
            a.proc.wait(10)
            wait_for("b leads", lambda: cluster(b)["leading"], LEASE_TTL_S + 5, b)
            failover_s = time.monotonic() - killed_at
            print(f"failover: b leads {failover_s:.2f}s after the leader was killed")
            assert failover_s <= LEASE_TTL_S + 2 * RENEW_S + 1.0

            def finished() -> bool:
                got = httpx.get(f"{b.url}/v1/admin/deployments/echo/rollout",
                                headers=b.admin_headers(), timeout=2).json()
                return got["state"] == "done" and got["progress"]["converged"]

            took = wait_for("b finishes the rollout", finished, 60, b)
            print(f"rollout finished by the new leader {took:.2f}s after it led")
            time.sleep(1.0)
        finally:
            stop.set()
            loader.join(15)
        done = httpx.get(f"{b.url}/v1/admin/deployments/echo/rollout",
                         headers=b.admin_headers(), timeout=5).json()
        assert (done["revision"], done["good_revision"]) == (1, 1)
        assert [r["revision"] for r in done["replicas"]] == [1]
        assert len(statuses) > 100 and set(statuses) == {200}, \
            {s: statuses.count(s) for s in set(statuses)}

        # the new leader evaluates (the alert is still firing there) but tells nobody again
        time.sleep(3.0)
        alerts = httpx.get(f"{b.url}/v1/alerts", timeout=5).json()
        assert alerts["evaluated_here"] is True
        assert any(x["rule"] == "DeploymentNotReady" and x["state"] == "firing"
                   for x in alerts["alerts"]), alerts["alerts"]
        assert len(new_notifications(receiver, "DeploymentNotReady")) == 1, receiver.bodies
    finally:
        receiver.close()
        if a.proc.poll() is None:
            a.stop()
        if b is not None:
            assert b.stop() == []
