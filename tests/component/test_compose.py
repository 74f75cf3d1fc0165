"""Composition in process: handles from sync and async handlers, the parent's request id,
deadline and credential travel to the child; a loop is cut at max_call_depth; a sync
self-call with one replica is refused at once; a child never goes back to its caller; a
cancelled parent cancels its child; gather with and without partial results; a replica acts
only towards the deployments its own declares, for the requests it was sent."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Any

import httpx

import steadyserve
from steadyserve.config import ResilienceConfig
from steadyserve.replica.children import budget_for

from .conftest import HangingUp, admin_headers
from .test_access import make_key


class Back(steadyserve.Service):
    def setup(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.started = 0
        self.finished = 0
        self.cancelled_at: float | None = None

    @steadyserve.handler
    async def double(self, x: int) -> dict[str, Any]:
        from steadyserve.observe.logs import REQUEST_ID

        self.seen.append({"request_id": REQUEST_ID.get(), "x": x})
        return {"y": 2 * x}

    @steadyserve.handler
    async def slow(self, seconds: float) -> str:
        self.started += 1
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled_at = time.monotonic()
            raise
        self.finished += 1
        return "done"

    @steadyserve.handler
    def fail(self) -> None:
        raise RuntimeError("back fell over")

    @steadyserve.handler(batch=True, max_batch_size=16)
    def upper(self, texts: list[str]) -> list[str]:
        self.batches = [*getattr(self, "batches", []), len(texts)]
        time.sleep(0.02)  # while it computes, the next callers' items gather
        return [t.upper() for t in texts]


class Front(steadyserve.Service):
    @steadyserve.handler
    def sync_pipeline(self, x: int) -> dict[str, Any]:
        back = self.deployment("back")
        first = back.double(x=x)["y"]
        return {"y": back.double(x=first)["y"]}

    @steadyserve.handler
    async def async_pipeline(self, x: int) -> dict[str, Any]:
        return await self.deployment("back").double.acall(x=x)

    @steadyserve.handler
    async def many(self, n: int) -> int:
        back = self.deployment("back")
        return sum([(await back.double.acall(x=i))["y"] for i in range(n)])

    @steadyserve.handler
    async def wait_on_slow(self, seconds: float) -> str:
        return str(await self.deployment("back").slow.acall(seconds=seconds))

    @steadyserve.handler
    async def fan_out(self, x: int, partial: bool = False) -> dict[str, Any]:
        back = self.deployment("back")
        got = await steadyserve.gather({"a": back.double.prepare(x=x),
                                        "b": back.fail.prepare()}, partial=partial)
        return {"a": got["a"], "b": "failed: " + got["b"].error.code
                if isinstance(got["b"], steadyserve.Failed) else got["b"]}

    @steadyserve.handler
    async def shout(self, text: str) -> str:
        return str((await self.deployment("back").upper.acall(texts=[text]))[0])

    @steadyserve.handler
    def sync_fan_out(self, x: int) -> dict[str, Any]:
        back = self.deployment("back")
        got = self.gather({"a": back.double.prepare(x=x), "b": back.double.prepare(x=x + 1)})
        return {"a": got["a"]["y"], "b": got["b"]["y"]}


class Loop(steadyserve.Service):
    @steadyserve.handler
    async def recurse(self, n: int) -> int:
        return int(await self.deployment("loop").recurse.acall(n=n + 1))

    @steadyserve.handler
    def sync_self(self) -> str:
        return str(self.deployment("loop").recurse(n=0))


FRONT_BACK = {"front": (Front, 1), "back": (Back, 1)}
FRONT_CALLS_BACK = {"front": ("back",)}
LOOP_CALLS_ITSELF = {"loop": ("loop",)}


def backs(deployments: dict) -> list[Back]:
    return [app.service for app in deployments["back"].apps.values()]


async def test_sync_and_async_handles_carry_the_request_id(make_gateway: Any) -> None:
    _, client, deployments = await make_gateway(FRONT_BACK, calls=FRONT_CALLS_BACK)
    r = await client.post("/v1/deployments/front/sync_pipeline", json={"x": 3},
                          headers={"x-request-id": "parent-1"})
    assert r.status_code == 200 and r.json() == {"y": 12}, r.text
    assert [s["request_id"] for s in backs(deployments)[0].seen] == ["parent-1.1", "parent-1.2"]
    r = await client.post("/v1/deployments/front/async_pipeline", json={"x": 5})
    assert r.json() == {"y": 10}, r.text
    status = (await client.get("/v1/deployments/back")).json()
    assert status["child_calls"]["double"]["calls"] == 3
    assert status["child_calls"]["double"]["max_depth"] == 1
    assert "calls" not in status  # back declares none; front's status says what it may call
    assert (await client.get("/v1/deployments/front")).json()["calls"] == ["back"]


async def test_the_childs_deadline_is_what_is_left_of_the_parents(make_gateway: Any) -> None:
    _, client, _ = await make_gateway(FRONT_BACK, calls=FRONT_CALLS_BACK)
    started = time.monotonic()
    r = await client.post("/v1/deployments/front/wait_on_slow", json={"seconds": 5},
                          headers={"x-request-timeout-ms": "300"})
    took = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert took < 2, took  # the child's budget was the parent's, not its own 60 s


async def test_a_loop_is_cut_at_max_call_depth(make_gateway: Any) -> None:
    _, client, _ = await make_gateway({"loop": (Loop, 2)}, calls=LOOP_CALLS_ITSELF,
                                      max_call_depth=4)
    r = await client.post("/v1/deployments/loop/recurse", json={"n": 0})
    assert r.status_code == 508, r.text
    assert r.json()["error"]["code"] == "loop_detected"
    assert "max_call_depth (4)" in r.json()["error"]["message"]


async def test_a_sync_self_call_with_one_replica_is_refused_at_once(make_gateway: Any) -> None:
    _, client, _ = await make_gateway({"loop": (Loop, 1)}, calls=LOOP_CALLS_ITSELF)
    started = time.monotonic()
    r = await client.post("/v1/deployments/loop/sync_self", json={})
    assert r.status_code == 508 and "would wait for itself" in r.json()["error"]["message"]
    assert time.monotonic() - started < 2


async def test_a_child_is_never_sent_back_to_its_caller(make_gateway: Any) -> None:
    gateway, client, deployments = await make_gateway({"loop": (Loop, 2)},
                                                      calls=LOOP_CALLS_ITSELF, max_call_depth=3)
    apps = deployments["loop"].apps
    order: list[str] = []
    for rid, app in apps.items():
        inner = app.__call__

        async def counting(scope: Any, receive: Any, send: Any, rid: str = rid,
                           inner: Any = inner) -> None:
            if scope.get("path", "").startswith("/invoke/"):
                order.append(rid)
            await inner(scope, receive, send)

        gateway.transport.apps[deployments["loop"].addresses[rid]] = counting
    r = await client.post("/v1/deployments/loop/recurse", json={"n": 0})
    assert r.status_code == 508
    # depth 0..3 served, the 4th refused; each hop went to the other replica
    assert len(order) == 4 and all(a != b for a, b in itertools.pairwise(order)), order


async def test_credentials_travel_and_limit_the_child(make_gateway: Any) -> None:
    gateway, client, _ = await make_gateway(FRONT_BACK, calls=FRONT_CALLS_BACK)
    h = admin_headers(gateway)
    _, token = make_key(gateway.keys, "infer", deployments=("front",))
    only_front = {"authorization": f"Bearer {token}"}
    r = await client.post("/v1/deployments/front/async_pipeline", json={"x": 1},
                          headers=only_front)
    assert r.status_code == 403 and "may not call deployment 'back'" in r.text, r.text
    r = await client.post("/v1/deployments/front/async_pipeline", json={"x": 1}, headers=h)
    assert r.status_code == 200, r.text
    # the child-call credential alone is no admin key; a forged one is refused
    child = {"authorization": f"Bearer {gateway.keys.child_token('front')}"}
    assert (await client.get("/v1/admin/keys", headers=child)).status_code == 403
    r = await client.post("/v1/deployments/back/double", json={"x": 1},
                          headers={"authorization": "Bearer ssc_forged"})
    assert r.status_code == 401


async def test_a_replica_acts_only_for_the_requests_it_was_sent(make_gateway: Any) -> None:
    """What a compromised replica of `front` can do with what it holds: its deployment's
    token and the grants of the requests sent to it — call `back` (declared) for those
    requests' keys until their deadlines, no other deployment, no other key, no deeper."""
    gateway, client, _ = await make_gateway({**FRONT_BACK, "other": (Back, 1)},
                                            calls=FRONT_CALLS_BACK, max_call_depth=3)
    user_key, _ = make_key(gateway.keys, "infer")
    admin = gateway.keys.local_admin
    assert admin is not None
    keys, now = gateway.keys, time.time()
    front = {"authorization": f"Bearer {keys.child_token('front')}"}

    async def call(target: str, headers: dict[str, str]) -> httpx.Response:
        return await client.post(f"/v1/deployments/{target}/double", json={"x": 1},
                                 headers=headers)

    grant = keys.grant("front", user_key.id, 0, 10)
    assert grant is not None
    r = await call("back", {**front, "x-steadyserve-on-behalf-of": grant})
    assert r.status_code == 200 and r.json() == {"y": 2}, r.text
    # a deployment it does not declare: refused, saying where to declare it
    r = await call("other", {**front, "x-steadyserve-on-behalf-of": grant})
    assert r.status_code == 403 and "[deployments.front] calls" in r.text, r.text
    # a deployment that declares nothing; another deployment's token with front's grant
    other = {"authorization": f"Bearer {keys.child_token('other')}"}
    r = await call("back", other)
    assert r.status_code == 403 and "declares no calls" in r.text, r.text
    r = await call("back", {**other, "x-steadyserve-on-behalf-of": grant})
    assert r.status_code == 401 and "not issued to deployment 'other'" in r.text, r.text
    back_grant = keys.grant("back", admin.id, 0, 10)
    assert back_grant is not None
    r = await call("back", {**front, "x-steadyserve-on-behalf-of": back_grant})
    assert r.status_code == 401 and "not issued to deployment 'front'" in r.text, r.text
    # a key id it made up (the admin key's), an altered depth, an expired grant
    forged = grant.replace(user_key.id, admin.id, 1)
    r = await call("back", {**front, "x-steadyserve-on-behalf-of": forged})
    assert r.status_code == 401, r.text
    fields = grant.split(".")
    shallower = ".".join([fields[0], "0" if fields[1] != "0" else "1", *fields[2:]])
    r = await call("back", {**front, "x-steadyserve-on-behalf-of": shallower})
    assert r.status_code == 401, r.text
    stale = keys.grant("front", user_key.id, 0, -60)  # its deadline and slack passed
    assert stale is not None
    r = await call("back", {**front, "x-steadyserve-on-behalf-of": stale})
    assert r.status_code == 401 and "expired" in r.text, r.text
    # the depth is the grant's: a header cannot make a deep call shallow
    deep = keys.grant("front", user_key.id, 3, 10)
    assert deep is not None
    r = await call("back", {**front, "x-steadyserve-on-behalf-of": deep,
                            "x-steadyserve-hops": "1"})
    assert r.status_code == 508, r.text
    # no grant: a call of its own (setup, a batch), with no key: only while inference is
    # open to anonymous clients anyway — once keys exist, it is refused
    r = await call("back", front)
    assert r.status_code == 401 and "needs an API key" in r.text, r.text
    # a child call may not use the job queue (a job would outlive the grant)
    r = await client.post("/v1/jobs/back/double", json={"x": 1},
                          headers={**front, "x-steadyserve-on-behalf-of": grant})
    assert r.status_code == 403 and "job queue" in r.text, r.text
    # a revoked key stops its children, grant or not
    keys.put(dataclasses.replace(user_key, revoked_at=now))
    r = await call("back", {**front, "x-steadyserve-on-behalf-of": grant})
    assert r.status_code == 401 and "no longer valid" in r.text, r.text


