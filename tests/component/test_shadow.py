"""Shadow traffic in process: a share of a deployment's requests mirrored to a candidate
deployment, answers compared and discarded, never changing what the client gets; a
candidate that is slow does not slow the client, and one over its in-flight bound is
skipped; outcomes counted in the status and the metrics; a candidate's child calls act for
the client's key."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import steadyserve
from steadyserve.auth.keyring import KeyRing

from .services import Echo
from .test_access import make_key


class Candidate(steadyserve.Service):
    """Agrees with Echo, except on "drift" (a different answer) and "slow" (late)."""

    @steadyserve.handler
    def echo(self, text: str, n: int = 1) -> dict[str, Any]:
        if text == "drift":
            return {"text": "something else"}
        if text == "slow":
            time.sleep(0.5)
        return {"text": text * n}


class PipelineCandidate(steadyserve.Service):
    """Gets Echo's answer by calling another deployment."""

    @steadyserve.handler
    async def echo(self, text: str, n: int = 1) -> dict[str, Any]:
        return await self.deployment("back").echo.acall(text=text, n=n)  # type: ignore[no-any-return]


def shadowed(gateway: Any, **changes: Any) -> None:
    d = gateway.membership.deployments["echo"]
    d.config = replace(d.config, shadow="next", **changes)


async def settle(gateway: Any) -> None:
    for _ in range(200):
        if not any(gateway.shadows.inflight.values()):
            return
        await asyncio.sleep(0.01)


async def test_mirrored_answers_are_compared_and_the_client_gets_the_primarys(make_gateway):
    gateway, client, _ = await make_gateway({"echo": (Echo, 1), "next": (Candidate, 1)})
    shadowed(gateway, shadow_share=1.0)
    for text in ("a", "b", "drift"):
        r = await client.post("/v1/deployments/echo/echo", json={"text": text})
        assert r.status_code == 200 and r.json() == {"text": text}, r.text  # the primary's
    await settle(gateway)
    status = (await client.get("/v1/deployments/echo")).json()["shadow"]
    assert status["to"] == "next" and status["counts"] == {
        "match": 2, "mismatch": 1, "error": 0, "skipped": 0}
    assert [m["distance"] for m in status["last_mismatches"]] == [None]  # shapes differ
    metrics = (await client.get("/metrics")).text
    assert 'steadyserve_shadow_requests_total{deployment="echo",outcome="match",shadow="next"} 2.0' \
        in metrics


async def test_a_slow_candidate_never_slows_the_client_and_the_bound_skips(make_gateway):
    gateway, client, _ = await make_gateway({"echo": (Echo, 1), "next": (Candidate, 1)})
    shadowed(gateway, shadow_share=1.0, shadow_max_inflight=1)
    started = time.monotonic()
    first = await client.post("/v1/deployments/echo/echo", json={"text": "slow"})
    second = await client.post("/v1/deployments/echo/echo", json={"text": "slow"})
    took = time.monotonic() - started
    assert first.status_code == second.status_code == 200
    assert took < 0.4, took  # the candidate takes 0.5 s per answer; the client waited for none
    await settle(gateway)
    counts = gateway.shadows.status(gateway.membership.deployments["echo"])["counts"]
    assert counts == {"match": 1, "mismatch": 0, "error": 0, "skipped": 1}


async def test_a_share_of_zero_mirrors_nothing_and_a_failing_candidate_is_an_error(make_gateway):
    gateway, client, _ = await make_gateway({"echo": (Echo, 1), "next": (Candidate, 1)})
    shadowed(gateway, shadow_share=0.0)
    r = await client.post("/v1/deployments/echo/echo", json={"text": "a"})
    assert r.status_code == 200
    shadowed(gateway, shadow_share=1.0)
    r = await client.post("/v1/deployments/echo/fail", json={"kind": "value"})
    assert r.status_code == 500  # the client's failure: nothing to compare, nothing mirrored
    r = await client.post("/v1/deployments/echo/upper", json={"texts": ["x"]})
    assert r.status_code == 200  # the candidate has no `upper`: counted as an error
    await settle(gateway)
    counts = gateway.shadows.status(gateway.membership.deployments["echo"])["counts"]
    assert counts == {"match": 0, "mismatch": 0, "error": 1, "skipped": 0}


async def test_a_candidates_child_calls_act_for_the_clients_key(make_gateway):
    """Keys are required: the mirrored request's grant is the client's key (it used to be
    sent keyless, and the candidate's child calls were refused: every answer an error)."""
    ring = KeyRing()
    key, token = make_key(ring, "infer")
    gateway, client, deployments = await make_gateway(
        {"echo": (Echo, 1), "next": (PipelineCandidate, 1), "back": (Echo, 1)}, keys=ring,
        calls={"next": ("back",), "back": ("echo",)})
    shadowed(gateway, shadow_share=1.0)
    grants: list[bytes] = []
    [address] = deployments["next"].addresses.values()
    inner = gateway.transport.apps[address]

    async def spying(scope: Any, receive: Any, send: Any) -> None:
        grants.append(dict(scope["headers"]).get(b"x-steadyserve-grant", b""))
        await inner(scope, receive, send)

    gateway.transport.apps[address] = spying
    for text in ("a", "b"):
        r = await client.post("/v1/deployments/echo/echo", json={"text": text},
                              headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == {"text": text}, r.text
    await settle(gateway)
    status = (await client.get("/v1/deployments/echo",
                               headers={"authorization": f"Bearer {token}"})).json()["shadow"]
    assert status["counts"] == {"match": 2, "mismatch": 0, "error": 0, "skipped": 0}, status
    assert all(g.startswith(f"{key.id}.0.".encode()) for g in grants), grants
    # a child call (3 deep) to the shadowed deployment: its copy keeps the depth
    grant = gateway.keys.grant("back", key.id, 2, 10)
    r = await client.post("/v1/deployments/echo/echo", json={"text": "c"},
                          headers={"authorization": f"Bearer {gateway.keys.child_token('back')}",
                                   "x-steadyserve-on-behalf-of": grant})
    assert r.status_code == 200, r.text
    await settle(gateway)
    assert grants[-1].startswith(f"{key.id}.3.".encode()), grants
