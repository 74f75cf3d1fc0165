"""Dropping every tagged entry in L2 (the real Redis at 127.0.0.1:6379, each test under its own
key prefix): invalidating ALL_TAGS bumps one generation, so tagged entries of an older one
read as absent and writes computed before it are refused, untagged entries stay, and the
replay after an outage too long to replay one by one does the same. The replay set is bounded.

Without Redis these tests skip, except under CI=true, where they fail."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import redis.asyncio as aioredis

from steadyserve.cache.invalidation import ALL_TAGS
from steadyserve.cache.tiered import ResponseCache
from steadyserve.config import CacheConfig

from .conftest import REDIS_URL, store

pytestmark = pytest.mark.integration




async def test_all_drops_tagged_entries_keeps_untagged_and_refuses_racing_writes(prefix: str) -> None:
    s = await store(prefix)
    try:
        now = time.time()
        _, before = await s.lookup(["k"], ["account:1", ALL_TAGS])  # type: ignore[misc]
        assert before == ["0", "0"]
        assert await s.write("tagged", b"t", now + 60, now + 120, ["account:1"], before[:1], before[1])
        assert await s.write("plain", b"p", now + 60, now + 120, [], [])
        entries, _ = await s.lookup(["tagged", "plain"], [])  # type: ignore[misc]
        assert [e[0] for e in entries] == [b"t", b"p"] and all(len(e) == 4 for e in entries)

        assert await s.invalidate([ALL_TAGS]) == 0  # dropped lazily: one INCR, no scan

        entries, after = await s.lookup(["tagged", "plain"], ["account:1", ALL_TAGS])  # type: ignore[misc]
        assert entries[0] is None and entries[1][0] == b"p"
        assert after == ["0", "1"]  # the tag's own version did not move; the generation did
        # a write computed before the ALL invalidation (old generation) is refused
        assert not await s.write("tagged", b"old", now + 60, now + 120, ["account:1"], before[:1],
                                 before[1])
        assert not await s.write("tagged", b"old", now + 60, now + 120, ["account:1"], before[:1])
        # one computed after it is stored and seen
        assert await s.write("tagged", b"new", now + 60, now + 120, ["account:1"], after[:1], after[1])
        entries, _ = await s.lookup(["tagged"], [])  # type: ignore[misc]
        assert entries[0][0] == b"new"
        # untagged writes carry no generation check: they depend on no data
        assert await s.write("plain", b"p2", now + 60, now + 120, [], [], "stale-generation")
    finally:
        await s.stop()


async def test_an_entry_from_before_generations_reads_as_generation_zero(prefix: str) -> None:
    """Entries written by an older gateway have four fields: valid until the first ALL."""
    s = await store(prefix)
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        body = msgpack.packb([b"legacy", time.time() + 60, time.time() + 120, ["account:9"]],
                             use_bin_type=True)
        await raw.set(f"{prefix}e:legacy", body, px=60_000)
        entries, _ = await s.lookup(["legacy"], [])  # type: ignore[misc]
        assert entries[0][0] == b"legacy"
        await s.invalidate([ALL_TAGS])
        entries, _ = await s.lookup(["legacy"], [])  # type: ignore[misc]
        assert entries[0] is None
    finally:
        await raw.aclose()
        await s.stop()


async def test_too_many_invalidations_while_down_drop_every_tagged_entry_on_reconnect(prefix: str) -> None:
    s = await store(prefix, max_pending_invalidations=3)
    try:
        now = time.time()
        _, tokens = await s.lookup([], ["account:1", ALL_TAGS])  # type: ignore[misc]
        assert await s.write("tagged", b"t", now + 60, now + 120, ["account:1"], tokens[:1], tokens[1])
        assert await s.write("plain", b"p", now + 60, now + 120, [], [])
        s.up = False  # as after a failed call: invalidations are remembered, not sent
        for i in range(4):
            assert await s.invalidate([f"other:{i}"]) is None
        assert s._pending == set() and s._lost  # bounded: beyond 3, one flag instead
        assert await s._reconnect()
        assert s.up and not s._lost
        entries, versions = await s.lookup(["tagged", "plain"], [ALL_TAGS])  # type: ignore[misc]
        assert entries[0] is None and entries[1][0] == b"p" and versions == ["1"]
        # a write queued before the outage (old generation) is refused after it
        assert not await s.write("tagged", b"t", now + 60, now + 120, ["account:1"], tokens[:1],
                                 tokens[1])
    finally:
        await s.stop()


async def test_all_through_the_response_cache_reaches_the_other_gateway(prefix: str) -> None:
    cfg = CacheConfig(redis_url=REDIS_URL, redis_prefix=prefix, redis_timeout_s=0.5)
    heard: list[list[str]] = []

    async def told(tags: list[str]) -> None:
        heard.append(tags)

    one = ResponseCache(cfg, origin="one")
    two = ResponseCache(cfg, origin="two", on_remote_invalidate=told)
    await one.start()
    await two.start()
    try:
        await asyncio.sleep(0.3)  # both subscribed
        found, tokens = await one.lookup(["t", "p"], [("account:3",), ()])
        assert found == [None, None] and tokens.l2 is not None and ALL_TAGS in tokens.l2
        assert one.store("t", b"tagged", ttl_s=60, tags=("account:3",), tokens=tokens)
        assert one.store("p", b"plain", ttl_s=60, tags=(), tokens=tokens)
        deadline = time.monotonic() + 3
        while one.counters.l2_writes < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # the L2 writes are in the background
        assert one.counters.l2_writes == 2
        hits, _ = await two.lookup(["t", "p"], [("account:3",), ()])
        assert [h.payload if h else None for h in hits] == [b"tagged", b"plain"]

        body = await one.invalidate([ALL_TAGS])
        assert body["l1_dropped"] == 1 and body["l2"] == "up"
        while not heard and time.monotonic() < deadline + 3:  # noqa: ASYNC110 (pub/sub)
            await asyncio.sleep(0.02)
        assert heard == [[ALL_TAGS]]  # the other gateway told its replicas
        assert "t" not in two.l1 and "p" in two.l1  # and dropped its own tagged copies
        two.l1.clear()
        hits, _ = await two.lookup(["t", "p"], [("account:3",), ()])
        assert hits[0] is None and hits[1] is not None and hits[1].level == "l2"
    finally:
        await one.stop()
        await two.stop()