async def test_only_declared_callers_get_grants(make_gateway: Any) -> None:
    """A deployment that declares no calls gets no grant (and pays for no HMAC); one that
    declares them gets one per request, for the client's key."""
    gateway, client, deployments = await make_gateway(FRONT_BACK, calls=FRONT_CALLS_BACK)
    seen: dict[str, list[bytes | None]] = {"front": [], "back": []}
    for name in seen:
        for address in deployments[name].addresses.values():
            inner = gateway.transport.apps[address]

            async def spying(scope: Any, receive: Any, send: Any, inner: Any = inner,
                             name: str = name) -> None:
                if scope.get("path", "").startswith("/invoke/"):
                    seen[name].append(dict(scope["headers"]).get(b"x-steadyserve-grant"))
                await inner(scope, receive, send)

            gateway.transport.apps[address] = spying
    r = await client.post("/v1/deployments/front/async_pipeline", json={"x": 1},
                          headers=admin_headers(gateway))
    assert r.status_code == 200, r.text
    assert len(seen["front"]) == 1 and seen["front"][0] is not None
    assert seen["back"] == [None]  # back was called (by front) and declares nothing
    admin = gateway.keys.local_admin
    assert admin is not None and seen["front"][0].startswith(f"{admin.id}.0.".encode())


