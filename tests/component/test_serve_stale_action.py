"""The serve_stale automatic response: a firing alert switches a deployment's cacheable
requests to stale entries (within stale_if_error_s) without calling its replicas."""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

import steadyserve
from steadyserve.config import CacheConfig, Config, DeploymentConfig
from steadyserve.control.responder import Responder
from steadyserve.gateway.app import Gateway
from steadyserve.gateway.transport import InProcessTransport
from steadyserve.policies.actions import ActionGuard
from steadyserve.policies.alert_lifecycle import Alert
from steadyserve.testing import start_inprocess
from steadyserve.testing.clock import FakeClock


class Counted(steadyserve.Service):
    calls: ClassVar[int] = 0

    @steadyserve.handler(cache=True, cache_ttl_s=10)
    def get(self, key: str) -> dict[str, Any]:
        Counted.calls += 1
        return {"key": key, "call": Counted.calls}


def alert(deployment: str) -> Alert:
    return Alert(key="k", rule="DeploymentNotReady", labels={"deployment": deployment},
                 annotations={}, state="firing", value=0.0, description="")


async def test_serve_stale_answers_from_stale_entries_without_calling_replicas():
    clock = FakeClock(1000.0)
    config = Config(deployments=(DeploymentConfig(name="c", service="tests:Counted"),),
                    cache=CacheConfig(stale_while_revalidate_s=0, stale_if_error_s=300))
    gw = Gateway(config, transport=InProcessTransport())
    assert gw.cache is not None
    gw.cache.clock = clock
    dep = await start_inprocess(gw, "c", Counted, replicas=1)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://localhost")
    try:
        Counted.calls = 0
        url = "/v1/deployments/c/get"
        first = await client.post(url, json={"key": "a"})
        assert first.headers["x-steadyserve-cache"] == "miss"
        clock.advance(20)  # past the TTL; no stale-while-revalidate window
        again = await client.post(url, json={"key": "a"})
        assert (again.headers["x-steadyserve-cache"], Counted.calls) == ("miss", 2)

        responder = Responder(gw.controls, gw.metrics, None, ActionGuard(), None, wall=clock)
        [record] = await responder.respond(alert("c"), ("serve_stale",))
        assert record["outcome"] == "done", record
        clock.advance(20)
        stale = await client.post(url, json={"key": "a"})
        assert stale.status_code == 200
        assert stale.headers["x-steadyserve-cache"] == "stale"
        assert (stale.json()["call"], Counted.calls) == (2, 2)  # no upstream call, no refresh
        assert gw.cache.status()["serving_stale"] == {"c": 280.0}
        missing = await client.post(url, json={"key": "b"})  # nothing cached: goes upstream
        assert (missing.headers["x-steadyserve-cache"], Counted.calls) == ("miss", 3)

        clock.advance(300)  # the response ends by itself
        after = await client.post(url, json={"key": "a"})
        assert (after.headers["x-steadyserve-cache"], Counted.calls) == ("miss", 4)
    finally:
        await client.aclose()
        await dep.stop()


async def test_serve_stale_is_unavailable_without_a_cache():
    config = Config(deployments=(DeploymentConfig(name="c", service="tests:Counted"),),
                    cache=CacheConfig(enabled=False))
    gw = Gateway(config, transport=InProcessTransport())
    responder = Responder(gw.controls, gw.metrics, None, ActionGuard(), None)
    [record] = await responder.respond(alert("c"), ("serve_stale",))
    assert record["outcome"] == "unavailable"
