"""Canaries in process: the admin API starts, shows and aborts one; requests split by a
sticky key; a failing candidate's request is answered by the baseline; the controller (fake
clock, ticked by hand) rolls a worse candidate back and promotes a good one, and the split
follows at once."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import httpx
import pytest

import steadyserve
from steadyserve.config import CanaryConfig, Config, DeploymentConfig
from steadyserve.control.canary import CanaryController

from .conftest import admin_headers
from .services import Echo

PATH = "/v1/admin/deployments/echo/canary"


class Candidate(steadyserve.Service):
    """Echo's candidate: the same answers, or a server error for "bad" input."""

    @steadyserve.handler
    def echo(self, text: str, n: int = 1) -> dict[str, Any]:
        if text.startswith("bad"):
            raise ValueError("the candidate breaks")
        return {"text": text * n, "by": "candidate"}

    @steadyserve.handler(idempotent=False)
    def charge(self, amount: float) -> dict[str, float]:
        raise ValueError("the candidate cannot charge")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def canaried(make_gateway: Any, **rules: Any) -> tuple[Any, httpx.AsyncClient, Clock]:
    gateway, client, _ = await make_gateway({"echo": (Echo, 1), "next": (Candidate, 1)})
    canary = CanaryConfig(**{"deployment": "next", "steps": (10.0, 50.0), "min_samples": 50,
                             "min_step_s": 0.0, **rules})
    config = Config(deployments=(DeploymentConfig(name="echo", service="x:Y", canary=canary),
                                 DeploymentConfig(name="next", service="x:Z")))
    d = gateway.membership.deployments["echo"]
    d.config = replace(d.config, canary=canary)
    clock = Clock()
    gateway.canaries = CanaryController(config, gateway.splits, wall=clock, clock=clock,
                                        salt=lambda: "fixed")
    return gateway, client, clock


async def send(client: httpx.AsyncClient, n: int, text: str = "a", **headers: str
               ) -> list[str]:
    served = []
    for i in range(n):
        r = await client.post("/v1/deployments/echo/echo", json={"text": text},
                              headers={"x-request-id": f"req-{text}-{i}", **headers})
        assert r.status_code == 200, r.text
        served.append(r.json().get("by", "baseline"))
    return served


async def test_the_api_starts_shows_and_aborts_a_canary(make_gateway: Any) -> None:
    gateway, client, _ = await canaried(make_gateway)
    h = admin_headers(gateway)
    assert (await client.post(PATH)).status_code == 401  # a credential, always
    r = await client.get(PATH, headers=h)
    assert r.status_code == 200 and r.json()["state"] == "idle", r.text
    r = await client.post(PATH, headers=h)
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    assert r.json()["percent"] == 10.0 and r.json()["history"][0]["action"] == "start"
    r = await client.post(PATH, headers=h)
    assert r.status_code == 409 and "running" in r.json()["error"]["message"], r.text
    status = (await client.get("/v1/deployments/echo")).json()["canary"]
    assert status["state"] == "running" and status["candidate"] == "next"
    r = await client.delete(PATH, headers=h)
    assert r.status_code == 200 and r.json()["state"] == "rolled_back", r.text
    assert "aborted by" in r.json()["reason"]
    assert gateway.splits.get("echo") is None  # the baseline serves everything again
    assert (await client.delete(PATH, headers=h)).status_code == 409
    r = await client.post("/v1/admin/deployments/next/canary", headers=h)
    assert r.status_code == 404 and "declares no canary" in r.json()["error"]["message"]
    r = await client.post("/v1/admin/deployments/nope/canary", headers=h)
    assert r.status_code == 404


async def test_requests_split_by_a_sticky_key(make_gateway: Any) -> None:
    gateway, client, _ = await canaried(make_gateway)
    await client.post(PATH, headers=admin_headers(gateway))
    served = await send(client, 400)  # no sticky key: each request id is drawn afresh
    share = served.count("candidate") / len(served)
    assert 0.04 < share < 0.18, share
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):  # one user, one arm, every time
        arms = set(await send(client, 5, **{"x-session-id": user}))
        assert len(arms) == 1, (user, arms)
    huge = await send(client, 2, **{"x-user-id": "x" * 8000})  # bounded, still served
    assert len(set(huge)) == 1


async def test_a_failing_candidate_is_answered_by_the_baseline(make_gateway: Any) -> None:
    gateway, client, _ = await canaried(make_gateway, steps=(100.0,))
    await client.post(PATH, headers=admin_headers(gateway))
    served = await send(client, 5, text="bad")  # every one to the candidate, which fails
    assert served == ["baseline"] * 5
    tally = gateway.splits.observations.tally("echo", gateway.splits.get("echo").epoch,
                                              "candidate")
    assert tally.errors == 5 and tally.failovers == 5
    # a handler that is not idempotent is never sent twice: the candidate's error stands
    r = await client.post("/v1/deployments/echo/charge", json={"amount": 1.0})
    assert r.status_code >= 500, r.text


