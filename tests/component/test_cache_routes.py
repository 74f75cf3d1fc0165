"""The gateway's response cache against in-process replicas: hits, partial batches, singleflight,
tag invalidation, stale-while-revalidate, stale-if-error, model versions, and what is never cached.

Services count their upstream calls in class-level counters (replicas are separate instances);
`reset_counters` zeroes them before each test. Time in the cache is a FakeClock put on the
gateway's ResponseCache, so expiry needs no sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest

import steadyserve
from steadyserve.auth.keyring import KeyRing
from steadyserve.config import CacheConfig
from steadyserve.gateway.app import Gateway
from steadyserve.testing import FakeClock

from .conftest import admin_headers
from .services import fake_vector
from .test_access import make_key

pytestmark = pytest.mark.asyncio

CACHE = "x-steadyserve-cache"
N_CONCURRENT = 200


class Squares(steadyserve.Service):
    calls: ClassVar[int] = 0
    uncached_calls: ClassVar[int] = 0
    rejected_calls: ClassVar[int] = 0
    gate: ClassVar[threading.Event | None] = None
    lock: ClassVar[threading.Lock] = threading.Lock()

    @steadyserve.handler(cache=True)
    def square(self, x: int, scale: float = 1.0) -> dict[str, Any]:
        with Squares.lock:
            Squares.calls += 1
        gate = Squares.gate
        if gate is not None:
            assert gate.wait(10), "test never opened the gate"
        return {"y": x * x * scale}

    @steadyserve.handler(cache=False)
    def plain(self, x: int) -> dict[str, int]:
        with Squares.lock:
            Squares.uncached_calls += 1
        return {"y": x * x}

    @steadyserve.handler(cache=True)
    def picky(self, x: int) -> dict[str, int]:
        with Squares.lock:
            Squares.rejected_calls += 1
        if x < 0:
            raise steadyserve.ClientError("x must be >= 0", param="x")
        if x == 13:
            raise ValueError("unlucky")
        return {"y": x}


class Texts(steadyserve.Service):
    batches: ClassVar[list[list[str]]] = []

    @steadyserve.handler(batch=True, max_batch_size=32, cache=True)
    def upper(self, texts: list[str]) -> list[str]:
        Texts.batches.append(list(texts))
        return [t.upper() for t in texts]


class CachedEmbedder(steadyserve.Service):
    version = "emb-1"
    batches: ClassVar[list[list[str]]] = []

    @steadyserve.handler(batch=True, max_batch_size=32, openai="embeddings", cache=True)
    def embed(self, texts: list[str]) -> list[dict[str, Any]]:
        CachedEmbedder.batches.append(list(texts))
        return [{"embedding": fake_vector(t), "tokens": len(t.split()) + 2} for t in texts]


class Accounts(steadyserve.Service):
    """Two replicas share one 'database' (the class dict); each replica records invalidations."""

    balances: ClassVar[dict[int, int]] = {}
    reads: ClassVar[int] = 0
    told: ClassVar[list[tuple[int, list[str]]]] = []

    @steadyserve.handler(cache=True, cache_tags=("account:{account_id}",))
    def balance(self, account_id: int) -> dict[str, int]:
        Accounts.reads += 1
        return {"account_id": account_id, "balance": Accounts.balances.get(account_id, 0)}

    @steadyserve.handler(idempotent=False, invalidates=("account:{account_id}",))
    def deposit(self, account_id: int, amount: int) -> dict[str, int]:
        Accounts.balances[account_id] = Accounts.balances.get(account_id, 0) + amount
        return {"balance": Accounts.balances[account_id]}

    def invalidate(self, tags: list[str]) -> None:
        Accounts.told.append((id(self), list(tags)))


class Counter(steadyserve.Service):
    """Each answer carries the upstream call number, so a refreshed value is visible."""

    calls: ClassVar[int] = 0
    gate: ClassVar[threading.Event | None] = None
    lock: ClassVar[threading.Lock] = threading.Lock()

    @steadyserve.handler(cache=True, cache_ttl_s=0.2)
    def read(self, key: str) -> dict[str, Any]:
        with Counter.lock:
            Counter.calls += 1
            n = Counter.calls
        gate = Counter.gate
        if gate is not None:
            assert gate.wait(10), "test never opened the gate"
        return {"key": key, "n": n}


class Versioned(steadyserve.Service):
    version = "1"
    calls: ClassVar[int] = 0

    @steadyserve.handler(cache=True)
    def predict(self, x: int) -> dict[str, Any]:
        Versioned.calls += 1
        return {"x": x, "model": type(self).version}


class VersionedV2(Versioned):
    version = "2"


@pytest.fixture(autouse=True)
def reset_counters() -> None:
    Squares.calls = Squares.uncached_calls = Squares.rejected_calls = 0
    Squares.gate = None
    Texts.batches = []
    CachedEmbedder.batches = []
    Accounts.balances = {1: 100, 2: 200}
    Accounts.reads = 0
    Accounts.told = []
    Counter.calls = 0
    Counter.gate = None
    Versioned.calls = 0


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.002)


async def background_done(gw: Gateway) -> None:
    await eventually(lambda: not gw._spawned)


def fake_clock(gw: Gateway) -> FakeClock:
    assert gw.cache is not None
    clock = FakeClock(start=time.time())
    gw.cache.clock = clock
    return clock


Post = Callable[..., Awaitable[httpx.Response]]


def poster(client: httpx.AsyncClient, deployment: str, handler: str) -> Post:
    async def post(**body: Any) -> httpx.Response:
        return await client.post(f"/v1/deployments/{deployment}/{handler}", json=body)
    return post


# hit / miss -----------------------------------------------------------------------------------------


async def test_second_identical_request_is_a_hit_and_a_different_input_a_miss(make_gateway):
    _, client, _ = await make_gateway({"sq": (Squares, 2)})
    square = poster(client, "sq", "square")
    first = await square(x=3)
    assert first.status_code == 200 and first.json() == {"y": 9.0}
    assert first.headers[CACHE] == "miss"
    second = await square(x=3)
    assert second.status_code == 200 and second.json() == {"y": 9.0}
    assert second.headers[CACHE] == "hit"
    assert second.headers["x-steadyserve-version"] == "1"
    assert Squares.calls == 1
    # key order and int-for-float are one key after validation
    same = await client.post("/v1/deployments/sq/square", content=b'{"scale": 1, "x": 3}',
                             headers={"content-type": "application/json"})
    assert same.headers[CACHE] == "miss"  # explicit default: another key (documented in test_cache_keys)
    again = await client.post("/v1/deployments/sq/square", content=b'{"scale": 1.0, "x": 3}',
                              headers={"content-type": "application/json"})
    assert again.headers[CACHE] == "hit"
    other = await square(x=4)
    assert other.headers[CACHE] == "miss" and other.json() == {"y": 16.0}
    assert Squares.calls == 3


async def test_cache_status_and_metrics(make_gateway):
    _, client, _ = await make_gateway({"sq": (Squares, 1)})
    square = poster(client, "sq", "square")
    for x in (1, 1, 1, 2):
        await square(x=x)
    r = await client.get("/v1/cache")
    assert r.status_code == 200
    status = r.json()
    assert status["l1"]["entries"] == 2
    assert status["l1"]["hits"] == 2 and status["l1"]["misses"] == 2
    assert status["l1"]["bytes"] > 0
    assert status["l2"] is None
    hot = status["hot_keys"]
    assert hot and hot[0]["key"].startswith("sq/square/v1/") and hot[0]["count"] == 3
    assert len(status["hit_ratio_curve"]["points"]) >= 2
    assert (await client.get("/v1/cache?top=1")).json()["hot_keys"][0] == hot[0]

    text = (await client.get("/metrics")).text
    assert 'steadyserve_cache_items_total{deployment="sq",handler="square",result="hit"} 2.0' in text
    assert 'steadyserve_cache_items_total{deployment="sq",handler="square",result="miss"} 2.0' in text
    assert "steadyserve_cache_hit_ratio_estimate{" in text
    assert 'steadyserve_cache_entries{level="l1"} 2.0' in text


@pytest.mark.parametrize(
    ("query", "status"),
    [("top=1", 200), ("top=1000", 200), ("", 200), ("top=0", 400), ("top=1001", 400),
     ("top=-1", 400), ("top=abc", 400), ("top=%C2%B2", 400), ("top=" + "9" * 5000, 400)],
    ids=["1", "1000", "default", "0", "1001", "negative", "word", "superscript-two", "5000-digits"],
)
async def test_cache_status_top_parameter(make_gateway, query, status):
    _, client, _ = await make_gateway({"sq": (Squares, 1)})
    r = await client.get(f"/v1/cache?{query}")
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == "top"


async def test_cache_disabled_in_config(make_gateway):
    _, client, _ = await make_gateway({"sq": (Squares, 1)}, cache=CacheConfig(enabled=False))
    for _ in range(2):
        r = await poster(client, "sq", "square")(x=2)
        assert r.status_code == 200 and CACHE not in r.headers
    assert Squares.calls == 2
    assert (await client.get("/v1/cache")).status_code == 404


async def test_a_handler_without_cache_is_never_cached(make_gateway):
    _, client, _ = await make_gateway({"sq": (Squares, 1)})
    plain = poster(client, "sq", "plain")
    for _ in range(3):
        r = await plain(x=5)
        assert r.status_code == 200 and r.json() == {"y": 25}
        assert CACHE not in r.headers
    assert Squares.uncached_calls == 3


async def test_cache_control_no_store_bypasses_and_no_cache_recomputes(make_gateway):
    gw, client, _ = await make_gateway({"c": (Counter, 1)})
    fake_clock(gw)  # the 0.2 s TTL never passes

    async def read(cache_control: str | None = None) -> httpx.Response:
        headers = {"cache-control": cache_control} if cache_control else {}
        r = await client.post("/v1/deployments/c/read", json={"key": "k"}, headers=headers)
        assert r.status_code == 200
        return r

    assert (await read()).json()["n"] == 1
    bypass = await read("no-store")
    assert bypass.json()["n"] == 2 and CACHE not in bypass.headers
    hit = await read()
    assert hit.headers[CACHE] == "hit" and hit.json()["n"] == 1  # no-store stored nothing
    fresh = await read("No-Cache")
    assert fresh.headers[CACHE] == "miss" and fresh.json()["n"] == 3
    assert (await read()).json()["n"] == 3  # no-cache stored its fresh answer
    assert (await read("max-age=0")).json()["n"] == 4
    assert (await read("max-age=60")).headers[CACHE] == "hit"
    assert Counter.calls == 4


@pytest.mark.parametrize(("x", "status"), [(-1, 400), (13, 500)], ids=["4xx", "5xx"])
async def test_errors_are_returned_and_never_cached(make_gateway, x, status):
    gw, client, _ = await make_gateway({"sq": (Squares, 1)})
    picky = poster(client, "sq", "picky")
    for n in (1, 2):
        r = await picky(x=x)
        assert r.status_code == status
        assert CACHE not in r.headers
        assert Squares.rejected_calls == n  # a handler's 500 is the request's: never retried
    assert gw.cache is not None and len(gw.cache.l1) == 0
    if status == 400:
        assert r.json()["error"]["param"] == "x"
    ok = await picky(x=1)
    assert ok.status_code == 200 and ok.headers[CACHE] == "miss"


# batched handlers -------------------------------------------------------------------------------------


async def test_a_batched_request_is_served_partly_from_cache(make_gateway):
    _, client, _ = await make_gateway({"t": (Texts, 1)})
    upper = poster(client, "t", "upper")
    r1 = await upper(texts=["a", "b"])
    assert r1.json() == ["A", "B"] and r1.headers[CACHE] == "miss"
    r2 = await upper(texts=["a", "b", "c"])
    assert r2.json() == ["A", "B", "C"]
    assert r2.headers[CACHE] == "partial"
    assert Texts.batches == [["a", "b"], ["c"]]
    r3 = await upper(texts=["c", "x", "a", "x", "b"])  # order kept, duplicates asked once
    assert r3.json() == ["C", "X", "A", "X", "B"] and r3.headers[CACHE] == "partial"
    assert Texts.batches[-1] == ["x"]
    r4 = await upper(texts=["b", "a"])
    assert r4.json() == ["B", "A"] and r4.headers[CACHE] == "hit"
    assert len(Texts.batches) == 3


async def test_openai_embeddings_use_the_cache_per_input(make_gateway):
    _, client, _ = await make_gateway({"emb": (CachedEmbedder, 1)})

    async def embed(texts: list[str]) -> httpx.Response:
        r = await client.post("/v1/embeddings", json={"model": "emb", "input": texts})
        assert r.status_code == 200, r.text
        return r

    r1 = await embed(["x", "y y"])
    assert r1.headers[CACHE] == "miss"
    r2 = await embed(["y y", "z", "x"])
    assert r2.headers[CACHE] == "partial"
    assert CachedEmbedder.batches == [["x", "y y"], ["z"]]
    body = r2.json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    for d, text in zip(body["data"], ["y y", "z", "x"], strict=True):
        np.testing.assert_allclose(d["embedding"], fake_vector(text), rtol=1e-6)
    assert body["usage"]["prompt_tokens"] == 4 + 3 + 3  # tokens come from the cached items too
    r3 = await embed(["z"])
    assert r3.headers[CACHE] == "hit" and len(CachedEmbedder.batches) == 2
    b64 = await client.post("/v1/embeddings", json={"model": "emb", "input": "x",
                                                     "encoding_format": "base64"})
    assert b64.status_code == 200 and b64.headers[CACHE] == "hit"


# singleflight -------------------------------------------------------------------------------------------


async def test_200_concurrent_identical_requests_make_one_upstream_call(make_gateway):
    gw, client, _ = await make_gateway({"sq": (Squares, 2)})
    assert gw.cache is not None
    Squares.gate = threading.Event()
    square = poster(client, "sq", "square")
    tasks = [asyncio.ensure_future(square(x=7)) for _ in range(N_CONCURRENT)]
    await eventually(lambda: gw.cache is not None and gw.cache.flights.coalesced == N_CONCURRENT - 1)
    Squares.gate.set()
    responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * N_CONCURRENT
    assert all(r.json() == {"y": 49.0} for r in responses)
    outcomes = sorted(r.headers[CACHE] for r in responses)
    assert outcomes == ["coalesced"] * (N_CONCURRENT - 1) + ["miss"]
    assert Squares.calls == 1
    assert len(gw.cache.flights) == 0
    assert (await square(x=7)).headers[CACHE] == "hit"


async def test_a_coalesced_waiter_keeps_its_own_deadline(make_gateway):
    _, client, _ = await make_gateway({"sq": (Squares, 1)})
    Squares.gate = threading.Event()
    square = poster(client, "sq", "square")
    leader = asyncio.ensure_future(square(x=1))
    waiter: asyncio.Future[httpx.Response] | None = None
    try:
        await eventually(lambda: Squares.calls == 1)
        waiter = asyncio.ensure_future(client.post(
            "/v1/deployments/sq/square", json={"x": 1}, headers={"x-request-timeout-ms": "100"}))
        done, _ = await asyncio.wait({waiter}, timeout=0.5)
        assert done, "the waiter outlived its 100 ms deadline"
        assert waiter.result().status_code == 504
    finally:
        Squares.gate.set()
        await leader
        if waiter is not None:
            await waiter


async def test_concurrent_identical_requests_to_a_failing_handler_are_not_stampeded(make_gateway):
    _, client, _ = await make_gateway({"sq": (Squares, 1)}, cache=CacheConfig(stale_if_error_s=0))
    picky = poster(client, "sq", "picky")
    responses = await asyncio.gather(*(picky(x=13) for _ in range(50)))
    assert all(r.status_code == 500 for r in responses)
    assert Squares.rejected_calls <= 3  # a few rounds of one call each: a 500 is not retried


# invalidation ---------------------------------------------------------------------------------------------


async def test_a_write_invalidates_the_cached_read_on_every_replica(make_gateway):
    _, client, deployments = await make_gateway({"acct": (Accounts, 2)})
    balance = poster(client, "acct", "balance")
    deposit = poster(client, "acct", "deposit")
    r = await balance(account_id=1)
    assert r.json()["balance"] == 100 and r.headers[CACHE] == "miss"
    assert (await balance(account_id=1)).headers[CACHE] == "hit"
    assert (await balance(account_id=2)).headers[CACHE] == "miss"
    assert Accounts.reads == 2

    w = await deposit(account_id=1, amount=5)
    assert w.status_code == 200 and w.json() == {"balance": 105}
    assert CACHE not in w.headers
    # every replica's Service.invalidate was called with the rendered tag, before the answer
    replica_ids = {id(app.service) for app in deployments["acct"].apps.values()}
    assert {who for who, _ in Accounts.told} == replica_ids
    assert all(tags == ["account:1"] for _, tags in Accounts.told)

    r = await balance(account_id=1)
    assert r.json()["balance"] == 105 and r.headers[CACHE] == "miss"  # no stale read
    assert (await balance(account_id=2)).headers[CACHE] == "hit"  # other accounts untouched
    assert Accounts.reads == 3


async def test_a_write_racing_a_read_keeps_the_old_answer_out_of_the_cache(make_gateway):
    """The read's lookup happens, the write lands and invalidates, then the read's (possibly
    old) answer arrives: it is returned but not stored."""
    gw, client, _ = await make_gateway({"acct": (Accounts, 2)})
    assert gw.cache is not None
    original = Accounts.balance

    def slow_balance(self: Accounts, account_id: int) -> dict[str, int]:
        answer = original(self, account_id)
        assert write_done.wait(5)
        return answer

    write_done = threading.Event()
    Accounts.balance = slow_balance  # type: ignore[method-assign]
    try:
        for app in gw.transport.apps.values():  # type: ignore[attr-defined]
            app.handlers["balance"].fn = slow_balance.__get__(app.service)
        read = asyncio.ensure_future(poster(client, "acct", "balance")(account_id=1))
        await eventually(lambda: Accounts.reads == 1)
        w = await poster(client, "acct", "deposit")(account_id=1, amount=1)
        assert w.status_code == 200
        write_done.set()
        r = await read
        assert r.json()["balance"] == 100  # read before the write: its answer stands
    finally:
        Accounts.balance = original  # type: ignore[method-assign]
    assert len(gw.cache.l1) == 0
    assert gw.cache.l1.stats.refused_stale_loads == 1
    again = await poster(client, "acct", "balance")(account_id=1)
    assert again.json()["balance"] == 101 and again.headers[CACHE] == "miss"


async def test_invalidate_endpoint(make_gateway):
    gw, client, _ = await make_gateway({"acct": (Accounts, 2)})
    balance = poster(client, "acct", "balance")
    await balance(account_id=1)
    await balance(account_id=2)
    r = await client.post("/v1/cache/invalidate", json={"tags": ["account:1", "account:1", "nope"]},
                          headers=admin_headers(gw))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tags"] == ["account:1", "nope"]
    assert body["l1_dropped"] == 1
    assert body["replicas"] == {"told": 2, "failed": 0}
    assert len(Accounts.told) == 2
    assert (await balance(account_id=1)).headers[CACHE] == "miss"
    assert (await balance(account_id=2)).headers[CACHE] == "hit"


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"tags": []}', b'{"tags": "account:1"}', b'{"tags": [1]}', b'{"tags": [""]}',
     b'["account:1"]', b'{"tag": ["account:1"]}', b'{"tags": null}'],
    ids=["no-tags", "empty", "string", "int-item", "empty-item", "list-body", "misspelt", "null"],
)
async def test_invalidate_endpoint_refuses_bad_bodies(make_gateway, body):
    gw, client, _ = await make_gateway({"acct": (Accounts, 1)})
    r = await client.post("/v1/cache/invalidate", content=body,
                          headers={"content-type": "application/json", **admin_headers(gw)})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tags"
    assert "tags" in r.json()["error"]["message"]
    assert Accounts.told == []


async def test_invalidate_endpoint_method_and_json(make_gateway):
    gw, client, _ = await make_gateway({"acct": (Accounts, 1)})
    assert (await client.get("/v1/cache/invalidate", headers=admin_headers(gw))).status_code == 405
    r = await client.post("/v1/cache/invalidate", content=b"{nope",
                          headers={"content-type": "application/json", **admin_headers(gw)})
    assert r.status_code == 400


# stale-while-revalidate / stale-if-error ---------------------------------------------------------------


async def test_stale_while_revalidate_answers_at_once_and_refreshes_once(make_gateway):
    gw, client, _ = await make_gateway(
        {"c": (Counter, 2)}, cache=CacheConfig(stale_while_revalidate_s=30, stale_if_error_s=0))
    assert gw.cache is not None
    clock = fake_clock(gw)
    read = poster(client, "c", "read")
    r = await read(key="k")
    assert r.json() == {"key": "k", "n": 1} and r.headers[CACHE] == "miss"
    assert (await read(key="k")).headers[CACHE] == "hit"

    clock.advance(0.5)  # past the 0.2 s TTL, inside the 30 s window
    Counter.gate = threading.Event()  # hold the background refresh upstream
    for _ in range(5):
        stale = await read(key="k")
        assert stale.status_code == 200
        assert stale.headers[CACHE] == "stale"
        assert stale.json() == {"key": "k", "n": 1}
    await eventually(lambda: Counter.calls == 2)
    Counter.gate.set()
    await background_done(gw)
    assert Counter.calls == 2  # exactly one background refresh reached upstream
    assert gw.cache.counters.refreshes == 1

    fresh = await read(key="k")
    assert fresh.headers[CACHE] == "hit" and fresh.json() == {"key": "k", "n": 2}
    assert Counter.calls == 2


class Tally(steadyserve.Service):
    calls: ClassVar[int] = 0

    @steadyserve.handler
    def count(self, key: str) -> dict[str, Any]:
        Tally.calls += 1
        return {"key": key, "n": Tally.calls}


class ViaTally(steadyserve.Service):
    """A cached pipeline: its answer comes from a child call."""

    @steadyserve.handler(cache=True, cache_ttl_s=0.2)
    async def read(self, key: str) -> dict[str, Any]:
        return await self.deployment("t").count.acall(key=key)  # type: ignore[no-any-return]


async def test_a_background_refresh_calls_on_for_the_key_that_triggered_it(make_gateway):
    """Keys are required: the refresh's child call acts for the stale read's key (it was
    sent keyless and refused, so the stale copy was never refreshed)."""
    ring = KeyRing()
    _, token = make_key(ring, "infer")
    gw, client, _ = await make_gateway(
        {"via": (ViaTally, 1), "t": (Tally, 1)}, keys=ring, calls={"via": ("t",)},
        cache=CacheConfig(stale_while_revalidate_s=30, stale_if_error_s=0))
    Tally.calls = 0
    clock = fake_clock(gw)
    headers = {"authorization": f"Bearer {token}"}

    async def read() -> httpx.Response:
        r = await client.post("/v1/deployments/via/read", json={"key": "k"}, headers=headers)
        assert r.status_code == 200, r.text
        return r

    assert (await read()).json() == {"key": "k", "n": 1}
    clock.advance(0.5)
    assert (await read()).headers[CACHE] == "stale"
    await background_done(gw)
    assert gw.cache is not None and gw.cache.counters.refreshes == 1
    fresh = await read()
    assert fresh.headers[CACHE] == "hit" and fresh.json() == {"key": "k", "n": 2}


async def test_past_the_revalidate_window_a_request_waits_for_upstream(make_gateway):
    gw, client, _ = await make_gateway(
        {"c": (Counter, 1)}, cache=CacheConfig(stale_while_revalidate_s=1, stale_if_error_s=0))
    clock = fake_clock(gw)
    read = poster(client, "c", "read")
    await read(key="k")
    clock.advance(5)
    r = await read(key="k")
    assert r.headers[CACHE] == "miss" and r.json()["n"] == 2
    await background_done(gw)
    assert Counter.calls == 2


async def test_stale_if_error_serves_the_old_answer_when_every_replica_is_down(make_gateway):
    gw, client, deployments = await make_gateway(
        {"c": (Counter, 2)}, cache=CacheConfig(stale_while_revalidate_s=0, stale_if_error_s=300))
    clock = fake_clock(gw)
    read = poster(client, "c", "read")
    assert (await read(key="k")).json()["n"] == 1
    clock.advance(10)  # past the TTL and the (zero) revalidate window
    for replica_id in list(deployments["c"].apps):
        deployments["c"].kill(replica_id)
    r = await read(key="k")
    assert r.status_code == 200, r.text
    assert r.headers[CACHE] == "stale-if-error"
    assert r.json() == {"key": "k", "n": 1}

    started = time.monotonic()
    miss = await read(key="never-cached")
    assert time.monotonic() - started < 2.0
    assert miss.status_code in (502, 503), miss.text
    assert CACHE not in miss.headers

    clock.advance(300)  # past stale_if_error too: the copy is gone
    gone = await read(key="k")
    assert gone.status_code in (502, 503)


async def test_stale_if_error_serves_when_no_replica_is_registered(make_gateway):
    gw, client, deployments = await make_gateway(
        {"c": (Counter, 1)}, cache=CacheConfig(stale_while_revalidate_s=0, stale_if_error_s=300))
    clock = fake_clock(gw)
    read = poster(client, "c", "read")
    await read(key="k")
    clock.advance(10)
    for replica_id in list(deployments["c"].apps):
        gw.membership.remove("c", replica_id)
    r = await read(key="k")
    assert r.status_code == 200 and r.headers[CACHE] == "stale-if-error"
    miss = await read(key="other")
    assert miss.status_code == 503 and "retry-after" in miss.headers


# model versions ---------------------------------------------------------------------------------------------


async def test_an_answer_from_another_model_version_is_not_stored(make_gateway):
    gw, client, _ = await make_gateway({"m": (Versioned, 2)})
    predict = poster(client, "m", "predict")
    assert (await predict(x=1)).headers[CACHE] == "miss"
    assert (await predict(x=1)).headers[CACHE] == "hit"
    d = gw.membership.get("m")
    assert d is not None and d.version == "1"
    d.version = "2"  # a rollout: the gateway expects v2, these replicas still answer v1
    for _ in range(2):
        r = await predict(x=1)
        assert r.headers[CACHE] == "miss"  # the v1 entry is not served under v2
        assert r.json() == {"x": 1, "model": "1"}
    assert Versioned.calls == 3  # the v1 answers were not stored under the v2 key
    d.version = "1"
    assert (await predict(x=1)).headers[CACHE] == "hit"  # the v1 entry itself is intact


async def test_a_new_model_version_does_not_get_old_answers(make_gateway):
    gw, client, _ = await make_gateway({"m": (Versioned, 1)})
    predict = poster(client, "m", "predict")
    assert (await predict(x=1)).json()["model"] == "1"
    assert (await predict(x=1)).headers[CACHE] == "hit"
    # roll out v2: its replica replaces the v1 one (same replica id), the gateway learns v2
    from steadyserve.testing import start_inprocess

    v2 = await start_inprocess(gw, "m", VersionedV2, replicas=1)
    try:
        assert gw.membership.get("m").version == "2"  # type: ignore[union-attr]
        r = await predict(x=1)
        assert r.headers[CACHE] == "miss" and r.json() == {"x": 1, "model": "2"}
        assert r.headers["x-steadyserve-version"] == "2"
        r = await predict(x=1)
        assert r.headers[CACHE] == "hit" and r.json()["model"] == "2"
        assert Versioned.calls == 2
    finally:
        for app in v2.apps.values():
            await app.stop()
