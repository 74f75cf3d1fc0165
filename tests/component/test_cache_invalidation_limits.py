"""Invalidation is bounded, end to end in process: `POST /v1/cache/invalidate` within the [cache]
limits and the explicit `{"all": true}`, handlers declared with `invalidates=` refused before
they run when their input makes an unusable tag, the replica's own `/invalidate` limits, the
gateway's broadcast split to fit them, and the gateway's memory under a flood of unique tags.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any, ClassVar

import httpx
import pytest

import steadyserve
from steadyserve import codec
from steadyserve.cache.invalidation import ALL_TAGS, MESSAGE_MAX_BYTES, MESSAGE_MAX_TAGS
from steadyserve.config import CacheConfig
from steadyserve.gateway.app import Gateway

from .conftest import admin_headers

pytestmark = pytest.mark.asyncio

CACHE = "x-steadyserve-cache"
MiB = 1 << 20


class Profiles(steadyserve.Service):
    """Profiles by user name (a string: a client chooses how long the tag gets)."""

    names: ClassVar[dict[str, str]] = {}
    reads: ClassVar[int] = 0
    writes: ClassVar[int] = 0
    told: ClassVar[list[list[str]]] = []

    @steadyserve.handler(cache=True, cache_tags=("user:{user}",))
    def profile(self, user: str) -> dict[str, str]:
        Profiles.reads += 1
        return {"user": user, "name": Profiles.names.get(user, "?")}

    @steadyserve.handler(cache=True)
    def motd(self) -> dict[str, str]:
        return {"motd": "hello"}  # untagged: depends on no data

    @steadyserve.handler(idempotent=False, invalidates=("user:{user}",))
    def rename(self, user: str, name: str) -> dict[str, str]:
        Profiles.writes += 1
        Profiles.names[user] = name
        return {"user": user, "name": name}

    @steadyserve.handler(cache=True, cache_tags=("{topic}",))
    def news(self, topic: str) -> dict[str, str]:
        Profiles.reads += 1
        return {"topic": topic}

    @steadyserve.handler(idempotent=False, invalidates=("{topic}",))
    def publish(self, topic: str) -> dict[str, str]:
        """The input is the whole tag: "*" would be every tagged entry."""
        Profiles.writes += 1
        return {"topic": topic}

    def invalidate(self, tags: list[str]) -> None:
        Profiles.told.append(list(tags))


@pytest.fixture(autouse=True)
def reset() -> None:
    Profiles.names = {"ann": "Ann", "bob": "Bob"}
    Profiles.reads = Profiles.writes = 0
    Profiles.told = []


async def post(client: httpx.AsyncClient, handler: str, **body: Any) -> httpx.Response:
    return await client.post(f"/v1/deployments/p/{handler}", json=body)


async def invalidate(gw: Gateway, client: httpx.AsyncClient, body: Any) -> httpx.Response:
    return await client.post("/v1/cache/invalidate", json=body, headers=admin_headers(gw))


# the public route -------------------------------------------------------------------------------------


LIMITED = CacheConfig(max_invalidation_tags=5, max_tag_bytes=16, max_tracked_invalidations=50)


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        pytest.param({"tags": [f"t{i}" for i in range(6)]}, 413, "tags", "at most 5 tags",
                     id="over-the-count"),
        pytest.param({"tags": ["user:" + "x" * 12]}, 400, "tags", "17 bytes", id="over-the-length"),
        pytest.param({"tags": ["*"]}, 400, "tags", "reserved", id="the-star"),
        pytest.param({"tags": ["user:ann", "*"]}, 400, "tags", "{\"all\": true}", id="star-among-others"),
        pytest.param({"all": True, "tags": ["user:ann"]}, 400, "tags", "without tags", id="all-and-tags"),
        pytest.param({"all": "yes"}, 400, "all", "true or false", id="all-not-a-bool"),
        pytest.param({"all": False}, 400, "tags", "non-empty list", id="all-false-and-no-tags"),
    ],
)
async def test_the_route_refuses_what_is_over_the_limits(make_gateway, body, status, param, words):
    gw, client, _ = await make_gateway({"p": (Profiles, 2)}, cache=LIMITED)
    assert (await post(client, "profile", user="ann")).headers[CACHE] == "miss"
    r = await invalidate(gw, client, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert Profiles.told == []  # nothing reached the replicas
    assert (await post(client, "profile", user="ann")).headers[CACHE] == "hit"  # nor the cache


async def test_the_route_takes_what_is_within_the_limits(make_gateway):
    gw, client, _ = await make_gateway({"p": (Profiles, 2)}, cache=LIMITED)
    await post(client, "profile", user="ann")
    tags = ["user:ann", *(f"t{i}" for i in range(3)), "x" * 16]  # 5 tags, one of 16 bytes
    r = await invalidate(gw, client, {"tags": tags, "all": False})
    assert r.status_code == 200, r.text
    assert r.json()["l1_dropped"] == 1 and r.json()["replicas"] == {"told": 2, "failed": 0}
    assert Profiles.told == [tags] * 2
    assert (await post(client, "profile", user="ann")).headers[CACHE] == "miss"


async def test_all_drops_every_tagged_entry_on_the_gateway_and_the_replicas(make_gateway):
    gw, client, _ = await make_gateway({"p": (Profiles, 2)})
    assert gw.cache is not None
    for user in ("ann", "bob"):
        assert (await post(client, "profile", user=user)).headers[CACHE] == "miss"
    assert (await post(client, "motd")).headers[CACHE] == "miss"
    r = await invalidate(gw, client, {"all": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tags"] == [ALL_TAGS] and body["l1_dropped"] == 2
    assert body["replicas"] == {"told": 2, "failed": 0}
    assert Profiles.told == [[ALL_TAGS], [ALL_TAGS]]
    for user in ("ann", "bob"):
        assert (await post(client, "profile", user=user)).headers[CACHE] == "miss"
    assert (await post(client, "motd")).headers[CACHE] == "hit"  # untagged: kept
    assert gw.cache.l1.tracked_invalidations == 0  # "all" takes no slot


# handlers declared with invalidates= ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handler", "body", "param", "words"),
    [
        pytest.param("rename", {"user": "x" * 300, "name": "Eve"}, "user", "305 bytes", id="too-long"),
        pytest.param("publish", {"topic": "*"}, "topic", "reserved", id="the-star"),
        pytest.param("publish", {"topic": "t" * 257}, "topic", "at most 256", id="too-long-alone"),
    ],
)
async def test_an_invalidating_call_whose_tag_is_unusable_is_refused_before_it_runs(
        make_gateway, handler, body, param, words):
    _, client, _ = await make_gateway({"p": (Profiles, 2)})  # max_tag_bytes 256 by default
    assert (await post(client, "profile", user="ann")).headers[CACHE] == "miss"
    r = await post(client, handler, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert f"{{{param}}}" in error["message"]  # names the template too
    assert Profiles.writes == 0 and Profiles.names == {"ann": "Ann", "bob": "Bob"}  # it never ran
    assert Profiles.told == []
    assert (await post(client, "profile", user="ann")).headers[CACHE] == "hit"  # nothing flushed


async def test_an_invalidating_call_within_the_limits_runs_and_invalidates(make_gateway):
    _, client, _ = await make_gateway({"p": (Profiles, 2)})
    user = "u" * 251  # "user:" + 251 = 256 bytes: at the limit
    await post(client, "profile", user=user)
    assert (await post(client, "profile", user=user)).headers[CACHE] == "hit"
    r = await post(client, "rename", user=user, name="Long")
    assert r.status_code == 200 and r.json() == {"user": user, "name": "Long"}
    assert Profiles.told == [[f"user:{user}"]] * 2
    again = await post(client, "profile", user=user)
    assert again.headers[CACHE] == "miss" and again.json()["name"] == "Long"


@pytest.mark.parametrize(
    ("handler", "body"),
    [
        pytest.param("profile", {"user": "x" * 300}, id="too-long"),
        pytest.param("news", {"topic": "*"}, id="the-star"),
    ],
)
async def test_an_answer_whose_tag_no_invalidation_may_name_is_not_cached(make_gateway, handler, body):
    gw, client, _ = await make_gateway({"p": (Profiles, 1)})
    assert gw.cache is not None
    answers = [await post(client, handler, **body) for _ in range(2)]
    assert all(r.status_code == 200 and r.headers[CACHE] == "miss" for r in answers)
    assert answers[0].json() == answers[1].json()
    assert Profiles.reads == 2 and len(gw.cache.l1) == 0
    fine = {"profile": {"user": "ann"}, "news": {"topic": "sport"}}[handler]  # the same handler
    assert [(await post(client, handler, **fine)).headers[CACHE] for _ in range(2)] == ["miss", "hit"]


# the replica's own limits, and the broadcast that fits them ---------------------------------------


async def replica_invalidate(make_gateway, body: bytes) -> tuple[httpx.Response, list[list[str]]]:
    _, _, deployments = await make_gateway({"p": (Profiles, 1)})
    app = next(iter(deployments["p"].apps.values()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
        r = await c.post("/invalidate", content=body, headers={"content-type": codec.CONTENT_TYPE})
    return r, Profiles.told


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        pytest.param({"tags": [f"t{i}" for i in range(MESSAGE_MAX_TAGS + 1)]}, 413, "at most 1,000 tags",
                     id="over-the-count"),
        pytest.param({"tags": ["x" * 4097]}, 400, "4,097 bytes", id="over-the-length"),
        pytest.param({"tags": ["a", 7]}, 400, "tags[1]", id="not-a-string"),
        pytest.param({"tags": []}, 400, "non-empty list", id="empty"),
        pytest.param(["a"], 400, "non-empty list", id="not-a-map"),
    ],
)
async def test_the_replica_refuses_invalidations_over_its_limits(make_gateway, body, status, words):
    r, told = await replica_invalidate(make_gateway, codec.encode(body))
    assert r.status_code == status
    error = codec.decode(r.content)["error"]
    assert error["param"] == "tags" and words in error["message"]
    assert told == []


async def test_the_replica_refuses_a_body_over_its_limit_and_garbage(make_gateway):
    r, told = await replica_invalidate(make_gateway, codec.encode({"tags": ["x" * 4000] * 300}))
    assert r.status_code == 413 and "1,048,576 bytes" in codec.decode(r.content)["error"]["message"]
    r, told = await replica_invalidate(make_gateway, b"\xc1 not msgpack")
    assert r.status_code == 400 and codec.decode(r.content)["error"]["param"] == "tags"
    assert told == []


async def test_the_replica_takes_the_all_tag_and_tags_at_its_limits(make_gateway):
    tags = [ALL_TAGS, *(f"t{i}" for i in range(MESSAGE_MAX_TAGS - 2)), "x" * 4096]
    r, told = await replica_invalidate(make_gateway, codec.encode({"tags": tags}))
    assert r.status_code == 200 and codec.decode(r.content) == {"invalidated": MESSAGE_MAX_TAGS}
    assert told == [tags]


async def test_a_broadcast_larger_than_a_message_reaches_every_replica_in_parts(make_gateway):
    cfg = CacheConfig(max_invalidation_tags=2_500, max_tracked_invalidations=5_000)
    gw, client, _ = await make_gateway({"p": (Profiles, 2)}, cache=cfg)
    tags = [f"user:{i:06}" for i in range(2_500)]
    r = await invalidate(gw, client, {"tags": tags})
    assert r.status_code == 200, r.text
    assert r.json()["replicas"] == {"told": 2, "failed": 0}
    # each replica is told in order, the two replicas at once: their messages interleave
    assert sorted(len(m) for m in Profiles.told) == [500, 500, 1000, 1000, 1000, 1000]
    assert sorted(t for m in Profiles.told for t in m) == sorted(tags * 2)
    assert all(len(codec.encode({"tags": m})) <= MESSAGE_MAX_BYTES for m in Profiles.told)


# memory under a flood of unique tags -----------------------------------------------------------------


@pytest.mark.slow  # tracemalloc makes each allocation ~8x slower: 600,000 tags take seconds
async def test_a_flood_of_unique_tags_keeps_the_gateway_within_its_bound(make_gateway):
    """The probe that found the leak: 60 × 10,000 unique tags grew a gateway by 129 MB. Now the
    L1 store remembers at most max_tracked_invalidations tags and its memory stays flat."""
    bound = 20_000
    cfg = CacheConfig(max_invalidation_tags=10_000, max_tracked_invalidations=bound)
    gw, client, _ = await make_gateway({"p": (Profiles, 1)}, cache=cfg)
    assert gw.cache is not None
    l1 = gw.cache.l1
    await post(client, "profile", user="ann")
    await gw.invalidate([f"warmup:{i}" for i in range(bound)])  # reach the bound first
    began = l1.epoch()
    # made before tracing starts (tracing each allocation is slow) and dropped as they are
    # used: what is traced is what the gateway allocates and keeps
    rounds = [[f"flood:{r}:{i:05}" for i in range(10_000)] for r in range(60)]
    Profiles.told = []
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        while rounds:
            await gw.invalidate(rounds.pop())
            assert l1.tracked_invalidations <= bound
            Profiles.told.clear()  # what the fake replica service records is not the gateway's
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = after - before
    print(f"\n60 × 10,000 unique tags: L1 tracks {l1.tracked_invalidations:,} (bound {bound:,}), "
          f"folded {l1.folded_invalidations:,}; traced growth {growth / MiB:.2f} MiB, "
          f"peak {(peak - before) / MiB:.2f} MiB above the start")
    assert l1.tracked_invalidations <= bound
    assert l1.folded_invalidations >= 600_000
    assert growth < 2 * MiB
    # folding forgets invalidations, not entries: ann's answer was never invalidated
    assert (await post(client, "profile", user="ann")).headers[CACHE] == "hit"
    # and an answer whose computation began before the flood is refused, a new one stored
    assert l1.stale_since(("user:ann",), began) and not l1.stale_since(("user:ann",), l1.epoch())