async def test_a_worse_candidate_is_rolled_back_and_the_split_goes(make_gateway: Any) -> None:
    gateway, client, clock = await canaried(make_gateway, min_samples=30, error_margin=0.05)
    await client.post(PATH, headers=admin_headers(gateway))
    await send(client, 200)
    await send(client, 40, text="bad-")  # ~10 % of them to the candidate, which fails
    for i in range(200):  # 40 users, half the answers of them fail at the candidate
        r = await client.post("/v1/deployments/echo/echo", json={"text": "bad" if i % 2 else "ok"},
                              headers={"x-session-id": f"s{i % 40}"})
        assert r.status_code == 200, r.text
    controller = gateway.canaries
    clock.t += 5
    controller.tick()
    status = controller.status("echo")
    assert status["state"] == "rolled_back", status
    assert "errors" in status["reason"], status["reason"]
    assert status["history"][-1]["action"] == "rollback"
    assert status["history"][-1]["checks"]  # the evidence it acted on
    assert gateway.splits.get("echo") is None
    assert set(await send(client, 50)) == {"baseline"}


async def test_a_good_candidate_advances_then_is_promoted(make_gateway: Any) -> None:
    gateway, client, clock = await canaried(make_gateway, latency_margin=5.0,
                                            error_margin=0.1)
    await client.post(PATH, headers=admin_headers(gateway))
    controller = gateway.canaries
    for expected in ("running", "promoted"):
        epoch = gateway.splits.get("echo").epoch
        while min(controller.plans["echo"].cand.n, controller.plans["echo"].base.n) < 50:
            await send(client, 50)
            controller.merge(gateway.splits.observations.take())
        clock.t += 5
        controller.tick()
        assert controller.status("echo")["state"] == expected, controller.status("echo")
        assert gateway.splits.get("echo").epoch > epoch  # a new step: fresh evidence
    assert gateway.splits.get("echo").percent == 100.0
    assert set(await send(client, 20)) == {"candidate"}
    actions = [h["action"] for h in controller.status("echo")["history"]]
    assert actions == ["start", "advance", "promote"]


@pytest.mark.parametrize("rows", [None, "x", [[1, 2]], [["echo", "e", "candidate", 1, 0, [],
                                                          0, 0]],
                                  [["echo", 1, "nobody", 1, 0, [], 0, 0]],
                                  [["echo", 1, "candidate", 1, 0, ["x"], 0, 0]]])
async def test_malformed_worker_rows_are_dropped(make_gateway: Any, rows: Any) -> None:
    gateway, client, _ = await canaried(make_gateway)
    await client.post(PATH, headers=admin_headers(gateway))
    gateway.canaries.merge(rows)
    plan = gateway.canaries.plans["echo"]
    assert plan.cand.n == 0 and plan.base.n == 0


async def test_a_workers_split_and_report_travel_on_the_wire(make_gateway: Any) -> None:
    from steadyserve.gateway.canary import Splits

    gateway, client, _ = await canaried(make_gateway)
    await client.post(PATH, headers=admin_headers(gateway))
    worker = Splits()  # what a data-plane worker holds
    worker.apply_wire({**gateway.splits.to_wire(), "bad": {"percent": "x"}})
    assert worker.get("echo") == gateway.splits.get("echo") and worker.get("bad") is None
    split = worker.get("echo")
    worker.observations.observe("echo", split.epoch, "candidate", 0.01, False)
    worker.observations.observe("echo", split.epoch, "baseline", None, True)
    gateway.canaries.merge(worker.observations.take())  # its report
    plan = gateway.canaries.plans["echo"]
    assert (plan.cand.n, plan.base.n, plan.base.errors) == (1, 1, 1)
    assert worker.observations.take() == []  # taken once
    gateway.canaries.abort("echo")
    worker.apply_wire(gateway.splits.to_wire())
    assert worker.get("echo") is None


async def test_the_dashboard_shows_the_canary_and_its_evidence(make_gateway: Any) -> None:
    gateway, client, clock = await canaried(make_gateway, min_samples=5)
    r = await client.get("/v1/dashboard")
    shown = next(d for d in r.json()["deployments"] if d["name"] == "echo")["canary"]
    assert shown["state"] == "idle" and shown["checks"] == []
    await client.post(PATH, headers=admin_headers(gateway))
    await send(client, 120)
    clock.t += 1
    gateway.canaries.tick()
    body = (await client.get("/v1/dashboard")).json()
    shown = next(d for d in body["deployments"] if d["name"] == "echo")["canary"]
    assert shown["state"] == "running" and shown["percent"] == 10.0
    assert {c["metric"] for c in shown["checks"]} == {"errors", "latency", "quality"}
    assert shown["verdict"] and shown["history"][0]["action"] == "start"
    assert next(d for d in body["deployments"] if d["name"] == "next")["canary"] is None
