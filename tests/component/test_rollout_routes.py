"""The rollout admin routes against a real Supervisor (never started: no replica is launched,
so only what the routes validate and store is under test; the loop has its own tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from steadyserve.config import Config, DeploymentConfig
from steadyserve.control.supervisor import Supervisor
from steadyserve.gateway.app import Gateway
from steadyserve.gateway.membership import Membership
from steadyserve.gateway.transport import InProcessTransport
from steadyserve.observe.metrics import GatewayMetrics

from .conftest import admin_headers

pytestmark = pytest.mark.asyncio

PATH = "/v1/admin/deployments/risk/rollout"


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    config = Config(deployments=(DeploymentConfig(
        name="risk", service="steadyserve.examples.risk.service:RiskScorer", replicas=2,
        max_replicas=4, services=("steadyserve.examples.risk.service:RiskScorerV2",),
        rollout_env=("RISK_MODEL_TAG",)),))
    membership = Membership(config.deployments)
    metrics = GatewayMetrics()
    transport = InProcessTransport()
    supervisor = Supervisor(config, membership, transport, metrics)
    gw = Gateway(config, transport=transport, membership=membership, metrics=metrics,
                 control=supervisor)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gw),
                                 base_url="http://127.0.0.1") as client:
        yield gw, client


async def _unchanged(gw: Gateway, client: httpx.AsyncClient) -> None:
    r = await client.get(PATH, headers=admin_headers(gw))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["revision"], body["state"], body["good_revision"]) == (0, "done", 0)
    assert body["target"] == {
        "revision": 0, "service": "steadyserve.examples.risk.service:RiskScorer",
        "replicas": 2, "balancer": "power_of_two", "torch_threads": None, "env": {},
        "max_connections_per_replica": 256}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"replicas": True}, "replicas", id="bool"),
        pytest.param({"replicas": 1.5}, "replicas", id="float"),
        pytest.param({"replicas": 1000}, "replicas", id="over-max-replicas"),
        pytest.param({"service": "/some/file.py:Cls"}, "service", id="file-path"),
        pytest.param({"service": "antigravity:Fly"}, "service", id="unlisted-module"),
        pytest.param({"env": {"PYTHONWARNINGS": "ignore::antigravity.x",
                              "BROWSER": "sh -c 'id > FILE' %s"}}, "env.PYTHONWARNINGS",
                     id="unlisted-env-keys"),
        pytest.param({"env": {"RISK_MODEL_TAG": "a\u0000b"}}, "env.RISK_MODEL_TAG", id="env-nul"),
        pytest.param({"torch_threads": 0}, "torch_threads", id="threads"),
        pytest.param({"balancer": "fastest"}, "balancer", id="balancer"),
        pytest.param({"replicas": 1, "colour": "red"}, "colour", id="unknown-field"),
        pytest.param({"replicas": 1, "service": "/tmp/x.py:C"}, "service",
                     id="a-valid-field-does-not-save-an-invalid-one"),
    ],
)
async def test_a_refused_rollout_is_a_400_naming_the_field_and_changes_nothing(
        gateway: tuple[Gateway, httpx.AsyncClient], body: dict[str, Any], param: str) -> None:
    gw, client = gateway
    r = await client.post(PATH, json=body, headers=admin_headers(gw))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert "antigravity" not in error["message"] and "/some/file" not in error["message"]
    await _unchanged(gw, client)


async def test_the_service_refusal_lists_the_allowed_targets(
        gateway: tuple[Gateway, httpx.AsyncClient]) -> None:
    gw, client = gateway
    r = await client.post(PATH, json={"service": "x.py:Y"}, headers=admin_headers(gw))
    assert r.status_code == 400
    assert "RiskScorerV2" in r.json()["error"]["message"]


async def test_a_body_that_is_not_an_object_is_refused(
        gateway: tuple[Gateway, httpx.AsyncClient]) -> None:
    gw, client = gateway
    r = await client.post(PATH, json=[1, 2], headers=admin_headers(gw))
    assert r.status_code == 400, r.text
    await _unchanged(gw, client)


async def test_start_answers_202_then_409_while_rolling_and_cancel_goes_back(
        gateway: tuple[Gateway, httpx.AsyncClient]) -> None:
    gw, client = gateway
    h = admin_headers(gw)
    r = await client.post(PATH, json={"replicas": 3, "env": {"RISK_MODEL_TAG": "v2"},
                                      "balancer": "round_robin"}, headers=h)
    assert r.status_code == 202, r.text
    started = r.json()
    assert (started["revision"], started["state"]) == (1, "rolling")
    assert started["target"]["replicas"] == 3 and started["target"]["env"] == {"RISK_MODEL_TAG": "v2"}
    assert gw.membership.deployments["risk"].config.balancer == "round_robin"

    r = await client.get(PATH, headers=h)
    assert r.status_code == 200
    got = r.json()
    assert (got["revision"], got["state"], got["good_revision"]) == (1, "rolling", 0)
    assert got["progress"] == {"desired": 3, "updated": 0, "ready": 0, "old": 2, "draining": 0,
                               "converged": False}

    r = await client.post(PATH, json={"replicas": 1}, headers=h)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "conflict"

    r = await client.delete(PATH, headers=h)
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert (cancelled["state"], cancelled["revision"]) == ("cancelled", 1)
    assert cancelled["target"]["revision"] == 0 and cancelled["target"]["replicas"] == 2
    assert gw.membership.deployments["risk"].config.balancer == "power_of_two"

    r = await client.delete(PATH, headers=h)
    assert r.status_code == 409, r.text

    r = await client.post(PATH, json={}, headers=h)  # a restart of every replica, revision 2
    assert r.status_code == 202, r.text
    assert r.json()["revision"] == 2


async def test_an_unknown_deployment_is_a_404(gateway: tuple[Gateway, httpx.AsyncClient]) -> None:
    gw, client = gateway
    h = admin_headers(gw)
    for method in ("GET", "DELETE"):
        r = await client.request(method, "/v1/admin/deployments/nope/rollout", headers=h)
        assert r.status_code == 404, r.text
    r = await client.post("/v1/admin/deployments/nope/rollout", json={}, headers=h)
    assert r.status_code == 404, r.text