async def test_a_cancelled_parent_cancels_its_child(make_gateway: Any) -> None:
    gateway, _, deployments = await make_gateway(FRONT_BACK, calls=FRONT_CALLS_BACK)
    back = backs(deployments)[0]
    client = HangingUp("/v1/deployments/front/wait_on_slow", {"seconds": 10})
    task = asyncio.ensure_future(gateway(client.scope, client.receive, client.send))
    for _ in range(200):
        if back.started:
            break
        await asyncio.sleep(0.01)
    assert back.started == 1
    gone_at = time.monotonic()
    client.leave()
    await asyncio.wait_for(task, 5)
    for _ in range(100):
        if back.cancelled_at is not None:
            break
        await asyncio.sleep(0.005)
    assert back.cancelled_at is not None and back.finished == 0
    assert back.cancelled_at - gone_at < 0.1, back.cancelled_at - gone_at


async def test_gather_all_or_partial(make_gateway: Any) -> None:
    _, client, _ = await make_gateway(FRONT_BACK, calls=FRONT_CALLS_BACK)
    r = await client.post("/v1/deployments/front/fan_out", json={"x": 2})
    assert r.status_code == 500 and "back/fail" in r.json()["error"]["message"], r.text
    r = await client.post("/v1/deployments/front/fan_out", json={"x": 2, "partial": True})
    assert r.json() == {"a": {"y": 4}, "b": "failed: handler_failed"}, r.text
    r = await client.post("/v1/deployments/front/sync_fan_out", json={"x": 2})
    assert r.json() == {"a": 4, "b": 6}, r.text


