"""Replicas as Ray actors (`--backend ray`): served like local ones; an actor killed under load
is out of rotation within 2 s and replaced, with no client error; placement groups are
reserved per replica and given back; a gateway can join a cluster it did not start
(`--ray-address`) and leaves nothing behind on it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from steadyserve.testing.load import run_load, sleep_until

from .conftest import ECHO, Running, free_port, start

pytestmark = [pytest.mark.integration, pytest.mark.slow]

def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def replicas(gw: Running) -> list[dict]:
    return httpx.get(f"{gw.url}/v1/deployments/echo", timeout=5).json()["replicas"]


def actor_of(pid: int) -> psutil.Process:
    """The Ray worker process hosting the replica process `pid` (its parent)."""
    actor = psutil.Process(pid).parent()
    assert actor is not None and "ReplicaHost" in " ".join(actor.cmdline()), actor
    return actor


def test_ray_replicas_serve_and_a_killed_actor_is_replaced_with_no_client_error(serve):
    gw = serve([ECHO, "--replicas", "2", "--backend", "ray"], ready_timeout_s=120)
    before = replicas(gw)
    assert [r["state"] for r in before] == ["ready", "ready"]
    with gw.client() as c:
        pids = {c.post("/v1/deployments/echo/echo", json={"text": "hi"}).json()["pid"]
                for _ in range(30)}
    assert pids == {r["pid"] for r in before}  # both actors' replicas answer
    victim = before[0]
    actor = actor_of(victim["pid"])
    timings: dict[str, float] = {}

    async def kill_and_watch(t0: float) -> None:
        await sleep_until(t0, 2.0)
        killed = time.monotonic()
        os.kill(actor.pid, signal.SIGKILL)
        async with httpx.AsyncClient(timeout=5) as c:
            while time.monotonic() - killed < 30:
                state = {r["id"]: r for r in
                         (await c.get(f"{gw.url}/v1/deployments/echo")).json()["replicas"]}
                mine = state[victim["id"]]
                if "out" not in timings and (mine["state"] != "ready" or mine["pid"] !=
                                             victim["pid"]):
                    timings["out"] = time.monotonic() - killed
                if mine["state"] == "ready" and mine["pid"] != victim["pid"]:
                    timings["replaced"] = time.monotonic() - killed
                    return
                await asyncio.sleep(0.02)

    async def scenario():
        t0 = time.monotonic() + 0.3
        return await asyncio.gather(
            run_load(f"{gw.url}/v1/deployments/echo/echo", 50, 8,
                     body_fn=lambda i: {"text": f"r{i}"}, t0=t0),
            kill_and_watch(t0))

    result, _ = asyncio.run(scenario())
    assert result.error_count() == 0, (result.errors(), result.error_codes())
    assert timings.get("out", 99) < 2.0, timings
    assert "replaced" in timings, (timings, replicas(gw))
    print(f"ray actor killed: out of rotation in {timings['out']:.3f}s, replaced in "
          f"{timings['replaced']:.2f}s; {result.total} requests, 0 errors")
    after = {r["id"]: r for r in replicas(gw)}
    assert after[victim["id"]]["restarts"] == 1
    assert not psutil.pid_exists(victim["pid"]) or \
        psutil.Process(victim["pid"]).status() == psutil.STATUS_ZOMBIE


def test_placement_groups_are_reserved_per_replica_and_given_back(tmp_path):
    """The local cluster has 2 CPUs; two replicas each reserve a group of 2 × 0.5 CPU, so
    the cluster is full. A killed replica comes back only if its group was given back; a
    deployment whose group cannot fit fails its start with the reason, and the other one
    keeps serving."""
    (tmp_path / "steadyserve.toml").write_text(f"""
data_dir = "{tmp_path / 'state'}"
backend = "ray"
[supervisor]
ray_call_timeout_s = 5
[alerting]
enabled = false
[deployments.echo]
service = "{ECHO}"
replicas = 2
num_cpus = 0.5
placement_bundles = [{{CPU = 0.5}}, {{CPU = 0.5}}]
placement_strategy = "STRICT_PACK"
[deployments.huge]
service = "{ECHO}"
replicas = 1
num_cpus = 0.5
placement_bundles = [{{CPU = 0.5}}, {{CPU = 64}}]
""")
    gw = start([], tmp_path)
    try:
        gw.wait_ready_replicas("echo", 2, 120)  # `huge` never gets placed
        served = replicas(gw)
        for r in served:  # the replica knows its group (its actor's name)
            group = psutil.Process(r["pid"]).environ().get("STEADYSERVE_PLACEMENT_GROUP", "")
            assert group.startswith(r["id"] + "-"), group
        victim = served[0]
        os.kill(actor_of(victim["pid"]).pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = {r["id"]: r for r in replicas(gw)}[victim["id"]]
            if now["state"] == "ready" and now["pid"] != victim["pid"]:
                break
            assert time.monotonic() < deadline, (now, gw.log.read_text()[-3000:])
            time.sleep(0.2)
        with gw.client() as c:
            for _ in range(20):
                assert c.post("/v1/deployments/echo/echo", json={"text": "x"}).status_code \
                    == 200
        log = gw.log.read_text()
        assert "could not reserve the placement group of a huge replica" in log, log[-3000:]
        huge = httpx.get(f"{gw.url}/v1/deployments/huge", timeout=5).json()
        assert huge["ready_replicas"] == 0
    finally:
        assert gw.stop() == []


def test_a_gateway_joins_a_cluster_it_did_not_start_and_leaves_nothing_on_it(serve, tmp_path):
    port = free_port()
    # Ray's socket paths under it must stay within AF_UNIX's 107 bytes: not under tmp_path
    temp_dir = tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp")
    # the cluster's own credential, given to the gateway that joins it (Ray's token auth)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
         "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir],
        stdout=(tmp_path / "ray-head.log").open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, **auth})
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert head.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "ray-head.log").read_text()[-3000:]
            time.sleep(0.2)
        gw = serve([ECHO, "--replicas", "2", "--backend", "ray", "--ray-address",
                    f"127.0.0.1:{port}"], ready_timeout_s=120, env=auth)
        served = replicas(gw)
        with gw.client() as c:
            assert c.post("/v1/deployments/echo/echo", json={"text": "x"}).status_code == 200
        # the replicas live under the cluster's raylet, not under the gateway
        assert not set(gw.replica_pids()) & {r["pid"] for r in served}
        hosts = [actor_of(r["pid"]) for r in served]
        assert gw.stop() == []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
                p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in hosts):
            time.sleep(0.1)
        alive = [p.pid for p in hosts if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], "the gateway left its replica actors on the cluster"
        for r in served:
            assert not psutil.pid_exists(r["pid"]) or \
                psutil.Process(r["pid"]).status() == psutil.STATUS_ZOMBIE
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)
