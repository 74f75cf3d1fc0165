"""`steadyserve run --workers 2`: two processes share the port (SO_REUSEPORT); the worker
routes with the membership the gateway process pushes, forwards admin and status routes to
it (credentials checked there), and reports its metrics; an invalidation reaches every
process's cache; a killed replica costs no request in either process; a killed worker is
started again; and stopping leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import HERE, Running, start

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def fresh_connection_post(gw: Running, path: str, body: dict, **kw) -> httpx.Response:
    """A new connection per request: the kernel picks the process for each (SO_REUSEPORT)."""
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        return c.post(path, json=body, **kw)


def processes_that_served(gw: Running) -> set[str]:
    out = set()
    for line in gw.log.read_text().splitlines():
        if '"steadyserve.access"' in line:
            out.add(json.loads(line)["process"])
    return out


def metric(gw: Running, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def workers_of(gw: Running) -> list[psutil.Process]:
    return [p for p in psutil.Process(gw.proc.pid).children()
            if "spawn_main" in " ".join(p.cmdline())]


def test_two_processes_share_the_port_and_act_as_one_gateway(tmp_path: Path) -> None:
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[gateway]
workers = 2
[deployments.echo]
service = "{HERE / 'services' / 'echo.py'}:Echo"
replicas = 2
[deployments.cached]
service = "{HERE / 'services' / 'cache_echo.py'}:CacheEcho"
replicas = 1
""")
    gw = start([], tmp_path)
    try:
        gw.wait_ready(60)
        assert len(workers_of(gw)) == 1
        for _ in range(120):
            r = fresh_connection_post(gw, "/v1/deployments/echo/echo", {"text": "hi"})
            assert r.status_code == 200, r.text
        assert processes_that_served(gw) == {"gateway", "worker-1"}
        time.sleep(1.5)  # a worker reports each second
        assert metric(gw, "steadyserve_requests_total", deployment="echo", code="2xx") == 120
        assert metric(gw, "steadyserve_gateway_workers") == 2

        # admin routes land on either process and are answered by the gateway process
        for _ in range(20):
            with httpx.Client(base_url=gw.url, timeout=10) as c:
                assert c.get("/v1/admin/deployments/echo/rollout").status_code == 401
                ok = c.get("/v1/admin/deployments/echo/rollout", headers=gw.admin_headers())
                assert ok.status_code == 200 and ok.json()["deployment"] == "echo", ok.text
                listing = c.get("/v1/deployments/echo").json()
                assert [r["state"] for r in listing["replicas"]] == ["ready", "ready"]

        # an invalidation reaches every process's own cache: no stale answer after it
        seen = [fresh_connection_post(gw, "/v1/deployments/cached/echo", {"text": "a"}).json()
                for _ in range(30)]
        before = max(s["call"] for s in seen)
        r = fresh_connection_post(gw, "/v1/cache/invalidate", {"tags": ["text:a"]},
                                  headers=gw.admin_headers())
        assert r.status_code == 200, r.text
        time.sleep(0.2)
        after = [fresh_connection_post(gw, "/v1/deployments/cached/echo", {"text": "a"}).json()
                 for _ in range(30)]
        assert min(s["call"] for s in after) > before, (before, after)

        # a replica killed: both processes stop routing to it, no request fails
        victim = httpx.get(f"{gw.url}/v1/deployments/echo", timeout=5).json()["replicas"][0]
        psutil.Process(victim["pid"]).send_signal(signal.SIGKILL)
        for _ in range(100):
            r = fresh_connection_post(gw, "/v1/deployments/echo/echo", {"text": "x"})
            assert r.status_code == 200, r.text

        # a worker killed: started again; new connections are served meanwhile
        worker = workers_of(gw)[0]
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = fresh_connection_post(gw, "/v1/deployments/echo/echo", {"text": "y"})
            assert r.status_code == 200, r.text
            if workers_of(gw) and metric(gw, "steadyserve_gateway_workers") == 2:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the worker was not started again:\n{gw.log.read_text()[-3000:]}")
        served_by_new = {p.pid for p in workers_of(gw)}
        assert worker.pid not in served_by_new
    finally:
        assert gw.stop() == []


def test_a_burst_at_zero_replicas_spread_over_both_processes_is_served(tmp_path: Path) -> None:
    """Requests held in either process are served once the first replica is ready: the
    worker tells the gateway process's autoscaler at once, and gets the replica with the
    membership it pushes."""
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
[gateway]
workers = 2
[alerting]
enabled = false
[deployments.work]
service = "{HERE / 'services' / 'scaling.py'}:SlowStart"
replicas = 0
torch_threads = 1
env = {{ LOAD_S = "0.5" }}
[deployments.work.autoscale]
min_replicas = 0
max_replicas = 1
target_ongoing_requests = 8
scale_to_zero_delay_s = 600
""")
    gw = start([], tmp_path)
    try:
        deadline = time.monotonic() + 60
        while len(workers_of(gw)) < 1 or "worker 1 serving" not in gw.log.read_text():
            assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
            time.sleep(0.1)
        assert gw.status("work")["ready_replicas"] == 0

        async def burst() -> list[httpx.Response]:
            async def one() -> httpx.Response:
                async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:  # own connection
                    return await c.post("/v1/deployments/work/work", json={"seconds": 0.01})
            return await asyncio.gather(*(one() for _ in range(16)))

        replies = asyncio.run(burst())
        assert [r.status_code for r in replies] == [200] * 16, \
            [r.text for r in replies if r.status_code != 200][:3]
        assert processes_that_served(gw) == {"gateway", "worker-1"}
    finally:
        assert gw.stop() == []