def test_the_child_budget_leaves_time_for_the_hops_after_it() -> None:
    expected = {"a/x": 0.1, "b/y": 0.3}
    # the first of two hops gets what is left less the second's expected time
    assert budget_for(1.0, "a/x", ["a/x", "b/y"], 0, expected) == 0.7
    assert budget_for(1.0, "b/y", ["a/x", "b/y"], 1, expected) == 1.0  # the last: all of it
    assert budget_for(1.0, "c/z", ["a/x", "b/y"], 0, expected) == 1.0  # not the learned path
    assert budget_for(0.2, "a/x", ["a/x", "b/y"], 0, expected) < 0  # fails fast


async def test_a_plain_client_cannot_claim_to_be_a_child(make_gateway: Any) -> None:
    _, client, _ = await make_gateway({"back": (Back, 1)})
    r = await client.post("/v1/deployments/back/double", json={"x": 1},
                          headers={"x-steadyserve-hops": "99",
                                   "x-steadyserve-on-behalf-of": "someone"})
    assert r.status_code == 200, r.text  # no child credential: the headers mean nothing


async def test_concurrent_child_calls_are_batched_by_the_childs_batcher(make_gateway: Any
                                                                        ) -> None:
    # the parents' admission off: 8 at once must all reach their child calls, whatever the
    # machine's load (admission is tested elsewhere; here the child's batcher is)
    _, client, deployments = await make_gateway(FRONT_BACK, calls=FRONT_CALLS_BACK,
                                                resilience=ResilienceConfig(admission=False))
    got = await asyncio.gather(*[client.post("/v1/deployments/front/shout",
                                             json={"text": f"t{i}"}) for i in range(8)])
    assert [r.json() for r in got] == [f"T{i}" for i in range(8)]
    batches = backs(deployments)[0].batches
    assert sum(batches) == 8 and max(batches) > 1, batches  # merged, as client requests are


async def test_a_request_makes_at_most_max_child_calls_per_request(make_gateway: Any) -> None:
    """A handler calling in a loop is cut off: each request's grant serves that many calls."""
    _, client, deployments = await make_gateway(FRONT_BACK, calls=FRONT_CALLS_BACK,
                                                max_child_calls_per_request=3)
    r = await client.post("/v1/deployments/front/many", json={"n": 3})
    assert r.status_code == 200 and r.json() == 6, r.text
    r = await client.post("/v1/deployments/front/many", json={"n": 5})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_child_calls", r.text
    assert "max_child_calls_per_request" in r.text
    assert len(backs(deployments)[0].seen) == 6  # 3 + 3: the 4th call never reached back
    r = await client.post("/v1/deployments/front/many", json={"n": 2})  # a new request, anew
    assert r.status_code == 200 and r.json() == 2, r.text
