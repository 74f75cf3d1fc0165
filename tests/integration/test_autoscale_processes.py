"""Autoscaling with real processes: a burst against a deployment at zero is held and served,
a failed scale-up answers 503 with the reason, and a load step up and back down is followed
without a client error while replicas drain."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from steadyserve.testing.load import run_load

from .conftest import HERE, STEADYSERVE, Running

pytestmark = [pytest.mark.integration]

SERVICES = HERE / "services" / "scaling.py"


def config(tmp_path: Path, service: str, autoscale: str, *, replicas: int = 0,
           env: str = "") -> None:
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[alerting]
enabled = false
[deployments.work]
service = "{SERVICES}:{service}"
replicas = {replicas}
torch_threads = 1
{env}
[deployments.work.autoscale]
{autoscale}
""")


def autoscale_status(gw: Running) -> dict:
    return gw.status("work")["autoscale"]


def wait_for(predicate, timeout_s: float, what: str, gw: Running) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout_s}s: {gw.status('work')}\n"
                         f"{gw.log.read_text()[-3000:]}")


def test_a_burst_at_zero_is_held_and_served_then_it_scales_back_to_zero(serve, tmp_path):
    load_s = 1.0
    config(tmp_path, "SlowStart", """
min_replicas = 0
max_replicas = 2
target_ongoing_requests = 8
stable_window_s = 2
panic_window_s = 1
scale_to_zero_delay_s = 2
""", env=f'env = {{ LOAD_S = "{load_s}" }}')
    gw = serve([])
    assert gw.status("work")["ready_replicas"] == 0 and gw.replica_pids() == []
    assert httpx.get(f"{gw.url}/readyz", timeout=2).status_code == 200  # at zero on purpose

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            return await asyncio.gather(*(
                c.post("/v1/deployments/work/work", json={"seconds": 0.01}) for _ in range(30)))

    started = time.monotonic()
    replies = asyncio.run(burst())
    took = time.monotonic() - started
    assert [r.status_code for r in replies] == [200] * 30, [r.text for r in replies if
                                                            r.status_code != 200][:3]
    # the replica's load time, plus process start and import, plus the queue of 30 requests
    assert took < load_s + 15
    events = autoscale_status(gw)["events"]
    assert events[-1]["reason"].startswith("scale from zero") and events[-1]["from"] == 0
    shown = subprocess.run([*STEADYSERVE, "status", "--url", gw.url], capture_output=True,
                           text=True, timeout=30, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "autoscale 0..2 replicas, target 8 ongoing each" in shown.stdout
    assert "0 -> " in shown.stdout and "scale from zero" in shown.stdout
    # idle: back to zero after the 2 s stable window and the 2 s delay
    wait_for(lambda: gw.status("work")["desired_replicas"] == 0 and not gw.replica_pids(),
             30, "scale to zero", gw)
    assert autoscale_status(gw)["events"][0]["to"] == 0
    metrics = httpx.get(f"{gw.url}/metrics", timeout=5).text
    assert 'steadyserve_autoscale_decisions_total{deployment="work",direction="down"}' in metrics


def test_a_failed_scale_up_answers_503_with_the_reason(serve, tmp_path):
    config(tmp_path, "BrokenStart", """
min_replicas = 0
max_replicas = 1
activation_timeout_s = 20
""")
    gw = serve([])
    started = time.monotonic()
    r = httpx.post(f"{gw.url}/v1/deployments/work/work", json={}, timeout=30)
    assert r.status_code == 503, r.text
    assert time.monotonic() - started < 15  # told when the start failed, not at the timeout
    assert int(r.headers["retry-after"]) >= 1
    error = r.json()["error"]
    assert error["code"] == "activation_failed"
    assert "starting one failed" in error["message"] and "while starting" in error["message"]
    assert gw.proc.poll() is None


@pytest.mark.slow
def test_a_load_step_is_followed_up_and_down_without_a_client_error(serve, tmp_path):
    config(tmp_path, "SlowStart", """
min_replicas = 1
max_replicas = 3
target_ongoing_requests = 0.5
upscale_delay_s = 1
downscale_delay_s = 3
stable_window_s = 3
panic_window_s = 1
""", replicas=1, env='env = { LOAD_S = "0.2" }')
    gw = serve([])

    async def step() -> tuple:
        url = f"{gw.url}/v1/deployments/work/work"
        t0 = time.monotonic() + 0.2
        body = {"seconds": 0.05}  # one replica does 20/s
        # 6/s ≈ 0.3 ongoing (1 replica); 24/s ≈ 1.2 (3 replicas); back to 6/s
        low = await run_load(url, 6, 4, body_fn=lambda i: body, t0=t0, timeout_s=10)
        high = await run_load(url, 24, 10, body_fn=lambda i: body, t0=t0 + 4, timeout_s=10)
        peak = gw.status("work")["desired_replicas"]
        after = await run_load(url, 6, 14, body_fn=lambda i: body, t0=t0 + 14, timeout_s=10)
        return low, high, peak, after

    low, high, peak, after = asyncio.run(step())
    assert low.error_count() == 0, low.errors()
    # the step is over one replica's capacity until the new ones are ready: anything refused
    # meanwhile is a 503 overloaded with Retry-After, and a little of it at most
    assert set(high.error_codes()) <= {"overloaded"}, high.errors()
    assert high.error_count() <= high.total * 0.1, high.report()
    assert peak >= 2, gw.status("work")
    assert after.error_count() == 0, (after.errors(), after.error_codes())  # while draining
    wait_for(lambda: gw.status("work")["desired_replicas"] == 1
             and len(gw.status("work")["replicas"]) == 1, 20, "scale back down", gw)
    directions = [e["direction"] for e in reversed(autoscale_status(gw)["events"])]
    assert directions[0] == "up" and directions[-1] == "down", directions
