"""The Redis wrapper against the real Redis at 127.0.0.1:6379 (each test under its own key
prefix): entries round-trip, writes racing an invalidation are refused, invalidations reach
the other gateways, and a dead Redis degrades to "nothing" without raising.

Without Redis these tests skip, except under CI=true, where they fail."""

from __future__ import annotations

import asyncio
import time

import pytest

from steadyserve.cache.redis_store import RedisStore
from steadyserve.cache.tiered import ResponseCache
from steadyserve.config import CacheConfig

from .conftest import REDIS_URL, store

pytestmark = pytest.mark.integration




async def test_entries_and_tag_versions_round_trip(prefix: str) -> None:
    s = await store(prefix)
    try:
        now = time.time()
        assert await s.lookup(["k1"], ["account:1"]) == ([None], ["0"])
        assert await s.write("k1", b"payload", now + 60, now + 120, ["account:1"], ["0"])
        entries, versions = await s.lookup(["k1", "k2"], ["account:1"])  # type: ignore[misc]
        assert entries[0][:2] == [b"payload", pytest.approx(now + 60)]
        assert entries[1] is None and versions == ["0"]
    finally:
        await s.stop()


async def test_an_answer_marked_wrong_is_forgotten_by_key(prefix: str) -> None:
    s = await store(prefix)
    try:
        now = time.time()
        for key in ("k1", "k2"):
            assert await s.write(key, b"payload", now + 60, now + 120, [], [])
        assert await s.forget(["k1", "never-stored"]) == 1
        entries, _ = await s.lookup(["k1", "k2"], [])  # type: ignore[misc]
        assert entries[0] is None and entries[1] is not None  # only the wrong one went
        assert await s.forget([]) == 0
    finally:
        await s.stop()


async def test_a_write_computed_before_an_invalidation_is_refused(prefix: str) -> None:
    s = await store(prefix)
    try:
        now = time.time()
        _, versions = await s.lookup(["k1"], ["account:7"])  # type: ignore[misc]
        assert await s.invalidate(["account:7"]) == 0  # an update lands while k1 is computed
        assert not await s.write("k1", b"old", now + 60, now + 120, ["account:7"], versions)
        assert (await s.lookup(["k1"], []))[0] == [None]  # type: ignore[index]
        _, fresh = await s.lookup(["k1"], ["account:7"])  # type: ignore[misc]
        assert fresh == ["1"]
        assert await s.write("k1", b"new", now + 60, now + 120, ["account:7"], fresh)
        assert await s.invalidate(["account:7"]) == 1  # drops it, and only tagged entries
    finally:
        await s.stop()


async def test_invalidations_reach_the_other_gateway_and_not_the_sender(prefix: str) -> None:
    heard: dict[str, list[list[str]]] = {"a": [], "b": []}

    async def on(origin: str, tags: list[str]) -> None:
        heard[origin].append(tags)

    a = await store(prefix, "a", on_invalidate=lambda tags: on("a", tags))
    b = await store(prefix, "b", on_invalidate=lambda tags: on("b", tags))
    try:
        await asyncio.sleep(0.3)  # both subscribed
        await a.invalidate(["account:1", "account:2"])
        deadline = time.monotonic() + 3
        while not heard["b"] and time.monotonic() < deadline:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.02)
        assert heard == {"a": [], "b": [["account:1", "account:2"]]}
    finally:
        await a.stop()
        await b.stop()


async def test_the_sender_waits_until_the_other_gateways_dropped_their_copies(prefix: str) -> None:
    dropped_at: list[float] = []

    async def slow_drop(tags: list[str]) -> None:
        await asyncio.sleep(0.3)  # e.g. telling its replicas
        dropped_at.append(time.monotonic())

    a = await store(prefix, "a")
    b = await store(prefix, "b", on_invalidate=slow_drop)
    c = await store(prefix, "c", on_invalidate=slow_drop)
    try:
        await asyncio.sleep(0.5)  # all subscribed
        started = time.monotonic()
        await a.invalidate(["account:5"])
        returned = time.monotonic()
        assert a.last_acks == (2, 2)
        assert len(dropped_at) == 2 and max(dropped_at) <= returned
        assert 0.3 <= returned - started < 1.0
        c.ack_timeout_s = 0.2  # a slow gateway delays the writer at most this long
        b.on_invalidate = lambda tags: asyncio.sleep(5)
        started = time.monotonic()
        await c.invalidate(["account:6"])
        assert c.last_acks == (1, 2) and c.ack_timeouts == 1  # a answered, b did not in time
        assert time.monotonic() - started < 0.6
    finally:
        for s in (a, b, c):
            s._stopping = True
        for s in (a, b, c):
            await s.stop()


async def test_a_gateway_sees_entries_another_stored_and_drops_them_on_invalidation(prefix: str) -> None:
    cfg = CacheConfig(redis_url=REDIS_URL, redis_prefix=prefix, redis_timeout_s=0.5)
    one, two = ResponseCache(cfg, origin="one"), ResponseCache(cfg, origin="two")
    await one.start()
    await two.start()
    try:
        found, tokens = await one.lookup(["k"], [("account:3",)])
        assert found == [None]
        assert one.store("k", b"answer", ttl_s=60, tags=("account:3",), tokens=tokens)
        deadline = time.monotonic() + 3
        hit = None
        while time.monotonic() < deadline:
            [hit], _ = await two.lookup(["k"], [("account:3",)])
            if hit is not None:
                break
            await asyncio.sleep(0.02)  # the L2 write is in the background
        assert hit is not None and (hit.payload, hit.level) == (b"answer", "l2")
        assert "k" in two.l1  # copied into the second gateway's L1
        await one.invalidate(["account:3"])
        while "k" in two.l1 and time.monotonic() < deadline + 3:  # noqa: ASYNC110 (pub/sub)
            await asyncio.sleep(0.02)
        assert "k" not in two.l1  # pub/sub reached the other gateway's L1
        [gone], _ = await two.lookup(["k"], [("account:3",)])
        assert gone is None
    finally:
        await one.stop()
        await two.stop()


async def test_a_dead_redis_answers_nothing_quickly_and_remembers_invalidations() -> None:
    s = RedisStore("redis://127.0.0.1:1/0", origin="a", timeout_s=0.05, retry_s=0.1)
    await s.start()  # never raises
    try:
        assert not s.up
        started = time.monotonic()
        assert await s.lookup(["k"], ["t"]) is None
        assert not await s.write("k", b"v", time.time() + 1, time.time() + 2, [], [])
        assert await s.invalidate(["account:1"]) is None
        assert time.monotonic() - started < 0.05  # while down, no per-call timeouts
        assert s._pending == {"account:1"}  # replayed when Redis is back
    finally:
        await s.stop()
